"""Argument checking and normalisation for ``separable_conv2d``.

Everything a user can get wrong is caught here, before any kernel runs, with a
message that names the argument and the value. The kernels then receive
normalised geometry: ``stride`` and ``dilation`` as ``[sh, sw]`` and
``padding`` as ``[top, bottom, left, right]`` (asymmetric only for
``padding="same"`` with an even effective kernel, as in PyTorch).
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

IntOrPair = Union[int, Sequence[int]]


class Geometry(NamedTuple):
    """The normalised geometry of a call (a NamedTuple: built on every call, so kept cheap to build)."""

    stride: List[int]  # [sh, sw]
    padding: List[int]  # [top, bottom, left, right]
    dilation: List[int]  # [dh, dw]
    kernel_size: Tuple[int, int]
    depth_multiplier: int
    out_size: Tuple[int, int]


def _pair(name: str, value, *, minimum: int) -> List[int]:
    if type(value) is int and value >= minimum:  # the common cases, first (a bool is not an int here)
        return [value, value]
    if type(value) is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int \
            and value[0] >= minimum and value[1] >= minimum:  # a module's own pair (nn.Conv2d keeps tuples)
        return [value[0], value[1]]
    if isinstance(value, bool) or not isinstance(value, (int, tuple, list, torch.Size)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        values = [value, value]
    else:
        values = list(value)
        if len(values) == 1:
            values = values * 2
        if len(values) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
            raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in values):
        raise ValueError(f"{name} must be >= {minimum} in every dimension, got {value!r}")
    return values


_Pair = Tuple[int, int]


def conv_module_args(kernel_size, stride, padding, dilation) -> Tuple[_Pair, _Pair, Union[_Pair, str], _Pair]:
    """A convolution module's kernel_size, stride, padding and dilation, checked when it is built (``nn.Conv2d``
    takes a zero stride or kernel and fails only when called): pairs of ints, or a padding string, which
    ``nn.Conv2d`` checks itself."""
    kernel = tuple(_pair("kernel_size", kernel_size, minimum=1))
    step = tuple(_pair("stride", stride, minimum=1))
    spacing = tuple(_pair("dilation", dilation, minimum=1))
    pad = padding if isinstance(padding, str) else tuple(_pair("padding", padding, minimum=0))
    return kernel, step, pad, spacing


def output_size(size: int, pad_before: int, pad_after: int, kernel: int, stride: int, dilation: int) -> int:
    return (size + pad_before + pad_after - dilation * (kernel - 1) - 1) // stride + 1


def pooled_shape(input: torch.Tensor, kernel: Sequence[int], stride: Sequence[int],
                 padding: Sequence[int]) -> Tuple[int, int, int, int]:
    """Output shape of a 2-D pool of ``input`` (N, C, H, W): symmetric padding, dilation 1, floor mode."""
    return (input.shape[0], input.shape[1],
            *(output_size(input.shape[2 + i], padding[i], padding[i], kernel[i], stride[i], 1) for i in range(2)))


def check_tensor(name: str, value, ndim: Optional[int] = None) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")


def same_padding(kernel_size: Sequence[int], dilation: Sequence[int]) -> List[int]:
    """``padding="same"`` as ``[top, bottom, left, right]``: the odd element on the bottom and the right,
    as ``nn.Conv2d`` pads."""
    padding = []
    for k, d in zip(kernel_size, dilation):
        total = d * (k - 1)
        padding += [total // 2, total - total // 2]
    return padding


def normalize(
    input: torch.Tensor,
    depthwise_weight: torch.Tensor,
    pointwise_weight: torch.Tensor,
    depthwise_bias: Optional[torch.Tensor],
    pointwise_bias: Optional[torch.Tensor],
    stride: IntOrPair,
    padding: Union[IntOrPair, str],
    dilation: IntOrPair,
) -> Geometry:
    """Validate every argument of ``separable_conv2d`` and return the geometry.

    ``input`` must already be batched ``(N, C, H, W)``.
    """
    check_tensor("input", input, 4)
    check_tensor("depthwise_weight", depthwise_weight, 4)
    check_tensor("pointwise_weight", pointwise_weight, 4)
    channels = input.shape[1]
    if channels == 0:
        raise ValueError(f"input must have at least one channel, got shape {tuple(input.shape)}")
    hidden, one, kh, kw = depthwise_weight.shape
    if one != 1 or hidden == 0 or hidden % channels != 0 or kh == 0 or kw == 0:
        raise ValueError(
            f"depthwise_weight must have shape (C*M, 1, kh, kw) with C = input channels = {channels} and "
            f"kh, kw >= 1, got {tuple(depthwise_weight.shape)}"
        )
    out_channels = pointwise_weight.shape[0]
    if out_channels == 0:
        raise ValueError(f"pointwise_weight must have at least one output channel (C_out >= 1), got shape "
                         f"{tuple(pointwise_weight.shape)}")
    if tuple(pointwise_weight.shape[1:]) != (hidden, 1, 1):
        raise ValueError(
            f"pointwise_weight must have shape (C_out, {hidden}, 1, 1) to follow a depthwise_weight with "
            f"{hidden} output channels, got {tuple(pointwise_weight.shape)}"
        )
    for name, bias, length in (("depthwise_bias", depthwise_bias, hidden),
                               ("pointwise_bias", pointwise_bias, out_channels)):
        if bias is None:
            continue
        check_tensor(name, bias, 1)
        if bias.shape[0] != length:
            raise ValueError(f"{name} must have shape ({length},), got {tuple(bias.shape)}")

    tensors = [("depthwise_weight", depthwise_weight), ("pointwise_weight", pointwise_weight),
               ("depthwise_bias", depthwise_bias), ("pointwise_bias", pointwise_bias)]
    if not input.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got dtype {input.dtype}")
    for name, tensor in tensors:
        if tensor is None:
            continue
        if tensor.dtype != input.dtype:
            raise TypeError(f"{name} has dtype {tensor.dtype} but input has dtype {input.dtype}; they must match")
        if tensor.device != input.device:
            raise ValueError(f"{name} is on device {tensor.device} but input is on {input.device}; they must match")

    stride_ = _pair("stride", stride, minimum=1)
    dilation_ = _pair("dilation", dilation, minimum=1)
    if isinstance(padding, str):
        if padding == "valid":
            padding_ = [0, 0, 0, 0]
        elif padding == "same":
            if stride_ != [1, 1]:
                raise ValueError(f"padding='same' is not supported for strided convolutions, got stride={stride!r}")
            padding_ = same_padding((kh, kw), dilation_)
        else:
            raise ValueError(f"padding must be an int, a pair of ints, 'same' or 'valid', got {padding!r}")
    else:
        ph, pw = _pair("padding", padding, minimum=0)
        padding_ = [ph, ph, pw, pw]

    out_h = output_size(input.shape[2], padding_[0], padding_[1], kh, stride_[0], dilation_[0])
    out_w = output_size(input.shape[3], padding_[2], padding_[3], kw, stride_[1], dilation_[1])
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"output size would be ({out_h}, {out_w}) for input of spatial size {tuple(input.shape[2:])}, "
            f"kernel ({kh}, {kw}), stride {stride_}, padding {padding!r}, dilation {dilation_}; it must be >= 1"
        )
    return Geometry(stride_, padding_, dilation_, (kh, kw), hidden // channels, (out_h, out_w))


def memory_format_of(tensor: torch.Tensor) -> torch.memory_format:
    """The memory format an output should take to follow ``tensor`` (4-D)."""
    if tensor.is_contiguous():
        return torch.contiguous_format
    if tensor.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    # Non-contiguous (e.g. sliced): channels_last when channels vary fastest.
    return torch.channels_last if tensor.stride(1) < tensor.stride(3) else torch.contiguous_format
