"""Losses: cross-entropy and temperature-scaled knowledge distillation as pure functions, and
DistillTerm, distillation as one more loss term of `train`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from agnews_lora.errors import ConfigError


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy in fp32 (logits may come out of bf16 autocast), against
    (1 - label_smoothing) * one-hot + label_smoothing / classes."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float, alpha: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y).

    Args:
        student_logits: [batch, classes].
        teacher_logits: [batch, classes], no gradient.
        labels: gold labels [batch].
        temperature: T > 0; the T^2 factor keeps the KD gradients' scale independent of T.
        alpha: weight of the KD term in [0, 1]; 0 is plain cross-entropy.
        label_smoothing: for the cross-entropy term.

    Returns:
        The scalar loss (batch mean; KL summed over classes).
    """
    ce = cross_entropy(student_logits, labels, label_smoothing)
    if alpha == 0:
        return ce
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().detach() / temperature, dim=-1)
    kl = F.kl_div(s, t, reduction="batchmean", log_target=True)
    return alpha * temperature**2 * kl + (1 - alpha) * ce


@dataclass(frozen=True)
class DistillTerm:
    """Distillation as one more loss term: `distillation_loss` against teacher logits computed once.

    `distill` builds it from the teacher-logit artifact (runs.TeacherLogits); `train` takes the
    teacher's logits for its own training rows by row identity (`aligned`) and records
    `summary()` in summary.json.
    """

    logits: np.ndarray  # [rows, classes]: the teacher's, one row per entry of `rows`
    rows: np.ndarray  # the identity (data.row_ids) of the text each row of `logits` belongs to
    temperature: float
    alpha: float
    key: str  # the artifact's key (teacher.json points to the artifact)
    teacher: str  # the teacher as resolved: a run folder, a model folder or a Hub id
    teacher_kind: str  # "run" or "model"
    teacher_mode: str  # "finetuned" or "frozen"
    teacher_val_accuracy: float | None  # on the student's validation rows (None: none)
    logits_seconds: float  # spent on the logits for this run; 0.0 when the cache served them
    logits_cached: bool

    def __post_init__(self):
        if len(self.logits) != len(self.rows):
            raise ValueError(f"DistillTerm: {len(self.logits)} rows of logits for {len(self.rows)} row ids")

    def aligned(self, rows: np.ndarray) -> np.ndarray:
        """The teacher's logits for `rows` (row ids), in that order.

        Raises:
            ConfigError: some of the rows have no teacher logits (they were computed for other rows).
        """
        rows = np.asarray(rows, dtype=np.uint64)
        if np.array_equal(rows, self.rows):
            return self.logits
        order = np.argsort(self.rows, kind="stable")
        pos = np.minimum(np.searchsorted(self.rows[order], rows), max(len(order) - 1, 0))
        found = self.rows[order][pos] == rows if len(order) else np.zeros(len(rows), dtype=bool)
        if not found.all():
            first = int(np.flatnonzero(~found)[0])
            raise ConfigError(f"teacher logits {self.key}: {int((~found).sum())} of the {len(rows)} training rows "
                              f"have none (the first is row {first}); they were computed for other rows. "
                              "Compute them for this config's rows (agnews_lora.distill.teacher_logits)")
        return self.logits[order[pos]]

    def loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
             label_smoothing: float = 0.0) -> torch.Tensor:
        """`distillation_loss` at this term's temperature and alpha."""
        return distillation_loss(student_logits, teacher_logits, labels, temperature=self.temperature,
                                 alpha=self.alpha, label_smoothing=label_smoothing)

    def summary(self) -> dict:
        """The "distill" entry of summary.json."""
        return {"teacher": self.teacher, "teacher_kind": self.teacher_kind, "teacher_mode": self.teacher_mode,
                "temperature": self.temperature, "alpha": self.alpha,
                "teacher_val_accuracy": self.teacher_val_accuracy, "teacher_logits_seconds": self.logits_seconds,
                "teacher_logits_cached": self.logits_cached}


def orthogonality_penalty(left: list[torch.Tensor], right: list[torch.Tensor]) -> torch.Tensor | float:
    """AdaLoRA's regulariser: the mean over matrices of ||P P^T - I||_F for each `left` matrix
    (rows should be orthonormal: lora_A, [r, in]) and ||Q^T Q - I||_F for each `right` matrix
    (columns: lora_B, [out, r]), as peft adds it when labels go through its forward. fp32."""
    terms = []
    for matrix, rows in [(m, True) for m in left] + [(m, False) for m in right]:
        m = matrix.float()
        cov = m @ m.T if rows else m.T @ m
        terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)))
    return torch.stack(terms).mean() if terms else 0.0
