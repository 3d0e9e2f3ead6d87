"""``SeparableConv2d``: a drop-in for ``nn.Conv2d(groups=C)`` followed by a 1x1 ``nn.Conv2d``."""

from __future__ import annotations

import copy
from typing import Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._args import conv_module_args, memory_format_of, same_padding
from .dispatch import BackendAttribute
from .functional import separable_conv2d

_size_2_t = Union[int, Tuple[int, int]]


def _explicit_padding(conv: nn.Conv2d) -> Tuple[int, int, int, int]:
    """``conv``'s padding as ``F.pad`` takes it, (left, right, top, bottom), as ``nn.Conv2d`` pads
    for a padding mode other than zeros."""
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    if conv.padding == "same":
        top, bottom, left, right = same_padding(conv.kernel_size, conv.dilation)
        return (left, right, top, bottom)
    top, left = conv.padding
    return (left, left, top, top)


def _pad(input: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``input`` padded by ``conv``'s padding in its padding mode, in ``input``'s memory format (``F.pad``
    returns some modes' results contiguous)."""
    padded = F.pad(input, _explicit_padding(conv), mode=conv.padding_mode)
    if input.dim() == 4 and memory_format_of(input) is torch.channels_last:
        padded = padded.contiguous(memory_format=torch.channels_last)
    return padded


class SeparableConv2d(BackendAttribute, nn.Module):
    """Depthwise ``kernel_size`` convolution then pointwise 1x1 convolution, one fused op.

    The parameters live in two ``nn.Conv2d`` children, ``conv1`` (depthwise,
    ``groups=in_channels``) and ``pointwise`` (1x1), which are never called:
    they only hold and initialise the weights. So a ``SeparableConv2d`` starts
    from exactly the weights that the same ``nn.Conv2d`` pair would get under
    the same seed, and its ``state_dict`` has the layout of timm's
    ``SeparableConv2d`` (``conv1.weight``, ``pointwise.weight``).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation: as ``nn.Conv2d``.
        bias: give both convolutions a bias.
        depth_multiplier: depthwise output channels per input channel (M).
        backend: ``"auto"``, ``"torch"``, ``"cpp"`` or ``"triton"``.
        relu_input: apply ReLU to the input inside the kernel (used by fused inference).
        padding_mode: as ``nn.Conv2d``: ``"zeros"`` (inside the kernel), or ``"reflect"``,
            ``"replicate"`` or ``"circular"`` (the input is padded by ``F.pad`` first, as
            ``nn.Conv2d`` does, and the kernel runs without padding).

    Shape: ``(N, in_channels, H, W)`` or ``(in_channels, H, W)`` to
    ``(N, out_channels, H_out, W_out)``, in the input's memory format.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_2_t,
        stride: _size_2_t = 1,
        padding: Union[_size_2_t, str] = 0,
        dilation: _size_2_t = 1,
        bias: bool = False,
        depth_multiplier: int = 1,
        backend: str = "auto",
        device=None,
        dtype=None,
        *,
        relu_input: bool = False,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("depth_multiplier", depth_multiplier)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        kernel_size, stride, padding, dilation = conv_module_args(kernel_size, stride, padding, dilation)
        factory = {"device": device, "dtype": dtype}
        # nn.Conv2d rejects an unknown padding_mode or padding string, naming it and the value.
        self.conv1 = nn.Conv2d(in_channels, in_channels * depth_multiplier, kernel_size, stride, padding,
                               dilation, groups=in_channels, bias=bias, padding_mode=padding_mode, **factory)
        self.pointwise = nn.Conv2d(in_channels * depth_multiplier, out_channels, 1, bias=bias, **factory)
        self.backend = backend
        self.relu_input = relu_input
        self._pack = False
        self._drop_packed()

    @property
    def depthwise(self) -> nn.Conv2d:
        return self.conv1

    @property
    def in_channels(self) -> int:
        return self.conv1.in_channels

    @property
    def out_channels(self) -> int:
        return self.pointwise.out_channels

    @property
    def depth_multiplier(self) -> int:
        return self.conv1.out_channels // self.conv1.in_channels

    @property
    def padding_mode(self) -> str:
        return self.conv1.padding_mode

    def reset_parameters(self) -> None:
        self.conv1.reset_parameters()
        self.pointwise.reset_parameters()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._forward_with(input, self.pointwise.weight, self.pointwise.bias)

    def _forward_with(self, input: torch.Tensor, pointwise_weight: torch.Tensor, pointwise_bias) -> torch.Tensor:
        """``forward`` with ``pointwise_weight`` and ``pointwise_bias`` in place of the module's (a BatchNorm folded
        into them: ``kernels.separable_conv2d_batch_norm`` in evaluation; the packed copy serves the module's own
        weight only)."""
        conv = self.conv1
        padding = conv.padding
        if conv.padding_mode != "zeros":  # relu(pad(x)) == pad(relu(x)): these modes copy input values
            input, padding = _pad(input, conv), 0
        return separable_conv2d(
            input, conv.weight, pointwise_weight, conv.bias, pointwise_bias,
            conv.stride, padding, conv.dilation, backend=self.backend, relu_input=self.relu_input,
            _packed_pointwise=self._packed_pointwise if getattr(self, "_pack", False) else None)

    def pack_for_inference(self, enabled: bool = True) -> "SeparableConv2d":
        """Keep the pointwise weight packed for the cpp backend's forward, instead of packing it on every call.

        The cpp forward rearranges the pointwise weight into the panels its GEMM reads on each call; in the
        fused Xception's eval at batch 1 that took about 6% of the time with AVX-512 on an AMD Zen 4 (about 1%
        with AVX2; docs/cpu-backends.md). With packing on, the calls that run
        the cpp forward without recording a graph (inference: ``torch.no_grad()``, or weights that do not
        require grad) pack it once and reuse the packed copy, with the same results to the bit. The copy
        takes as much memory again as the pointwise weight, and is made again when the weight changes
        through PyTorch (an in-place update, ``load_state_dict``, ``.to()``); a write that PyTorch does not
        count, through ``weight.data`` or a NumPy view, is not seen: call ``pack_for_inference()`` again after
        one. Calls that record a graph, other backends, weights made under ``torch.inference_mode()`` (they
        count no changes) and ``torch.compile`` run as before.
        ``enabled=False`` turns it off and frees the copy. Returns ``self``.
        """
        self._pack = bool(enabled)
        self._drop_packed()
        return self

    def _drop_packed(self) -> None:
        self._packed = None
        self._packed_key = None

    def _packed_pointwise(self, weight: torch.Tensor):
        """``weight`` packed (``sepconv_cpp::pack_pointwise``), packed again when it changed since; None for a
        weight other than this module's own (a cast under autocast) and for an inference tensor (made under
        ``torch.inference_mode()``: it counts no changes). ``separable_conv2d`` calls it only outside
        ``torch.compile`` (Dynamo cannot trace ``is_inference()``)."""
        own = self.pointwise.weight
        if weight is not own or own.is_inference():
            return None
        key = (own.data_ptr(), own._version, own.dtype, own.shape)
        if self._packed is None or self._packed_key != key:
            self._packed = torch.ops.sepconv_cpp.pack_pointwise.default(own.detach())
            self._packed_key = key
        return self._packed

    def __getstate__(self):
        # The packed copy is this process's (its panel layout is the loaded library's): never pickled or
        # deep-copied; the copy packs again on its first call.
        state = super().__getstate__()  # nn.Module's: a copy of __dict__
        state["_packed"] = None
        state["_packed_key"] = None
        return state

    def extra_repr(self) -> str:
        return (f"backend={self.backend!r}" + (", relu_input=True" if self.relu_input else "")
                + (f", padding_mode={self.padding_mode!r}" if self.padding_mode != "zeros" else ""))

    @classmethod
    def from_conv2d(cls, depthwise: nn.Conv2d, pointwise: nn.Conv2d, backend: str = "auto") -> "SeparableConv2d":
        """A ``SeparableConv2d`` computing what ``pointwise(depthwise(x))`` computes.

        The weights are copied (the returned module does not share them).
        """
        for name, conv in (("depthwise", depthwise), ("pointwise", pointwise)):
            if not isinstance(conv, nn.Conv2d):
                raise TypeError(f"{name} must be an nn.Conv2d, got {type(conv).__name__}")
            overridden = [method for method in ("forward", "_conv_forward")
                          if getattr(type(conv), method) is not getattr(nn.Conv2d, method)]
            if overridden:  # the fused op would compute nn.Conv2d's convolution, not what this class does
                raise TypeError(f"{name} is a {type(conv).__name__}, an nn.Conv2d subclass that overrides "
                                f"{' and '.join(overridden)}; only what nn.Conv2d computes can be fused")
        if depthwise.groups != depthwise.in_channels:
            raise ValueError(f"depthwise.groups must equal depthwise.in_channels={depthwise.in_channels}, "
                             f"got {depthwise.groups}")
        if pointwise.kernel_size != (1, 1) or pointwise.stride != (1, 1) or pointwise.groups != 1 \
                or pointwise.padding not in ((0, 0), "valid") or pointwise.dilation != (1, 1):
            raise ValueError("pointwise must be a 1x1 convolution with stride 1, no padding and groups=1, got "
                             f"{pointwise}")
        if pointwise.in_channels != depthwise.out_channels:
            raise ValueError(f"pointwise.in_channels={pointwise.in_channels} must equal "
                             f"depthwise.out_channels={depthwise.out_channels}")
        weight = depthwise.weight
        module = cls(depthwise.in_channels, pointwise.out_channels, depthwise.kernel_size, depthwise.stride,
                     depthwise.padding, depthwise.dilation, bias=False,
                     depth_multiplier=depthwise.out_channels // depthwise.in_channels,
                     backend=backend, device=weight.device, dtype=weight.dtype, padding_mode=depthwise.padding_mode)
        module.conv1 = copy.deepcopy(depthwise)
        module.pointwise = copy.deepcopy(pointwise)
        return module
