"""``separable_conv2d``: check the arguments, pick a backend, run the autograd Function."""

from __future__ import annotations

from typing import Callable, Dict, Optional, Union

import torch

from ._args import IntOrPair, check_tensor, normalize
from .autograd import (SeparableConv2dFunction, SeparableConv2dKeepingHidden, call_below_autograd, forward_op,
                       keeps_hidden, needs_autograd, plain_eager)
from . import gpu_dispatch
from .dispatch import resolve
from .ops import torch_pair_recorded

# Whether a device type has autocast, asked once per type. torch.amp.is_autocast_available is a
# builtin that torch.compile and torch.export cannot trace in torch 2.6 (a graph break, an error under
# fullgraph=True or export); a lookup in this dict traces everywhere. The usual types are asked at import.
_AUTOCAST_AVAILABLE: Dict[str, bool] = {}


def _autocast_available(device_type: str) -> bool:
    available = _AUTOCAST_AVAILABLE.get(device_type)
    if available is None:
        available = _AUTOCAST_AVAILABLE[device_type] = bool(torch.amp.is_autocast_available(device_type))
    return available


for _device_type in ("cpu", "cuda", "meta"):
    _autocast_available(_device_type)


def separable_conv2d(
    input: torch.Tensor,
    depthwise_weight: torch.Tensor,
    pointwise_weight: torch.Tensor,
    depthwise_bias: Optional[torch.Tensor] = None,
    pointwise_bias: Optional[torch.Tensor] = None,
    stride: IntOrPair = 1,
    padding: Union[IntOrPair, str] = 0,
    dilation: IntOrPair = 1,
    *,
    backend: str = "auto",
    relu_input: bool = False,
    _packed_pointwise: Optional[Callable[[torch.Tensor], Optional[torch.Tensor]]] = None,
) -> torch.Tensor:
    """Depthwise KxK convolution then pointwise 1x1 convolution, fused.

    Equals ``F.conv2d(F.conv2d(input, depthwise_weight, depthwise_bias, stride,
    padding, dilation, groups=C), pointwise_weight, pointwise_bias)``.

    Args:
        input: ``(N, C, H, W)`` or unbatched ``(C, H, W)``; NCHW or channels_last,
            contiguous or not. The output keeps its memory format.
        depthwise_weight: ``(C*M, 1, kh, kw)``, M the depth multiplier.
        pointwise_weight: ``(C_out, C*M, 1, 1)``.
        depthwise_bias: ``(C*M,)`` or None. pointwise_bias: ``(C_out,)`` or None.
        stride, dilation: int or pair. padding: int, pair, ``"same"`` or ``"valid"``.
        backend: ``"auto"``, ``"torch"``, ``"cpp"`` or ``"triton"`` (see
            ``kernels.available_backends()``). On CUDA, ``"auto"`` picks cuDNN or a
            Triton mode per layer (docs/gpu-dispatch.md); on CPU with ``SEPCONV_TUNE=1``,
            cpp or torch per layer, whichever measured faster.
        relu_input: apply ReLU to ``input`` first, inside the same kernel.
        _packed_pointwise: internal (``SeparableConv2d.pack_for_inference``): called with the pointwise
            weight where the call runs cpp's forward without a graph; returns that weight packed
            (``sepconv_cpp::pack_pointwise``) or None.

    Returns:
        ``(N, C_out, H_out, W_out)`` (or ``(C_out, H_out, W_out)`` for unbatched input).
    """
    check_tensor("input", input)
    if input.dim() not in (3, 4):
        raise ValueError(f"input must be 3-D (C, H, W) or 4-D (N, C, H, W), got shape {tuple(input.shape)}")
    unbatched = input.dim() == 3
    if unbatched:
        input = input.unsqueeze(0)
    device_type = input.device.type
    # is_autocast_enabled raises for device types without autocast (meta, for shape inference)
    autocast = _autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    if autocast:
        dtype = torch.get_autocast_dtype(device_type)
        input, depthwise_weight, pointwise_weight, depthwise_bias, pointwise_bias = (
            t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
            for t in (input, depthwise_weight, pointwise_weight, depthwise_bias, pointwise_bias)
        )
    geometry = normalize(input, depthwise_weight, pointwise_weight, depthwise_bias, pointwise_bias,
                         stride, padding, dilation)
    grad = needs_autograd((input, depthwise_weight, pointwise_weight, depthwise_bias, pointwise_bias))
    # On CUDA, and on CPU with tuning on, "auto" chooses per layer (kernels.gpu_dispatch): it is told the layer.
    per_layer = gpu_dispatch.shape_dispatch_applies(input.device) or (
        backend == "auto" and gpu_dispatch.cpu_tuning_applies(input.device))
    layer = (gpu_dispatch.layer_of(input, pointwise_weight, depthwise_bias, pointwise_bias, geometry, relu_input,
                                   grad)
             if per_layer else None)
    name = resolve(backend, input.device, input.dtype, layer)
    args = (input, depthwise_weight, pointwise_weight, depthwise_bias, pointwise_bias,
            geometry.stride, geometry.padding, geometry.dilation, bool(relu_input))
    if _packed_pointwise is not None and name == "cpp" and not grad and not torch.compiler.is_compiling():
        packed = _packed_pointwise(pointwise_weight)
        if packed is not None:
            output = call_below_autograd(torch.ops.sepconv_cpp.forward_packed.default, args[:3] + (packed,) + args[3:])
            return output.squeeze(0) if unbatched else output
    if autocast:  # the op runs in the dtype chosen above (autocast off inside: ~2.5 us a call otherwise)
        with torch.autocast(device_type, enabled=False):
            output = _run(name, args, grad)
    else:
        output = _run(name, args, grad)
    return output.squeeze(0) if unbatched else output


def _run(name: str, args: tuple, grad: bool) -> torch.Tensor:
    if name == "torch" and plain_eager(args[0]):
        # The eager pair itself: autograd saves and the host spends what nn.Conv2d does.
        return torch_pair_recorded(*args)
    if grad:
        if keeps_hidden(name, args[2]):
            return SeparableConv2dKeepingHidden.apply(*args, name)[0]
        return SeparableConv2dFunction.apply(*args, name)
    # No graph to record: the op itself, below the autograd key (its autograd kernel would only redispatch).
    return call_below_autograd(forward_op(name), args)
