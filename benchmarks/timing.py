"""Timers: a time-budgeted wall-clock timer for CPU, CUDA-event timers for GPU.

Every timer warms up first (so compilation, autotuning and first-touch
allocation are excluded) and returns the list of per-call times in
milliseconds; ``summarize`` turns that into p20/p50/p80.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

try:
    import resource
except ImportError:  # not on Windows
    resource = None


@dataclass(frozen=True)
class TimingPolicy:
    """How long to measure one case.

    warmup: calls before timing (at least 1: the first call compiles/autotunes).
    min_repeats: timed calls always made (so p20/p80 mean something even for slow cases; 6 is the fewest
        rounds whose paired ratios give a speedup its 95% interval, ``median_interval``).
    min_seconds: then keep timing until this much time was spent in timed calls ...
    max_repeats: ... but never more calls than this.
    """

    warmup: int = 2
    min_repeats: int = 6
    min_seconds: float = 0.5
    max_repeats: int = 200

    def __post_init__(self) -> None:
        if self.warmup < 1:
            raise ValueError(f"warmup must be >= 1, got {self.warmup}")
        if self.min_repeats < 1 or self.max_repeats < self.min_repeats:
            raise ValueError(f"need 1 <= min_repeats <= max_repeats, got {self.min_repeats}, {self.max_repeats}")


@dataclass(frozen=True)
class Timing:
    p20_ms: float
    p50_ms: float
    p80_ms: float
    repeats: int


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in [0, 100]."""
    if not values:
        raise ValueError("percentile of an empty list")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(times_ms: Sequence[float]) -> Timing:
    return Timing(percentile(times_ms, 20), statistics.median(times_ms), percentile(times_ms, 80), len(times_ms))


