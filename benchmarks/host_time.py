"""Host time of one separable-conv call: the Python, dispatch, autograd and launch work around the kernels.

    python -m benchmarks.host_time --device cuda
    python -m benchmarks.host_time --device cpu --stub-triton
    python -m benchmarks.host_time --device cpu --null-gpu

Each provider runs a tiny layer (batch 1, 16 -> 16 channels, 4x4, 3x3, channels_last), whose kernels
take a few microseconds, many times in a row, and the device is synchronised once at the end: the time
per call is then the host's. On a GPU a plain call (not replayed from a CUDA graph) costs at least
this much whatever the layer, and a layer whose kernels take less is host-bound: on the H200 a split
mode forward took 0.14 ms in plain calls against 0.055 ms replayed from a graph
(``results/cuda-nvidia-h200.md``). Modes: ``fwd`` (no grad) and ``full`` (forward and backward).

On a CPU the kernels are not negligible for every provider (oneDNN's small convolutions take tens of
microseconds), and the triton providers run Triton's interpreter; ``--stub-triton`` makes its kernel
launches do nothing, so the triton rows time the Python path alone (the rows say so: a development
figure, not a speed). ``--null-gpu`` (TRITON_INTERPRET unset) goes further: the triton providers run
their launchers on CPU tensors through Triton's own launch path for an sm_90 GPU, with a stand-in driver
whose launches do nothing (``benchmarks.null_gpu``), so their rows count Triton's per-launch work too
(binding, specialization, the autotuner's lookup), all but the CUDA driver's own; other providers run
the CPU's own paths, their kernels' time included. Each triton row records whether
``kernels.triton.fast_launch`` was on (``SEPCONV_TRITON_FAST_LAUNCH``), and whether the ops ran their Python
implementations directly (``kernels.ops.DIRECT``; ``--dispatcher`` sends every op through PyTorch's
dispatcher instead, for comparison).

Rows are appended to ``<out>/host-time-<machine>.jsonl`` with the run's machine, versions and commit.
``--profile N`` also prints, per case, the N Python functions with the most own time (cProfile; the
profiler's own cost inflates them, so read them as shares, not times).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import shlex
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from kernels import ops

from . import providers
from .cases import DTYPES, Case, Shape
from .cli import choices, positive_int
from .machine import device_slug, run_info
from .results import DEFAULT_DIR, JsonlLog

SHAPE = Shape("16->16@4", 16, 16, 4, 4)
MODES = ("fwd", "full")
DEFAULT_PROVIDERS = ("eager", "torch", "triton-split", "triton", "auto")
# On a null GPU only the triton providers stand for a GPU's host path ("eager", "torch" and "auto" run the CPU's).
NULL_GPU_PROVIDERS = ("triton-split", "triton")


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def host_time_us(fn, device: str, calls: int, rounds: int = 5) -> float:
    """Microseconds a call, best of ``rounds`` runs of ``calls`` calls (each run synchronised once, at its end)."""
    for _ in range(max(10, calls // 10)):
        fn()
    _synchronize(device)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        _synchronize(device)
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


@contextlib.contextmanager
def dispatcher_only():
    """Within: every op goes through PyTorch's dispatcher (``kernels.ops.DIRECT`` emptied, then restored)."""
    import kernels

    kernels.available_backends()  # the backends fill DIRECT as they load: load them first
    kept = dict(ops.DIRECT)
    ops.DIRECT.clear()
    try:
        yield
    finally:
        ops.DIRECT.update(kept)


def _fast_launch() -> Optional[bool]:
    """Whether the triton backend launches kept kernels directly (None where it is not loaded)."""
    module = sys.modules.get("kernels.triton.fast_launch")
    return None if module is None else bool(module.ENABLED)


@contextlib.contextmanager
def stubbed_triton_launches():
    """Within: the Triton interpreter's kernel launches do nothing (CPU only: the Python path alone is timed)."""
    from triton.runtime import interpreter

    run = interpreter.InterpretedFunction.run
    interpreter.InterpretedFunction.run = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        interpreter.InterpretedFunction.run = run


