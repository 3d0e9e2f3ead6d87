"""Training-mode BatchNorm on channels_last CPU activations (the ``cpp`` backend's kernel).

Xception puts a BatchNorm after every convolution. In training it normalises with the batch's
statistics, and ATen writes its output, and in the backward its input gradient, into freshly
allocated buffers: at batch 8 the 147x147 and 74x74 activations are 45-88 MB, which glibc maps
afresh on each allocation, so the BatchNorm's time there is mostly page faults. The ``cpp``
backend's ``batch_norm`` / ``batch_norm_backward`` ops compute the same thing (ATen's formulas,
double-precision sums, deterministic; the variance from per-64-row sums of squared deviations
merged exactly, so the input is read once for both statistics) into buffers recycled by its
buffer cache. ``BatchNorm2d`` is ``nn.BatchNorm2d`` with a ``backend``: the same parameters,
buffers and ``state_dict``, the same running-statistics updates; it calls the op in training on
channels_last float32/float64 CPU input when ``backend`` resolves to ``cpp``, and
``F.batch_norm`` everywhere else (evaluation, other layouts, devices and dtypes, autocast).

``separable_conv2d_batch_norm(conv, bn, x)`` is ``bn(conv(x))`` for a separable conv (or a strided
``PointwiseConv2d`` shortcut, which runs as the separable op) and the BatchNorm after it; in training
on cpp the conv's forward gathers its output's per-channel mean and M2 as it stores it
(``sepconv_cpp::forward_with_moments``) and the BatchNorm kernel takes them as ``moments``, so it
does not read the output once more for them.

``run_sequential(modules, input)`` runs modules in turn as ``nn.Sequential`` does, each separable conv and
the BatchNorm after it as ``separable_conv2d_batch_norm``; where such a BatchNorm's output goes (through
``nn.Identity`` modules only) into another separable conv, in training on cpp, that conv reads the BatchNorm's
input and applies the BatchNorm (and its ReLU) as it reads it (``sepconv_cpp::batch_norm_separable``): the
normalised activation is never written: the backward keeps the BatchNorm's input alone and the conv's
backward reads it the same way.

In evaluation on a CPU, ``separable_conv2d_batch_norm`` and ``run_sequential`` fold a BatchNorm that normalises
with its running statistics into the convolution before it (``batch_norm_folded``: the conv's output channels' weights
scaled, a bias added), on every call: the BatchNorm's pass over the activation, and the buffer it writes, are gone.

``relu_output=True`` applies a ReLU to the output: in the kernel's pass, and in its backward as
ReLU's own backward does (the gradient is zero where the output is), so a ``BN -> ReLU`` pair costs
no pass of its own and no fresh buffer either way; elsewhere ``F.relu`` runs in place after
``F.batch_norm``. Same values and gradients as the separate ``nn.ReLU``.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import gpu_dispatch
from ._args import normalize
from .conv import Conv2d
from .dispatch import BackendAttribute, channels_last_cpp_applies, check_backend_name
from .module import SeparableConv2d
from .pointwise import PointwiseConv2d, identity_depthwise
from .pointwise import _uses_kernel as _pointwise_uses_kernel


def _uses_kernel(input: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                 backend: str) -> bool:
    if input.dim() == 4 and (input.numel() == 0 or input.shape[0] * input.shape[2] * input.shape[3] < 2):
        return False  # ATen's error or an empty result
    return channels_last_cpp_applies(input, (weight, bias), backend)


def batch_norm(
    input: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    relu_output: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """``F.batch_norm`` with the same arguments (then ``F.relu`` with ``relu_output``); training-mode
    calls on channels_last float32/float64 CPU input run the ``cpp`` kernel where ``backend``
    resolves to ``cpp``.

    The running statistics are updated as ATen does (``(1 - momentum) * running + momentum * batch``,
    the unbiased batch variance), from the kernel's double-precision sums.
    """
    check_backend_name(backend)
    if not isinstance(relu_output, bool):
        raise TypeError(f"relu_output must be a bool, got {relu_output!r}")
    if not (training and _uses_kernel(input, weight, bias, backend)):
        output = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        return F.relu(output, inplace=True) if relu_output else output
    return _batch_norm_kernel(input, running_mean, running_var, weight, bias, momentum, eps, relu_output, None)


def _batch_norm_kernel(input, running_mean, running_var, weight, bias, momentum, eps, relu_output, moments):
    """The cpp op in training mode and the running-statistics update; ``moments``: input's mean and M2 per
    channel as ``sepconv_cpp::forward_with_moments`` returns them (None: the op takes them itself)."""
    output, mean, _, var = torch.ops.sepconv_cpp.batch_norm.default(input, weight, bias, float(eps), relu_output,
                                                                    moments)
    _update_running(running_mean, running_var, momentum, mean, var)
    return output


def _update_running(running_mean, running_var, momentum, mean, var) -> None:
    """``running = (1 - momentum) * running + momentum * batch`` for the statistics kept (None: not kept)."""
    with torch.no_grad():
        if running_mean is not None:
            running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        if running_var is not None:
            running_var.mul_(1.0 - momentum).add_(var.to(running_var.dtype), alpha=momentum)


class BatchNorm2d(BackendAttribute, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training-mode forward runs on a ``kernels`` backend.

    Same constructor (plus ``backend``), parameters, buffers and ``state_dict`` as
    ``nn.BatchNorm2d``; ``isinstance(m, nn.BatchNorm2d)`` holds, so BN folding and checkpoint
    code treat it as one. See ``kernels.batch_norm`` for which calls run the kernel.
    ``relu_output=True`` makes it ``BatchNorm2d -> ReLU`` in one call (no parameters of its own, so
    the ``state_dict`` is the same).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None, *,
                 relu_output: bool = False, backend: str = "auto") -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if not isinstance(relu_output, bool):
            raise TypeError(f"relu_output must be a bool, got {relu_output!r}")
        self.relu_output = relu_output
        self.backend = backend

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._forward(input, None)

    def _running(self):
        """What a call does with the running statistics, as ``nn.BatchNorm2d``'s forward: counts the batch
        (in training) and returns the running-average factor (``momentum``, or with momentum=None the cumulative
        average 1 / batches seen) and the running mean and variance the call uses (None: none kept)."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        keep_running = not self.training or self.track_running_stats
        return factor, self.running_mean if keep_running else None, self.running_var if keep_running else None

    def _forward(self, input: torch.Tensor, moments: Optional[torch.Tensor]) -> torch.Tensor:
        """``forward``; given ``moments`` (input's per-channel mean and M2 from the separable forward that
        wrote it, ``separable_conv2d_batch_norm``), the training-mode kernel takes them."""
        self._check_input_dim(input)
        factor, running_mean, running_var = self._running()
        # Batch statistics in training, and in evaluation too when there are no running ones.
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if moments is not None:
            return _batch_norm_kernel(input, running_mean, running_var, self.weight, self.bias, factor, self.eps,
                                      self.relu_output, moments)
        return batch_norm(input, running_mean, running_var, self.weight, self.bias, batch_stats, factor, self.eps,
                          relu_output=self.relu_output, backend=self.backend)

    def extra_repr(self) -> str:
        extra = ", relu_output=True" if self.relu_output else ""
        return super().extra_repr() + extra + (f", backend={self.backend!r}" if self.backend != "auto" else "")


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _global_hooks() -> bool:
    """Whether any module hook is registered globally (they would see the modules called one by one)."""
    hooks = nn.modules.module
    return bool(hooks._global_forward_hooks or hooks._global_forward_pre_hooks or hooks._global_backward_hooks
                or hooks._global_backward_pre_hooks)


