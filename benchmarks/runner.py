"""Run a list of cases: check availability, prepare, time, measure memory, write each row as it finishes."""

from __future__ import annotations

import dataclasses
import gc
import itertools
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import isolated, providers
from .cases import BASELINE_LAYOUT, BASELINE_PROVIDER, DTYPES, Case, mode_flops, separable_bytes, separable_flops
from .machine import RunInfo
from .memory import COLUMN as MEMORY_COLUMN
from .memory import peak_allocated_mb
from .results import ROW_KEYS, JsonlLog
from .timing import Timing, TimingPolicy, measure, median_interval, summarize, time_cpu, time_cpu_interleaved


@dataclass
class RunState:
    """What a run has produced so far (kept current, so an interrupted run can still be summarized)."""

    rows: List[dict] = field(default_factory=list)
    # "provider (suite, dtype)" -> why it did not run
    unavailable: Dict[str, str] = field(default_factory=dict)
    interrupted: bool = False


# Whole-model cases take at least this many rounds: a training step moves 10-20% from call to call
# on the 2-core VM (fresh 40-90 MB buffers are paged in or not), and the speedup is a median of
# paired ratios, so five rounds left it swinging by ~0.1x between runs.
MODEL_MIN_ROUNDS = 9


@dataclass
class RunOptions:
    device: str
    policy: TimingPolicy
    measure_memory: bool = True
    cuda_graphs: bool = False
    model_kwargs: Dict = field(default_factory=dict)
    model_flops_per_image: Optional[float] = None
    # Test hook: raise KeyboardInterrupt once this many rows are written.
    interrupt_after: Optional[int] = None
    # CPU: run each whole-model case in a worker process of its own (benchmarks.isolated).
    isolate: bool = False
    # Called with (case, what is happening) while a CPU group is prepared and timed: a whole-model
    # group takes minutes before its rows exist, and the caller shows that it is moving.
    on_status: Optional[Callable[[Case, str], None]] = None


def work(case: Case, options: RunOptions) -> Tuple[float, float]:
    """(FLOPs, minimal bytes) of one call of ``case``."""
    element_size = torch.empty((), dtype=DTYPES[case.dtype]).element_size()
    if case.suite == "model":
        flops = mode_flops((options.model_flops_per_image or 0.0) * case.batch, case.mode)
        image_bytes = case.batch * case.shape.cin * case.shape.h * case.shape.w * element_size
        return flops, float(image_bytes)
    depthwise = case.suite != "shortcut"
    flops = mode_flops(separable_flops(case.shape, case.batch, depthwise), case.mode)
    return flops, separable_bytes(case.shape, case.batch, element_size, case.mode, depthwise)


def base_row(case: Case, run: RunInfo) -> dict:
    shape = case.shape
    row = {key: None for key in ROW_KEYS}
    row.update(suite=case.suite, shape=shape.name, cin=shape.cin, cout=shape.cout, h=shape.h, w=shape.w, k=shape.k,
               stride=shape.stride, batch=case.batch, dtype=case.dtype, layout=case.layout, mode=case.mode,
               provider=case.provider, threads=torch.get_num_threads())
    return row


def _finish_row(case: Case, prepared: providers.Prepared, timing: Timing, options: RunOptions, run: RunInfo,
                baselines: Dict[tuple, float]) -> dict:
    row = base_row(case, run)
    flops, nbytes = work(case, options)
    seconds = timing.p50_ms / 1e3
    row.update(status="ok", p20_ms=timing.p20_ms, p50_ms=timing.p50_ms, p80_ms=timing.p80_ms,
               repeats=timing.repeats, gflop=flops / 1e9, ran=prepared.ran)
    if flops:
        row["gflop_s"] = flops / seconds / 1e9
        peak = run.peak_gflops.get(case.dtype)
        if peak:
            row["pct_peak"] = 100.0 * row["gflop_s"] / peak
    if case.suite == "model":
        row["images_per_s"] = case.batch / seconds
    else:
        row["gb_s"] = nbytes / seconds / 1e9
    if case.provider == BASELINE_PROVIDER and case.layout == BASELINE_LAYOUT:
        baselines[case.group] = timing.p50_ms
    if case.group in baselines:
        row["speedup_vs_eager_cl"] = baselines[case.group] / timing.p50_ms
    if options.measure_memory:
        row[MEMORY_COLUMN] = (prepared.memory() if prepared.memory is not None
                              else peak_allocated_mb(prepared.fn, options.device))
    return row


