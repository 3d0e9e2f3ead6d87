"""``python -m benchmarks.plot``: charts of the latest run in each results log.

For every ``<slug>.jsonl`` in the results folder, writes ``<slug>.png`` (``make bench``
draws it at the end of each run). Panels:

- one per layer group (batch, dtype, mode): the speedup of each provider over the
  eager channels_last pair, layer by layer, on a log axis with a 1x line;
- whole model: the same speedup for eval and the training step;
- a roofline: achieved GFLOP/s against arithmetic intensity under the run's
  measured compute and bandwidth roofs.

A provider has one colour in every panel; NCHW runs are hatched (bars) or hollow
(roofline points). The title names the machine, the versions, the commit and the
results file the chart was drawn from.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullLocator  # noqa: E402

from .cases import BASELINE_LAYOUT, BASELINE_PROVIDER  # noqa: E402
from .results import DEFAULT_DIR, atomic_write_bytes, latest_run, read_rows  # noqa: E402

# One colour per provider, the same in every panel and every chart. Providers not listed
# here get a colour of their own from the spare palette, chosen by their name.
PROVIDER_COLORS = {
    "eager": "#7f7f7f",
    "compile": "#2ca02c",
    "torch": "#8c564b",
    # A backend's whole-model providers are shades of its colour: dark fused, light unfused.
    "cpp": "#ff7f0e",
    "cpp-fused": "#c44e00",
    "cpp-unfused": "#ffbb78",
    "triton": "#1f77b4",
    "triton-fused": "#0b3d91",
    "triton-unfused": "#9ecae1",
    "triton-split": "#9467bd",
    "triton-split-fused": "#54278f",
    "triton-split-unfused": "#c5b0d5",
    "auto": "#d62728",
}
SPARE_COLORS = ("#bcbd22", "#17becf", "#e377c2", "#98df8a", "#c49c94", "#dbdb8d", "#f7b6d2")
NCHW_HATCH = "//"
# Ticks of a speedup axis, printed as 0.5x, 1x, 2x: about even steps on a log scale, and
# 1-2-5 steps alone where the range is wide.
RATIO_TICKS = [round(m * 10.0 ** e, 6) for e in range(-3, 3) for m in (1, 1.5, 2, 3, 5, 7)]
WIDE_RATIO_TICKS = [round(m * 10.0 ** e, 6) for e in range(-3, 3) for m in (1, 2, 5)]


def provider_color(provider: str) -> str:
    # A predicted series (benchmarks.gpu_model) takes the colour of the provider it predicts.
    provider = provider.removesuffix("-predicted")
    if provider in PROVIDER_COLORS:
        return PROVIDER_COLORS[provider]
    return SPARE_COLORS[zlib.crc32(provider.encode()) % len(SPARE_COLORS)]


def _series(row: dict) -> Tuple[str, str]:
    return row["provider"], row["layout"] or BASELINE_LAYOUT


def _series_label(series: Tuple[str, str]) -> str:
    provider, layout = series
    return f"{provider} {'CL' if layout == 'channels_last' else 'NCHW'}"


def _is_baseline(series: Tuple[str, str]) -> bool:
    return series == (BASELINE_PROVIDER, BASELINE_LAYOUT)


def format_ratio(value: float, _position: object = None) -> str:
    """0.5 -> '0.5x', 1 -> '1x', 20 -> '20x'."""
    return f"{value:g}x"


def ratio_axis(axis, values: Sequence[float]) -> None:
    """A log speedup axis that spans ``values`` and 1, ticked 0.5x / 1x / 2x, with the 1x line."""
    low = min(min(values), 1.0) / 1.3
    high = max(max(values), 1.0) * 1.3
    axis.set_yscale("log")
    axis.set_ylim(low, high)
    ticks = [t for t in RATIO_TICKS if low <= t <= high]
    if len(ticks) > 8:
        ticks = [t for t in WIDE_RATIO_TICKS if low <= t <= high]
    axis.yaxis.set_major_locator(FixedLocator(ticks))
    axis.yaxis.set_major_formatter(FuncFormatter(format_ratio))
    axis.yaxis.set_minor_locator(NullLocator())
    axis.axhline(1.0, color="black", linewidth=1.2)
    axis.grid(axis="y", color="#dddddd", linewidth=0.6)
    axis.set_axisbelow(True)


def _layer_label(row: dict) -> str:
    """'64->128@147' -> two short lines ('64→128', '@147') that sit level under a bar group."""
    first, _, rest = row["shape"].partition(" ")
    name = rest if rest and not any(ch.isdigit() for ch in first) else row["shape"]  # 'sweep 32->32@8'
    return name.replace("->", "→").replace("@", "\n@")


def _bars(axis, rows: Sequence[dict], category, annotate: bool = False) -> List[Tuple[str, str]]:
    """Grouped bars of ``speedup_vs_eager_cl``, one group per category, one bar per series (not the baseline),
    with a whisker over the row's 95% interval (``speedup_ci95``) where it has one."""
    categories = list(dict.fromkeys(category(r) for r in rows))
    series = [s for s in dict.fromkeys(_series(r) for r in rows) if not _is_baseline(s)]
    width = 0.8 / max(len(series), 1)
    values = []
    for index, name in enumerate(series):
        by_category = {category(r): r for r in rows if _series(r) == name}
        xs = [i + (index - (len(series) - 1) / 2) * width for i, c in enumerate(categories) if c in by_category]
        shown = [by_category[c] for c in categories if c in by_category]
        heights = [r["speedup_vs_eager_cl"] for r in shown]
        values += heights
        axis.bar(xs, heights, width, color=provider_color(name[0]), edgecolor="white", linewidth=0.5,
                 hatch=None if name[1] == "channels_last" else NCHW_HATCH)
        whiskers = [(x, r["speedup_vs_eager_cl"], r["speedup_ci95"])
                    for x, r in zip(xs, shown) if r.get("speedup_ci95")]
        if whiskers:
            axis.errorbar([x for x, _, _ in whiskers], [h for _, h, _ in whiskers],
                          yerr=[[h - ci[0] for _, h, ci in whiskers], [ci[1] - h for _, h, ci in whiskers]],
                          fmt="none", ecolor="#333333", elinewidth=0.7, capsize=1.5)
            values += [ci[1] for _, _, ci in whiskers] + [ci[0] for _, _, ci in whiskers]
        if annotate:  # each value above its bar, or above its whisker where it has one
            for x, r in zip(xs, shown):
                top = max(r["speedup_vs_eager_cl"], (r.get("speedup_ci95") or [0.0, 0.0])[1])
                axis.annotate(format_ratio(round(r["speedup_vs_eager_cl"], 2)), (x, top), xytext=(0, 2),
                              textcoords="offset points", ha="center", va="bottom", fontsize=8)
    axis.set_xticks(range(len(categories)))
    axis.set_xticklabels(categories, fontsize=8)
    axis.set_xlim(-0.6, len(categories) - 0.4)
    ratio_axis(axis, values or [1.0])
    return series


