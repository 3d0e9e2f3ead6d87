"""Result files: the append-only JSONL log and the markdown summary of the latest run.

``benchmarks/results/<device-slug>.jsonl``: one JSON object per line, one line
per case (measured, unavailable or failed), each carrying the run metadata
under ``"run"``. Each line is flushed and fsynced as soon as its case finishes,
so an interrupted run keeps every finished row; ``read_rows`` skips a torn last
line. ``<device-slug>.md`` is rewritten atomically (temp file + ``os.replace``).
"""

from __future__ import annotations

import json
import os
import shlex
import tempfile
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

from .cases import BASELINE_LAYOUT, BASELINE_PROVIDER
from .machine import pinned_note
from .memory import COLUMN as MEMORY_COLUMN
from .memory import COLUMN_DOC as MEMORY_DOC

DEFAULT_DIR = Path(__file__).resolve().parent / "results"

# Every row has every one of these keys (None where it does not apply).
ROW_KEYS = (
    "suite", "shape", "cin", "cout", "h", "w", "k", "stride", "batch", "dtype", "layout", "mode", "provider",
    "status", "reason", "p20_ms", "p50_ms", "p80_ms", "repeats", "gflop", "gflop_s", "gb_s", "pct_peak",
    "speedup_vs_eager_cl", "speedup_ci95", MEMORY_COLUMN, "threads", "case_wall_s", "images_per_s", "minor_faults",
    "ran",
)


def throughput_column(suite: str) -> tuple:
    """(header, row key) of a suite's throughput column: images/s for whole models, GB/s for layers."""
    return ("images/s", "images_per_s") if suite == "model" else ("GB/s", "gb_s")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see ``atomic_write_bytes``)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)  # mkstemp makes it 0600; a result file is an ordinary file
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


class JsonlLog:
    """Appends rows to a JSONL file, each one durable before ``append`` returns."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair_torn_tail()
        self._handle = open(self.path, "a", encoding="utf-8")

    def _repair_torn_tail(self) -> None:
        """A run killed mid-write can leave a last line without its newline: end it, so new rows start clean."""
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, "rb+") as handle:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    handle.write(b"\n")

    def append(self, row: dict) -> None:
        self._handle.write(json.dumps(row, sort_keys=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "JsonlLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_rows(path: Path) -> Iterator[dict]:
    """Rows of a JSONL log; lines that are not complete JSON objects (a torn write) are skipped."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                yield row


def timed_through_cuda_graphs(run: Dict) -> bool:
    """Whether a run timed its cases by replaying CUDA graphs (``--cuda-graphs``): recorded as ``cuda_graphs``,
    or, for runs from before that field, read from the command line the run recorded."""
    if run.get("cuda_graphs") is not None:
        return bool(run["cuda_graphs"])
    return "--cuda-graphs" in shlex.split(run.get("argv") or "")


def latest_run(rows: Iterable[dict]) -> List[dict]:
    """The rows of the last run in the log."""
    rows = list(rows)
    if not rows:
        return []
    run_id = rows[-1].get("run", {}).get("run_id")
    return [row for row in rows if row.get("run", {}).get("run_id") == run_id]


def group_unavailable(unavailable: Dict[str, str]) -> Dict[str, str]:
    """Merge providers that share a reason: ``{"eager, compile (model, fp32)": reason}``."""
    by_reason: Dict[tuple, List[str]] = {}
    for label, reason in unavailable.items():
        provider, _, where = label.partition(" (")
        by_reason.setdefault((where, reason), []).append(provider)
    return {f"{', '.join(names)} ({where}": reason for (where, reason), names in by_reason.items()}


# --- markdown ---------------------------------------------------------------------------------------

TARGETS_TEXT = {
    "layers": "fwd and fwd+bwd >= 1.0x the eager channels_last pair on every shape; >= 2x on the 147x147 and "
              "74x74 shapes at batch 8; 19x19 and 10x10 shapes at >= 85% of the measured peak",
    # A run whose cpp library runs the AVX2 path (python -m benchmarks --isa avx2: eager held to AVX2 too).
    "layers-avx2": "fwd >= 1.0x the eager channels_last pair on every shape at batch 1 and 8, fwd+bwd >= 1.0x "
                   "at batch 8 (the AVX2 path, with oneDNN and ATen held to AVX2 as well)",
    "model": "eval forward >= 1.2x eager channels_last at batch 1 and >= 1.8x at batch 8; training step >= 1.3x "
             "at batch 8 with peak memory no higher than eager",
}


