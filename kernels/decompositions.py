"""This library's ops written as ATen ops, for ``torch.export``.

A program exported (``torch.export.export``) from a model that calls ``separable_conv2d`` holds
the op of the backend that ran while it was traced: ``sepconv_cpp::forward`` on a CPU,
``sepconv_torch::forward_keeping_hidden`` or ``sepconv_triton::forward`` elsewhere. Such a
program runs only where this library is imported and that backend loads. ::

    ep = torch.export.export(model, (x,))
    ep = ep.run_decompositions(kernels.decompositions())

replaces every op of this library by the ATen ops that compute the same result (the grouped
``F.conv2d`` and the 1x1 ``F.conv2d`` of the torch backend, ``F.max_pool2d`` plus the residual,
a training-mode BatchNorm, ``F.conv2d``), so the program holds ATen ops only: it loads and runs without this
library, on any device, and goes on to tools that know ATen (AOTInductor, ExecuTorch, the ONNX
exporter). The fusion is gone from such a program; the results are those of the torch backend.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn.functional as F

from . import ops
from ._args import memory_format_of
from .triton import mode as triton_mode


def _split_forward_keeping_hidden(input, *args):
    """Split mode's ``forward_keeping_hidden``: the depthwise result as (N*OH*OW, C_hid), row-major."""
    output, hidden = ops._torch_forward_keeping_hidden(input, *args)
    return output, hidden.permute(0, 2, 3, 1).reshape(-1, hidden.shape[1])


def _triton_forward_keeping_hidden(input, *args):
    """``sepconv_triton`` runs the mode ``SEPCONV_TRITON_MODE`` names (read without importing Triton, so
    that a program exported on a GPU decomposes anywhere): split mode's result, or fused mode's (no
    depthwise result: an empty one)."""
    if triton_mode() == "split":
        return _split_forward_keeping_hidden(input, *args)
    return ops._torch_forward(input, *args), input.new_empty(0)


def _max_pool2d_add(input, residual, kernel_size, stride, padding):
    output = F.max_pool2d(input, list(kernel_size), list(stride), list(padding)) + residual
    return ops.as_returned(output, memory_format_of(input))


def _conv2d(input, weight, bias, stride, padding, dilation):
    return ops.as_returned(F.conv2d(input, weight, bias, list(stride), list(padding), list(dilation)),
                           memory_format_of(input))


def _moments(output):
    """Per channel the mean and the sum of squared deviations from it, (2, C) float64."""
    count = output.numel() // output.shape[1] if output.shape[1] else 0
    var, mean = torch.var_mean(output.double(), [0, 2, 3], correction=0)
    return torch.stack([mean, var * count])


def _forward_with_moments(input, *args):
    output = ops._torch_forward(input, *args)
    return output, _moments(output)


def _batch_norm(input, weight, bias, eps, relu=False, moments=None):
    """Training-mode BatchNorm over (N, H, W): the output, and per channel the mean, 1/sqrt(var + eps)
    and the unbiased variance (NaN for a single value), all in the input's dtype, as the cpp op (from
    ``moments``, the input's mean and M2, where given)."""
    if moments is None:
        var, mean = torch.var_mean(input, [0, 2, 3], correction=0)
    else:
        count = input.numel() // input.shape[1] if input.shape[1] else 0
        mean, var = moments[0].to(input.dtype), (moments[1] / count).to(input.dtype)
    invstd = torch.rsqrt(var + eps)
    shape = (1, -1, 1, 1)
    output = (input - mean.view(shape)) * invstd.view(shape)
    if weight is not None:
        output = output * weight.view(shape)
    if bias is not None:
        output = output + bias.view(shape)
    if relu:
        output = F.relu(output)
    count = input.numel() // input.shape[1] if input.shape[1] else 0
    unbiased = var * (count / (count - 1)) if count > 1 else torch.full_like(var, float("nan"))
    return ops.as_returned(output, memory_format_of(input)), mean, invstd, unbiased


def decompositions() -> Dict[torch._ops.OpOverload, Callable]:
    """A table for ``ExportedProgram.run_decompositions``: every op of this library that a forward pass
    can put in an exported program (each backend's ``forward``, the torch and triton namespaces'
    ``forward_keeping_hidden``, and the cpp backend's ``forward_with_moments``, ``max_pool2d_add``,
    ``batch_norm`` and ``conv2d``), mapped to ATen ops that compute the same result. Merge it into
    another table to decompose both::

        table = torch.export.default_decompositions()
        table.update(kernels.decompositions())
        ep = ep.run_decompositions(table)
    """
    table: Dict[torch._ops.OpOverload, Callable] = {}
    keeping_hidden = {"torch": ops._torch_forward_keeping_hidden, "triton": _triton_forward_keeping_hidden,
                      "triton_split": _split_forward_keeping_hidden}
    for implementation in ops.IMPLEMENTATIONS:
        namespace = getattr(torch.ops, ops.namespace(implementation))
        table[namespace.forward.default] = ops._torch_forward
        if implementation in ops.KEEPS_HIDDEN:
            table[namespace.forward_keeping_hidden.default] = keeping_hidden[implementation]
    table[torch.ops.sepconv_cpp.max_pool2d_add.default] = _max_pool2d_add
    table[torch.ops.sepconv_cpp.batch_norm.default] = _batch_norm
    table[torch.ops.sepconv_cpp.forward_with_moments.default] = _forward_with_moments
    table[torch.ops.sepconv_cpp.conv2d.default] = _conv2d
    return table
