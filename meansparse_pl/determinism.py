"""Reproducible numbers on GPUs: what Lightning's ``deterministic`` option does, and the one thing it leaves.

``--trainer.deterministic true`` (``Trainer(deterministic=True)``, set by the demo config) makes Lightning call
``torch.use_deterministic_algorithms(True)``, turn off cuDNN's autotuner and make cuDNN deterministic, and set
``CUBLAS_WORKSPACE_CONFIG`` for deterministic cuBLAS. It leaves TensorFloat-32: on Ampere and newer GPUs
PyTorch runs float32 convolutions in TF32 by default (10-bit mantissa), so a float32 model's features, and the
band decisions on them, differ from the CPU's float32 ones. :func:`float32_reference_math` turns TF32 off for
convolutions and matrix products; the CLI applies it whenever the trainer is deterministic. Seeds are per
device already: ``torch.manual_seed`` (and so ``seed_everything`` and every attack's seed) seeds the CPU and
every CUDA device.

Cost on a GPU: deterministic algorithms are often slower (some backward kernels, e.g. scatter-add, fall back to
sorted or serialised versions; an op without a deterministic kernel raises instead), and full float32 instead of
TF32 runs convolutions at a fraction of the tensor-core rate.
"""

from __future__ import annotations

import torch


def float32_reference_math(enabled: bool = True) -> None:
    """With ``enabled``, float32 convolutions and matrix products in full float32 (no TF32), as on a CPU;
    without, PyTorch's defaults (TF32 for cuDNN convolutions, full float32 for matrix products)."""
    torch.backends.cudnn.allow_tf32 = not enabled
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def tf32_enabled() -> bool:
    """Whether any float32 work may run in TF32 now."""
    return bool(torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)
