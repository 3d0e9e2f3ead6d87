"""``conv2d`` and ``Conv2d``: a dense convolution (Xception's stem) on a ``kernels`` backend.

Xception's stem is two dense 3x3 convolutions, and at batch 8 the second one's output (64 channels at
147x147) is 44 MB. glibc maps a block of 32 MiB or more afresh on every allocation, so each call of
ATen's convolution there faults its output's pages in one by one (10,805 faults, about a third of the
call's time on the 2-core development machines). The ``cpp`` backend's ``conv2d`` op gathers each
block of output pixels' input windows (taps x input channels) into an L2-resident tile, multiplies it
by the weight with the separable forward's GEMM micro-kernel, and writes a result recycled by its
buffer cache (kernels/csrc/buffer_cache.h). Where ATen's result would not be mapped afresh, oneDNN's
convolution was the faster (the stem's 32->64 at batch 1, its 3->32 at any batch: see
docs/cpu-backends.md), so the kernel runs only on channels_last float32/float64 CPU input whose
result is at least 32 MiB, with groups 1 and numeric padding, where ``backend`` resolves to ``cpp``;
every other call is ``F.conv2d``. The backward is ATen's (oneDNN) from the saved input and weight.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._args import IntOrPair, _pair, check_tensor, conv_module_args, output_size
from .dispatch import BackendAttribute, channels_last_cpp_applies, check_backend_name

# glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): blocks this large or larger
# are mapped afresh on every allocation.
FRESH_MAPPING_BYTES = 32 << 20


def _result_bytes(input: torch.Tensor, weight: torch.Tensor, stride, padding, dilation) -> int:
    oh = output_size(input.shape[2], padding[0], padding[0], weight.shape[2], stride[0], dilation[0])
    ow = output_size(input.shape[3], padding[1], padding[1], weight.shape[3], stride[1], dilation[1])
    return input.shape[0] * weight.shape[0] * oh * ow * input.element_size()


def _uses_kernel(input, weight: torch.Tensor, bias: Optional[torch.Tensor], stride, padding, dilation,
                 groups: int, backend: str) -> bool:
    if not isinstance(input, torch.Tensor) or input.dim() != 4 or weight.dim() != 4:
        return False
    if groups != 1 or weight.shape[1] != input.shape[1]:
        return False
    if _result_bytes(input, weight, stride, padding, dilation) < FRESH_MAPPING_BYTES:
        return False
    return channels_last_cpp_applies(input, (weight, bias), backend)


def conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``F.conv2d(input, weight, bias, stride, padding, dilation, groups)`` (numeric padding).

    The ``cpp`` kernel runs where ``backend`` resolves to ``cpp`` on channels_last float32/float64 CPU
    input with groups 1 and a result of at least 32 MiB (no autocast); every other call is
    ``F.conv2d``. Same values as ``F.conv2d`` up to float rounding; the backward is ATen's.
    """
    check_tensor("input", input)
    check_tensor("weight", weight, 4)
    if weight.shape[2] == 0 or weight.shape[3] == 0:
        raise ValueError(f"weight must have a kernel of at least 1x1, got shape {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, 1)
    step = _pair("stride", stride, minimum=1)
    pad = _pair("padding", padding, minimum=0)
    spacing = _pair("dilation", dilation, minimum=1)
    check_backend_name(backend)
    if not _uses_kernel(input, weight, bias, step, pad, spacing, groups, backend):
        return F.conv2d(input, weight, bias, step, pad, spacing, groups)
    return torch.ops.sepconv_cpp.conv2d.default(input, weight, bias, step, pad, spacing)


class Conv2d(BackendAttribute, nn.Conv2d):
    """``nn.Conv2d`` whose calls run the :func:`conv2d` kernel on ``backend`` where it applies.

    The same arguments (``backend`` keyword-only, after them), parameters, initialisation (under the same
    seed) and ``state_dict`` as ``nn.Conv2d``; ``isinstance(module, nn.Conv2d)`` holds, so code that folds
    a BatchNorm into a convolution treats it as one. String padding (``"same"``) and padding modes other
    than ``"zeros"`` always take ``nn.Conv2d``'s own forward.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Union[int, Tuple[int, int]],
                 stride: Union[int, Tuple[int, int]] = 1, padding: Union[int, Tuple[int, int], str] = 0,
                 dilation: Union[int, Tuple[int, int]] = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", device=None, dtype=None, *, backend: str = "auto") -> None:
        kernel_size, stride, padding, dilation = conv_module_args(kernel_size, stride, padding, dilation)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device=device, dtype=dtype)
        self.backend = backend

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._forward_with(input, self.weight, self.bias)

    def _forward_with(self, input: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
        """``forward`` with ``weight`` and ``bias`` in place of the module's (a BatchNorm folded into them:
        ``kernels.separable_conv2d_batch_norm`` in evaluation)."""
        # nn.Conv2d's own forward (and its errors) wherever the kernel does not run, without conv2d's
        # argument checks: its parameters were checked when it was built.
        if (isinstance(self.padding, str) or self.padding_mode != "zeros"
                or not _uses_kernel(input, weight, bias, self.stride, self.padding, self.dilation,
                                    self.groups, self.backend)):
            return self._conv_forward(input, weight, bias)
        return torch.ops.sepconv_cpp.conv2d.default(input, weight, bias, list(self.stride),
                                                    list(self.padding), list(self.dilation))

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", backend={self.backend!r}" if self.backend != "auto" else "")
