"""This library's ops written as ATen ops, for ``torch.export``.

A program exported (``torch.export.export``) from a model that calls ``separable_conv2d`` holds
the op of the backend that ran while it was traced: ``sepconv_cpp::forward`` on a CPU,
``sepconv_torch::forward_keeping_hidden`` or ``sepconv_triton::forward`` elsewhere. Such a
program runs only where this library is imported and that backend loads. ::

    ep = torch.export.export(model, (x,))
    ep = ep.run_decompositions(kernels.decompositions())

replaces every op of this library by the ATen ops that compute the same result (the grouped
``F.conv2d`` and the 1x1 ``F.conv2d`` of the torch backend, ``F.max_pool2d`` plus the residual,
a training-mode BatchNorm), so the program holds ATen ops only: it loads and runs without this
library, on any device, and goes on to tools that know ATen (AOTInductor, ExecuTorch, the ONNX
exporter). The fusion is gone from such a program; the results are those of the torch backend.
"""

from __future__ import annotations

import os
from typing import Callable, Dict

import torch
import torch.nn.functional as F

from . import ops
from ._args import memory_format_of
from .dispatch import TRITON_MODE_ENV


def _forward(input, depthwise_weight, pointwise_weight, depthwise_bias, pointwise_bias,
             stride, padding, dilation, relu_input):
    output, _ = ops._torch_pair(input, depthwise_weight, pointwise_weight, depthwise_bias, pointwise_bias,
                                stride, padding, dilation, relu_input)
    return output.contiguous(memory_format=memory_format_of(input))


def _forward_keeping_hidden(hidden_layout: Callable[[], str]):
    """``forward_keeping_hidden`` with the depthwise result in the layout the namespace keeps it:
    ``"nchw"`` (the torch backend: (N, C_hid, OH, OW) in the input's memory format), ``"rows"``
    (split mode: (N*OH*OW, C_hid) row-major) or ``"none"`` (fused mode keeps none: empty)."""

    def forward_keeping_hidden(input, depthwise_weight, pointwise_weight, depthwise_bias, pointwise_bias,
                               stride, padding, dilation, relu_input):
        output, hidden = ops._torch_pair(input, depthwise_weight, pointwise_weight, depthwise_bias,
                                         pointwise_bias, stride, padding, dilation, relu_input)
        memory_format = memory_format_of(input)
        layout = hidden_layout()
        if layout == "rows":
            hidden = hidden.permute(0, 2, 3, 1).reshape(-1, hidden.shape[1])
        elif layout == "none":
            hidden = input.new_empty(0)
        else:
            hidden = hidden.contiguous(memory_format=memory_format)
        return output.contiguous(memory_format=memory_format), hidden

    return forward_keeping_hidden


def _triton_hidden_layout() -> str:
    # The sepconv_triton namespace runs the mode SEPCONV_TRITON_MODE names (kernels.triton.forward.mode),
    # read here without importing Triton, so that a program exported on a GPU decomposes anywhere.
    return "rows" if os.environ.get(TRITON_MODE_ENV, "fused") == "split" else "none"


def _max_pool2d_add(input, residual, kernel_size, stride, padding):
    output = F.max_pool2d(input, list(kernel_size), list(stride), list(padding)) + residual
    return output.contiguous(memory_format=memory_format_of(input))


def _batch_norm(input, weight, bias, eps, relu=False):
    """Training-mode BatchNorm over (N, H, W): the output, and per channel the mean, 1/sqrt(var + eps)
    and the unbiased variance (NaN for a single value), all in the input's dtype, as the cpp op."""
    var, mean = torch.var_mean(input, [0, 2, 3], correction=0)
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
    return output.contiguous(memory_format=memory_format_of(input)), mean, invstd, unbiased


def decompositions() -> Dict[torch._ops.OpOverload, Callable]:
    """A table for ``ExportedProgram.run_decompositions``: every op of this library that a forward pass
    can put in an exported program (each backend's ``forward``, the torch and triton namespaces'
    ``forward_keeping_hidden``, and the cpp backend's ``max_pool2d_add`` and ``batch_norm``), mapped
    to ATen ops that compute the same result. Merge it into another table to decompose both::

        table = torch.export.default_decompositions()
        table.update(kernels.decompositions())
        ep = ep.run_decompositions(table)
    """
    table: Dict[torch._ops.OpOverload, Callable] = {}
    layouts = {"torch": lambda: "nchw", "triton": _triton_hidden_layout, "triton_split": lambda: "rows"}
    for implementation in ops.IMPLEMENTATIONS:
        namespace = getattr(torch.ops, ops.namespace(implementation))
        table[namespace.forward.default] = _forward
        if implementation in ops.KEEPS_HIDDEN:
            table[namespace.forward_keeping_hidden.default] = _forward_keeping_hidden(layouts[implementation])
    table[torch.ops.sepconv_cpp.max_pool2d_add.default] = _max_pool2d_add
    table[torch.ops.sepconv_cpp.batch_norm.default] = _batch_norm
    return table