def _fmt(value: Optional[float], digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}{suffix}"


NOISY_SPREAD = 0.25


def is_noisy(row: dict) -> bool:
    """p20..p80 wider than 25% of the median: the machine was busy, treat the number with care."""
    return bool(row.get("p50_ms")) and (row["p80_ms"] - row["p20_ms"]) > NOISY_SPREAD * row["p50_ms"]


def _noise_mark(row: dict) -> str:
    return " ⚠" if is_noisy(row) else ""


def interval_text(interval: Optional[Sequence[float]], digits: int = 2) -> str:
    """`` (0.97–1.03)``: a row's 95% interval of its speedup (``speedup_ci95``), or nothing without one."""
    return "" if not interval else f" ({interval[0]:.{digits}f}–{interval[1]:.{digits}f})"


def _speedup(value: Optional[float], interval: Optional[Sequence[float]] = None) -> str:
    if value is None:
        return "–"
    mark = " ✅" if value >= 1.0 else " ❌"
    return f"{value:.2f}x{interval_text(interval)}{mark}"


def within_spread(check: dict) -> bool:
    """A missed speedup target whose 95% interval still reaches the goal: the run cannot tell it from met."""
    interval = check.get("interval")
    return not check["ok"] and bool(interval) and interval[1] >= check["goal"]


def check_targets(rows: Sequence[dict], backend: str) -> List[dict]:
    """One entry per target and case: ``{target, case, value, goal, ok, unit}`` for the project backend
    ``backend``; speedup entries also carry ``interval``, the row's 95% interval (``speedup_ci95``, or None)."""
    checks: List[dict] = []

    def speedup_check(target: str, case: str, row: dict, goal: float) -> dict:
        value = row["speedup_vs_eager_cl"]
        return dict(target=target, case=case, value=value, goal=goal, ok=value >= goal, unit="x",
                    interval=row.get("speedup_ci95"))
    ok_rows = [r for r in rows if r.get("status") == "ok"]
    for row in ok_rows:
        if (row["suite"] == "layers" and row["provider"] == backend and row["layout"] == BASELINE_LAYOUT
                and _targets_suite(row) == "layers-avx2"):
            if (row["mode"] == "fwd" or row["batch"] == 8) and row["speedup_vs_eager_cl"] is not None:
                case = f"{row['shape']} N={row['batch']} {row['dtype']} {row['mode']}"
                checks.append(speedup_check(">= 1.0x eager CL (AVX2)", case, row, 1.0))
            continue
        if row["suite"] == "layers" and row["provider"] == backend and row["layout"] == BASELINE_LAYOUT:
            case = f"{row['shape']} N={row['batch']} {row['dtype']} {row['mode']}"
            if row["mode"] in ("fwd", "full") and row["speedup_vs_eager_cl"] is not None:
                goal = 2.0 if row["h"] in (147, 74) and row["batch"] == 8 else 1.0
                checks.append(speedup_check(f">= {goal:.1f}x eager CL", case, row, goal))
            if row["h"] in (19, 10) and row["pct_peak"] is not None:
                checks.append(dict(target=">= 85% of peak", case=case, value=row["pct_peak"], goal=85.0,
                                   ok=row["pct_peak"] >= 85.0, unit="%"))
        if row["suite"] == "model" and row["speedup_vs_eager_cl"] is not None:
            case = f"N={row['batch']} {row['dtype']} {row['mode']} {row['provider']}"
            if row["mode"] == "eval" and row["provider"] == f"{backend}-fused":
                goal = 1.2 if row["batch"] == 1 else 1.8
                checks.append(speedup_check(f">= {goal:.1f}x eager CL", case, row, goal))
            if row["mode"] == "train" and row["provider"] == f"{backend}-unfused":
                checks.append(speedup_check(">= 1.3x eager CL", case, row, 1.3))
                base = _baseline_of(ok_rows, row)
                if base and base.get(MEMORY_COLUMN) is not None and row.get(MEMORY_COLUMN) is not None:
                    checks.append(dict(target="peak memory <= eager CL", case=case, value=row[MEMORY_COLUMN],
                                       goal=base[MEMORY_COLUMN], ok=row[MEMORY_COLUMN] <= base[MEMORY_COLUMN],
                                       unit=" MiB"))
    return checks


