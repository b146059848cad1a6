"""Per-layer norm and routing kernels, one file per layer type, registered by decorator.

Importing this package fills ``KERNELS`` (type → kernel). See ``base.py`` for the kernel contract.
"""

from . import conv, embedding, group_norm, layer_norm, linear, rms_norm  # noqa: F401  (registration)
from .base import (
    CAPTURES,
    KERNELS,
    MATERIALISE_BUDGET,
    VALIDATORS,
    Call,
    Capture,
    Kernel,
    LayerGrads,
    Request,
    register_kernel,
    trainable,
)
from .fallback import fallback_kernel

__all__ = [
    "CAPTURES",
    "KERNELS",
    "MATERIALISE_BUDGET",
    "VALIDATORS",
    "Call",
    "Capture",
    "Kernel",
    "LayerGrads",
    "Request",
    "fallback_kernel",
    "register_kernel",
    "trainable",
]