def _plot_layer_group(axis, rows: Sequence[dict], title: str) -> List[Tuple[str, str]]:
    series = _bars(axis, rows, _layer_label)
    axis.set_title(title, fontsize=11)
    axis.set_ylabel(f"speedup vs {BASELINE_PROVIDER} {BASELINE_LAYOUT}")
    return series


def _plot_model(axis, rows: Sequence[dict]) -> List[Tuple[str, str]]:
    def category(row: dict) -> str:
        step = "training step" if row["mode"] == "train" else "eval"
        return f"{step}\nN={row['batch']} {row['dtype']}"

    series = _bars(axis, rows, category, annotate=True)
    axis.set_title(f"Whole model ({rows[0]['shape']})", fontsize=11)
    axis.set_ylabel(f"speedup vs {BASELINE_PROVIDER} {BASELINE_LAYOUT}")
    return series


def _plot_roofline(axis, rows: Sequence[dict], run: dict) -> List[Tuple[str, str]]:
    points = [r for r in rows if r.get("gflop_s") and r.get("gb_s")]
    intensities = [r["gflop_s"] / r["gb_s"] for r in points]
    low, high = min(intensities) / 2, max(intensities) * 2
    bandwidth = run.get("peak_gbps")
    for (dtype, peak), style in zip((run.get("peak_gflops") or {}).items(), ("-", "--", ":", "-.")):
        if bandwidth:
            ridge = peak / bandwidth
            xs = [low, max(min(ridge, high), low), high]
            axis.plot(xs, [min(peak, x * bandwidth) for x in xs], color="black", linestyle=style, linewidth=1.5,
                      label=f"roof {dtype}: {peak:,.0f} GFLOP/s, {bandwidth:,.0f} GB/s (measured)")
    series = list(dict.fromkeys(_series(r) for r in points))
    for name in series:
        chosen = [(r["gflop_s"] / r["gb_s"], r["gflop_s"]) for r in points if _series(r) == name]
        color = provider_color(name[0])
        hollow = name[1] != "channels_last"
        axis.scatter([c[0] for c in chosen], [c[1] for c in chosen], s=18, edgecolors=color,
                     facecolors="none" if hollow else color, linewidths=1.0)
    axis.set_xscale("log")
    axis.set_yscale("log")
    for scale in (axis.xaxis, axis.yaxis):  # 20, 50, 100, not 2x10^1
        scale.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        scale.set_major_formatter(FuncFormatter(lambda value, _position: f"{value:,.6g}"))
        scale.set_minor_locator(NullLocator())
    axis.grid(color="#eeeeee", linewidth=0.6)
    axis.set_axisbelow(True)
    axis.set_xlabel("arithmetic intensity (FLOP / minimal byte)")
    axis.set_ylabel("achieved GFLOP/s")
    axis.set_title("Layers against the roofline", fontsize=11)
    if bandwidth:
        axis.legend(fontsize=8, loc="lower right")
    return series