def print_profile(fn, calls: int, top: int) -> None:
    """The ``top`` Python functions by own time over ``calls`` calls (cProfile): where the host time goes."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(top)
    lines = stream.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip().startswith("ncalls")), 0)
    print("\n".join(line[:160] for line in lines[start:] if line.strip()))


def measure(device: str, dtype: str, provider_names: Sequence[str], modes: Sequence[str], calls: int,
            stubbed: bool, profile: int = 0, null: bool = False) -> List[dict]:
    rows = []
    for provider in provider_names:
        reason = providers.availability("layers", provider, device, dtype)
        if reason is not None and not ((stubbed or null) and provider.startswith("triton") and device == "cpu"):
            print(f"{provider}: skipped ({reason})")
            continue
        for mode in modes:
            case = Case("layers", SHAPE, 1, dtype, "channels_last", mode, provider)
            prepared = providers.prepare(case, device)
            with prepared.timed() as call:
                microseconds = host_time_us(call, device, calls)
                if profile:
                    print(f"-- {provider} {mode}: the {profile} functions with the most own time over {calls} calls")
                    print_profile(call, calls, profile)
            triton = provider.startswith("triton")
            stub = stubbed and triton
            rows.append(dict(provider=provider, mode=mode, dtype=dtype, shape=SHAPE.name, calls=calls,
                             host_us=round(microseconds, 2), triton_launches_stubbed=stub,
                             triton_null_gpu=null and triton, triton_fast_launch=_fast_launch() if triton else None,
                             ops_direct=bool(ops.DIRECT)))
            note = "  (kernels stubbed)" if stub else "  (null GPU)" if null and triton else ""
            print(f"{provider:14s} {mode:5s} {microseconds:9.1f} us a call{note}")
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    parser.add_argument("--providers", type=choices("provider", providers.LAYER_PROVIDERS),
                        help=f"comma-separated layer providers (default {','.join(DEFAULT_PROVIDERS)}; with "
                             f"--null-gpu {','.join(NULL_GPU_PROVIDERS)})")
    parser.add_argument("--modes", type=choices("mode", MODES), default=",".join(MODES), help="fwd,full")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--calls", type=positive_int, default=300, help="calls a timed run (best of 5 runs)")
    parser.add_argument("--stub-triton", action="store_true",
                        help="CPU: the Triton interpreter's launches do nothing (the Python path alone)")
    parser.add_argument("--null-gpu", action="store_true",
                        help="CPU: the triton providers through Triton's launch path for sm_90, launching nothing")
    parser.add_argument("--dispatcher", action="store_true",
                        help="every op through PyTorch's dispatcher (no direct calls of Python implementations)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also print the N Python functions with the most own time (cProfile) per case")
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR, help=f"results folder (default {DEFAULT_DIR})")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.profile < 0:
        parser.error(f"--profile must be >= 0, got {args.profile}")
    if args.stub_triton and device != "cpu":
        parser.error("--stub-triton is for --device cpu (on a GPU the launches are what is timed)")
    if args.stub_triton and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--stub-triton needs TRITON_INTERPRET=1 in the environment (it stubs the interpreter's launches)")
    if args.null_gpu and (device != "cpu" or args.stub_triton):
        parser.error("--null-gpu is for --device cpu, without --stub-triton")
    if args.null_gpu and os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("--null-gpu needs TRITON_INTERPRET unset (the kernels are compiled for a GPU)")
    dtype = args.dtype or ("bf16" if device == "cuda" or args.null_gpu else "fp32")
    info = run_info(device, argv="python -m benchmarks.host_time " + shlex.join(sys.argv[1:] if argv is None
                                                                               else list(argv)))
    print(f"host time a call on {info.device_name} ({device}), torch {info.torch_version}, run {info.run_id}")
    if args.null_gpu:
        from .null_gpu import null_gpu

        context = null_gpu()
    else:
        context = stubbed_triton_launches() if args.stub_triton else contextlib.nullcontext()
    with context, dispatcher_only() if args.dispatcher else contextlib.nullcontext():
        names = args.providers or (NULL_GPU_PROVIDERS if args.null_gpu else DEFAULT_PROVIDERS)
        rows = measure(device, dtype, names, args.modes, args.calls, args.stub_triton, args.profile,
                       args.null_gpu)
    path = args.out / f"host-time-{device_slug(device)}.jsonl"
    with JsonlLog(path) as log:
        for row in rows:
            log.append({**row, "run": info.as_dict()})
    print(f"rows: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