def median_interval(values: Sequence[float], level: float = 0.95) -> Optional[Tuple[float, float]]:
    """A distribution-free confidence interval for the median of ``values``: the order statistics
    ``(x_(l), x_(n+1-l))`` with the largest ``l`` whose coverage, ``1 - 2 P(B <= l - 1)`` for B ~
    Binomial(n, 1/2), is at least ``level``. None where ``values`` are too few for that (n < 6 at 95%).

    It treats the values as independent draws. Paired ratios of consecutive rounds are not quite
    that (a slow spell can span rounds), so read it as the run's own spread, not as a bound on what
    another run would measure."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level!r}")
    ordered = sorted(values)
    n = len(ordered)
    below, best = 0.0, 0  # P(B <= rank - 1) for the rank under test; the largest rank that keeps the coverage
    for rank in range(1, n // 2 + 1):
        below += math.comb(n, rank - 1) / 2.0 ** n
        if 1.0 - 2.0 * below < level:
            break
        best = rank
    if best == 0:
        return None
    return ordered[best - 1], ordered[n - best]


def time_cpu(fn: Callable[[], object], policy: TimingPolicy,
             clock: Callable[[], float] = time.perf_counter) -> List[float]:
    """Wall-clock each call of ``fn`` (ms) after ``policy.warmup`` untimed calls.

    Stops once both ``min_repeats`` calls and ``min_seconds`` of timed calls are
    done, or at ``max_repeats`` calls. ``clock`` is injectable for tests.
    """
    for _ in range(policy.warmup):
        fn()
    times: List[float] = []
    spent = 0.0
    while len(times) < policy.max_repeats:
        start = clock()
        fn()
        elapsed = clock() - start
        times.append(elapsed * 1e3)
        spent += elapsed
        if len(times) >= policy.min_repeats and spent >= policy.min_seconds:
            break
    return times


def _minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is missing: Windows)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def time_cpu_interleaved(fns: Sequence[Callable[[], object]], policy: TimingPolicy,
                         clock: Callable[[], float] = time.perf_counter, settle: int = 1,
                         faults: Optional[List[List[int]]] = None,
                         on_round: Optional[Callable[[int], None]] = None,
                         fault_counters: Optional[Sequence[Optional[Callable[[], int]]]] = None) -> List[List[float]]:
    """Per-call times (ms) of several callables, timed in rounds that call each once, in order.

    A shared machine slows down in spells (other tenants of a virtual machine, clock
    changes); timed in turn, every callable sees the same spells, so their ratios hold
    where back-to-back cases could each catch a different one. Each callable is warmed up
    first. Rounds stop once every callable has ``min_repeats`` calls and the timed calls
    took ``min_seconds`` per callable in all (the budget of timing them one by one), or
    after ``max_repeats`` rounds.

    Each timed call follows ``settle`` untimed calls of the same callable. Without them a
    call's time depends on which callable ran before it: glibc hands large freed blocks
    back to the kernel, and the next call faults its buffers in again or not, depending on
    the previous caller's sizes (64->128@147 at batch 1: 0.91 ms alone, 3.2 ms right after
    the eager pair).

    ``faults``, when given, receives one list per callable: the minor page faults the
    process took during each timed call (read outside the timed window), the usual cause
    when a case's times swing between runs.

    ``fault_counters``, when given, has one entry per callable: what reads its faults (None: this
    process's), for a callable that runs in another process.

    ``on_round``, when given, is called with the number of rounds done after each round
    (outside the timed calls): a whole-model group takes minutes, and a caller can show it.
    """
    if not fns:
        return []
    for fn in fns:
        for _ in range(policy.warmup):
            fn()
    times: List[List[float]] = [[] for _ in fns]
    if faults is not None:
        faults[:] = [[] for _ in fns]
    spent = 0.0
    counters = [counter or _minor_faults for counter in (fault_counters or [None] * len(fns))]
    for done in range(1, policy.max_repeats + 1):
        for slot, (fn, own) in enumerate(zip(fns, times)):
            for _ in range(settle):
                fn()
            before = counters[slot]() if faults is not None else 0
            start = clock()
            fn()
            elapsed = clock() - start
            if faults is not None:
                faults[slot].append(counters[slot]() - before)
            own.append(elapsed * 1e3)
            spent += elapsed
        if on_round is not None:
            on_round(done)
        if len(times[0]) >= policy.min_repeats and spent >= policy.min_seconds * len(fns):
            break
    return times


def time_cuda(fn: Callable[[], object], policy: TimingPolicy, use_cuda_graph: bool = False,
              grad_to_none: Optional[Sequence[torch.Tensor]] = None) -> List[float]:
    """Per-call GPU times (ms) with the L2 cache flushed before each call.

    Uses ``triton.testing.do_bench`` (warm-up and cache flush built in) when
    Triton is importable, ``do_bench_cudagraph`` when ``use_cuda_graph``, and
    CUDA events with a manual flush otherwise.
    """
    warmup_ms = max(25.0, 1e3 * policy.min_seconds / 10)
    rep_ms = max(100.0, 1e3 * policy.min_seconds)
    try:
        import triton.testing as tt
    except ImportError:
        tt = None
    if tt is not None:
        try:
            if use_cuda_graph:
                result = tt.do_bench_cudagraph(fn, rep=int(rep_ms), grad_to_none=grad_to_none, return_mode="all")
            else:
                result = tt.do_bench(fn, warmup=int(warmup_ms), rep=int(rep_ms), grad_to_none=grad_to_none,
                                     return_mode="all")
            return [float(t) for t in result]
        except (AssertionError, TypeError):  # a Triton without return_mode="all"
            pass
    return _time_cuda_events(fn, policy, grad_to_none)


def _time_cuda_events(fn: Callable[[], object], policy: TimingPolicy,
                      grad_to_none: Optional[Sequence[torch.Tensor]]) -> List[float]:
    flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
    for _ in range(policy.warmup):
        fn()
    torch.cuda.synchronize()
    times: List[float] = []
    spent = 0.0
    while len(times) < policy.max_repeats:
        if grad_to_none:
            for tensor in grad_to_none:
                tensor.grad = None
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        spent += times[-1] / 1e3
        if len(times) >= policy.min_repeats and spent >= policy.min_seconds:
            break
    return times


def measure(fn: Callable[[], object], device: str, policy: TimingPolicy, **cuda_options) -> Timing:
    """Time ``fn`` on ``device`` ("cpu" or "cuda") and summarize."""
    if device == "cuda":
        return summarize(time_cuda(fn, policy, **cuda_options))
    return summarize(time_cpu(fn, policy))