def _separable_args(conv: nn.Module, input: torch.Tensor):
    """The separable op's arguments after the input for a module whose forward on ``input`` is that op (the
    separable conv, or a PointwiseConv2d whose call takes the kernel: an identity depthwise stage, as
    ``pointwise_conv2d`` runs it): depthwise weight and bias, pointwise weight and bias, stride, padding,
    dilation, relu_input; the submodules whose hooks would run; and the backend. None otherwise."""
    if type(conv).forward is SeparableConv2d.forward and isinstance(conv, SeparableConv2d):
        if conv.conv1.padding_mode != "zeros":
            return None
        depthwise, pointwise = conv.conv1, conv.pointwise
        return ((depthwise.weight, depthwise.bias, pointwise.weight, pointwise.bias, depthwise.stride,
                 depthwise.padding, depthwise.dilation, bool(conv.relu_input)), (conv, depthwise, pointwise),
                conv.backend)
    if type(conv).forward is PointwiseConv2d.forward and isinstance(conv, PointwiseConv2d):
        # Where pointwise_conv2d runs its kernel (and for input its own checks pass: other channel counts get
        # its error from the two calls).
        if (not isinstance(input, torch.Tensor) or input.dim() != 4 or input.shape[1] != conv.in_channels
                or not _pointwise_uses_kernel(input, conv.weight, conv.bias, conv.stride, conv.backend)):
            return None
        return ((identity_depthwise(input), None, conv.weight, conv.bias, conv.stride, 0, 1, False), (conv,),
                conv.backend)
    return None


