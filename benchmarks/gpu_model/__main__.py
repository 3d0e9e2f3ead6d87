"""``python -m benchmarks.gpu_model``: the Triton backend on an H200, predicted from its SASS on a CPU.

    python -m benchmarks.gpu_model [--layers 728->728@19,...] [--dtypes bf16,fp32] [--modes fused,split]
                                   [--directions fwd,bwd] [--batch 32] [--capability 90] [--all-configs]
    python -m benchmarks.gpu_model --validate [--with-backward]
    python -m benchmarks.gpu_model --rows PATH          # predicted rows in the benchmark suite's format
                                                        # (layers; with --layers all, the whole network too)
    python -m benchmarks.gpu_model --check               # spills, scalar loads, occupancy (what make test runs)

Every time it prints is PREDICTED by a model (``benchmarks/gpu_model/model.py``), not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import List

from ..cases import XCEPTION_LAYERS, resolve_shapes, separable_bytes, separable_flops
from ..machine import git_commit
from . import layers, model, sass


def _recorded_eager(results: Path) -> dict:
    """(shape, dtype, mode, batch) -> the recorded eager cuDNN pair's p50 ms, from the H200 results."""
    out = {}
    if not results.exists():
        return out
    for line in results.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("suite") == "layers" and row.get("provider") == "eager" and row.get("status") == "ok":
            out[(row["shape"], row["dtype"], row["mode"], row["batch"])] = row["p50_ms"]
    return out


RESULTS = Path(__file__).resolve().parents[1] / "results" / "cuda-nvidia-h200.jsonl"


def print_kernel(report: layers.KernelReport, verbose: bool) -> None:
    p = report.prediction
    if p is None:
        print(f"    {report.kernel} [{report.config}]: not modelled: {report.error}")
        return
    print(f"    {report.kernel} [{report.config}] sm_{report.capability}: predicted {p.seconds * 1e3:.3f} ms, "
          f"bound by {p.bound}; {p.registers} registers, {p.spills} spill instructions, {p.shared_bytes} B shared, "
          f"{p.ctas_per_sm} programs/SM (limited by {p.limited_by}), {p.ctas} programs in {p.waves} waves")
    if not verbose:
        return
    bodies = [("straight-line", report.sass.straight, 1.0)]
    bodies += [(f"loop @{loop.start:#06x}", loop.instructions, (report.executions or {}).get(loop.start, 1.0))
               for loop in report.sass.all_loops()]
    for name, instructions, executions in bodies:
        counts = {k: v for k, v in sass.census(instructions).items() if v}
        widths = sass.global_loads_by_width(instructions)
        loads = ", ".join(f"{count}x{size * 8}-bit" for size, count in widths.items()) or "none"
        total = sum(counts.values())
        mix = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
        print(f"      {name:<18} runs {executions:>8.0f}/program, {total:>5} instructions: {mix}; "
              f"global loads: {loads}")
    dynamic = report.dynamic_census()
    total = sum(dynamic.values()) or 1.0
    mix = ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in sorted(dynamic.items(), key=lambda kv: -kv[1]) if v)
    print(f"      executed per program ({total:,.0f} warp-instructions per warp): {mix}")
    terms = ", ".join(f"{k} {v * 1e3:.3f}" for k, v in p.terms.items())
    print(f"      model terms (ms, predicted; each body counted under the term that bounds it): {terms}")


