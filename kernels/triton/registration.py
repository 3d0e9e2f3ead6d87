"""Register the Triton launchers as implementations of the ``sepconv_triton`` and ``sepconv_triton_split`` ops.

``sepconv_triton`` runs the mode ``SEPCONV_TRITON_MODE`` names (read at every call; fused by
default); ``sepconv_triton_split`` always runs split mode, so that ``kernels.dispatch`` can choose
the mode per call.
"""

from __future__ import annotations

import os

import torch

from ..ops import define, namespace
from . import backward, forward, split

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
        return (split_mode if forward.mode() == "split" else fused)(*args)

    return run


def mode() -> str:
    """The mode ``SEPCONV_TRITON_MODE`` names ("fused" when unset); a ValueError naming the variable otherwise."""
    return forward.mode()


def _register(implementation: str, forward_op, backward_op) -> None:
    define(implementation)
    lib = torch.library.Library(namespace(implementation), "IMPL")
    lib.impl("forward", forward_op, "CUDA")
    lib.impl("backward", backward_op, "CUDA")
    lib.impl("forward", _interpreter_only(forward_op), "CPU")
    lib.impl("backward", _interpreter_only(backward_op), "CPU")
    _registered.append(lib)


def register() -> None:
    """Register once: CUDA -> launchers, CPU -> launchers under the interpreter."""
    if _registered:
        return
    _register("triton", _by_mode(forward.forward, split.forward), _by_mode(backward.backward, split.backward))
    _register("triton_split", split.forward, split.backward)
