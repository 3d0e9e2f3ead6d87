"""``python -m benchmarks ... --warm-only --jobs N``: compile a run's kernels in parallel, time nothing.

Triton compiles a kernel the first time a process launches it with a new specialization (tile
config, constexprs, which integer arguments are 1 or divisible by 16) and keeps the binary in its
on-disk cache (``TRITON_CACHE_DIR``, ``~/.triton/cache`` by default); a later process that launches
the same kernel with the same specialization loads it from there. A benchmark run compiles in its
one process, one kernel at a time: on a GPU a layer's Triton cases launch about seven kernels
(fused forward and backward, split mode's depthwise, transposed-depthwise and sum kernels) and a
whole model dozens, so compiling can take most of a short GPU session. Here N worker processes
prepare the same cases (the same command line, with ``--warm-only --jobs N`` added) and call each
once; the later timed run finds every kernel compiled. The workers inherit the environment
(``SEPCONV_TRITON_AUTOTUNE``, ``SEPCONV_TRITON_CONFIGS``, ``TRITON_CACHE_DIR``), so they build
exactly what it will launch. Nothing is written but Triton's cache (and the cpp library's build
cache on a CPU). Cases whose provider compiles nothing here (eager, ``torch``, ``compile``) are
left out; ``auto`` is kept (on CUDA it may run a Triton mode).
"""

from __future__ import annotations

import multiprocessing
import signal
import time
from typing import List, Optional, Sequence, Tuple

import torch

from .cases import Case

SKIPPED_PROVIDERS = ("eager", "torch", "compile")


def _worker_init() -> None:
    # The parent stops the pool (terminate) on an interrupt; a worker's own traceback would only add noise.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


def worker_pool(processes: int):
    """A pool of ``processes`` spawned workers (CUDA cannot be used in a forked child) that ignore SIGINT and run
    one torch thread each; the caller terminates it."""
    return multiprocessing.get_context("spawn").Pool(processes=processes, initializer=_worker_init)


def error_line(error: BaseException, limit: int) -> str:
    """``error`` in one line: its type and the first ``limit`` characters of its message's first line."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0][:limit] if lines else ''}"


def call_once(task: Tuple[Case, str, Optional[dict]]) -> Tuple[str, float, Optional[str]]:
    """Prepares ``case`` on ``device`` and calls it once (its compiles happen here): (label, seconds, error)."""
    from . import providers

    case, device, model_kwargs = task
    start = time.perf_counter()
    try:
        prepared = providers.prepare(case, device, model_kwargs)
        prepared.fn()
        if device == "cuda":
            torch.cuda.synchronize()
    except Exception as error:  # noqa: BLE001 - one case's failure is reported; the others still warm
        return case.label, time.perf_counter() - start, error_line(error, 200)
    return case.label, time.perf_counter() - start, None


def warm_cases(cases: Sequence[Case]) -> List[Case]:
    """The cases worth a worker's call: one per (suite, shape, batch, dtype, layout, mode, provider) with a
    provider that may compile a kernel; whole-model cases first (the longest), then the layers."""
    from .providers import case_backend

    chosen = [case for case in dict.fromkeys(cases)
              if case.provider not in SKIPPED_PROVIDERS and case_backend(case) not in SKIPPED_PROVIDERS]
    return sorted(chosen, key=lambda case: case.suite != "model")


def warm(cases: Sequence[Case], device: str, jobs: int, model_kwargs: Optional[dict] = None,
         log=print) -> int:
    """Calls each of ``warm_cases(cases)`` once in ``jobs`` worker processes; 0 when every call ran, 1 when
    one failed, 130 when interrupted (the workers are stopped; what they compiled stays in the cache)."""
    chosen = warm_cases(cases)
    log(f"warming {len(chosen)} of {len(cases)} cases in {jobs} worker processes (nothing is timed)")
    if not chosen:
        return 0
    failed = 0
    start = time.perf_counter()
    pool = worker_pool(min(jobs, len(chosen)))
    try:
        tasks = [(case, device, model_kwargs) for case in chosen]
        for done, (label, seconds, error) in enumerate(pool.imap_unordered(call_once, tasks), 1):
            failed += error is not None
            log(f"[{done}/{len(chosen)}] {label}: {'failed: ' + error if error else 'ran'} ({seconds:.1f} s)")
        pool.close()
    except KeyboardInterrupt:
        log(f"interrupted after {time.perf_counter() - start:.0f} s; what the workers compiled is cached")
        return 130
    finally:
        pool.terminate()
        pool.join()
    log(f"warmed in {time.perf_counter() - start:.1f} s" + (f"; {failed} case(s) failed" if failed else ""))
    return 1 if failed else 0
