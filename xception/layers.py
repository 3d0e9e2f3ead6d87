"""The building blocks of Xception: the two separable-conv flavours and the residual block.

A model file never launches kernels itself: the ``"fused"`` flavour is
``kernels.SeparableConv2d`` (one op per call, backend chosen by ``kernels``),
the ``"conv2d"`` flavour is :class:`Conv2dSeparable`, two plain ``nn.Conv2d``
calls (the eager baseline). Both hold their weights in children named
``conv1`` (depthwise) and ``pointwise`` (1x1), so their ``state_dict`` keys
are identical and weights move freely between them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import kernels

SEPARABLE_KINDS = ("fused", "conv2d")


def make_divisible(value: float, divisor: int = 8) -> int:
    """``value`` rounded to the nearest multiple of ``divisor`` (at least ``divisor``, and never
    more than 10% below ``value``)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class Conv2dSeparable(nn.Module):
    """Depthwise then pointwise convolution as two ``nn.Conv2d`` calls: the eager baseline.

    Computes what ``kernels.SeparableConv2d`` computes, with the same children
    (``conv1``: ``(C, 1, kh, kw)`` depthwise, ``groups=C``; ``pointwise``:
    ``(C_out, C, 1, 1)``) and so the same ``state_dict`` keys.

    Shape: ``(N, in_channels, H, W)`` to ``(N, out_channels, H_out, W_out)``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, bias: bool = False, relu_input: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, in_channels, kernel_size, stride, padding, dilation,
                               groups=in_channels, bias=bias)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=bias)
        self.relu_input = relu_input

    @property
    def in_channels(self) -> int:
        return self.conv1.in_channels

    @property
    def out_channels(self) -> int:
        return self.pointwise.out_channels

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.relu_input:
            input = F.relu(input)
        return self.pointwise(self.conv1(input))

    def extra_repr(self) -> str:
        return "relu_input=True" if self.relu_input else ""


def separable_conv(kind: str, in_channels: int, out_channels: int, backend: str = "auto") -> nn.Module:
    """A 3x3, stride 1, padding 1 separable convolution without bias, of flavour ``kind``."""
    if kind == "fused":
        return kernels.SeparableConv2d(in_channels, out_channels, 3, 1, 1, bias=False, backend=backend)
    if kind == "conv2d":
        return Conv2dSeparable(in_channels, out_channels, 3, 1, 1, bias=False)
    raise ValueError(f"separable must be one of {list(SEPARABLE_KINDS)}, got {kind!r}")


def batch_norm(kind: str, channels: int, backend: str = "auto") -> nn.Module:
    """The BatchNorm after a convolution: ``kernels.BatchNorm2d`` on ``backend`` for the fused kind
    (its training-mode kernel on cpp), ``nn.BatchNorm2d`` for the conv2d kind. Same ``state_dict``."""
    if kind == "fused":
        return kernels.BatchNorm2d(channels, backend=backend)
    return nn.BatchNorm2d(channels)


def batch_norm_relu(kind: str, channels: int, backend: str = "auto", fold_relu: bool = False
                    ) -> tuple[nn.Module, nn.Module]:
    """A ``BatchNorm -> ReLU`` pair as (BN, ReLU slot). With ``fold_relu`` on the fused kind the BN applies
    the ReLU itself (``relu_output=True``: one pass each way) and the slot holds an ``nn.Identity``."""
    bn = batch_norm(kind, channels, backend)
    if fold_relu and isinstance(bn, kernels.BatchNorm2d):
        bn.relu_output = True
        return bn, nn.Identity()
    return bn, nn.ReLU(inplace=True)


def shortcut_conv(kind: str, in_channels: int, out_channels: int, stride: int, backend: str = "auto") -> nn.Conv2d:
    """A block's 1x1 shortcut convolution without bias: ``kernels.PointwiseConv2d`` on ``backend`` for the
    fused kind (the cpp kernel where it records a graph), ``nn.Conv2d`` for the conv2d kind. Same ``state_dict``."""
    if kind == "fused":
        return kernels.PointwiseConv2d(in_channels, out_channels, stride=stride, bias=False, backend=backend)
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


def stem_conv(kind: str, in_channels: int, out_channels: int, stride: int, backend: str = "auto") -> nn.Conv2d:
    """A stem 3x3 convolution without padding or bias: ``kernels.Conv2d`` on ``backend`` for the fused kind
    (the cpp kernel where its result is large), ``nn.Conv2d`` for the conv2d kind. Same ``state_dict``."""
    if kind == "fused":
        return kernels.Conv2d(in_channels, out_channels, 3, stride, 0, bias=False, backend=backend)
    return nn.Conv2d(in_channels, out_channels, 3, stride, 0, bias=False)


def is_separable(module: nn.Module) -> bool:
    return isinstance(module, (kernels.SeparableConv2d, Conv2dSeparable))


@dataclass(frozen=True)
class BlockSpec:
    """One residual block of Xception, as data.

    ``channels`` lists the output channels of its separable convolutions in
    order (each is ReLU -> SeparableConv 3x3 -> BN); ``stride`` 2 ends the
    block with a 3x3/2 max pool and gives the shortcut a 1x1/2 conv + BN;
    ``start_with_relu`` False drops the first ReLU (only the first entry block).
    """

    channels: tuple[int, ...]
    stride: int = 1
    start_with_relu: bool = True


class Block(nn.Module):
    """Xception's residual block: ``rep(x) + shortcut(x)`` (added into rep's output), no ReLU after the sum.

    ``rep`` is an ``nn.Sequential`` laid out as in timm's ``legacy_xception``
    (ReLUs occupy indices too, so the ``state_dict`` keys match):
    ``[ReLU], SepConv, BN, ReLU, SepConv, BN, ..., [MaxPool]``. Its first ReLU
    is not in-place: the shortcut still reads the block input. With
    ``fold_relu`` each ReLU is applied by the separable conv after it instead
    (``relu_input=True``, exact in training too) and its slot holds an
    ``nn.Identity``: no separate pass over the activations, forward or backward.

    A strided block of the fused kind ends in ``kernels.max_pool2d_add`` (pool and sum in one pass
    on the cpp backend, forward and backward; ``F.max_pool2d(...) + shortcut`` otherwise).

    Shape: ``(N, in_channels, H, W)`` to ``(N, spec.channels[-1], ceil(H/stride), ceil(W/stride))``.
    """

    def __init__(self, in_channels: int, spec: BlockSpec, separable: str = "fused", backend: str = "auto",
                 fold_relu: bool = False) -> None:
        super().__init__()
        if spec.stride not in (1, 2):
            raise ValueError(f"BlockSpec.stride must be 1 or 2, got {spec.stride}")
        if not spec.channels:
            raise ValueError("BlockSpec.channels must name at least one separable convolution")
        layers: list[nn.Module] = []
        channels = in_channels
        for index, out_channels in enumerate(spec.channels):
            conv = separable_conv(separable, channels, out_channels, backend)
            if index > 0 or spec.start_with_relu:
                conv.relu_input = fold_relu
                layers.append(nn.Identity() if fold_relu else nn.ReLU(inplace=index > 0))
            layers.append(conv)
            layers.append(batch_norm(separable, out_channels, backend))
            channels = out_channels
        if spec.stride != 1:
            layers.append(nn.MaxPool2d(3, spec.stride, 1))
        self.rep = nn.Sequential(*layers)
        self.separable = separable
        self.in_channels = in_channels
        self.out_channels = channels
        self.skip: nn.Conv2d | None = None
        self.skipbn: nn.Module | None = None
        if channels != in_channels or spec.stride != 1:
            self.skip = shortcut_conv(separable, in_channels, channels, spec.stride, backend)
            self.skipbn = batch_norm(separable, channels, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The shortcut and its BatchNorm as one call: in training on cpp the 1x1 conv's forward hands the
        # BatchNorm its output's statistics (kernels.separable_conv2d_batch_norm).
        shortcut = x if self.skip is None else kernels.separable_conv2d_batch_norm(self.skip, self.skipbn, x)
        pool = self.rep[-1]
        if not (self.separable == "fused" and isinstance(pool, nn.MaxPool2d)):
            # rep's modules in turn through kernels.run_sequential (each separable conv with its BatchNorm, in
            # training folded into the next conv's input read); rep itself where it has hooks of its own.
            hooked = self.rep._forward_hooks or self.rep._forward_pre_hooks
            out = self.rep(x) if hooked else kernels.run_sequential(self.rep, x)
            if out.dtype != shortcut.dtype or out.shape != shortcut.shape:
                return out + shortcut
            # The sum in place, into rep's output (as timm's Block does): nothing saves that tensor for
            # the backward, and a new one would be an activation-sized allocation a call.
            out += shortcut
            return out
        # The pool and the sum in one pass where the backend has a kernel for it (cpp).
        x = kernels.run_sequential(itertools.islice(self.rep, len(self.rep) - 1), x)
        last_conv = self.rep[-3]  # [..., SepConv, BN (or Identity once fused), MaxPool]
        return kernels.max_pool2d_add(x, shortcut, pool.kernel_size, pool.stride, pool.padding,
                                      backend=last_conv.backend)
