"""Terminal output: a progress bar while the run goes, then one table per suite (rich)."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .memory import COLUMN as MEMORY_COLUMN
from .results import group_unavailable, interval_text, is_noisy, throughput_column, within_spread


def make_progress(console: Console) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[case]}"), console=console, transient=False)


def _num(value: Optional[float], digits: int = 1, suffix: str = "") -> str:
    return "–" if value is None else f"{value:,.{digits}f}{suffix}"


def _spread(row: dict) -> str:
    text = f"{_num(row['p20_ms'], 2)}–{_num(row['p80_ms'], 2)}"
    return f"[yellow]{text} ⚠[/yellow]" if is_noisy(row) else text


def _speedup(value: Optional[float], interval=None) -> str:
    if value is None:
        return "–"
    color = "green" if value >= 1.0 else "red"
    return f"[{color}]{value:.2f}x[/{color}]{interval_text(interval)}"


def print_tables(console: Console, rows: Sequence[dict], unavailable: Dict[str, str]) -> None:
    if unavailable:
        table = Table(title="Providers not run", title_justify="left")
        table.add_column("provider")
        table.add_column("reason", overflow="fold")
        for name, reason in group_unavailable(unavailable).items():
            table.add_row(name, reason)
        console.print(table)
    ok = [r for r in rows if r.get("status") == "ok"]
    for suite in dict.fromkeys(r["suite"] for r in ok):
        table = Table(title=f"suite: {suite}", title_justify="left")
        throughput_header, throughput_key = throughput_column(suite)
        for column, justify in (("shape", "left"), ("N", "right"), ("dtype", "left"), ("mode", "left"),
                                ("provider", "left"), ("layout", "left"), ("p50 ms", "right"), ("p20–p80", "right"),
                                ("GFLOP/s", "right"), (throughput_header, "right"), ("% peak", "right"),
                                ("vs eager CL", "right"), (MEMORY_COLUMN, "right")):
            table.add_column(column, justify=justify)
        previous_group = None
        for r in (r for r in ok if r["suite"] == suite):
            group = (r["shape"], r["batch"], r["dtype"], r["mode"])
            if previous_group is not None and group != previous_group:
                table.add_section()
            previous_group = group
            table.add_row(r["shape"], str(r["batch"]), r["dtype"], r["mode"], r["provider"],
                          "CL" if r["layout"] == "channels_last" else "NCHW", _num(r["p50_ms"], 3),
                          _spread(r), _num(r["gflop_s"]), _num(r.get(throughput_key)),
                          _num(r["pct_peak"], 1, "%"), _speedup(r["speedup_vs_eager_cl"], r.get("speedup_ci95")),
                          _num(r[MEMORY_COLUMN]))
        console.print(table)
    failed: List[dict] = [r for r in rows if r.get("status") == "error"]
    if failed:
        table = Table(title="Cases that failed", title_justify="left")
        table.add_column("case")
        table.add_column("error", overflow="fold")
        for r in failed:
            table.add_row(f"{r['suite']} {r['shape']} N={r['batch']} {r['dtype']} {r['layout']} {r['mode']} "
                          f"{r['provider']}", r["reason"])
        console.print(table)


def print_targets(console: Console, checks: Sequence[dict], backend: str) -> None:
    if not checks:
        console.print(f"[yellow]Targets for {backend!r} not evaluated: no {backend} rows with an eager "
                      f"channels_last baseline in this run.[/yellow]")
        return
    passed = sum(c["ok"] for c in checks)
    table = Table(title=f"Targets for {backend}: {passed}/{len(checks)} met", title_justify="left")
    for column in ("target", "case", "measured", "goal", "met"):
        table.add_column(column)
    for c in checks:
        met = ("[green]yes[/green]" if c["ok"] else "[red]no[/red] (within the run's spread)" if within_spread(c)
               else "[red]no[/red]")
        table.add_row(c["target"], c["case"], f"{c['value']:.2f}{c['unit']}{interval_text(c.get('interval'))}",
                      f"{c['goal']:.2f}{c['unit']}", met)
    console.print(table)