def _moments_apply(conv: nn.Module, bn: nn.Module, input: torch.Tensor, args) -> bool:
    """Whether ``separable_conv2d_batch_norm`` takes BatchNorm's statistics from the separable forward: the two
    modules as this library defines them (no subclass's forward, no hooks), BatchNorm in training, and a call
    both would run on their cpp kernels (channels_last float32/float64 CPU input, more than one value a
    channel; with CPU tuning on, ``auto`` chooses per layer, so not there). ``args``: ``_separable_args(conv)``."""
    if args is None or not (type(bn).forward is BatchNorm2d.forward and isinstance(bn, BatchNorm2d)):
        return False
    if not (bn.training and isinstance(input, torch.Tensor) and input.dim() == 4):
        return False
    (depthwise_weight, depthwise_bias, pointwise_weight, pointwise_bias, *_), modules, backend = args
    if _has_hooks(bn) or any(_has_hooks(module) for module in modules):
        return False
    if _global_hooks():
        return False
    if torch._C._are_functorch_transforms_active():
        return False
    weights = (depthwise_weight, pointwise_weight, depthwise_bias, pointwise_bias)
    if backend == "auto" and gpu_dispatch.cpu_tuning_applies(input.device):
        return False
    return (channels_last_cpp_applies(input, weights, backend)
            and channels_last_cpp_applies(input, (bn.weight, bn.bias), bn.backend))


def separable_conv2d_batch_norm(conv: nn.Module, bn: nn.Module, input: torch.Tensor) -> torch.Tensor:
    """``bn(conv(input))`` for a separable convolution followed by a BatchNorm (Xception's ``SepConv -> BN``).

    Where ``conv`` is a ``kernels.SeparableConv2d`` (or a ``kernels.PointwiseConv2d`` whose call runs the
    separable op: a strided shortcut in training) and ``bn`` a ``kernels.BatchNorm2d`` in training mode, and
    both run their cpp kernels on this input (channels_last float32/float64 on a CPU), the separable forward
    gathers its output's per-channel mean and variance as it stores the output
    (``sepconv_cpp::forward_with_moments``) and the BatchNorm kernel takes them instead of reading the output
    once more for them: the same output, gradients, running statistics and ``num_batches_tracked`` as the two
    calls, up to rounding (the sums run in another order).

    In evaluation, where ``bn`` normalises with its running statistics (an ``nn.BatchNorm2d`` or
    ``kernels.BatchNorm2d``) and ``conv`` is a ``kernels.SeparableConv2d``, ``PointwiseConv2d`` or ``Conv2d``, on
    float32/float64 CPU tensors on any backend, ``bn`` is folded into ``conv``'s weights
    (``batch_norm_folded``) and ``conv`` runs once with them: no BatchNorm pass, the same result up to rounding.
    Only where ``conv``'s output pixels are at least its weights per output channel (scaling them costs less than
    the pass), not under autocast, while ``torch.compile`` traces or under functorch transforms.

    Anywhere else (other modules, other backends, devices, layouts or dtypes in training, hooks on either module)
    it is ``bn(conv(input))``.
    """
    folded = _with_batch_norm_folded(conv, bn, input)
    if folded is not None:
        return folded
    started = _with_moments(conv, bn, input)
    if started is None:
        return bn(conv(input))
    return bn._forward(*started)


def batch_norm_folded(weight: torch.Tensor, bias: Optional[torch.Tensor], bn: nn.Module):
    """The weight and bias of a convolution followed by the evaluation-mode BatchNorm ``bn`` (running statistics),
    as one convolution: ``conv'(x) = bn(conv(x))``, each output channel's weights scaled by
    ``bn.weight / sqrt(running_var + eps)`` and the bias ``(bias - running_mean) * scale + bn.bias``.

    The scale and bias are computed in float64; the scale is rounded to ``weight``'s dtype and multiplied into it
    (one multiplication a weight in that dtype), the bias rounded once. ``bias`` and ``bn``'s affine parameters may
    be None; the result always has a bias. Differentiable in ``weight``, ``bias`` and ``bn``'s parameters."""
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    if bias is not None:
        shift = shift + bias.double() * scale
    folded = weight * scale.to(weight.dtype).view(-1, *([1] * (weight.dim() - 1)))
    return folded, shift.to(device=weight.device, dtype=weight.dtype)