def measure_case(case: Case, options: RunOptions, run: RunInfo, baselines: Dict[tuple, float]) -> dict:
    """Prepare, time and measure one case on its own (the GPU path: do_bench per case)."""
    prepared = providers.prepare(case, options.device, options.model_kwargs)
    cuda_options = {}
    if options.device == "cuda":
        cuda_options = dict(use_cuda_graph=options.cuda_graphs, grad_to_none=prepared.grad_to_none or None)
    with prepared.timed() as call:
        timing = measure(call, options.device, options.policy, **cuda_options)
    row = _finish_row(case, prepared, timing, options, run, baselines)
    del prepared
    return row


def _error_row(case: Case, run: RunInfo, error: Exception) -> dict:
    row = base_row(case, run)
    row.update(status="error", reason=f"{type(error).__name__}: {error}"[:500])
    return row


def measure_group(cases: List[Case], options: RunOptions, run: RunInfo,
                  baselines: Dict[tuple, float]) -> List[dict]:
    """One row per case of a group (CPU), their timed calls interleaved round by round.

    Every case is prepared and called once first; one that fails gets an error row and
    the others are still timed. The baseline is the group's first case; each case's
    speedup is the median over rounds of the paired ratio baseline / case.
    """
    workers: List[isolated.Worker] = []
    try:
        return _measure_group(cases, options, run, baselines, workers)
    finally:
        for worker in workers:
            worker.close()


def _measure_group(cases: List[Case], options: RunOptions, run: RunInfo, baselines: Dict[tuple, float],
                   workers: list) -> List[dict]:
    rows: List[Optional[dict]] = [None] * len(cases)
    ready: List[Tuple[int, providers.Prepared]] = []

    def status(case: Case, text: str) -> None:
        if options.on_status is not None:
            options.on_status(case, text)

    for index, case in enumerate(cases):
        status(case, f"preparing {case.provider} {case.layout} ({index + 1}/{len(cases)}: build, compile, first call)")
        try:
            if options.isolate and case.suite == "model":
                workers.append(isolated.Worker(case, options.device, options.model_kwargs, torch.get_num_threads()))
                prepared = workers[-1].prepared
            else:
                prepared = providers.prepare(case, options.device, options.model_kwargs)
            prepared.fn()  # compiles, autotunes, builds: outside the rounds
            ready.append((index, prepared))
        except KeyboardInterrupt:
            raise
        except Exception as error:  # noqa: BLE001 - one failing case must not end the run; its row says why
            rows[index] = _error_row(case, run, error)
    rounds: List[List[float]] = []
    faults: List[List[int]] = []
    policy = options.policy
    if cases and cases[0].suite == "model":
        policy = dataclasses.replace(policy, min_repeats=max(policy.min_repeats, MODEL_MIN_ROUNDS))
    on_round = None
    if ready:
        lead = cases[ready[0][0]]
        status(lead, f"warming up {len(ready)} providers, then at least {policy.min_repeats} timed rounds")

        def on_round(done: int) -> None:
            status(lead, f"timed round {done} of at least {policy.min_repeats} ({len(ready)} providers a round)")
    try:
        rounds = time_cpu_interleaved([p.fn for _, p in ready], policy, faults=faults, on_round=on_round,
                                      fault_counters=[p.faults for _, p in ready])
        timings = [summarize(t) for t in rounds]
    except KeyboardInterrupt:
        raise
    except Exception:  # noqa: BLE001 - a case that fails only later: time the cases one by one to find it
        rounds = []
        timings = []
        for index, prepared in ready:
            try:
                timings.append(summarize(time_cpu(prepared.fn, policy)))
            except Exception as error:  # noqa: BLE001
                rows[index] = _error_row(cases[index], run, error)
                timings.append(None)
    # The baseline's calls, round by round, when it was timed in the same rounds.
    base_rounds = next((rounds[slot] for slot, (index, _) in enumerate(ready)
                        if rounds and cases[index].provider == BASELINE_PROVIDER
                        and cases[index].layout == BASELINE_LAYOUT), None)
    for slot, ((index, prepared), timing) in enumerate(zip(ready, timings)):
        if timing is None:
            continue
        try:
            rows[index] = row = _finish_row(cases[index], prepared, timing, options, run, baselines)
            if base_rounds is not None:
                # Paired: the median over rounds of baseline / case, each pair timed back to back,
                # so a slow spell that spans a round cancels out of its ratio.
                ratios = [b / c for b, c in zip(base_rounds, rounds[slot])]
                row["speedup_vs_eager_cl"] = statistics.median(ratios)
                interval = median_interval(ratios) if rounds[slot] is not base_rounds else None
                row["speedup_ci95"] = list(interval) if interval is not None else None
            if rounds and faults[slot]:  # 4 KiB pages faulted in by a timed call, median over the rounds
                row["minor_faults"] = statistics.median(faults[slot])
        except Exception as error:  # noqa: BLE001
            rows[index] = _error_row(cases[index], run, error)
    return rows