def _targets_suite(row: dict) -> str:
    """The TARGETS_TEXT entry that applies to a row: the AVX2 path's for layer rows of a run whose cpp
    library and oneDNN both ran AVX2 (--isa avx2), else the row's suite."""
    run = row.get("run") or {}
    onednn = run.get("onednn_isa") or ""
    if row["suite"] == "layers" and run.get("cpp_isa") == "avx2" and "AVX2" in onednn and "512" not in onednn:
        return "layers-avx2"
    return row["suite"]


def _provider_cell(row: dict) -> str:
    """The provider, and for ``auto`` what it ran: ``auto → cpp``."""
    return f"{row['provider']} → {row['ran']}" if row.get("ran") else row["provider"]


def _baseline_of(rows: Sequence[dict], row: dict) -> Optional[dict]:
    for other in rows:
        if (other["provider"] == BASELINE_PROVIDER and other["layout"] == BASELINE_LAYOUT
                and all(other[k] == row[k] for k in ("suite", "shape", "batch", "dtype", "mode"))):
            return other
    return None


def _gpu_timing_line(run: Dict) -> str:
    timing = ("CUDA graph replays (--cuda-graphs: the GPU's time, without the host's launch overhead)"
              if timed_through_cuda_graphs(run) else "plain calls (the host's launch overhead included)")
    tiles = {True: "autotuned", False: "fixed (SEPCONV_TRITON_AUTOTUNE=0: each kernel's first config)",
             None: "not recorded"}[run.get("triton_autotune")]
    return f"- GPU timing: {timing}; Triton tile configs {tiles}{pinned_note(run.get('triton_configs'))}"