def _normalises_with_running_statistics(bn: nn.Module) -> bool:
    """Whether ``bn`` is a BatchNorm2d (``nn.BatchNorm2d`` or this library's, forward not overridden, no hooks)
    whose call normalises with its running statistics: evaluation mode with both statistics kept."""
    return (isinstance(bn, nn.BatchNorm2d) and type(bn).forward in (nn.BatchNorm2d.forward, BatchNorm2d.forward)
            and not bn.training and bn.running_mean is not None and bn.running_var is not None
            and not _has_hooks(bn))


def _scaled_convolution(conv: nn.Module):
    """(the weight an output-channel scale applies to, its bias) for a convolution of this library whose output
    channels are that weight's rows and whose call can take another weight and bias (``_forward_with``): a
    ``SeparableConv2d`` (its pointwise weight), a ``PointwiseConv2d`` or a ``Conv2d``, each as this library defines
    it (no subclass's forward, no hooks on it or its children). None otherwise."""
    if any(_has_hooks(module) for module in (conv, *conv.children())):
        return None
    if type(conv).forward is SeparableConv2d.forward and isinstance(conv, SeparableConv2d):
        return conv.pointwise.weight, conv.pointwise.bias
    for kind in (PointwiseConv2d, Conv2d):
        if type(conv).forward is kind.forward and isinstance(conv, kind):
            return conv.weight, conv.bias
    return None


