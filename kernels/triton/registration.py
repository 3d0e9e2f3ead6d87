"""Register the Triton launchers as implementations of the ``sepconv_triton`` and ``sepconv_triton_split`` ops.

``sepconv_triton`` runs the mode ``SEPCONV_TRITON_MODE`` names (read at every call; fused by
default); ``sepconv_triton_split`` always runs split mode, so that ``kernels.dispatch`` can choose
the mode per call.
"""

from __future__ import annotations

import os

import torch

from ..ops import DIRECT, define, empty_output, namespace, output_shape
from . import backward, forward, mode, split

_registered = []


def _interpreter_only(launcher):
    """Wrap a launcher for CPU tensors: allowed only in Triton's interpreter."""

    def run(*args):
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "sepconv_triton ops run on CPU tensors only in Triton's interpreter (TRITON_INTERPRET=1 "
                "set before triton kernels are imported); use a CUDA tensor or another backend")
        if not forward.INTERPRET:
            raise RuntimeError("TRITON_INTERPRET=1 was set after kernels.triton was loaded; set it before importing")
        return launcher(*args)

    return run


def _by_mode(fused, split_mode):
    """The launcher that ``SEPCONV_TRITON_MODE`` selects, read at every call."""

    def run(*args):
        return (split_mode if mode() == "split" else fused)(*args)

    return run


def _fused_forward_keeping_hidden(input, *args):
    """Fused mode computes no depthwise result to keep: an empty one, which the backward recomputes."""
    return forward.forward(input, *args), input.new_empty(0)


def _fused_backward_from_hidden(grad_output, input, hidden, *args):
    return backward.backward(grad_output, input, *args)


def _split_backward_from_hidden(grad_output, input, hidden, *args):
    return split.backward(grad_output, input, *args, hidden=hidden)


def _fake_keeping_hidden(split_mode):
    """The fake of ``forward_keeping_hidden``: split mode's hidden is (N*OH*OW, C_hid), fused mode's empty."""

    def fake(input, depthwise_weight, pointwise_weight, depthwise_bias, pointwise_bias, stride, padding, dilation,
             relu_input):
        shape = output_shape(input, depthwise_weight, pointwise_weight, stride, padding, dilation)
        pixels = shape[0] * shape[2] * shape[3]
        hidden_shape = (pixels, depthwise_weight.shape[0]) if split_mode() else (0,)
        return empty_output(input, shape), input.new_empty(hidden_shape)

    return fake


def _register(implementation: str, launchers, split_mode) -> None:
    """``launchers``: op name -> launcher; ``split_mode()``: whether the namespace runs split mode now."""
    define(implementation)
    lib = torch.library.Library(namespace(implementation), "IMPL")
    ops_namespace = getattr(torch.ops, namespace(implementation))
    for name, launcher in launchers.items():
        on_cpu = _interpreter_only(launcher)
        lib.impl(name, launcher, "CUDA")
        lib.impl(name, on_cpu, "CPU")
        DIRECT[getattr(ops_namespace, name).default] = {"cuda": launcher, "cpu": on_cpu}
    torch.library.register_fake(f"{namespace(implementation)}::forward_keeping_hidden",
                                _fake_keeping_hidden(split_mode), lib=lib)
    _registered.append(lib)


# Implementation -> op -> launcher (``benchmarks.null_gpu`` registers these for CPU tensors as they are).
LAUNCHERS = {
    "triton": {
        "forward": _by_mode(forward.forward, split.forward),
        "backward": _by_mode(backward.backward, split.backward),
        "forward_keeping_hidden": _by_mode(_fused_forward_keeping_hidden, split.forward_keeping_hidden),
        "backward_from_hidden": _by_mode(_fused_backward_from_hidden, _split_backward_from_hidden),
    },
    "triton_split": {
        "forward": split.forward,
        "backward": split.backward,
        "forward_keeping_hidden": split.forward_keeping_hidden,
        "backward_from_hidden": _split_backward_from_hidden,
    },
}


def register() -> None:
    """Register once: CUDA -> launchers, CPU -> launchers under the interpreter."""
    if _registered:
        return
    _register("triton", LAUNCHERS["triton"], lambda: mode() == "split")
    _register("triton_split", LAUNCHERS["triton_split"], lambda: True)
