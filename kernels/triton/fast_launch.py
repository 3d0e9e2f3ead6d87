"""Launch a kernel that already ran with the same arguments' signature without Triton's per-call work.

At every call, Triton's launch path (``JITFunction.run``, behind ``Autotuner.run`` for an autotuned kernel)
binds the arguments, computes each one's specialization and a cache key, looks the compiled kernel up
and checks the kernel's globals; the autotuner first builds a key of its own. That is about 10 us of
Python a launch, 25 us through the autotuner, on a 2-core AMD EPYC (``python -m benchmarks.host_time
--null-gpu``), where a split-mode forward makes one launch and its backward two more: on a layer whose
kernels take tens of microseconds, the host's time decides what a plain call costs.

``launch`` does that work once per *signature*: the kernel (or autotuner), the config, the device, the
values of the integer, flag and constexpr arguments, and for each tensor its dtype and whether its
address is 16-byte aligned. Triton specializes a kernel on no more than that (a tensor's dtype and
alignment, an integer's value being 1 or a multiple of 16, the constexprs), so one signature always
means one compiled kernel. The first call with a signature takes Triton's path (compiling, autotuning)
and keeps the compiled kernel it returns, with the config the autotuner chose; later calls hand the
kernel's launcher exactly the arguments ``JITFunction.run`` would (``tests/test_fast_launch.py`` checks
this against Triton's own launches), including its launch hooks, so profilers still see each launch.

Not covered, as Triton's path covers them: kernels whose globals change after they were compiled, and
``TRITON_DEBUG`` or other compile settings changed while the process runs (read at a signature's first
call). ``SEPCONV_TRITON_FAST_LAUNCH=0`` (read at import) sends every launch through Triton's path.
Nothing here runs in Triton's interpreter, nor while ``benchmarks.gpu_model`` records launches.
"""

from __future__ import annotations

import inspect
import os
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import triton
from torch import Tensor
from triton import knobs
from triton.runtime.driver import driver

from .common import INTERPRET

FAST_LAUNCH_ENV = "SEPCONV_TRITON_FAST_LAUNCH"


def _enabled_by_environment() -> bool:
    value = os.environ.get(FAST_LAUNCH_ENV, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{FAST_LAUNCH_ENV}={value!r} is not valid; set it to 1 (the default: launch known "
                         "signatures directly) or 0 (every launch through Triton's own path)")
    return value == "1"


# benchmarks.gpu_model turns this off while it records launches (its stand-ins replace Triton's path).
ENABLED = _enabled_by_environment() and not INTERPRET
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


class _Entry(NamedTuple):
    kernel: object                  # triton's CompiledKernel
    owners: tuple                   # the target and config whose ids the key holds (kept alive with it)
    names: Tuple[str, ...]          # every parameter of the kernel, in order
    tail: Tuple[object, ...]        # the values of the parameters after the positional arguments


_entries: Dict[tuple, _Entry] = {}
# A signature holds the integer arguments' values (sizes among them), so a process that sees ever new shapes would
# keep ever more entries: past this many, they are dropped and kept again as calls come (Triton's own caches stay).
MAX_ENTRIES = 4096


def clear() -> None:
    """Forget every kept kernel (the next call of each signature takes Triton's path again)."""
    _entries.clear()


def _signature(args: Sequence[object], kwargs: Dict[str, object]) -> tuple:
    """What Triton may specialize on, at least as finely: a tensor's dtype and 16-byte alignment, any other
    argument's value, and every argument's type (an int's value decides its specialization; a bool and an
    int that compare equal stay apart)."""
    values = [(arg.dtype, arg.data_ptr() % 16 == 0) if isinstance(arg, Tensor) else arg for arg in args]
    return (*values, *map(type, args), *kwargs.items(), *map(type, kwargs.values()))


def _entry(fn, kernel, args: Sequence[object], values: Dict[str, object], owners: tuple) -> _Entry:
    """The kept form of a launch of ``fn`` (a JITFunction) that compiled to ``kernel``: ``values`` names the
    arguments after the positional ones (constexprs and the config's meta-parameters)."""
    names = tuple(fn.arg_names)
    tail = []
    for param in fn.params[len(args):]:
        if param.name in values:
            tail.append(values[param.name])
        elif param.default is not inspect.Parameter.empty:
            tail.append(param.default)
        else:
            raise TypeError(f"{fn.__name__}: no value for parameter {param.name!r}")
    if hasattr(kernel, "result"):  # an asynchronous compile's future (Triton 3.6)
        kernel = kernel.result()
    return _Entry(kernel, owners, names, tuple(tail))


def launch(target, config: Optional[triton.Config], grid: Callable[[dict], tuple], args: Sequence[object],
           kwargs: Dict[str, object]) -> None:
    """Launch ``target`` over ``grid`` (a function of the launch's named arguments) with positional ``args`` and
    keyword ``kwargs`` (the constexprs). ``target`` is an autotuner (``config`` None: it chooses the config
    at a signature's first call) or a JITFunction (run with ``config``'s meta-parameters and options, or
    with ``kwargs`` alone when ``config`` is None)."""
    if not ENABLED:
        _triton_launch(target, config, grid, args, kwargs)
        return
    device = driver.active.get_current_device()
    # By identity: hashing a Config or a JITFunction by value costs microseconds (the entry keeps both alive).
    key = (id(target), id(config), device, _signature(args, kwargs))
    entry = _entries.get(key)
    if entry is None:
        kernel, fn, meta = _triton_launch(target, config, grid, args, kwargs)
        if kernel is not None:
            if len(_entries) >= MAX_ENTRIES:
                _entries.clear()
            _entries[key] = _entry(fn, kernel, args, {**kwargs, **meta}, (target, config))
        return
    kernel = entry.kernel
    values = (*args, *entry.tail)
    shape = grid(dict(zip(entry.names, values))) if callable(grid) else grid
    stream = driver.active.get_current_stream(device)
    runtime = knobs.runtime
    metadata = kernel.launch_metadata(shape, stream, *values)
    kernel.run(shape[0], shape[1] if len(shape) > 1 else 1, shape[2] if len(shape) > 2 else 1, stream,
               kernel.function, kernel.packed_metadata, metadata, runtime.launch_enter_hook,
               runtime.launch_exit_hook, *values)


def _triton_launch(target, config, grid, args, kwargs):
    """The launch through Triton's own path: (compiled kernel or None, its JITFunction, the meta-parameters of
    the config it ran with)."""
    if config is None and not hasattr(target, "configs"):  # a plain JITFunction
        return target[grid](*args, **kwargs), target, {}
    if config is None:  # the autotuner chooses
        kernel = target[grid](*args, **kwargs)
        return kernel, target.fn, target.best_config.kwargs if kernel is not None else {}
    fn = target.fn if hasattr(target, "configs") else target
    meta = dict(config.kwargs)
    options = {name: value for name, value in config.all_kwargs().items() if name in _OPTIONS}
    return fn[grid({**kwargs, **meta})](*args, **kwargs, **meta, **options), fn, meta