def _with_batch_norm_folded(conv: nn.Module, bn: nn.Module, input: torch.Tensor) -> Optional[torch.Tensor]:
    """``bn(conv(input))`` as one convolution with ``bn`` folded into its weights (``batch_norm_folded``), where
    ``bn`` normalises with its running statistics (evaluation mode), ``conv`` is one of this library's convolutions
    (``_scaled_convolution``), the tensors are float32 or float64 CPU tensors (16-bit weights would be rounded once
    more; on a GPU each of the fold's small ops is a kernel launch),
    autocast is off, and the batch is large enough that scaling the weights costs less than the BatchNorm's pass over
    the output (``conv``'s output pixels at least its weights per output channel). Not while ``torch.compile``
    traces (its compiler fuses the BatchNorm itself) nor under functorch transforms. None elsewhere."""
    if not (_normalises_with_running_statistics(bn) and isinstance(input, torch.Tensor) and input.dim() == 4):
        return None
    # On a GPU the fold's few small tensor ops would each be a kernel launch, more host time than the BatchNorm's
    # one launch saves: CPU only.
    if input.device.type != "cpu" or input.dtype not in (torch.float32, torch.float64):
        return None
    if torch.is_autocast_enabled("cpu"):
        return None
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active() or _global_hooks():
        return None
    found = _scaled_convolution(conv)
    if found is None:
        return None
    weight, bias = found
    parameters = (weight, bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    if any(t is not None and (t.dtype != input.dtype or t.device != input.device) for t in parameters):
        return None
    if weight.shape[0] != bn.num_features or getattr(conv, "in_channels", None) != input.shape[1]:
        return None
    stride = conv.conv1.stride if isinstance(conv, SeparableConv2d) else conv.stride
    pixels = input.shape[0] * -(-input.shape[2] // stride[0]) * -(-input.shape[3] // stride[1])
    if pixels < weight[0].numel():
        return None
    output = conv._forward_with(input, *batch_norm_folded(weight, bias, bn))
    return F.relu(output, inplace=True) if getattr(bn, "relu_output", False) else output


def _geometry(input: torch.Tensor, args):
    """``normalize``'s geometry of the separable op on ``input`` with ``_separable_args``' arguments, and whether
    its output has at least two values a channel (what BatchNorm needs)."""
    depthwise_weight, depthwise_bias, pointwise_weight, pointwise_bias, stride, padding, dilation, _ = args
    geometry = normalize(input, depthwise_weight, pointwise_weight, depthwise_bias, pointwise_bias, stride,
                         padding, dilation)
    return geometry, input.shape[0] * geometry.out_size[0] * geometry.out_size[1] >= 2


def _with_moments(conv: nn.Module, bn: nn.Module, input: torch.Tensor):
    """``conv(input)`` and its per-channel moments for ``bn`` (``forward_with_moments``), where
    ``separable_conv2d_batch_norm`` takes them; None elsewhere."""
    args = _separable_args(conv, input)
    if not _moments_apply(conv, bn, input, args):
        return None
    op_args = args[0]
    geometry, enough = _geometry(input, op_args)
    if not enough:
        return None  # BatchNorm's own error, or ATen's, as the two calls give it
    depthwise_weight, depthwise_bias, pointwise_weight, pointwise_bias, _, _, _, relu_input = op_args
    return torch.ops.sepconv_cpp.forward_with_moments.default(
        input, depthwise_weight, pointwise_weight, depthwise_bias, pointwise_bias, geometry.stride,
        geometry.padding, geometry.dilation, relu_input)


def _is_identity(module: nn.Module) -> bool:
    return type(module) is nn.Identity and not _has_hooks(module)


def _fold(output: torch.Tensor, moments: torch.Tensor, bn: nn.Module, conv: nn.Module, after: Optional[nn.Module]):
    """``conv(bn(output))`` with ``bn`` applied in ``conv``'s input read (``sepconv_cpp::batch_norm_separable``),
    where ``bn`` (a BatchNorm2d in training whose statistics came with ``output``: ``_with_moments``) is folded
    into ``conv``: a ``kernels.SeparableConv2d`` of depth multiplier 1, no hooks, on its cpp kernel for this
    activation. Returns (conv's output, its moments for ``after`` where ``after`` would take them, else None);
    None where the fold does not apply."""
    if not (type(conv).forward is SeparableConv2d.forward and isinstance(conv, SeparableConv2d)):
        return None
    if conv.conv1.out_channels != conv.conv1.in_channels or any(_has_hooks(m) for m in (conv, *conv.children())):
        return None
    args = _separable_args(conv, output)
    if args is None or not channels_last_cpp_applies(output, args[0][:4], args[2]):
        return None
    if args[2] == "auto" and gpu_dispatch.cpu_tuning_applies(output.device):
        return None  # with CPU tuning on, `auto` chooses per layer
    geometry, enough = _geometry(output, args[0])
    # The output's moments where the module after takes them (it is a BatchNorm that would, given conv's input).
    with_moments = after is not None and enough and _moments_apply(conv, after, output, args)
    depthwise_weight, depthwise_bias, pointwise_weight, pointwise_bias, _, _, _, relu_input = args[0]
    factor, running_mean, running_var = bn._running()
    out, out_moments, mean, _, var = torch.ops.sepconv_cpp.batch_norm_separable.default(
        output, moments, bn.weight, bn.bias, float(bn.eps), depthwise_weight, pointwise_weight, depthwise_bias,
        pointwise_bias, geometry.stride, geometry.padding, geometry.dilation, relu_input or bn.relu_output,
        with_moments)
    _update_running(running_mean, running_var, factor, mean, var)
    return out, out_moments if with_moments else None


def run_sequential(modules: Iterable[nn.Module], input: torch.Tensor) -> torch.Tensor:
    """``modules`` called in turn on ``input`` (what ``nn.Sequential(*modules)(input)`` computes), each separable
    convolution and the module after it as one ``separable_conv2d_batch_norm`` call.

    In training on cpp, a BatchNorm that takes its statistics from the separable convolution before it, and whose
    output goes (through hook-free ``nn.Identity`` modules only) into another ``kernels.SeparableConv2d``, is applied
    by that convolution as it reads its input (with the BatchNorm's ReLU and the convolution's ``relu_input``): the
    normalised activation is never stored, which takes one activation a folded pair off the memory a training step
    keeps for its backward. Same outputs, gradients and running statistics as the calls in turn, up to rounding.
    """
    modules = list(modules)
    x = input
    pending = None  # (output, moments, bn): bn(output), not applied yet
    index = 0
    while index < len(modules):
        module = modules[index]
        if pending is not None:
            if _is_identity(module):
                index += 1
                continue
            after = modules[index + 1] if index + 1 < len(modules) else None
            folded = _fold(*pending, module, after)
            if folded is not None:
                out, out_moments = folded
                pending = (out, out_moments, after) if out_moments is not None else None
                x = out
                index += 2 if out_moments is not None else 1
                continue
            output, moments, bn = pending
            x, pending = bn._forward(output, moments), None
            continue  # the module again, on the BatchNorm's output
        if index + 1 < len(modules) and isinstance(module, (SeparableConv2d, PointwiseConv2d, Conv2d)):
            folded = _with_batch_norm_folded(module, modules[index + 1], x)
            if folded is not None:
                x = folded
                index += 2
                continue
        if index + 1 < len(modules) and isinstance(module, SeparableConv2d):
            started = _with_moments(module, modules[index + 1], x)
            if started is not None:
                pending = (*started, modules[index + 1])
            else:
                x = modules[index + 1](module(x))
            index += 2
            continue
        x = module(x)
        index += 1
    if pending is not None:
        output, moments, bn = pending
        x = bn._forward(output, moments)
    return x
