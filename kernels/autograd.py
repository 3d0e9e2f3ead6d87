"""``SeparableConv2dFunction``: the public autograd face of the separable-conv ops.

Forward and backward each make one call of the chosen backend's
``torch.library`` op, so ``torch.compile`` sees two opaque, fake-able ops.
Only the input and weights are saved; the backward op recomputes the
depthwise intermediate.

``SeparableConv2dKeepingHidden`` is the face of the torch and triton backends where the
pointwise weight needs a gradient: the torch backend's forward and split mode's write the
depthwise result ``hidden`` to memory anyway (torch: (N, C_hid, OH, OW) in the input's memory
format; split mode: (N*OH*OW, C_hid) rows, input dtype), and keeping it for the backward saves
recomputing it there (one depthwise pass over the input), at the memory the eager pair spends
too: ``nn.Conv2d``'s backward keeps the pointwise convolution's input, the same tensor. Fused
mode computes no such tensor and keeps none; cpp does not keep one (``kernels.ops.KEEPS_HIDDEN``).
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch._functorch.utils import unwrap_dead_wrappers

from . import ops

_FORWARD = {name: ops.forward_op(name) for name in ops.IMPLEMENTATIONS}
_BACKWARD = {name: ops.make_backward(ops.backward_op(name)) for name in ops.IMPLEMENTATIONS}
_FORWARD_KEEPING_HIDDEN = {name: getattr(torch.ops, ops.namespace(name)).forward_keeping_hidden.default
                           for name in ops.KEEPS_HIDDEN}
_BACKWARD_FROM_HIDDEN = {
    name: ops.make_backward(getattr(torch.ops, ops.namespace(name)).backward_from_hidden.default, keeps_hidden=True)
    for name in ops.KEEPS_HIDDEN}


def forward_op(implementation: str):
    """The forward op of a resolved implementation (``kernels.ops.IMPLEMENTATIONS``)."""
    return _FORWARD[implementation]


def needs_autograd(tensors) -> bool:
    """Whether a call on these tensors must record a graph (grad mode on and one of them requires grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _PositionalFunction(torch.autograd.Function):
    """An ``autograd.Function`` whose ``apply`` takes every argument positionally, in ``forward``'s order.

    ``Function.apply`` binds its arguments to ``forward``'s signature (``inspect.signature`` and
    ``bind`` on every call: ~30 us of host time, more than the cuDNN pair's whole forward launch);
    with no keyword or default to fill in, the binding changes nothing, so this ``apply`` skips it
    outside functorch transforms (where ``Function.apply`` runs as it is). ``torch.compile`` traces
    ``apply`` itself and never calls this method.
    """

    @classmethod
    def apply(cls, *args):
        if torch._C._are_functorch_transforms_active():
            return super().apply(*args)
        return super(torch.autograd.Function, cls).apply(*unwrap_dead_wrappers(args))


# Where the ops run below the autograd keys, and (kept here for existing callers) how.
below_autograd = ops.below_autograd
call_below_autograd = ops.call_below_autograd


def plain_eager(input: torch.Tensor) -> bool:
    """Whether a call on ``input`` may run the torch implementation as its ATen ops under autograd
    (``kernels.ops.torch_pair_recorded``) instead of its op: a plain tensor, no tracing or functorch
    transform (``below_autograd``), and no dispatch mode, which sees the ``sepconv_torch`` op as
    ``torch.compile``, ``torch.export`` and the benchmarks' census of the ops that ran do."""
    return type(input) is torch.Tensor and below_autograd() and torch._C._len_torch_dispatch_stack() == 0


class SeparableConv2dFunction(_PositionalFunction):
    """``apply(input, depthwise_weight, pointwise_weight, depthwise_bias, pointwise_bias,
    stride, padding, dilation, relu_input, backend)``.

    Arguments are already checked and normalised (see ``kernels.functional``):
    ``input`` is ``(N, C, H, W)``, ``stride``/``dilation`` are ``[h, w]``,
    ``padding`` is ``[top, bottom, left, right]``, ``backend`` a resolved implementation
    (``kernels.ops.IMPLEMENTATIONS``: a backend, or ``"triton_split"``).
    """

    @staticmethod
    def forward(
        input: torch.Tensor,
        depthwise_weight: torch.Tensor,
        pointwise_weight: torch.Tensor,
        depthwise_bias: Optional[torch.Tensor],
        pointwise_bias: Optional[torch.Tensor],
        stride: List[int],
        padding: List[int],
        dilation: List[int],
        relu_input: bool,
        backend: str,
    ) -> torch.Tensor:
        return call_below_autograd(_FORWARD[backend], (input, depthwise_weight, pointwise_weight, depthwise_bias,
                                                        pointwise_bias, stride, padding, dilation, relu_input))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ops.setup_context(ctx, inputs[:9], output)
        ctx.backend = inputs[9]

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return _BACKWARD[ctx.backend](ctx, grad_output) + (None,)


def keeps_hidden(implementation: str, pointwise_weight: torch.Tensor) -> bool:
    """Whether a recorded call keeps the depthwise result for its backward: an implementation that can
    (``kernels.ops.KEEPS_HIDDEN``), and a pointwise weight that needs a gradient (the one reader)."""
    return implementation in ops.KEEPS_HIDDEN and pointwise_weight.requires_grad


class SeparableConv2dKeepingHidden(_PositionalFunction):
    """``SeparableConv2dFunction`` for the torch and triton implementations (same ``apply`` arguments): the forward
    returns ``(output, hidden)`` and saves ``hidden`` (non-differentiable) for the backward."""

    @staticmethod
    def forward(
        input: torch.Tensor,
        depthwise_weight: torch.Tensor,
        pointwise_weight: torch.Tensor,
        depthwise_bias: Optional[torch.Tensor],
        pointwise_bias: Optional[torch.Tensor],
        stride: List[int],
        padding: List[int],
        dilation: List[int],
        relu_input: bool,
        backend: str,
    ):
        return call_below_autograd(_FORWARD_KEEPING_HIDDEN[backend], (
            input, depthwise_weight, pointwise_weight, depthwise_bias, pointwise_bias, stride, padding, dilation,
            relu_input))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ops.setup_context_keeping_hidden(ctx, inputs[:9], output)
        ctx.backend = inputs[9]

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor, grad_hidden: Optional[torch.Tensor]):
        return _BACKWARD_FROM_HIDDEN[ctx.backend](ctx, grad_output) + (None,)
