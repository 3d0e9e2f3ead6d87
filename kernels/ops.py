"""The ``torch.library`` ops that every backend implements.

Each backend owns a namespace with the same two ops (``sepconv_<backend>``):

    forward(input, depthwise_weight, pointwise_weight, depthwise_bias?, pointwise_bias?,
            stride[2], padding[4], dilation[2], relu_input) -> output
    backward(grad_output, input, depthwise_weight, pointwise_weight, depthwise_bias?,
             stride[2], padding[4], dilation[2], relu_input, output_mask[5])
        -> (grad_input, grad_depthwise_weight, grad_pointwise_weight,
            grad_depthwise_bias, grad_pointwise_bias)

``padding`` is ``[top, bottom, left, right]``. ``output_mask`` has one flag per
gradient, in the order they are returned (as ``aten::convolution_backward``'s covers
its bias): a gradient that is not asked for is not computed and comes back as an
empty ``(0,)`` tensor. A layer without biases asks for neither bias gradient, so no
backend sums ``grad_output`` over pixels for a pointwise bias that does not exist.
The backward op recomputes the depthwise intermediate it needs. The torch and
triton backends' namespaces have a second pair, ``forward_keeping_hidden`` (which
also returns the depthwise result: the torch backend's, and split mode's) and
``backward_from_hidden`` (which takes it back), so that a graph recorded there keeps
that result, as the eager ``nn.Conv2d`` pair keeps the pointwise convolution's input,
instead of recomputing it (``kernels.autograd.SeparableConv2dKeepingHidden``). The cpp
backend's fused backward recomputes it tile by tile instead, and keeps nothing.

The schemas and fake (meta) implementations live here, so ``torch.compile``
and ``opcheck`` see every backend the same way. The ``torch`` namespace is
implemented here with ATen; ``cpp`` registers its CPU kernels from C++
(``TORCH_LIBRARY_IMPL``) and ``triton`` its CUDA kernels from
``kernels/triton`` (``sepconv_triton``: the mode ``SEPCONV_TRITON_MODE`` names, fused by
default; ``sepconv_triton_split``: split mode always).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch._prims_common import make_channels_last_strides_for, make_contiguous_strides_for

from ._args import memory_format_of, output_size, pooled_shape

BACKEND_NAMES = ("torch", "cpp", "triton")
# What a resolved call runs: a backend's ops, or the triton backend's split mode (a depthwise
# kernel, then the pointwise convolution as a GEMM), which has ops of its own so that the mode
# can be chosen per call (``kernels.dispatch.resolve``).
IMPLEMENTATIONS = BACKEND_NAMES + ("triton_split",)

FORWARD_SCHEMA = (
    "forward(Tensor input, Tensor depthwise_weight, Tensor pointwise_weight, Tensor? depthwise_bias, "
    "Tensor? pointwise_bias, int[2] stride, int[4] padding, int[2] dilation, bool relu_input) -> Tensor"
)
BACKWARD_SCHEMA = (
    "backward(Tensor grad_output, Tensor input, Tensor depthwise_weight, Tensor pointwise_weight, "
    "Tensor? depthwise_bias, int[2] stride, int[4] padding, int[2] dilation, bool relu_input, "
    "bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)

# The torch and triton backends' namespaces have two more (see the module docstring). ``hidden`` is the
# depthwise result: for torch the depthwise convolution's output, (N, C_hid, OH, OW) in the input's memory
# format; in split mode (N*OH*OW, C_hid) row-major in the input's dtype; fused mode computes none and
# returns an empty (0,) tensor, which ``backward_from_hidden`` takes as "recompute it".
KEEPS_HIDDEN = ("torch", "triton", "triton_split")
HIDDEN_SCHEMAS = (
    FORWARD_SCHEMA.replace("forward(", "forward_keeping_hidden(").replace(") -> Tensor", ") -> (Tensor, Tensor)"),
    BACKWARD_SCHEMA.replace("backward(", "backward_from_hidden(").replace(
        "Tensor input, ", "Tensor input, Tensor hidden, "),
)


# The cpp namespace has more ops: the tail of a strided residual block, max_pool2d(input) +
# residual in one pass, and its input gradient (see kernels.pooling) ...
POOL_SCHEMAS = (
    "max_pool2d_add(Tensor input, Tensor residual, int[2] kernel_size, int[2] stride, int[2] padding) -> Tensor",
    "max_pool2d_add_backward(Tensor grad_output, Tensor input, int[2] kernel_size, int[2] stride, "
    "int[2] padding) -> Tensor",
)


# ... training-mode BatchNorm on channels_last activations (see kernels.batch_norm): batch
# statistics, the output (ReLU'd with relu), and mean / invstd / unbiased variance per channel; its
# backward (given the ReLU'd output, it first masks grad_output as ReLU's backward does). The batch
# statistics come from a pass over the input, or, as ``moments`` ((2, C) float64: the per-channel mean
# and sum of squared deviations), from the separable forward that wrote the input: the forward's
# variant ``forward_with_moments`` gathers them as it stores its output (see
# kernels.batch_norm.separable_conv2d_batch_norm) ...
FORWARD_WITH_MOMENTS_SCHEMA = FORWARD_SCHEMA.replace("forward(", "forward_with_moments(").replace(
    ") -> Tensor", ") -> (Tensor, Tensor)")
BATCH_NORM_SCHEMAS = (
    "batch_norm(Tensor input, Tensor? weight, Tensor? bias, float eps, bool relu=False, Tensor? moments=None) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    "batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, Tensor invstd, "
    "bool[3] output_mask, Tensor? relu_output=None) -> (Tensor, Tensor, Tensor)",
)
# ... that BatchNorm folded into the separable convolution after it (see kernels.batch_norm.run_sequential): the
# convolution reads relu?(input * alpha + beta) with BatchNorm's batch-statistics alpha and beta, so the
# normalised activation is never stored; returns the output, its moments (with with_moments, else (0,)), and
# BatchNorm's mean, invstd and unbiased variance. Its backward runs the separable backward reading the input the
# same way, then BatchNorm's backward, and returns the gradients of input, bn_weight, bn_bias, depthwise_weight,
# pointwise_weight, depthwise_bias and pointwise_bias ...
BATCH_NORM_SEPARABLE_SCHEMAS = (
    "batch_norm_separable(Tensor input, Tensor? moments, Tensor? bn_weight, Tensor? bn_bias, float eps, "
    "Tensor depthwise_weight, Tensor pointwise_weight, Tensor? depthwise_bias, Tensor? pointwise_bias, int[2] stride, "
    "int[4] padding, int[2] dilation, bool relu_input, bool with_moments) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "batch_norm_separable_backward(Tensor grad_output, Tensor input, Tensor? bn_weight, Tensor? bn_bias, Tensor mean, "
    "Tensor invstd, Tensor depthwise_weight, Tensor pointwise_weight, Tensor? depthwise_bias, int[2] stride, "
    "int[4] padding, int[2] dilation, bool relu_input, bool[7] output_mask) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
# ... a dense convolution (groups 1; its backward is ATen's, see kernels.conv) ...
CONV_SCHEMA = (
    "conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation) -> Tensor"
)
# ... the forward with its pointwise weight packed ahead (for inference: a weight that serves many calls is
# not packed again on each; kernels.module.SeparableConv2d.pack_for_inference) and that packing, in the
# build's own panel layout (ceil(Cout / 32) * K * 32 elements; no graph: the packed copy is a snapshot) ...
FORWARD_PACKED_SCHEMA = FORWARD_SCHEMA.replace("forward(", "forward_packed(").replace(
    "Tensor pointwise_weight, ", "Tensor pointwise_weight, Tensor packed_pointwise, ")
PACK_SCHEMA = "pack_pointwise(Tensor pointwise_weight) -> Tensor"
PACK_COLUMNS = 32  # the panel width (csrc/microkernel.h kCols)
# ... and two for its buffer cache (kernels/csrc/buffer_cache.h): bytes live, idle and the idle
# cap; and freeing the idle blocks (returns the bytes freed).
CACHE_SCHEMAS = ("cache_stats() -> int[]", "empty_cache() -> int")


def namespace(backend: str) -> str:
    return f"sepconv_{backend}"


def check_window(kh: int, kw: int, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> None:
    """The checks of the C++ ops (check_window in sepconv_cpu.cpp) for the ops implemented in Python: they are
    public (``torch.ops.sepconv_*``), and ``separable_conv2d``'s own checks are not on their path."""
    if kh < 1 or kw < 1:
        raise ValueError(f"the kernel must be at least 1x1, got {kh}x{kw}")
    for name, values, minimum in (("stride", stride, 1), ("dilation", dilation, 1), ("padding", padding, 0)):
        if min(values) < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {list(values)}")


