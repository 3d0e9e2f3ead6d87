"""``python -m benchmarks.plot``: charts of the latest run in each results log.

For every ``<slug>.jsonl`` in the results folder, writes ``<slug>.png`` with
two panels: the speedup of each provider over the eager channels_last pair per
layer case, and a roofline (achieved GFLOP/s against arithmetic intensity,
under the run's measured compute and bandwidth roofs).
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .cases import BASELINE_LAYOUT, BASELINE_PROVIDER  # noqa: E402
from .results import DEFAULT_DIR, atomic_write_bytes, latest_run, read_rows  # noqa: E402


def _series_name(row: dict) -> str:
    layout = "CL" if row["layout"] == "channels_last" else "NCHW"
    return f"{row['provider']} {layout}"


def _plot_speedup(axis, rows: Sequence[dict]) -> None:
    layer_rows = [r for r in rows if r["suite"] != "model" and r.get("speedup_vs_eager_cl") is not None]
    if not layer_rows:
        axis.text(0.5, 0.5, "no layer rows with a baseline", ha="center", va="center", transform=axis.transAxes)
        axis.set_axis_off()
        return
    cases = list(dict.fromkeys(f"{r['shape']}\nN={r['batch']} {r['dtype']} {r['mode']}" for r in layer_rows))
    series = [s for s in dict.fromkeys(_series_name(r) for r in layer_rows)
              if s != f"{BASELINE_PROVIDER} CL"]
    width = 0.8 / max(len(series), 1)
    for index, name in enumerate(series):
        values: Dict[str, float] = {
            f"{r['shape']}\nN={r['batch']} {r['dtype']} {r['mode']}": r["speedup_vs_eager_cl"]
            for r in layer_rows if _series_name(r) == name}
        xs = [i + (index - (len(series) - 1) / 2) * width for i, case in enumerate(cases) if case in values]
        axis.bar(xs, [values[c] for c in cases if c in values], width, label=name)
    axis.axhline(1.0, color="black", linewidth=1, linestyle="--")
    axis.set_yscale("log")
    axis.set_xticks(range(len(cases)))
    axis.set_xticklabels(cases, rotation=90, fontsize=7)
    axis.set_ylabel(f"speedup vs {BASELINE_PROVIDER} {BASELINE_LAYOUT} (p50)")
    axis.set_title("Speedup per layer case")
    axis.legend(fontsize=8)


def _plot_roofline(axis, rows: Sequence[dict], run: dict) -> None:
    points = [r for r in rows if r["suite"] != "model" and r.get("gflop_s") and r.get("gb_s")]
    if not points:
        axis.text(0.5, 0.5, "no layer rows", ha="center", va="center", transform=axis.transAxes)
        axis.set_axis_off()
        return
    intensities = [r["gflop_s"] / r["gb_s"] for r in points]
    low, high = min(intensities) / 2, max(intensities) * 2
    bandwidth = run.get("peak_gbps")
    for dtype, peak in (run.get("peak_gflops") or {}).items():
        if bandwidth:
            ridge = peak / bandwidth
            xs = [low, max(min(ridge, high), low), high]
            axis.plot(xs, [min(peak, x * bandwidth) for x in xs], linewidth=2,
                      label=f"roof {dtype}: {peak:,.0f} GFLOP/s, {bandwidth:,.0f} GB/s")
    for name in dict.fromkeys(_series_name(r) for r in points):
        chosen = [(r["gflop_s"] / r["gb_s"], r["gflop_s"]) for r in points if _series_name(r) == name]
        axis.scatter([c[0] for c in chosen], [c[1] for c in chosen], s=14, label=name)
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("arithmetic intensity (FLOP / minimal byte)")
    axis.set_ylabel("achieved GFLOP/s")
    axis.set_title("Roofline (measured peaks)")
    axis.legend(fontsize=7)


def render_png(rows: Sequence[dict]) -> bytes:
    """The two-panel chart of one run's rows, as PNG bytes."""
    run = rows[0].get("run", {}) if rows else {}
    ok = [r for r in rows if r.get("status") == "ok"]
    n_cases = len({(r["shape"], r["batch"], r["dtype"], r["mode"]) for r in ok if r["suite"] != "model"})
    figure, (left, right) = plt.subplots(1, 2, figsize=(max(12.0, 0.45 * n_cases + 8), 7),
                                         gridspec_kw={"width_ratios": [max(1.0, n_cases / 12), 1]})
    try:
        _plot_speedup(left, ok)
        _plot_roofline(right, ok, run)
        figure.suptitle(f"{run.get('device_name', '?')}: {run.get('threads', '?')} threads, torch "
                        f"{run.get('torch_version', '?')}, run {run.get('run_id', '?')}")
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=110)
    finally:
        plt.close(figure)
    return buffer.getvalue()


def plot_results(out: Path, slug: Optional[str] = None) -> List[Path]:
    """Write ``<slug>.png`` next to each ``<slug>.jsonl`` in ``out``; returns the PNG paths."""
    logs = [Path(out) / f"{slug}.jsonl"] if slug else sorted(Path(out).glob("*.jsonl"))
    written: List[Path] = []
    for log in logs:
        if not log.exists():
            raise FileNotFoundError(f"no results log {log}; run `python -m benchmarks --out {out}` first")
        # Other tools' logs in the folder (benchmarks.rss, triton_sweep) have no suite rows to plot.
        rows = latest_run([row for row in read_rows(log) if "suite" in row])
        if not rows:
            continue
        path = log.with_suffix(".png")
        atomic_write_bytes(path, render_png(rows))
        written.append(path)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR, help=f"results folder (default {DEFAULT_DIR})")
    parser.add_argument("--slug", help="only this machine's log, e.g. cpu-amd-epyc")
    args = parser.parse_args(argv)
    try:
        written = plot_results(args.out, args.slug)
    except FileNotFoundError as error:
        parser.error(str(error))
    if not written:
        print(f"no results in {args.out}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
