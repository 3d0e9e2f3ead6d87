"""Peak memory of one call, above what was allocated before it.

GPU: ``torch.cuda.max_memory_allocated`` (the caching allocator's peak of live
tensor bytes) after ``reset_peak_memory_stats``, minus the bytes live before.

CPU: torch has no allocator statistics for CPU, so one extra call runs under
``torch.profiler`` with ``profile_memory=True`` and the allocation trace
(every allocation and free, in time order) is summed; the peak of that running
sum is the most tensor memory the call had live at once beyond its inputs.
Memory that oneDNN or a C++ extension allocates outside torch's allocator is
not seen on CPU.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Iterator, Optional

import torch

COLUMN = "peak_alloc_mb"
COLUMN_DOC = {
    "cpu": "peak tensor bytes live during one call above the start (torch.profiler allocation trace), MiB",
    "cuda": "torch.cuda.max_memory_allocated during one call above the start, MiB",
}


def peak_allocated_mb(fn: Callable[[], object], device: str) -> Optional[float]:
    """MiB, or None when this torch cannot measure it."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = fn()
        torch.cuda.synchronize()
        del result
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    return _cpu_peak_mb(fn)


def _cpu_peak_mb(fn: Callable[[], object]) -> Optional[float]:
    from torch.profiler import ProfilerActivity, profile

    try:
        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn()
            del result
        events = prof.profiler.kineto_results.events()
        allocations = sorted((event.start_ns(), event.nbytes()) for event in events if event.name() == "[memory]")
    except (AttributeError, RuntimeError):  # the kineto event API is not public; degrade to "not measured"
        return None
    live = peak = 0
    for _, nbytes in allocations:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the profiler's start/stop lines, which kineto prints to fd 2 from C++."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # stderr replaced (pytest capture): nothing to silence
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
