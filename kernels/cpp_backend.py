"""Loader of the C++ CPU backend (fused kernels in ``kernels/csrc``).

``load()`` registers the CPU kernels of the ``sepconv_cpp`` ops (schemas in
``kernels/ops.py``). It uses the library built ahead of time by ``setup.py``
(``SEPCONV_BUILD_EXT=1``) when that is present and not older than the sources;
otherwise it compiles the sources once with ``torch.utils.cpp_extension``
(ninja, ``-O3 -march=native -fopenmp``) into the torch extensions cache
(``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), where later
processes find it. Concurrent first builds wait on cpp_extension's lock file.
Any failure (no compiler, no ninja) raises ``RuntimeError`` with the reason;
``kernels.dispatch`` turns that into one warning and falls back.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import List, Optional

import torch

from . import ops

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ["sepconv_cpu.cpp"]
PREBUILT_NAME = "_sepconv_cpp"  # kernels/_sepconv_cpp*.so, built by setup.py
JIT_NAME = "sepconv_cpp_kernels"

CXX_FLAGS = ["-O3", "-march=native", "-fopenmp"] + os.environ.get("SEPCONV_EXTRA_CFLAGS", "").split()
LD_FLAGS = ["-fopenmp"]

_lock = threading.Lock()
_loaded: Optional[str] = None


def source_files() -> List[Path]:
    """Every C++ file the library is built from (sources and headers)."""
    return sorted(p for p in CSRC.iterdir() if p.suffix in (".cpp", ".h"))


def _prebuilt() -> Optional[str]:
    """Path of the ahead-of-time library next to this file, if it is newer than every source."""
    candidates = glob.glob(str(Path(__file__).resolve().parent / f"{PREBUILT_NAME}*.so"))
    candidates += glob.glob(str(Path(__file__).resolve().parent / f"{PREBUILT_NAME}*.pyd"))
    if not candidates:
        return None
    library = max(candidates, key=os.path.getmtime)
    newest_source = max(p.stat().st_mtime for p in source_files())
    return library if os.path.getmtime(library) >= newest_source else None


def _jit_library_is_current(build_directory: str) -> bool:
    """Whether the extensions cache holds a library newer than every source (then loading is quick)."""
    libraries = glob.glob(os.path.join(build_directory, f"{JIT_NAME}*.so"))
    if not libraries:
        return False
    newest_source = max(p.stat().st_mtime for p in source_files())
    return max(os.path.getmtime(path) for path in libraries) >= newest_source


def _jit_build() -> str:
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler found (looked for {compiler!r}; set CXX to one)")
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed (pip install ninja); torch.utils.cpp_extension needs it")
    build_directory = cpp_extension._get_build_directory(JIT_NAME, verbose=False)
    if not _jit_library_is_current(build_directory):
        # The compile takes one to two minutes with no output of its own: say why the process waits.
        print(f"kernels: building the C++ backend (once, about 1-2 minutes); cached in {build_directory}",
              file=sys.stderr, flush=True)
    cpp_extension.load(
        name=JIT_NAME,
        sources=[str(CSRC / name) for name in SOURCES],
        extra_cflags=CXX_FLAGS,
        extra_ldflags=LD_FLAGS,
        extra_include_paths=[str(CSRC)],
        is_python_module=False,
        verbose=os.environ.get("SEPCONV_BUILD_VERBOSE") == "1",
    )
    return f"JIT build ({build_directory})"


def load() -> None:
    """Register the ``sepconv_cpp`` CPU kernels; raise ``RuntimeError`` saying why when impossible."""
    global _loaded
    with _lock:
        if _loaded is not None:
            return
        ops.define("cpp")
        prebuilt = _prebuilt()
        if prebuilt is not None:
            torch.ops.load_library(prebuilt)
            _loaded = prebuilt
            return
        try:
            _loaded = _jit_build()
        except RuntimeError:
            raise
        except Exception as error:  # noqa: BLE001 - compiler/ninja failures come as many types
            raise RuntimeError(f"building the C++ extension failed: {type(error).__name__}: {error}") from error


def library_location() -> Optional[str]:
    """Where the loaded kernels came from (None before ``load()``)."""
    return _loaded
