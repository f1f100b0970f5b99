"""Losses as pure functions: cross-entropy and temperature-scaled knowledge distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
