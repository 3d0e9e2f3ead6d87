"""Which backend runs a call, and why.

A backend is a name, a loader and a support check. Loaders are lazy: importing
``kernels`` never imports Triton or builds the C++ extension. A backend that
cannot load records why, ``available_backends()`` reports it, ``"auto"``
skips it with a one-time warning, and asking for it by name raises with the
reason.

To add a backend: define its ops in ``kernels/ops.py`` (``BACKEND_NAMES``),
register its kernels in its own module, and add a ``Backend`` entry below.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch

from . import gpu_dispatch
from ._args import memory_format_of
from . import triton as triton_package

ENV_VAR = "XCEPTION_SEPCONV_BACKEND"
TRITON_MODE_ENV = triton_package.MODE_ENV  # kernels.triton imports no Triton until load()


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here (the message says why)."""


@dataclass
class Backend:
    name: str
    # Imports/builds the backend and registers its kernels; raises with the reason when it cannot.
    loader: Optional[str]
    # Returns None when the backend can run on tensors of this device and dtype, else the reason.
    supports: Callable[[torch.device, torch.dtype], Optional[str]]
    # Order tried by "auto" for each device type (lower first).
    priority: Dict[str, int] = field(default_factory=dict)
    # Asked by "auto" once the backend loads: None to take it, else why another is faster here.
    auto_check: Optional[Callable[[], Optional[str]]] = None
    _state: Optional[str] = None  # None: not tried yet; "": loaded; otherwise the failure reason
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def load(self) -> Optional[str]:
        """Load once; return None when usable, else the reason it is not."""
        with self._lock:
            if self._state is None:
                try:
                    if self.loader is not None:
                        module_name, _, function = self.loader.partition(":")
                        getattr(importlib.import_module(module_name), function)()
                    self._state = ""
                except Exception as error:  # noqa: BLE001 - any failure makes the backend unavailable
                    self._state = f"{type(error).__name__}: {error}".strip()
            return self._state or None


