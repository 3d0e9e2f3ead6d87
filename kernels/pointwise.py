"""``pointwise_conv2d`` and ``PointwiseConv2d``: a 1x1 convolution (a residual shortcut) on a ``kernels`` backend.

The strided blocks of Xception (and the downsampling blocks of ResNets) add a 1x1, stride 2
convolution of the block's input to the block's output. That is the separable op's second stage
alone: the ``cpp`` backend runs it as the separable op with a 1x1 identity depthwise stage (each
hidden value is an input value times 1.0, exact), so its GEMM micro-kernel forms the output, and
in the backward the weight gradient, and scatters the input gradient into a recycled buffer.
Against ATen's oneDNN convolution on channels_last float32 input, forward and backward together
took less time at every shortcut of Xception (batch 1 and 8, AVX-512 and AVX2: see docs/cpu-backends.md);
the forward alone, the unstrided case and NCHW input were mixed. So the kernel runs only where a
graph is recorded, the stride is more than 1 and the input is channels_last; every other call is
``F.conv2d``, whatever ``backend`` says.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._args import IntOrPair, _pair, check_tensor
from .autograd import needs_autograd
from .dispatch import BackendAttribute, channels_last_cpp_applies, check_backend_name
from .functional import separable_conv2d


def _uses_kernel(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: list,
                 backend: str) -> bool:
    if max(stride) < 2 or not needs_autograd((input, weight, bias)):
        return False
    return channels_last_cpp_applies(input, (weight, bias), backend)


def identity_depthwise(input: torch.Tensor) -> torch.Tensor:
    """The (C, 1, 1, 1) weight of ones that runs a 1x1 convolution as the separable op (times 1.0: exact)."""
    return torch.ones((input.shape[-3], 1, 1, 1), dtype=input.dtype, device=input.device)


def pointwise_conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntOrPair = 1,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``F.conv2d(input, weight, bias, stride)`` for a 1x1 ``weight`` (no padding, dilation or groups).

    Args:
        input: ``(N, C_in, H, W)`` or unbatched ``(C_in, H, W)``.
        weight: ``(C_out, C_in, 1, 1)``. bias: ``(C_out,)`` or None.
        stride: int or pair.
        backend: ``"auto"`` or a ``kernels`` backend name. The ``cpp`` kernel runs where that resolves
            to ``cpp`` for a call that records a graph on channels_last float32/float64 CPU input with a
            stride above 1 (no autocast); every other call is ``F.conv2d``.

    Returns:
        ``(N, C_out, H_out, W_out)``, in the input's memory format.
    """
    check_tensor("input", input)
    check_tensor("weight", weight, 4)
    if input.dim() not in (3, 4):
        raise ValueError(f"input must be 3-D (C, H, W) or 4-D (N, C, H, W), got shape {tuple(input.shape)}")
    channels = input.shape[-3]
    if tuple(weight.shape[1:]) != (channels, 1, 1):
        raise ValueError(f"weight must be (C_out, {channels}, 1, 1) for input with {channels} channels, "
                         f"got shape {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, 1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must be ({weight.shape[0]},), one value per output channel, "
                             f"got shape {tuple(bias.shape)}")
    step = _pair("stride", stride, minimum=1)
    check_backend_name(backend)
    if not _uses_kernel(input, weight, bias, step, backend):
        return F.conv2d(input, weight, bias, step)
    return separable_conv2d(input, identity_depthwise(input), weight, None, bias, step, 0, backend="cpp")


class PointwiseConv2d(BackendAttribute, nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, 1, stride, bias=bias)`` whose calls go through
    :func:`pointwise_conv2d` on ``backend``.

    Arguments after ``out_channels`` are keyword-only (``nn.Conv2d``'s third positional argument is the
    kernel size). The same parameters, initialisation (under the same seed) and ``state_dict`` as that
    ``nn.Conv2d``; ``isinstance(module, nn.Conv2d)`` holds, so code that folds a BatchNorm into a
    convolution or walks a model's convolutions treats it as one.
    """

    def __init__(self, in_channels: int, out_channels: int, *, stride: Union[int, Tuple[int, int]] = 1,
                 bias: bool = True, backend: str = "auto", device=None, dtype=None) -> None:
        stride = tuple(_pair("stride", stride, minimum=1))  # nn.Conv2d takes a zero stride and fails when called
        super().__init__(in_channels, out_channels, 1, stride, bias=bias, device=device, dtype=dtype)
        self.backend = backend

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._forward_with(input, self.weight, self.bias)

    def _forward_with(self, input: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
        """``forward`` with ``weight`` and ``bias`` in place of the module's (a BatchNorm folded into them:
        ``kernels.separable_conv2d_batch_norm`` in evaluation)."""
        # A call that records no graph, or an unstrided one, is nn.Conv2d's whatever the backend:
        # straight there, without pointwise_conv2d's checks (10-15 us a call at batch 1).
        if max(self.stride) < 2 or not needs_autograd((input, weight, bias)):
            return self._conv_forward(input, weight, bias)
        return pointwise_conv2d(input, weight, bias, self.stride, backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", backend={self.backend!r}" if self.backend != "auto" else "")