def run_cases(cases: List[Case], options: RunOptions, run: RunInfo, log: JsonlLog, state: RunState,
              on_row: Optional[Callable[[Case, dict], None]] = None) -> RunState:
    """Measure every case in order, a group (the cases compared with one baseline) at a time.

    On CPU the group's cases are timed interleaved (``measure_group``); on GPU one by one.
    Each group's rows are appended to ``log`` before the next group starts.
    """
    baselines: Dict[tuple, float] = {}
    reasons: Dict[tuple, Optional[str]] = {}
    run_dict = run.as_dict()

    def emit(case: Case, row: Optional[dict]) -> None:
        if row is None:  # an unavailable provider already reported
            if on_row:
                on_row(case, None)
            return
        row["run"] = run_dict
        log.append(row)
        state.rows.append(row)
        if on_row:
            on_row(case, row)
        if options.interrupt_after is not None and len(state.rows) >= options.interrupt_after:
            raise KeyboardInterrupt(f"test hook: interrupted after {len(state.rows)} rows")

    for _, grouped in itertools.groupby(cases, key=lambda case: case.group):
        group = list(grouped)
        rows: List[Optional[dict]] = [None] * len(group)
        measured: List[int] = []
        for index, case in enumerate(group):
            key = (case.suite, case.provider, case.dtype)
            if key not in reasons:
                reasons[key] = providers.availability(case.suite, case.provider, options.device, case.dtype)
            reason = reasons[key]
            if reason is None:
                measured.append(index)
                continue
            label = f"{case.provider} ({case.suite}, {case.dtype})"
            if label in state.unavailable:
                continue
            state.unavailable[label] = reason
            row = base_row(case, run)
            row.update(status="unavailable", reason=reason, layout=None, shape=None, batch=None, mode=None,
                       cin=None, cout=None, h=None, w=None, k=None, stride=None)
            rows[index] = row
        if options.device == "cpu" and measured:
            started = time.perf_counter()
            try:
                results = measure_group([group[i] for i in measured], options, run, baselines)
            finally:
                gc.collect()
            # The group's cost (preparation, compiles, warm-up, timed rounds) shared evenly: what a case adds.
            share = round((time.perf_counter() - started) / len(measured), 3)
            for index, row in zip(measured, results):
                row["case_wall_s"] = share
                rows[index] = row
        else:
            for index in measured:
                started = time.perf_counter()
                try:
                    rows[index] = measure_case(group[index], options, run, baselines)
                except KeyboardInterrupt:
                    raise
                except Exception as error:  # noqa: BLE001 - one failing case must not end the run
                    rows[index] = _error_row(group[index], run, error)
                finally:
                    gc.collect()
                # Everything the case cost, compile and warm-up included: what it adds to a run's duration.
                rows[index]["case_wall_s"] = round(time.perf_counter() - started, 3)
        for case, row in zip(group, rows):
            emit(case, row)
    return state
