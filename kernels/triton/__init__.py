"""The Triton backend: fused kernels for CUDA tensors (and CPU under TRITON_INTERPRET=1).

``load()`` (called by ``kernels.dispatch``) imports Triton and registers the
launchers of ``forward.py`` and ``backward.py`` as the CUDA implementation of
``sepconv_triton::forward`` / ``::backward`` and as a CPU implementation that
only runs in Triton's interpreter. The kernel modules are imported inside
``load()``: ``@triton.jit`` reads ``TRITON_INTERPRET`` when it decorates.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

MIN_TRITON = (3, 6)

MODE_ENV = "SEPCONV_TRITON_MODE"
# "0": each kernel runs its first tile config (no timing runs, one compile per kernel); "1" (default) autotunes.
AUTOTUNE_ENV = "SEPCONV_TRITON_AUTOTUNE"
# A JSON file of tile configs that replace autotuning for the kernels it names (``pinned.py``).
CONFIGS_ENV = "SEPCONV_TRITON_CONFIGS"
MODES = ("fused", "split")


def mode() -> str:
    """``SEPCONV_TRITON_MODE``: "fused" (the default: one kernel per op, nothing intermediate in memory)
    or "split" (a depthwise kernel, then the pointwise convolution as a GEMM; ``split.py``). Read without
    importing Triton (``kernels.decompositions`` needs it where Triton is not installed)."""
    value = os.environ.get(MODE_ENV, "fused")
    if value not in MODES:
        raise ValueError(f"{MODE_ENV}={value!r} is not valid; set it to one of {list(MODES)}")
    return value


@contextlib.contextmanager
def environ(name: str, value: str):
    """``os.environ[name] = value`` inside the block; the caller's value (or its absence) restored afterwards
    (the backend's and Triton's settings: SEPCONV_TRITON_MODE, TRITON_CACHE_DIR, TRITON_DUMP_PTXAS_LOG)."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def unsupported() -> Optional[str]:
    """Why the installed Triton cannot run this backend (not installed, or older than MIN_TRITON), or None.
    Imports Triton but none of the kernel modules."""
    try:
        import triton
    except ImportError as error:
        return f"the triton backend needs the 'triton' package (>= 3.6): {error}"
    version = tuple(int(part) for part in triton.__version__.split(".")[:2] if part.isdigit())
    if version < MIN_TRITON:
        return f"the triton backend needs triton >= 3.6, found {triton.__version__}"
    return None


def load() -> None:
    reason = unsupported()
    if reason is not None:
        raise ImportError(reason)
    from . import registration

    registration.register()
