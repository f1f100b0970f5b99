"""agnews-lora: LoRA fine-tuning of pretrained encoders for AG News topic classification."""

import os

# bf16 matrix products on CPU run oneDNN kernels built for each shape (2-6 ms per build on the
# 2-core dev machine, against 0.1-2 ms per call) and kept in a cache of 1,024 kernels by default.
# A training run meets about 26 kernel shapes per batch width (forward and backward products of the
# dense layers, LoRA and attention) and, on AG News, 65-100 batch widths: the default cache
# thrashes and kernels are rebuilt step after step (benchmarks/kernel_cache.py measures it). oneDNN
# reads the capacity when the process builds its first kernel, so it is set here, at import; a
# value already in the environment wins.
ONEDNN_KERNEL_CACHE = 16384
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_KERNEL_CACHE))
