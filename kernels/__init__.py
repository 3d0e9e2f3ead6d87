"""Fast depthwise-separable convolution for PyTorch.

    from kernels import separable_conv2d, SeparableConv2d, available_backends

Backends: ``torch`` (ATen reference ops), ``cpp`` (fused C++ CPU kernels),
``triton`` (fused Triton kernels for CUDA; CPU under ``TRITON_INTERPRET=1``).
On CUDA, ``backend="auto"`` picks per layer from recorded GPU measurements;
``kernels.tune(True)`` times the candidates on this GPU instead (docs/gpu-dispatch.md).
"""

import torch

from . import ops  # noqa: F401  (defines the torch.library ops)
from .autograd import SeparableConv2dFunction
from .batch_norm import BatchNorm2d, batch_norm, batch_norm_folded, run_sequential, separable_conv2d_batch_norm
from .conv import Conv2d, conv2d
from .decompositions import decompositions
from .dispatch import BackendUnavailableError, available_backends, cpp_build_info, resolve as resolve_backend
from .functional import separable_conv2d
from .gpu_dispatch import tune
from .module import SeparableConv2d
from .pointwise import PointwiseConv2d, pointwise_conv2d
from .pooling import max_pool2d_add
from .reference import separable_conv2d_reference

__all__ = [
    "BackendUnavailableError",
    "BatchNorm2d",
    "Conv2d",
    "PointwiseConv2d",
    "SeparableConv2d",
    "SeparableConv2dFunction",
    "available_backends",
    "batch_norm",
    "batch_norm_folded",
    "conv2d",
    "cpp_build_info",
    "decompositions",
    "empty_cache",
    "max_pool2d_add",
    "pointwise_conv2d",
    "resolve_backend",
    "run_sequential",
    "separable_conv2d",
    "separable_conv2d_batch_norm",
    "separable_conv2d_reference",
    "tune",
]


def empty_cache() -> int:
    """Free the idle blocks of the ``cpp`` backend's buffer cache; return the bytes freed (0 when the
    backend is not loaded). See README, "Memory"."""
    from . import cpp_backend

    if cpp_backend.library_location() is None:
        return 0
    return int(torch.ops.sepconv_cpp.empty_cache())


__version__ = "0.1.0"