def render_markdown(rows: Sequence[dict], run: Dict, unavailable: Dict[str, str], target_backend: Optional[str],
                    interrupted: bool = False) -> str:
    lines: List[str] = []
    lines.append(f"# Benchmark: {run.get('device_name')} ({run.get('device')})")
    lines.append("")
    if interrupted:
        lines += ["**This run was interrupted: the tables hold only the cases that finished.**", ""]
    peaks = ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in (run.get("peak_gflops") or {}).items())
    lines += [
        f"- run `{run.get('run_id')}` at {run.get('utc_time')} UTC, commit `{run.get('git_commit')}`",
        f"- CPU: {run.get('cpu_model')}; GPU: {run.get('gpu_model') or 'none'}; torch threads: {run.get('threads')}; "
        f"load average at start: {run.get('load_average')}",
        *([f"- ISA: cpp library `{run.get('cpp_isa')}`, oneDNN {run.get('onednn_isa')}, ATen "
            f"{run.get('aten_cpu_capability')}"] if run.get("device") == "cpu" and run.get("cpp_isa") else []),
        *([f"- GPU {run.get('gpu_capability')}; TF32: cuDNN convolutions "
           f"{'on' if run.get('cudnn_allow_tf32') else 'off'}, matmuls {'on' if run.get('matmul_allow_tf32') else 'off'} "
           "(torch.backends flags in force for every provider)"] if run.get("gpu_capability") else []),
        *([_gpu_timing_line(run)] if run.get("device") == "cuda" else []),
        *([f"- backend='auto': {'tuned per layer (SEPCONV_TUNE=1 or --tune)' if run['auto_tuning'] else 'untuned'}"]
          if run.get("auto_tuning") is not None else []),
        *(["- whole-model cases: each provider in a worker process of its own (--isolate), called in turns"]
          if run.get("isolated_models") else []),
        f"- torch {run.get('torch_version')}, triton {run.get('triton_version') or 'not installed'}, "
        f"python {run.get('python')}",
        f"- measured peak compute: {peaks or 'not measured'}; memory bandwidth: "
        f"{_fmt(run.get('peak_gbps'), 0)} GB/s (copy). Detail: {run.get('peak_detail')}",
        f"- command: `{run.get('argv')}`",
        "",
        "Times are p50 over repeats after warm-up (p20–p80 in brackets); on CPU the providers of one shape, "
        "batch and mode are timed in turn, round by round (each timed call after one untimed call of the same "
        "provider), so a slow spell of the machine falls on all of them. "
        "GFLOP/s counts 2 FLOPs per "
        "multiply-add (backward = 2x forward). GB/s uses the minimal traffic (each tensor read or written once). "
        f"Speedup is against the eager `nn.Conv2d` pair in channels_last (on CPU the median over rounds of the "
        f"paired ratio eager / provider, so it need not equal the ratio of the two p50s; in brackets its 95% "
        f"interval, from the order statistics of the rounds' ratios: this run's spread, which rounds that share a "
        f"slow spell make look narrower than it is, and which runs on other days may fall outside). "
        f"A target missed with an interval that reaches the goal is marked \"within the run's spread\": "
        f"still missed. `{MEMORY_COLUMN}`: "
        f"{MEMORY_DOC.get(run.get('device'), MEMORY_DOC['cpu'])}. ⚠ marks a p20–p80 spread wider than "
        f"{NOISY_SPREAD:.0%} of the median (a busy machine). `page faults`: minor page faults (4 KiB pages "
        "mapped in afresh) during a timed call, median over the rounds (CPU): buffers that glibc handed back "
        "to the kernel and that the call faults in again, the usual cause of a case that moves between runs. "
        "`auto → cpp`: the implementation `backend=\"auto\"` ran in that case (seen on an untimed call).",
        "",
    ]
    if unavailable:
        lines += ["## Providers not run", "", "| provider | reason |", "|---|---|"]
        lines += [f"| {name} | {reason} |" for name, reason in group_unavailable(unavailable).items()]
        lines.append("")
    failed = [r for r in rows if r.get("status") == "error"]
    for suite in dict.fromkeys(r["suite"] for r in rows if r.get("status") == "ok"):
        suite_rows = [r for r in rows if r["suite"] == suite and r.get("status") == "ok"]
        lines += [f"## Suite `{suite}`", ""]
        targets = _targets_suite(suite_rows[0])
        if targets in TARGETS_TEXT and target_backend:
            lines += [f"Targets for `{target_backend}`: {TARGETS_TEXT[targets]}.", ""]
        throughput_header, throughput_key = throughput_column(suite)
        lines += [
            f"| shape | N | dtype | mode | provider | layout | p50 ms [p20–p80] | GFLOP/s | {throughput_header} | "
            f"% peak | speedup vs eager CL | {MEMORY_COLUMN} | page faults |",
            "|---|---:|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in suite_rows:
            lines.append(
                f"| {r['shape']} | {r['batch']} | {r['dtype']} | {r['mode']} | {_provider_cell(r)} | {r['layout']} | "
                f"{_fmt(r['p50_ms'], 3)} [{_fmt(r['p20_ms'], 3)}–{_fmt(r['p80_ms'], 3)}]{_noise_mark(r)} | {_fmt(r['gflop_s'])} | "
                f"{_fmt(r.get(throughput_key))} | {_fmt(r['pct_peak'], 1, '%')} | "
                f"{_speedup(r['speedup_vs_eager_cl'], r.get('speedup_ci95'))} | "
                f"{_fmt(r[MEMORY_COLUMN])} | {_fmt(r.get('minor_faults'), 0)} |")
        lines.append("")
    checks = check_targets(rows, target_backend) if target_backend else []
    if checks:
        passed = sum(c["ok"] for c in checks)
        lines += [f"## Targets for `{target_backend}`: {passed}/{len(checks)} met", "",
                  "| target | case | measured | goal | met |", "|---|---|---:|---:|---|"]
        for c in checks:
            met = "✅" if c["ok"] else "❌ (within the run's spread)" if within_spread(c) else "❌"
            measured = f"{c['value']:.2f}{c['unit']}{interval_text(c.get('interval'))}"
            lines.append(f"| {c['target']} | {c['case']} | {measured} | {c['goal']:.2f}{c['unit']} | {met} |")
        lines.append("")
    elif rows and target_backend:
        lines += [f"## Targets for `{target_backend}`", "",
                  f"Not evaluated: no `{target_backend}` rows with an eager channels_last baseline in this run.", ""]
    if failed:
        lines += ["## Cases that failed", "", "| case | error |", "|---|---|"]
        lines += [f"| {r['suite']} {r['shape']} N={r['batch']} {r['dtype']} {r['layout']} {r['mode']} {r['provider']} "
                  f"| {r['reason']} |" for r in failed]
        lines.append("")
    return "\n".join(lines)