def _legend_handles(series: Sequence[Tuple[str, str]]) -> List[Patch]:
    handles = [Patch(facecolor=provider_color(BASELINE_PROVIDER), edgecolor="black",
                     label=f"{_series_label((BASELINE_PROVIDER, BASELINE_LAYOUT))} (baseline: the 1x line)")]
    for name in dict.fromkeys(series):
        if not _is_baseline(name):
            handles.append(Patch(facecolor=provider_color(name[0]), edgecolor="white",
                                 hatch=None if name[1] == "channels_last" else NCHW_HATCH, label=_series_label(name)))
    return handles


def _title(run: dict, source: Optional[str]) -> str:
    versions = f"torch {run.get('torch_version', '?')}"
    if run.get("triton_version"):
        versions += f", triton {run['triton_version']}"
    commit = str(run.get("git_commit") or "?")
    commit = commit[:10] + ("-dirty" if commit.endswith("-dirty") else "")
    # Rows from a model (benchmarks.gpu_model --rows) are predictions: the chart says so first.
    predicted = "PREDICTED by a model, not measured: " if run.get("predicted") else ""
    threads = f", {run['threads']} threads" if run.get("threads") else ""
    line = (f"{predicted}{run.get('device_name', '?')} ({run.get('device', '?')}{threads}), "
            f"{versions}, commit {commit}, {run.get('utc_time', '?')}")
    return line + (f"\nfrom {source}, run {run.get('run_id', '?')}" if source else f"\nrun {run.get('run_id', '?')}")


def build_figure(rows: Sequence[dict], source: Optional[str] = None) -> Figure:
    """The chart of one run's rows; ``source`` names the results file in the title. The caller closes it."""
    run = rows[0].get("run", {}) if rows else {}
    ok = [r for r in rows if r.get("status") == "ok" and r.get("speedup_vs_eager_cl") is not None]
    layers = [r for r in ok if r["suite"] != "model"]
    model = [r for r in ok if r["suite"] == "model"]
    groups: Dict[tuple, List[dict]] = {}
    for row in layers:
        groups.setdefault((row["suite"], row["batch"], row["dtype"], row["mode"]), []).append(row)
    panels = [("layers", key) for key in groups]
    if model:
        panels.append(("model", None))
    if any(r.get("gflop_s") and r.get("gb_s") for r in layers):
        panels.append(("roofline", None))
    if not panels:
        panels.append(("empty", None))
    columns = 2 if len(panels) > 1 else 1
    lines = math.ceil(len(panels) / columns)
    most_layers = max([len({r["shape"] for r in group}) for group in groups.values()] or [0])
    panel_width = max(8.0, 0.75 * most_layers)
    figure, axes = plt.subplots(lines, columns, figsize=(panel_width * columns, 4.6 * lines + 1.0), squeeze=False)
    series: List[Tuple[str, str]] = []
    try:
        for axis, (kind, key) in zip(axes.flat, panels):
            if kind == "layers":
                suite, batch, dtype, mode = key
                what = {"fwd": "forward", "bwd": "backward", "full": "forward + backward"}.get(mode, mode)
                series += _plot_layer_group(axis, groups[key], f"{suite}: N={batch} {dtype}, {what}")
            elif kind == "model":
                series += _plot_model(axis, model)
            elif kind == "roofline":
                series += _plot_roofline(axis, layers, run)
            else:
                axis.text(0.5, 0.5, "no measured rows with a baseline", ha="center", va="center",
                          transform=axis.transAxes)
                axis.set_axis_off()
        for axis in list(axes.flat)[len(panels):]:
            axis.set_axis_off()
        # Title, legend and panels at fixed distances from the top in inches, whatever the figure's height
        # (fractions of a tall figure put the title's second line on the legend).
        height = figure.get_figheight()
        figure.suptitle(_title(run, source), fontsize=11, y=1.0 - 0.1 / height, va="top")
        if series:
            handles = _legend_handles(series)
            figure.legend(handles=handles, loc="upper center", ncol=min(len(handles), 6), fontsize=9,
                          bbox_to_anchor=(0.5, 1.0 - 0.55 / height), frameon=False)
        figure.tight_layout(rect=(0, 0, 1, 1.0 - 0.85 / height))
    except BaseException:
        plt.close(figure)
        raise
    return figure


def render_png(rows: Sequence[dict], source: Optional[str] = None) -> bytes:
    """``build_figure`` as PNG bytes."""
    figure = build_figure(rows, source)
    try:
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100)
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
        atomic_write_bytes(path, render_png(rows, source=_display_path(log)))
        written.append(path)
    return written


def _display_path(path: Path) -> str:
    """The results file as the repository names it (benchmarks/results/...), else as given."""
    resolved = path.resolve()
    root = Path(__file__).resolve().parent.parent
    try:
        return str(resolved.relative_to(root))
    except ValueError:
        return path.name


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
