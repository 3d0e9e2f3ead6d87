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

The kernels have a vector path for AVX-512, AVX2+FMA and aarch64 NEON
(``csrc/vec.h``); ``-march=native`` picks the host's. ``SEPCONV_CPU_ISA=avx2``
builds and loads an x86 library held to AVX2+FMA instead (``-mno-avx512f``:
what a CPU without AVX-512 runs), under its own name and cache directory, so
it never replaces the default build. ``build_info()`` says which path the
loaded library runs and the blocking it chose from the cache sizes.
"""

from __future__ import annotations

import ctypes
import glob
import os
import platform
import shutil
import sys
import threading
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch

from . import ops

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ["sepconv_cpu.cpp"]
PREBUILT_NAME = "_sepconv_cpp"  # kernels/_sepconv_cpp*.so, built by setup.py
JIT_NAME = "sepconv_cpp_kernels"

CXX_FLAGS = ["-O3", "-march=native", "-fopenmp"] + os.environ.get("SEPCONV_EXTRA_CFLAGS", "").split()
LD_FLAGS = ["-fopenmp"]

ISA_ENV = "SEPCONV_CPU_ISA"
L1D_WAYS_ENV = "SEPCONV_L1D_WAYS"
INTERLEAVE_BYTES_ENV = "SEPCONV_INTERLEAVE_BYTES"
# Extra compiler flags of each build variant ("native": the host's best path).
ISA_VARIANT_FLAGS = {"native": [], "avx2": ["-mno-avx512f"]}
# The x86 paths in order: a library built for one runs on a CPU that has it or a later one.
_X86_ORDER = ("scalar", "avx2", "avx512")

_lock = threading.Lock()
_loaded: Optional[str] = None
_library_file: Optional[str] = None  # the shared library itself, for build_info()


def requested_variant() -> str:
    """The build variant ``SEPCONV_CPU_ISA`` asks for (``"native"`` when unset); ValueError for others."""
    value = os.environ.get(ISA_ENV, "native") or "native"
    if value not in ISA_VARIANT_FLAGS:
        raise ValueError(f"{ISA_ENV} must be one of {sorted(ISA_VARIANT_FLAGS)}, got {value!r}")
    if value == "avx2" and host_isa() not in ("avx2", "avx512"):
        raise ValueError(f"{ISA_ENV}=avx2 needs an x86-64 CPU with AVX2 and FMA; this one runs {host_isa()!r}")
    return value


def _whole_number_setting(variable: str, minimum: int, noun: str = "a whole number") -> Optional[int]:
    """The environment variable as a whole number >= minimum (None when unset); ValueError naming it otherwise."""
    value = os.environ.get(variable, "")
    if not value:
        return None
    if not value.isdigit() or int(value) < minimum:
        raise ValueError(f"{variable} must be {noun} >= {minimum}, got {value!r}")
    return int(value)


def l1d_ways_override() -> Optional[int]:
    """``SEPCONV_L1D_WAYS``: the L1d associativity the blocking rules take instead of the one the library
    reads from the machine (None when unset); ValueError unless a whole number >= 1."""
    return _whole_number_setting(L1D_WAYS_ENV, 1)


def interleave_bytes_override() -> Optional[int]:
    """``SEPCONV_INTERLEAVE_BYTES``: the size of input plus output gradient above which the backward takes each
    block of pixels through all of a thread's channel chunks in turn, instead of the L3 the library counts on
    (None when unset); ValueError unless a whole number >= 0."""
    return _whole_number_setting(INTERLEAVE_BYTES_ENV, 0, "a whole number of bytes")


def jit_name(variant: str, base: str = JIT_NAME) -> str:
    """The name (and cache directory) of a build variant of the extension ``base`` (this library's by default)."""
    return base if variant == "native" else f"{base}_{variant}"


def host_isa() -> str:
    """The best vector path this CPU can run: ``"avx512"``, ``"avx2"`` (AVX2 and FMA), ``"neon"``
    (aarch64), or ``"scalar"``; from the flags in /proc/cpuinfo (``"unknown"`` on x86 without it)."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return "neon"
    if machine not in ("x86_64", "amd64"):
        return "scalar"
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    if "avx512f" in flags:
        return "avx512"
    return "avx2" if {"avx2", "fma"} <= flags else "scalar"


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


def _jit_library_is_current(build_directory: str, name: str = JIT_NAME) -> bool:
    """Whether the extensions cache holds a library newer than every source (then loading is quick)."""
    libraries = glob.glob(os.path.join(build_directory, f"{name}*.so"))
    if not libraries:
        return False
    newest_source = max(p.stat().st_mtime for p in source_files())
    return max(os.path.getmtime(path) for path in libraries) >= newest_source


def _jit_build(variant: str = "native") -> str:
    global _library_file
    from torch.utils import cpp_extension

    name = jit_name(variant)

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler found (looked for {compiler!r}; set CXX to one)")
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed (pip install ninja); torch.utils.cpp_extension needs it")
    build_directory = cpp_extension._get_build_directory(name, verbose=False)
    if not _jit_library_is_current(build_directory, name):
        # The compile takes one to two minutes with no output of its own: say why the process waits.
        print(f"kernels: building the C++ backend (once, about 1-2 minutes); cached in {build_directory}",
              file=sys.stderr, flush=True)
    library = cpp_extension.load(
        name=name,
        sources=[str(CSRC / source) for source in SOURCES],
        extra_cflags=CXX_FLAGS + ISA_VARIANT_FLAGS[variant],
        extra_ldflags=LD_FLAGS,
        extra_include_paths=[str(CSRC)],
        is_python_module=False,
        verbose=os.environ.get("SEPCONV_BUILD_VERBOSE") == "1",
    )
    # Newer torch returns the library's path; older releases (2.4) return None: it is <name>.so there.
    _library_file = library if isinstance(library, str) else os.path.join(build_directory, f"{name}.so")
    return f"JIT build ({build_directory})"


def load() -> None:
    """Register the ``sepconv_cpp`` CPU kernels; raise ``RuntimeError`` saying why when impossible."""
    global _loaded, _library_file
    with _lock:
        if _loaded is not None:
            return
        try:
            variant = requested_variant()
            l1d_ways_override()
            interleave_bytes_override()
        except ValueError as error:
            raise RuntimeError(str(error)) from error
        ops.define("cpp")
        prebuilt = _prebuilt() if variant == "native" else None
        if prebuilt is not None:
            torch.ops.load_library(prebuilt)
            _library_file = where = prebuilt
        else:
            try:
                where = _jit_build(variant)
            except RuntimeError:
                raise
            except Exception as error:  # noqa: BLE001 - compiler/ninja failures come as many types
                raise RuntimeError(f"building the C++ extension failed: {type(error).__name__}: {error}") from error
        built = (build_info() or {}).get("isa")
        host = host_isa()
        if built in _X86_ORDER and host in _X86_ORDER and _X86_ORDER.index(built) > _X86_ORDER.index(host):
            # A library built elsewhere (setup.py on another machine) would stop on an illegal instruction.
            raise RuntimeError(f"the C++ library {_library_file} was built for {built}, which this CPU ({host}) "
                               f"cannot run; rebuild it here (delete it, or reinstall with SEPCONV_BUILD_EXT=1)")
        _loaded = where


def build_info() -> Optional[Dict[str, Union[str, int, bool]]]:
    """What the loaded library runs (None before ``load()``): ``isa`` (the vector path compiled in:
    avx512, avx2, neon or scalar), ``lanes``, ``tile_rows`` x ``tile_vectors`` (the micro-kernel's
    register tile), ``backward_block`` (output pixels per block of the backward: 96 with 12-row tiles;
    with 6-row tiles 96 where L2 has 2 MB a core or more, 288 below), the cache sizes it read
    (``l1d_bytes``, ``l1d_ways``, ``l2_bytes``, ``l3_bytes``, ``cache_source``: sysfs, sysconf or default;
    ``l1d_ways`` is ``SEPCONV_L1D_WAYS`` where set) and the
    blocking chosen from them (``tile_bytes``, ``stream_bytes``, ``l3_usable_bytes``: the L3 the
    forward counts on for its weight, at most 16 MB per online CPU, ``interleave_bytes``: the input plus
    output gradient above which the backward takes each block of pixels through all of a thread's channel
    chunks in turn, ``l3_usable_bytes`` unless ``SEPCONV_INTERLEAVE_BYTES`` sets it, and
    ``stream_strided_rows``: whether the forward streams outputs whose rows lie a multiple of 4 KB apart:
    where a micro-kernel call's ``tile_rows`` rows fit the ways of the L1 set they share)."""
    if _library_file is None:
        return None
    function = ctypes.CDLL(_library_file).sepconv_cpu_build_info
    function.restype = ctypes.c_char_p
    info: Dict[str, Union[str, int, bool]] = {}
    for item in function().decode().split(";"):
        key, _, value = item.partition("=")
        info[key] = int(value) if value.isdigit() else value
    info["stream_strided_rows"] = bool(info.get("stream_strided_rows"))
    return info


def vector_path_reason() -> Optional[str]:
    """None when the loaded library has a vector path for this CPU; otherwise why not (then the fused
    kernels run plain loops, slower than ATen's oneDNN convolutions, and ``"auto"`` takes torch)."""
    info = build_info()
    if info is None or info.get("isa") != "scalar":
        return None
    return (f"the C++ library was built without a vector path (isa 'scalar'; this CPU: {host_isa()}); its plain "
            f"loops are slower than torch's convolutions. The vector paths are AVX-512, AVX2+FMA and aarch64 NEON")


def library_location() -> Optional[str]:
    """Where the loaded kernels came from (None before ``load()``)."""
    return _loaded