def _torch_supports(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    return None


def _cpp_supports(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if device.type != "cpu":
        return f"the cpp backend runs on CPU tensors only, got device {device}"
    if dtype not in (torch.float32, torch.float64):
        return f"the cpp backend supports float32 and float64, got {dtype}"
    return None


def _cpp_auto_check() -> Optional[str]:
    # A build without a vector path for this CPU runs plain loops, slower than ATen's convolutions.
    from . import cpp_backend

    return cpp_backend.vector_path_reason()


def _triton_supports(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "the triton backend runs on CPU tensors only under TRITON_INTERPRET=1"
    elif device.type != "cuda":
        return f"the triton backend runs on CUDA tensors, got device {device}"
    if dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        return f"the triton backend supports float32, float64, float16 and bfloat16, got {dtype}"
    return None


BACKENDS: Dict[str, Backend] = {
    "torch": Backend("torch", None, _torch_supports, {"cpu": 2, "cuda": 2}),
    "cpp": Backend("cpp", "kernels.cpp_backend:load", _cpp_supports, {"cpu": 0}, _cpp_auto_check),
    # Never ranked by "auto". On CPU it is the interpreter, a correctness tool. On CUDA "auto" picks
    # between it and cuDNN per layer (kernels/gpu_dispatch.py: a table of recorded GPU measurements,
    # or the tuner); backend="triton" always runs it.
    "triton": Backend("triton", "kernels.triton:load", _triton_supports, {}),
}


def check_backend_name(name: object) -> str:
    """``name`` when it is ``"auto"`` or a backend's name; otherwise a ValueError naming it."""
    if not isinstance(name, str) or (name != "auto" and name not in BACKENDS):
        raise ValueError(f"backend must be one of {['auto', *BACKENDS]}, got {name!r}")
    return name


class BackendAttribute:
    """Mixin for modules: a ``backend`` attribute, checked on every assignment."""

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        self._backend = check_backend_name(name)


def available_backends() -> Dict[str, Optional[str]]:
    """Each backend's name mapped to None when it loads here, or to the reason it does not.

    Loading may build the C++ extension on first call (cached afterwards). Which vector path the
    C++ library runs (avx512, avx2, neon, scalar): ``cpp_build_info()``.
    """
    return {name: backend.load() for name, backend in BACKENDS.items()}


def cpp_build_info() -> Optional[Dict[str, object]]:
    """The C++ library's vector path (``isa``: avx512, avx2, neon or scalar) and the blocking it chose
    from this machine's caches (``kernels.cpp_backend.build_info``); None when the backend cannot load.
    """
    if BACKENDS["cpp"].load() is not None:
        return None
    from . import cpp_backend

    return cpp_backend.build_info()


_warned: set = set()


_INTERNAL_DIRS = (os.path.dirname(os.path.abspath(__file__)) + os.sep,
                  os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        # Point at the first frame outside kernels/ and torch/ (the caller's line), however deep the call came.
        level, frame = 1, sys._getframe(0)
        while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
            level, frame = level + 1, frame.f_back
        warnings.warn(message, RuntimeWarning, stacklevel=level)


# What the tuner times on a CPU where "auto" takes cpp; torch first: it wins a tie.
CPU_CANDIDATES = ("torch", "cpp")
_resolved: Dict[tuple, str] = {}
_resolved_layers: Dict[tuple, str] = {}


# torch.compile runs this at trace time and keeps its answer as a constant: tracing into it
# would meet the loader's lock (a graph break) on a first call made under compile.
@torch.compiler.assume_constant_result
def resolve(backend: str, device: torch.device, dtype: torch.dtype, layer: Optional[tuple] = None) -> str:
    """What runs a call with ``backend=...`` on tensors of this device and dtype: a backend's name,
    or, from ``"auto"`` on CUDA, ``"triton_split"`` (the triton backend's split mode;
    ``kernels.ops.IMPLEMENTATIONS``).

    ``"auto"`` (or the ``XCEPTION_SEPCONV_BACKEND`` variable, when ``backend`` is
    ``"auto"``) picks the fastest backend that loads and supports the tensors,
    warning once for each faster backend it had to skip; on CUDA, given the call's
    ``layer`` (the fields of ``kernels.gpu_dispatch.Layer``), it picks per layer
    between cuDNN and the two Triton modes (``kernels.gpu_dispatch``); on CPU, with
    tuning on (``SEPCONV_TUNE=1``) and given the layer, it times cpp against torch once
    per layer where it would take cpp, and keeps the faster. A backend named
    explicitly raises ``BackendUnavailableError`` when it cannot run; ``"triton"`` runs
    the mode ``SEPCONV_TRITON_MODE`` names at each call (fused by default).
    """
    backend_env = os.environ.get(ENV_VAR)
    key = (backend, device.type, dtype, backend_env, os.environ.get("TRITON_INTERPRET"))
    name = _resolved.get(key)
    if name is None:
        name = _resolve_uncached(backend, device, dtype)
        _resolved[key] = name
    if layer is not None and backend == "auto" and (backend_env or "auto") == "auto":
        if gpu_dispatch.shape_dispatch_applies(device):
            return _resolve_layer(device, dtype, layer)
        if name == "cpp" and gpu_dispatch.cpu_tuning_applies(device):
            # Tuning on a CPU: cpp where it measured faster on this layer, else the oneDNN pair.
            return gpu_dispatch.tuned(device, dtype, gpu_dispatch.Layer(*layer), CPU_CANDIDATES)
    return name


def channels_last_cpp_applies(input: torch.Tensor, others, backend: str) -> bool:
    """Whether a cpp kernel written for channels_last activations (the training BatchNorm, the shortcut
    convolution) takes a call on ``input``: 4-D float32/float64 channels_last CPU input, CPU autocast off,
    each of ``others`` (tensors or None) in the input's dtype and on its device, and ``backend`` resolving
    to ``cpp`` (asked last: resolving may warn once)."""
    if not (input.dim() == 4 and input.device.type == "cpu" and input.dtype in (torch.float32, torch.float64)):
        return False
    if memory_format_of(input) != torch.channels_last or torch.is_autocast_enabled("cpu"):
        return False
    if any(t is not None and (t.dtype != input.dtype or t.device != input.device) for t in others):
        return False
    return resolve(backend, input.device, input.dtype) == "cpp"


def _triton_mode() -> str:
    return triton_package.mode()


def _resolve_layer(device: torch.device, dtype: torch.dtype, layer: tuple) -> str:
    """The implementation an ``auto`` call on a CUDA layer runs (``kernels.gpu_dispatch.choose``)."""
    mode = os.environ.get(TRITON_MODE_ENV)
    # TF32 changes float32 math only; reading the flags costs a few microseconds a call.
    tf32 = ((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
            if dtype == torch.float32 else None)
    key = (device, dtype, layer, mode, gpu_dispatch.tuning_enabled(), tf32)
    name = _resolved_layers.get(key)
    if name is None:
        triton = BACKENDS["triton"]
        reason = triton.supports(device, dtype) or triton.load()
        candidates = ["torch"]
        if reason is None:
            # SEPCONV_TRITON_MODE, when set, fixes the Triton mode for "auto" too.
            modes = {"fused": ["triton"], "split": ["triton_split"]}
            candidates += modes[_triton_mode()] if mode else ["triton", "triton_split"]
        name = gpu_dispatch.choose(device, dtype, gpu_dispatch.Layer(*layer), tuple(candidates))
        _resolved_layers[key] = name
    return name


def requested_backend(backend: str) -> str:
    """The backend a call asks for: ``backend``, or ``XCEPTION_SEPCONV_BACKEND`` (when set) for ``"auto"``."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {backend!r}")
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {['auto', *BACKENDS]}, got {backend!r}")
        return backend
    requested = os.environ.get(ENV_VAR, "auto") or "auto"
    if requested != "auto" and requested not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={requested!r} is not a backend; choose one of {['auto', *BACKENDS]}")
    return requested


def _resolve_uncached(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    requested = requested_backend(backend)

    if requested != "auto":
        chosen = BACKENDS[requested]
        reason = chosen.load() or chosen.supports(device, dtype)
        if reason:
            raise BackendUnavailableError(f"backend {requested!r} cannot run on {device.type} {dtype}: {reason}")
        return requested

    ranked = sorted((b for b in BACKENDS.values() if device.type in b.priority), key=lambda b: b.priority[device.type])
    ranked = ranked or [BACKENDS["torch"]]
    for candidate in ranked:
        reason = candidate.supports(device, dtype) or candidate.load()
        if reason is None and candidate.auto_check is not None:
            reason = candidate.auto_check()
        if reason is None:
            return candidate.name
        if candidate.name != "torch":
            _warn_once(f"separable_conv2d: backend {candidate.name!r} skipped for {device.type} {dtype}: {reason}")
    return "torch"
