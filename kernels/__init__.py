"""Fast depthwise-separable convolution for PyTorch.

    from kernels import separable_conv2d, SeparableConv2d, available_backends

Backends: ``torch`` (ATen reference ops), ``cpp`` (fused C++ CPU kernels),
``triton`` (fused Triton kernels for CUDA; CPU under ``TRITON_INTERPRET=1``).
"""

from . import ops  # noqa: F401  (defines the torch.library ops)
from .autograd import SeparableConv2dFunction
from .dispatch import BackendUnavailableError, available_backends, resolve as resolve_backend
from .functional import separable_conv2d
from .module import SeparableConv2d
from .pooling import max_pool2d_add
from .reference import separable_conv2d_reference

__all__ = [
    "BackendUnavailableError",
    "SeparableConv2d",
    "SeparableConv2dFunction",
    "available_backends",
    "max_pool2d_add",
    "resolve_backend",
    "separable_conv2d",
    "separable_conv2d_reference",
]
__version__ = "0.1.0"