def report(args) -> int:
    import torch

    recorded = _recorded_eager(RESULTS)
    for shape in args.layers:
        for dtype in args.dtypes:
            for mode in args.modes:
                for direction in args.directions:
                    op = layers.op_report(shape, args.batch, dtype, mode, direction, args.capability,
                                          tf32=bool(torch.backends.cudnn.allow_tf32))
                    seconds = op.seconds
                    total = f"{seconds * 1e3:.3f} ms" if seconds is not None else "not modelled"
                    eager_key = (shape.name, dtype, "fwd" if direction == "fwd" else "full", args.batch)
                    line = f"{shape.name} N={args.batch} {dtype} {mode} {direction}: predicted {total}"
                    eager = recorded.get((shape.name, dtype, "fwd", args.batch))
                    if direction == "fwd" and eager and seconds:
                        line += f" (recorded eager cuDNN pair {eager:.3f} ms: predicted {eager / seconds / 1e3:.2f}x)"
                    elif direction == "bwd" and seconds and eager_key in recorded and eager:
                        backward = recorded[eager_key] - eager
                        line += f" (recorded eager backward {backward:.3f} ms)"
                    print(line)
                    for configs in op.kernels:
                        chosen = configs if args.all_configs else [r for r in op.best() if r in configs] or configs
                        for kernel_report in chosen:
                            print_kernel(kernel_report, args.verbose)
                    for call in op.library:
                        kind = f"GEMM {call.flops / 1e9:.1f} GFLOP" if call.flops else f"{call.bytes / 1e6:.1f} MB"
                        print(f"    library {call.op} {kind} {call.shapes}")
                    if op.library:
                        print(f"    library calls, predicted: {op.library_seconds * 1e3:.3f} ms")
    print("\nAll times above are predicted by benchmarks.gpu_model for an H200; none was measured.")
    return 0


def predicted_rows(args) -> List[dict]:
    recorded = _recorded_eager(RESULTS)
    import platform

    import torch

    # fp32 follows PyTorch's convolution setting, as the backend does (TF32 unless turned off).
    tf32 = bool(torch.backends.cudnn.allow_tf32)
    now = datetime.now(timezone.utc)
    run = {"run_id": now.strftime("%Y%m%dT%H%M%SZ") + "-predicted", "utc_time": now.isoformat(timespec="seconds"),
           "device": "cuda", "device_name": "NVIDIA H200 (predicted by benchmarks.gpu_model)", "predicted": True,
           "gpu_model": "NVIDIA H200", "cpu_model": platform.processor() or platform.machine(),
           "torch_version": torch.__version__, "triton_version": _triton_version(), "git_commit": git_commit(),
           "python": platform.python_version(), "argv": " ".join(sys.argv), "cudnn_allow_tf32": tf32,
           "constants": {k: v[0] for k, v in model.CONSTANTS.items()},
           "gemm_efficiency_measured": {"x".join(map(str, k)): v[0] for k, v in model.GEMM_EFFICIENCY_MEASURED.items()}}
    rows = []
    for shape in args.layers:
        for dtype in args.dtypes:
            for mode in args.modes:
                seconds = layers.layer_seconds(shape, args.batch, dtype, mode, "full", args.capability, tf32)
                for suite_mode in ("fwd", "full"):
                    value = seconds.get(suite_mode)
                    ms = None if value is None else value * 1e3
                    eager = recorded.get((shape.name, dtype, suite_mode, args.batch))
                    gflop = separable_flops(shape, args.batch) * (1 if suite_mode == "fwd" else 3) / 1e9
                    size = 2 if dtype in ("bf16", "fp16") else 4
                    rows.append({
                        "suite": "layers", "shape": shape.name, "cin": shape.cin, "cout": shape.cout, "h": shape.h,
                        "w": shape.w, "k": shape.k, "stride": shape.stride, "batch": args.batch, "dtype": dtype,
                        "layout": "channels_last", "mode": suite_mode,
                        "provider": ("triton" if mode == "fused" else "triton-split") + "-predicted",
                        "status": "ok" if ms is not None else "failed",
                        "reason": "predicted by benchmarks.gpu_model from the SASS; not measured",
                        "p20_ms": ms, "p50_ms": ms, "p80_ms": ms, "repeats": 0, "gflop": gflop,
                        "gflop_s": gflop / ms * 1e3 if ms else None,
                        "gb_s": separable_bytes(shape, args.batch, size, suite_mode) / ms / 1e6 if ms else None,
                        "pct_peak": None, "speedup_vs_eager_cl": eager / ms if ms and eager else None,
                        "peak_alloc_mb": None, "threads": None, "case_wall_s": None, "images_per_s": None,
                        "minor_faults": None, "run": run,
                    })
    return rows + _network_rows(rows, run)


