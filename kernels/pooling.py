"""``max_pool2d_add``: max pooling and a residual sum in one pass.

The strided blocks of Xception end in ``max_pool2d(rep(x), 3, 2, 1) + shortcut(x)``.
ATen's CPU max pool also writes an int64 index per output element, and the sum is a
second pass over the pooled tensor; the ``cpp`` backend's ``max_pool2d_add`` op does
both in one pass without indices. Its backward finds each window's maximum again in the
saved input (ATen's choice among ties and NaNs) and writes the input gradient in one
pass into a recycled buffer (ATen zeroes a fresh one, then scatters); the residual's
gradient is the output gradient itself. Every backend but ``cpp`` runs
``F.max_pool2d(...) + residual``. The two give the same bits forward (a maximum is exact,
and the sum is one rounding either way) and backward.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._args import IntOrPair, _pair, check_tensor, memory_format_of, pooled_shape
from .autograd import needs_autograd
from .dispatch import check_backend_name, resolve


def max_pool2d_add(
    input: torch.Tensor,
    residual: torch.Tensor,
    kernel_size: IntOrPair,
    stride: Optional[IntOrPair] = None,
    padding: IntOrPair = 0,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``F.max_pool2d(input, kernel_size, stride, padding) + residual``.

    Args:
        input: ``(N, C, H, W)``, NCHW or channels_last (the output follows it).
        residual: ``(N, C, H_out, W_out)``, the pooled shape (no broadcasting).
        kernel_size, stride (default ``kernel_size``), padding: int or pair, as for
            ``F.max_pool2d`` (dilation 1, floor mode, ``padding <= kernel_size / 2``).
        backend: ``"auto"`` or a ``kernels`` backend name. The one-pass kernel runs where that
            resolves to ``cpp`` (float32/float64 CPU tensors, no autocast; channels_last input
            when a graph is recorded); every other call, whatever ``backend`` says, is
            ``F.max_pool2d(...) + residual``.
    """
    check_tensor("input", input, 4)
    check_tensor("residual", residual, 4)
    kernel = _pair("kernel_size", kernel_size, minimum=1)
    step = kernel if stride is None else _pair("stride", stride, minimum=1)
    pad = _pair("padding", padding, minimum=0)
    if any(2 * p > k for p, k in zip(pad, kernel)):
        raise ValueError(f"padding must be at most half of kernel_size, got padding={padding!r}, "
                         f"kernel_size={kernel_size!r}")
    shape = pooled_shape(input, kernel, step, pad)
    if tuple(residual.shape) != shape:
        raise ValueError(f"residual must have the pooled shape {shape}, got {tuple(residual.shape)}")
    check_backend_name(backend)
    # With a graph to record, the kernel's backward works on NHWC: NCHW training keeps ATen's pool.
    one_pass = (input.device.type == "cpu" and input.dtype in (torch.float32, torch.float64)
                and residual.dtype == input.dtype and residual.device == input.device
                and not torch.is_autocast_enabled("cpu")
                and (memory_format_of(input) == torch.channels_last or not needs_autograd((input, residual))))
    if one_pass and resolve(backend, input.device, input.dtype) == "cpp":
        return torch.ops.sepconv_cpp.max_pool2d_add.default(input, residual, kernel, step, pad)
    return F.max_pool2d(input, kernel, step, pad) + residual