def output_shape(input: torch.Tensor, depthwise_weight: torch.Tensor, pointwise_weight: torch.Tensor,
                 stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> List[int]:
    kh, kw = depthwise_weight.shape[2], depthwise_weight.shape[3]
    check_window(kh, kw, stride, padding, dilation)
    return [
        input.shape[0],
        pointwise_weight.shape[0],
        output_size(input.shape[2], padding[0], padding[1], kh, stride[0], dilation[0]),
        output_size(input.shape[3], padding[2], padding[3], kw, stride[1], dilation[1]),
    ]


def empty_output(input: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The output buffer every backend returns: shaped ``shape``, in ``input``'s memory format."""
    return torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=memory_format_of(input))


def _int_strides(shape: tuple, channels_last: bool) -> tuple:
    """``_strides_for`` with int sizes. As torch lays tensors out: contiguous, a size 0 counts as 1;
    channels_last, it does not (the strides of the dimensions outside it become 0)."""
    if channels_last:
        channels, height, width = shape[1], shape[2], shape[3]
        return (height * width * channels, 1, width * channels, channels)
    strides = [1] * len(shape)
    for dim in range(len(shape) - 2, -1, -1):
        strides[dim] = strides[dim + 1] * max(shape[dim + 1], 1)
    return tuple(strides)


def _strides_for(shape: Sequence[int], memory_format: torch.memory_format) -> tuple:
    """The strides ``torch.empty(shape, memory_format=memory_format)`` gets."""
    channels_last = memory_format is torch.channels_last
    if all(type(size) is int for size in shape):  # real sizes (every eager call): plain int arithmetic
        return _int_strides(tuple(shape), channels_last)
    # Symbolic sizes, under tracing: torch's own rule.
    return tuple(make_channels_last_strides_for(shape) if channels_last else make_contiguous_strides_for(shape))


def as_returned(result: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """``result``, a tensor this call allocated, as an op output in ``memory_format``, with exactly the
    strides ``torch.empty`` gives that format (what the ops' fake kernels promise; ``torch.compile``
    checks them): ``result`` itself where it has them; where only the strides of size-1 dimensions
    differ (they address nothing: ATen's weight gradients of shape (C_out, C, 1, 1), say), ``result``
    with those strides restated in place, in eager calls; else a copy. (A copy costs one more pass
    over the tensor, 0.07 ms for the 4.9 MB output of 1024->1536 at 10x10, batch 8, on CPU, and on a
    GPU a kernel launch and its host time.)"""
    if result._base is None and result.storage_offset() == 0:
        strides = _strides_for(result.shape, memory_format)
        if result.stride() == strides:
            return result
        if (type(result) is torch.Tensor and torch._C._len_torch_dispatch_stack() == 0
                and result.is_contiguous(memory_format=memory_format)):
            return result.as_strided_(result.shape, strides)
    out = torch.empty(result.shape, dtype=result.dtype, device=result.device, memory_format=memory_format)
    return out.copy_(result)


def check_output_mask(output_mask: Sequence[bool]) -> List[bool]:
    """``output_mask`` as five bools (input, depthwise weight, pointwise weight, depthwise bias, pointwise
    bias); a ValueError naming it otherwise."""
    if len(output_mask) != 5:
        raise ValueError(f"output_mask must have 5 entries (input, depthwise_weight, pointwise_weight, "
                         f"depthwise_bias, pointwise_bias), got {list(output_mask)}")
    return [bool(v) for v in output_mask]


def empty_gradients(grad_output, input, depthwise_weight, pointwise_weight, depthwise_bias, output_mask):
    """The five gradient buffers of ``backward`` (``(0,)`` where ``output_mask`` says no)."""
    def like(tensor, wanted):
        return torch.empty_like(tensor, memory_format=torch.contiguous_format) if wanted else input.new_empty(0)

    want_input, want_depthwise, want_pointwise, want_depthwise_bias, want_pointwise_bias = check_output_mask(
        output_mask)
    return (
        torch.empty_like(input, memory_format=memory_format_of(input)) if want_input else input.new_empty(0),
        like(depthwise_weight, want_depthwise),
        like(pointwise_weight, want_pointwise),
        input.new_empty(depthwise_weight.shape[0] if want_depthwise_bias else 0),
        input.new_empty(pointwise_weight.shape[0] if want_pointwise_bias else 0),
    )


def _fake_forward(input, depthwise_weight, pointwise_weight, depthwise_bias, pointwise_bias,
                  stride, padding, dilation, relu_input):
    return empty_output(input, output_shape(input, depthwise_weight, pointwise_weight, stride, padding, dilation))


def _fake_forward_packed(input, depthwise_weight, pointwise_weight, packed_pointwise, depthwise_bias,
                         pointwise_bias, stride, padding, dilation, relu_input):
    return _fake_forward(input, depthwise_weight, pointwise_weight, depthwise_bias, pointwise_bias, stride, padding,
                         dilation, relu_input)


def _fake_pack_pointwise(pointwise_weight):
    cout, k = pointwise_weight.shape[:2]
    return pointwise_weight.new_empty(((cout + PACK_COLUMNS - 1) // PACK_COLUMNS * k * PACK_COLUMNS,))


def _fake_backward(grad_output, input, depthwise_weight, pointwise_weight, depthwise_bias,
                   stride, padding, dilation, relu_input, output_mask):
    return empty_gradients(grad_output, input, depthwise_weight, pointwise_weight, depthwise_bias, output_mask)


def _fake_backward_from_hidden(grad_output, input, hidden, depthwise_weight, pointwise_weight, depthwise_bias,
                               stride, padding, dilation, relu_input, output_mask):
    return empty_gradients(grad_output, input, depthwise_weight, pointwise_weight, depthwise_bias, output_mask)


def _fake_max_pool2d_add(input, residual, kernel_size, stride, padding):
    return empty_output(input, pooled_shape(input, kernel_size, stride, padding))


def _fake_max_pool2d_add_backward(grad_output, input, kernel_size, stride, padding):
    return empty_output(input, input.shape)


def _setup_max_pool2d_add(ctx, inputs, output) -> None:
    input, _, kernel_size, stride, padding = inputs
    ctx.save_for_backward(input)
    ctx.window = (list(kernel_size), list(stride), list(padding))


def _max_pool2d_add_backward(ctx, grad_output):
    grad_input = None
    if ctx.needs_input_grad[0]:
        (input,) = ctx.saved_tensors
        # Any layout: the op reads grad_output as NHWC, copying only when it is not.
        grad_input = torch.ops.sepconv_cpp.max_pool2d_add_backward.default(grad_output, input, *ctx.window)
    return grad_input, grad_output if ctx.needs_input_grad[1] else None, None, None, None


def _fake_conv2d(input, weight, bias, stride, padding, dilation):
    kh, kw = weight.shape[2], weight.shape[3]
    return empty_output(input, [input.shape[0], weight.shape[0],
                                output_size(input.shape[2], padding[0], padding[0], kh, stride[0], dilation[0]),
                                output_size(input.shape[3], padding[1], padding[1], kw, stride[1], dilation[1])])


def _setup_conv2d(ctx, inputs, output) -> None:
    input, weight, bias, stride, padding, dilation = inputs
    ctx.save_for_backward(input, weight)
    ctx.geometry = (list(stride), list(padding), list(dilation))
    ctx.bias_shape = None if bias is None else list(bias.shape)


def _conv2d_backward(ctx, grad_output):
    """ATen's convolution backward (oneDNN on CPU) from the saved input and weight."""
    input, weight = ctx.saved_tensors
    stride, padding, dilation = ctx.geometry
    needs = ctx.needs_input_grad
    mask = [needs[0], needs[1], needs[2] and ctx.bias_shape is not None]
    if not any(mask):
        return None, None, None, None, None, None
    grads = torch.ops.aten.convolution_backward.default(
        grad_output, input, weight, ctx.bias_shape, stride, padding, dilation, False, [0, 0], 1, mask)
    return tuple(g if w else None for g, w in zip(grads, mask)) + (None, None, None)


def _fake_forward_with_moments(input, depthwise_weight, pointwise_weight, depthwise_bias, pointwise_bias,
                               stride, padding, dilation, relu_input):
    output = _fake_forward(input, depthwise_weight, pointwise_weight, depthwise_bias, pointwise_bias,
                           stride, padding, dilation, relu_input)
    return output, input.new_empty((2, output.shape[1]), dtype=torch.float64)


def _setup_forward_with_moments(ctx, inputs, output) -> None:
    setup_context(ctx, inputs, output)
    ctx.mark_non_differentiable(output[1])


def _fake_batch_norm(input, weight, bias, eps, relu=False, moments=None):
    stats = [input.new_empty(input.shape[1]) for _ in range(3)]
    return (empty_output(input, input.shape), *stats)


def _fake_batch_norm_backward(grad_output, input, weight, mean, invstd, output_mask, relu_output=None):
    want_input, want_weight, want_bias = output_mask
    return (empty_output(input, input.shape) if want_input else input.new_empty(0),
            input.new_empty(input.shape[1] if want_weight else 0),
            input.new_empty(input.shape[1] if want_bias else 0))


def _setup_batch_norm(ctx, inputs, output) -> None:
    input, weight, _, _, *rest = inputs
    relu = bool(rest[0]) if rest else False
    result, mean, invstd, var = output
    # With relu the output's zeros mask the gradient, as ReLU's backward does (the next layer
    # usually saves the same tensor, so this keeps nothing alive that would not be anyway).
    # Given moments are input's statistics: the backward is BatchNorm's whole one either way.
    ctx.save_for_backward(input, weight, mean, invstd, result if relu else None)
    ctx.mark_non_differentiable(mean, invstd, var)


def _batch_norm_backward(ctx, grad_output, *_):
    input, weight, mean, invstd, relu_output = ctx.saved_tensors
    needs = ctx.needs_input_grad
    mask = [needs[0], needs[1] and weight is not None, needs[2]]
    if not any(mask):
        return None, None, None, None, None, None
    grads = torch.ops.sepconv_cpp.batch_norm_backward.default(grad_output, input, weight, mean, invstd, mask,
                                                              relu_output)
    return tuple(g if w else None for g, w in zip(grads, mask)) + (None, None, None)


def _fake_batch_norm_separable(input, moments, bn_weight, bn_bias, eps, depthwise_weight, pointwise_weight,
                               depthwise_bias, pointwise_bias, stride, padding, dilation, relu_input, with_moments):
    output = _fake_forward(input, depthwise_weight, pointwise_weight, depthwise_bias, pointwise_bias,
                           stride, padding, dilation, relu_input)
    out_moments = input.new_empty((2, output.shape[1]) if with_moments else (0,), dtype=torch.float64)
    return (output, out_moments, *[input.new_empty(input.shape[1]) for _ in range(3)])


def _fake_batch_norm_separable_backward(grad_output, input, bn_weight, bn_bias, mean, invstd, depthwise_weight,
                                        pointwise_weight, depthwise_bias, stride, padding, dilation, relu_input,
                                        output_mask):
    _, *separable = empty_gradients(grad_output, input, depthwise_weight, pointwise_weight, depthwise_bias,
                                    [False, *output_mask[3:]])
    return (*_fake_batch_norm_backward(grad_output, input, bn_weight, mean, invstd, output_mask[:3]), *separable)


def _setup_batch_norm_separable(ctx, inputs, output) -> None:
    (input, _, bn_weight, bn_bias, _, depthwise_weight, pointwise_weight, depthwise_bias, pointwise_bias, stride,
     padding, dilation, relu_input, _) = inputs
    _, out_moments, mean, invstd, var = output
    ctx.save_for_backward(input, bn_weight, bn_bias, mean, invstd, depthwise_weight, pointwise_weight, depthwise_bias)
    ctx.geometry = (list(stride), list(padding), list(dilation), bool(relu_input))
    ctx.has_biases = (bn_weight is not None, bn_bias is not None, depthwise_bias is not None,
                      pointwise_bias is not None)
    ctx.memory_format = memory_format_of(input)
    ctx.mark_non_differentiable(out_moments, mean, invstd, var)


def _batch_norm_separable_backward(ctx, grad_output, *_):
    input, bn_weight, bn_bias, mean, invstd, depthwise_weight, pointwise_weight, depthwise_bias = ctx.saved_tensors
    has_bn_weight, has_bn_bias, has_depthwise_bias, has_pointwise_bias = ctx.has_biases
    needs = ctx.needs_input_grad
    # needs: input, moments, bn_weight, bn_bias, eps, depthwise_weight, pointwise_weight, depthwise_bias,
    # pointwise_bias, then the non-tensor arguments.
    mask = [needs[0], needs[2] and has_bn_weight, needs[3] and has_bn_bias, needs[5], needs[6],
            needs[7] and has_depthwise_bias, needs[8] and has_pointwise_bias]
    if not any(mask):
        return (None,) * 14
    grads = torch.ops.sepconv_cpp.batch_norm_separable_backward.default(
        grad_output.contiguous(memory_format=ctx.memory_format), input, bn_weight, bn_bias, mean, invstd,
        depthwise_weight, pointwise_weight, depthwise_bias, *ctx.geometry, mask)
    grads = [g if w else None for g, w in zip(grads, mask)]
    return (grads[0], None, grads[1], grads[2], None, *grads[3:]) + (None,) * 5


# --- autograd for the ops themselves (the autograd.Function reuses these two) ---------------

def setup_context(ctx, inputs, output, kept: tuple = ()) -> None:
    """Saves the input and weights (and ``kept``, tensors the backward op takes after the input)."""
    input, depthwise_weight, pointwise_weight, depthwise_bias, pointwise_bias, stride, padding, dilation, relu = inputs
    ctx.save_for_backward(input, depthwise_weight, pointwise_weight, depthwise_bias, *kept)
    ctx.geometry = (list(stride), list(padding), list(dilation), bool(relu))
    ctx.has_biases = (depthwise_bias is not None, pointwise_bias is not None)
    # The backward gives the op grad_output in the input's (and so the output's) memory format. Read here:
    # torch.compile and torch.export in torch 2.6 trace a backward strictly and refuse is_contiguous() there.
    ctx.memory_format = memory_format_of(input)


def setup_context_keeping_hidden(ctx, inputs, output) -> None:
    """``setup_context`` for ``forward_keeping_hidden``: the weights, the input and the depthwise result."""
    _, hidden = output
    setup_context(ctx, inputs, output, kept=(hidden,))
    ctx.mark_non_differentiable(hidden)


# torch.compiler.is_exporting arrived after torch 2.6; there, export's tracing is seen by its tensors
# (fake or functional tensors, not plain ones: call_below_autograd checks the first argument).
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


def below_autograd() -> bool:
    """Whether ``call_below_autograd`` may skip the autograd keys: in plain eager calls (``torch.compile`` and
    ``torch.export`` trace the op as it is; functorch transforms keep their own autograd levels)."""
    return not (torch.compiler.is_compiling() or _is_exporting() or torch._C._are_functorch_transforms_active())


# Ops whose implementations are Python functions that a plain eager call may run without the dispatcher:
# op -> device type -> function (``kernels.triton.registration`` adds the launchers it registers).
DIRECT: Dict[object, Dict[str, Callable]] = {}


def _unobserved() -> bool:
    """No dispatch or function mode and no profiler: nothing that would see an op by its name (the
    profiler's op records, ``FakeTensorMode``, the benchmarks' census of the ops that ran)."""
    return (torch._C._len_torch_dispatch_stack() == 0 and not torch._C._is_torch_function_mode_enabled()
            and not torch._C._autograd._profiler_enabled())


def call_below_autograd(op, args):
    """``op(*args)`` where no graph is recorded (inside a Function's forward or backward, or a call whose tensors
    need no gradient). The ops carry an autograd kernel of their own (``torch.library.register_autograd``) for
    direct callers; there it would only redispatch below autograd, in Python (~25 us). Excluding the
    autograd keys goes there directly; and where nothing observes the call, an op with a Python implementation
    for the tensors' device (``DIRECT``) runs it without the dispatcher's boxing and Python trampoline."""
    if type(args[0]) is torch.Tensor and below_autograd():  # a plain tensor: not traced (fake, functional)
        with torch._C._AutoDispatchBelowAutograd():
            direct = DIRECT.get(op)
            if direct is not None and _unobserved():
                function = direct.get(args[0].device.type)
                if function is not None:
                    return function(*args)
            return op(*args)
    return op(*args)


def make_backward(backward_op, keeps_hidden: bool = False):
    """The autograd backward for one backend's ops: one call of its backward op (``backward_from_hidden``, given
    the saved depthwise result, under ``keeps_hidden``)."""

    def backward(ctx, grad_output, *_):  # under keeps_hidden, also the (unused) gradient of hidden
        input, depthwise_weight, pointwise_weight, depthwise_bias, *hidden = ctx.saved_tensors
        stride, padding, dilation, relu_input = ctx.geometry
        has_depthwise_bias, has_pointwise_bias = ctx.has_biases
        needs = ctx.needs_input_grad
        mask = [needs[0], needs[1], needs[2], needs[3] and has_depthwise_bias, needs[4] and has_pointwise_bias]
        if not any(mask):
            return (None,) * 9
        args = (grad_output.contiguous(memory_format=ctx.memory_format), input, *hidden, depthwise_weight,
                pointwise_weight, depthwise_bias, stride, padding, dilation, relu_input, mask)
        # No graph of the gradients themselves (create_graph): below autograd, as the forward runs.
        grads = backward_op(*args) if torch.is_grad_enabled() else call_below_autograd(backward_op, args)
        return tuple(g if w else None for g, w in zip(grads, mask)) + (None,) * 4

    return backward


_libraries = {}


def define(backend: str) -> torch.library.Library:
    """Define (once) the two ops of ``backend``'s namespace with their fake and autograd kernels."""
    if backend in _libraries:
        return _libraries[backend]
    ns = namespace(backend)
    lib = torch.library.Library(ns, "DEF")
    lib.define(FORWARD_SCHEMA)
    lib.define(BACKWARD_SCHEMA)
    torch.library.register_fake(f"{ns}::forward", _fake_forward, lib=lib)
    torch.library.register_fake(f"{ns}::backward", _fake_backward, lib=lib)
    backward_op = getattr(torch.ops, ns).backward.default
    torch.library.register_autograd(f"{ns}::forward", make_backward(backward_op),
                                    setup_context=setup_context, lib=lib)
    if backend in KEEPS_HIDDEN:  # the forward's fake is the backend's (its hidden depends on the mode)
        for schema in HIDDEN_SCHEMAS:
            lib.define(schema)
        torch.library.register_fake(f"{ns}::backward_from_hidden", _fake_backward_from_hidden, lib=lib)
    if backend == "cpp":
        for schema in POOL_SCHEMAS + BATCH_NORM_SCHEMAS + BATCH_NORM_SEPARABLE_SCHEMAS + CACHE_SCHEMAS + (
                CONV_SCHEMA, FORWARD_WITH_MOMENTS_SCHEMA, FORWARD_PACKED_SCHEMA, PACK_SCHEMA):
            lib.define(schema)
        torch.library.register_fake(f"{ns}::forward_packed", _fake_forward_packed, lib=lib)
        torch.library.register_fake(f"{ns}::pack_pointwise", _fake_pack_pointwise, lib=lib)
        torch.library.register_fake(f"{ns}::forward_with_moments", _fake_forward_with_moments, lib=lib)
        torch.library.register_autograd(f"{ns}::forward_with_moments", make_backward(backward_op),
                                        setup_context=_setup_forward_with_moments, lib=lib)
        torch.library.register_fake(f"{ns}::batch_norm", _fake_batch_norm, lib=lib)
        torch.library.register_fake(f"{ns}::batch_norm_backward", _fake_batch_norm_backward, lib=lib)
        torch.library.register_autograd(f"{ns}::batch_norm", _batch_norm_backward,
                                        setup_context=_setup_batch_norm, lib=lib)
        torch.library.register_fake(f"{ns}::batch_norm_separable", _fake_batch_norm_separable, lib=lib)
        torch.library.register_fake(f"{ns}::batch_norm_separable_backward", _fake_batch_norm_separable_backward,
                                    lib=lib)
        torch.library.register_autograd(f"{ns}::batch_norm_separable", _batch_norm_separable_backward,
                                        setup_context=_setup_batch_norm_separable, lib=lib)
        torch.library.register_fake(f"{ns}::conv2d", _fake_conv2d, lib=lib)
        torch.library.register_autograd(f"{ns}::conv2d", _conv2d_backward, setup_context=_setup_conv2d, lib=lib)
        torch.library.register_fake(f"{ns}::max_pool2d_add", _fake_max_pool2d_add, lib=lib)
        torch.library.register_fake(f"{ns}::max_pool2d_add_backward", _fake_max_pool2d_add_backward, lib=lib)
        torch.library.register_autograd(f"{ns}::max_pool2d_add", _max_pool2d_add_backward,
                                        setup_context=_setup_max_pool2d_add, lib=lib)
    _libraries[backend] = lib
    return lib


def forward_op(backend: str):
    return getattr(torch.ops, namespace(backend)).forward.default


def backward_op(backend: str):
    return getattr(torch.ops, namespace(backend)).backward.default


# --- the "torch" backend: the same ops written with ATen, for every device --------------------

def _pad_input(input: torch.Tensor, padding: Sequence[int], relu_input: bool):
    """Apply the input ReLU and any asymmetric padding; return (tensor, symmetric conv padding)."""
    if relu_input:
        input = F.relu(input)
    top, bottom, left, right = padding
    if top == bottom and left == right:
        return input, [top, left]
    return F.pad(input, [left, right, top, bottom]), [0, 0]


def _torch_pair(input, depthwise_weight, pointwise_weight, depthwise_bias, pointwise_bias,
                stride, padding, dilation, relu_input):
    """(output, depthwise result) as ATen computes them."""
    padded, conv_padding = _pad_input(input, padding, relu_input)
    hidden = F.conv2d(padded, depthwise_weight, depthwise_bias, stride, conv_padding, dilation, groups=input.shape[1])
    return F.conv2d(hidden, pointwise_weight, pointwise_bias), hidden


def torch_pair_recorded(input, *args) -> torch.Tensor:
    """The torch implementation's output as the ATen pair itself (ReLU, depthwise and pointwise
    ``F.conv2d``, under autograd), for plain eager calls (``kernels.autograd.plain_eager``): autograd
    then records and saves what the ``nn.Conv2d`` pair does, and a call costs the pair's host time,
    not an op's and an ``autograd.Function``'s on top. The output keeps the input's memory format (a
    copy only where ATen chose the other one: an NCHW input with channels_last weights)."""
    return _torch_pair(input, *args)[0].contiguous(memory_format=memory_format_of(input))  # no copy when it is


def _torch_forward(input, *args):
    return as_returned(_torch_pair(input, *args)[0], memory_format_of(input))


def _torch_forward_keeping_hidden(input, *args):
    output, hidden = _torch_pair(input, *args)
    memory_format = memory_format_of(input)
    return as_returned(output, memory_format), as_returned(hidden, memory_format)


def _fake_torch_forward_keeping_hidden(input, depthwise_weight, pointwise_weight, depthwise_bias, pointwise_bias,
                                       stride, padding, dilation, relu_input):
    shape = output_shape(input, depthwise_weight, pointwise_weight, stride, padding, dilation)
    return empty_output(input, shape), empty_output(input, [shape[0], depthwise_weight.shape[0], *shape[2:]])


def _torch_backward(grad_output, input, *args):
    return _torch_backward_from_hidden(grad_output, input, input.new_empty(0), *args)


def _torch_backward_from_hidden(grad_output, input, hidden, depthwise_weight, pointwise_weight, depthwise_bias,
                                stride, padding, dilation, relu_input, output_mask):
    """The torch backend's backward; ``hidden``: the forward's depthwise result, or empty to recompute it."""
    want_input, want_depthwise, want_pointwise, want_depthwise_bias, want_pointwise_bias = check_output_mask(
        output_mask)
    # Each gradient is returned as ATen computed it where its strides allow (as_returned), not copied;
    # one not asked for is an empty (0,) tensor.
    out = [input.new_empty(0) for _ in range(5)]
    contiguous = torch.contiguous_format
    want_hidden = want_input or want_depthwise or want_depthwise_bias
    channels = input.shape[1]
    # The ReLU'd, padded input: for recomputing the depthwise result and for its backward only.
    if hidden.numel() == 0 or want_hidden:
        padded, conv_padding = _pad_input(input, padding, relu_input)
    if hidden.numel() == 0:
        hidden = F.conv2d(padded, depthwise_weight, depthwise_bias, stride, conv_padding, dilation, groups=channels)
    grad_hidden, grad_pw_weight, grad_pw_bias = torch.ops.aten.convolution_backward(
        grad_output, hidden, pointwise_weight, [pointwise_weight.shape[0]], [1, 1], [0, 0], [1, 1],
        False, [0, 0], 1, [want_hidden, want_pointwise, want_pointwise_bias])
    if want_pointwise:
        out[2] = as_returned(grad_pw_weight, contiguous)
    if want_pointwise_bias:
        out[4] = as_returned(grad_pw_bias, contiguous)
    if want_hidden:
        grad_padded, grad_dw_weight, grad_dw_bias = torch.ops.aten.convolution_backward(
            grad_hidden, padded, depthwise_weight, [depthwise_weight.shape[0]], list(stride), conv_padding,
            list(dilation), False, [0, 0], channels, [want_input, want_depthwise, want_depthwise_bias])
        if want_depthwise:
            out[1] = as_returned(grad_dw_weight, contiguous)
        if want_depthwise_bias:
            out[3] = as_returned(grad_dw_bias, contiguous)
        if want_input:
            top, _, left, _ = padding
            if conv_padding == [0, 0] and grad_padded.shape != input.shape:
                grad_padded = grad_padded[:, :, top:top + input.shape[2], left:left + input.shape[3]]
            if relu_input:  # ReLU's threshold backward: 0 where input <= 0, whatever the gradient
                grad_padded = torch.where(input > 0, grad_padded, 0)
            out[0] = as_returned(grad_padded, memory_format_of(input))
    return tuple(out)


_torch_lib = define("torch")
_torch_lib.impl("forward", _torch_forward, "CompositeExplicitAutograd")
_torch_lib.impl("backward", _torch_backward, "CompositeExplicitAutograd")
_torch_lib.impl("forward_keeping_hidden", _torch_forward_keeping_hidden, "CompositeExplicitAutograd")
_torch_lib.impl("backward_from_hidden", _torch_backward_from_hidden, "CompositeExplicitAutograd")
torch.library.register_fake("sepconv_torch::forward_keeping_hidden", _fake_torch_forward_keeping_hidden,
                            lib=_torch_lib)
for _implementation in IMPLEMENTATIONS:
    define(_implementation)