def _network_rows(layer_rows: List[dict], run: dict) -> List[dict]:
    """Whole-Xception rows predicted from ``layer_rows`` where they cover every layer the network runs."""
    from ..cases import MODEL_SHAPE
    from . import whole_model

    recorded = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()] \
        if RESULTS.exists() else []
    estimates = whole_model.predict(recorded, layer_rows, whole_model.layer_counts())
    return whole_model.network_rows(estimates, run, MODEL_SHAPE)


def _triton_version() -> str:
    import triton

    return triton.__version__


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_model", description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="728->728@19,128->256@74",
                        help="Xception layer names (or parts of them), comma-separated; 'all' for every layer")
    parser.add_argument("--dtypes", default="bf16")
    parser.add_argument("--modes", default="fused,split")
    parser.add_argument("--directions", default="fwd")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--capability", type=int, default=90, choices=(80, 90))
    parser.add_argument("--no-tf32", action="store_true",
                        help="fp32 as with torch.backends.cudnn.allow_tf32 = False (IEEE products in the kernels "
                             "and GEMMs); by default fp32 follows PyTorch's default, TF32")
    parser.add_argument("--all-configs", action="store_true", help="every autotune config, not the best one")
    parser.add_argument("-q", "--quiet", dest="verbose", action="store_false", help="no per-loop census")
    parser.add_argument("--validate", action="store_true", help="compare with the recorded H200 timings")
    parser.add_argument("--with-backward", action="store_true", help="--validate the layers' fwd+bwd rows too")
    parser.add_argument("--rows", type=Path, help="write predicted rows (provider *-predicted) to this JSONL file")
    parser.add_argument("--check", action="store_true", help="structural checks at every Xception layer")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes for --check")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.layers.split(",") if n.strip()]
    try:
        args.layers = list(XCEPTION_LAYERS) if names == ["all"] else resolve_shapes(names, XCEPTION_LAYERS, "--layers")
    except ValueError as error:
        parser.error(str(error))
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.directions = [d.strip() for d in args.directions.split(",") if d.strip()]
    for name, values, allowed in (("--dtypes", args.dtypes, ("bf16", "fp16", "fp32")),
                                  ("--modes", args.modes, layers.MODES),
                                  ("--directions", args.directions, ("fwd", "bwd"))):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            parser.error(f"{name}: {bad or values!r} not in {list(allowed)}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the model compiles the kernels for a GPU")
    if not sass.tool("nvdisasm"):
        print("nvdisasm is missing (Triton's NVIDIA backend bundles it); cannot read SASS", file=sys.stderr)
        return 2
    import torch

    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = False
    if args.validate:
        from . import validate

        return validate.validate(with_backward=args.with_backward)
    if args.check:
        from . import checks

        findings = checks.run_checks(args.layers, args.dtypes, args.modes, ("fwd", "bwd"), args.batch,
                                     args.capability, progress=lambda text: print(text, flush=True),
                                     jobs=args.jobs)
        for finding in findings:
            print(f"FAIL {finding}")
        print(f"{len(findings)} problems found")
        return 1 if findings else 0
    if args.rows:
        from ..results import atomic_write_text

        rows = predicted_rows(args)
        existing = args.rows.read_text() if args.rows.exists() else ""
        atomic_write_text(args.rows, existing + "".join(json.dumps(r) + "\n" for r in rows))
        print(f"{len(rows)} predicted rows appended to {args.rows}")
        return 0
    return report(args)


if __name__ == "__main__":
    sys.exit(main())
