"""What the Triton backend launches for one call, compiled as the GPU's runtime would compile it.

The launchers in ``kernels/triton`` run on CPU tensors here with a stand-in
Triton driver that reports a CUDA target (``sm_90`` or ``sm_80``) and launches
nothing. Every ``JITFunction.run`` and ``Autotuner.run`` call is recorded with
its real arguments; each kernel is then compiled through Triton's own binder
(``run(..., warmup=True)``), so it gets exactly the runtime's specialization:
ints equal to 1 become constants, ints and pointers divisible by 16 get
divisibility hints, and the launcher's constexprs are the ones it passes. The
matrix products and other ATen calls a launcher makes (split mode's cuBLAS
GEMMs, sums, copies) are recorded too, without computing the GEMMs.

Nothing here needs a GPU; Triton's bundled ``ptxas`` builds the cubin.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .model import const


@dataclass
class KernelLaunch:
    """One Triton launch: the kernel, its bound arguments and the configs it may run with."""

    fn: object                      # triton.runtime.jit.JITFunction
    args: tuple
    kwargs: dict                    # constexprs and options the launcher passed
    grid: object                    # a tuple or a function of the meta-parameters
    configs: List[object]           # triton.Config candidates (one for a direct launch)
    name: str = ""

    def arg_values(self, config) -> Dict[str, object]:
        """Parameter name -> value, with the config's meta-parameters and the kernel's defaults."""
        values = {p.name: p.default for p in self.fn.params if p.is_constexpr and p.has_default}
        values.update(zip(self.fn.arg_names, self.args))
        values.update(self.kwargs)
        if config is not None:
            values.update(config.kwargs)
        return values

    def grid_size(self, config) -> int:
        grid = self.grid(self.arg_values(config)) if callable(self.grid) else self.grid
        size = 1
        for extent in tuple(grid):
            size *= int(extent)
        return size


@dataclass
class LibraryCall:
    """An ATen call made by a launcher (a cuBLAS GEMM or a memory-bound op on the GPU)."""

    op: str
    flops: float                    # 2*M*N*K for matrix products, 0 otherwise
    bytes: float                    # inputs read plus outputs written, once each
    shapes: List[tuple] = field(default_factory=list)


@dataclass
class Recording:
    kernels: List[KernelLaunch] = field(default_factory=list)
    library: List[LibraryCall] = field(default_factory=list)


class _StandInDriver:
    """Enough of a Triton driver for the binder and the compiler: a CUDA target, no device."""

    def __init__(self, capability: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", capability, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


_MATMULS = {"mm", "addmm", "bmm", "baddbmm"}
# Calls that move no data on the GPU (views, metadata, allocation).
_FREE = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "view", "_unsafe_view",
         "reshape", "permute", "t", "transpose",
         "expand", "as_strided", "detach", "alias", "slice", "select", "unsqueeze", "squeeze", "split",
         "lift_fresh", "_to_copy_meta", "is_same_size", "sym_size", "sym_stride", "resize_"}


def _tensors(tree) -> List[torch.Tensor]:
    out = []
    for item in tree if isinstance(tree, (list, tuple)) else [tree]:
        if isinstance(item, torch.Tensor):
            out.append(item)
        elif isinstance(item, (list, tuple)):
            out += _tensors(item)
    return out


class _RecordAten(TorchDispatchMode):
    """Records the ATen calls of a launcher; matrix products return uncomputed outputs."""

    def __init__(self, recording: Recording):
        super().__init__()
        self.recording = recording

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0].rstrip("_")
        base = func._schema.name.split("::")[-1]
        if base in _MATMULS:
            operands = [a for a in args if isinstance(a, torch.Tensor) and a.dim() >= 2]
            a, b = operands[-2], operands[-1]
            m, k = a.shape[-2], a.shape[-1]
            n = b.shape[-1]
            batch = a.shape[0] if a.dim() == 3 else 1
            out = kwargs.get("out")
            if out is None:
                out = torch.empty((batch, m, n) if a.dim() == 3 else (m, n), dtype=a.dtype, device=a.device)
            size = a.element_size()
            moved = size * batch * (m * k + k * n + m * n)
            self.recording.library.append(LibraryCall(base, 2.0 * batch * m * n * k, float(moved),
                                                      [tuple(a.shape), tuple(b.shape)]))
            return out
        result = func(*args, **kwargs)
        if base not in _FREE and name not in _FREE:
            moved = sum(t.numel() * t.element_size() for t in _tensors(list(args) + list(kwargs.values())))
            moved += sum(t.numel() * t.element_size() for t in _tensors(result))
            if moved:
                self.recording.library.append(LibraryCall(base, 0.0, float(moved),
                                                          [tuple(t.shape) for t in _tensors(list(args))]))
        return result


@contextlib.contextmanager
def recording(capability: int = 90) -> Iterator[Recording]:
    """Within the block, Triton launches and ATen calls are recorded instead of run on a GPU."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter cannot compile kernels for a GPU")
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    rec = Recording()
    real_run, real_autotune_run = JITFunction.run, Autotuner.run

    def run(self, *args, grid, warmup, **kwargs):
        if warmup:
            return real_run(self, *args, grid=grid, warmup=True, **kwargs)
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "num_ctas", "maxnreg") if k in kwargs}
        import triton

        meta = {k: v for k, v in kwargs.items() if k not in {p.name for p in self.params if not p.is_constexpr}}
        config = triton.Config({}, **options)
        rec.kernels.append(KernelLaunch(self, args, meta, grid, [config], self.__name__))
        return None

    def autotune_run(self, *args, **kwargs):
        grid = kwargs.pop("grid")
        kwargs.pop("warmup", None)
        rec.kernels.append(KernelLaunch(self.fn, args, kwargs, grid, list(self.configs), self.fn.__name__))
        return None

    # The launchers' device choices for CPU tensors: the persistent grids' SM count, and fp32 products
    # in TF32 where PyTorch's flag would give them on a GPU (as the recorded GEMMs are priced); and every
    # launch through Triton's path, which the stand-ins below record (no direct relaunch of a kept kernel).
    stand_ins = _set_stand_ins({"kernels.triton.forward": {"STAND_IN_MULTIPROCESSORS": const("sms")},
                                "kernels.triton.common": {"STAND_IN_CUDA": True},
                                "kernels.triton.fast_launch": {"ENABLED": False}})
    previous_driver = driver._active
    driver.set_active(_StandInDriver(capability))
    JITFunction.run, Autotuner.run = run, autotune_run
    try:
        with _RecordAten(rec):
            yield rec
    finally:
        JITFunction.run, Autotuner.run = real_run, real_autotune_run
        _set_stand_ins(stand_ins)
        driver._active = previous_driver


def _set_stand_ins(values: Dict[str, Dict[str, object]]) -> Dict[str, Dict[str, object]]:
    """Set module attributes that already exist (modules imported so far); returns the previous values."""
    import sys

    previous: Dict[str, Dict[str, object]] = {}
    for module_name, attributes in values.items():
        module = sys.modules.get(module_name)
        for name, value in attributes.items():
            if module is not None and hasattr(module, name):
                previous.setdefault(module_name, {})[name] = getattr(module, name)
                setattr(module, name, value)
    return previous


def compile_launch(launch: KernelLaunch, config, capability: int = 90):
    """Compile ``launch`` with ``config`` for ``sm_<capability>`` as the runtime would; a CompiledKernel."""
    from triton.runtime.driver import driver

    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    meta = {**launch.kwargs, **config.kwargs}
    for key in ("num_warps", "num_stages"):
        meta.pop(key, None)
    previous = driver._active
    driver.set_active(_StandInDriver(capability))
    try:
        return launch.fn.run(*launch.args, grid=None, warmup=True, **meta, **options)
    finally:
        driver._active = previous


def record_call(call: Callable[[], object], capability: int = 90) -> Recording:
    """Run ``call`` (a launcher invocation on CPU tensors) and return what it launched."""
    with recording(capability) as rec:
        call()
    return rec


def config_name(config) -> str:
    """``BLOCK_P=64,BLOCK_CO=128,BLOCK_K=32,warps=8,stages=2`` (the tile sweep's spelling)."""
    meta = ",".join(f"{k}={v}" for k, v in config.kwargs.items() if not (k == "UNROLL_TAPS" and not v))
    parts = [meta] if meta else []
    return ",".join(parts + [f"warps={config.num_warps}", f"stages={config.num_stages}"])


def parse_config(text: str):
    """The inverse of ``config_name``."""
    import triton

    meta, options = {}, {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        parsed = {"True": True, "False": False}.get(value)
        parsed = int(value) if parsed is None else parsed
        if key in ("warps", "stages"):
            options["num_" + key] = parsed
        else:
            meta[key] = parsed
    return triton.Config(meta, **options)
