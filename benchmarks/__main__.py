"""``python -m benchmarks``: the separable-convolution benchmark suites.

    python -m benchmarks                      # quick on CPU (the default there), full grid on GPU
    python -m benchmarks --full --threads 2
    python -m benchmarks --suite layers --providers cpp,eager --batch 8 --modes fwd
    python -m benchmarks.plot                 # redraw the PNG charts of the latest run

Results: ``benchmarks/results/<device-slug>.jsonl`` (appended, one row per case),
``<device-slug>.md`` (the latest run) and ``<device-slug>.png`` (its charts, drawn
at the end of every run). See ``--help`` for every option.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from kernels.triton import AUTOTUNE_ENV

from . import isolated, providers
from .cli import choices, positive_int, positive_ints
from .cases import DTYPES, LAYER_MODES, LAYOUTS, MODEL_MODES, SHAPE_SETS, SUITES, build_cases
from .machine import device_slug, measure_peaks, pinned_configs, run_info, set_threads
from .results import DEFAULT_DIR, JsonlLog, atomic_write_text, check_targets, render_markdown
from .runner import RunOptions, RunState, run_cases
from .timing import TimingPolicy


# --isa: the environment that holds each library to the ISA. oneDNN, ATen and MKL (torch.mm and the
# classifier's linear layer) read theirs once, when first used, so a run that needs them re-executes
# itself with them set. Without MKL's, the avx2 run's matmul peak was measured with AVX-512 (309
# GFLOP/s against the AVX2 FMA loop's 232 on an Intel Xeon).
ISA_ENVIRONMENTS = {
    "native": {},
    "avx2": {"SEPCONV_CPU_ISA": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}

ALL_PROVIDERS = providers.LAYER_PROVIDERS
# --tiny-model (a test hook): one middle block at an eighth of the width.
TINY_MODEL_KWARGS = dict(middle_blocks=1, width=0.125)
MODEL_PROVIDER_NAMES = tuple(providers.model_providers_for(providers.BACKEND_PROVIDERS
                                                           + tuple(providers.MODE_PROVIDERS)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark the fused separable convolution against the eager nn.Conv2d pair and torch.compile.",
        epilog="Defaults on CPU are --quick; on CUDA the GPU grid (batch 32, bf16/fp16/fp32, both layouts).",
    )
    parser.add_argument("--suite", type=choices("suite", SUITES),
                        help="layers,model,shortcut (default: all three on CPU, layers,model on CUDA)")
    parser.add_argument("--backends", type=choices("backend", providers.BACKEND_PROVIDERS),
                        help=f"project backends to run ({','.join(providers.BACKEND_PROVIDERS)}; default all)")
    parser.add_argument("--providers", type=choices("provider", ALL_PROVIDERS + MODEL_PROVIDER_NAMES),
                        help=f"layer providers ({','.join(ALL_PROVIDERS)}) and model providers "
                             f"({','.join(MODEL_PROVIDER_NAMES)}); default: every backend plus eager and compile")
    parser.add_argument("--dtypes", type=choices("dtype", tuple(DTYPES)), help="fp32,bf16,fp16")
    parser.add_argument("--batch", type=positive_ints, help="batch sizes, e.g. 1,8")
    parser.add_argument("--modes", type=choices("mode", LAYER_MODES + MODEL_MODES),
                        help="fwd, bwd (backward only), full (fwd+bwd); "
                             "the model suite maps fwd to eval and full to the training step")
    parser.add_argument("--layout", type=choices("layout", LAYOUTS), help="channels_last,nchw")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    parser.add_argument("--shapes", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                        help=f"shape sets ({','.join(SHAPE_SETS)}) or parts of shape names, e.g. '@147,@74'")
    speed = parser.add_mutually_exclusive_group()
    speed.add_argument("--quick", action="store_true", help="the short grid (default on CPU; < 10 min on 2 cores)")
    speed.add_argument("--full", action="store_true", help="every shape, mode, layout and provider")
    parser.add_argument("--threads", type=positive_int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR, help=f"results folder (default {DEFAULT_DIR})")
    parser.add_argument("--repeats", type=positive_int,
                        help="minimum timed repeats per case (default 6, the fewest that give a CPU speedup its 95%% "
                             "interval; whole-model cases at least 9)")
    parser.add_argument("--min-time", type=float, help="minimum timed seconds per case (default 0.5, quick 0.3)")
    parser.add_argument("--cuda-graphs", action="store_true", help="GPU: time through CUDA graphs")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--no-peak", action="store_true", help="skip measuring the machine peak (no %% of peak)")
    parser.add_argument("--tune", action="store_true",
                        help="backend='auto' times its candidates once per layer and runs the faster "
                             "(kernels.tune(True), as SEPCONV_TUNE=1): the auto rows show what a tuned process gets")
    parser.add_argument("--isolate", action="store_true",
                        help="CPU: time each whole-model provider in a worker process of its own, called in turns "
                             "(as a training script of its own runs it; see benchmarks/isolated.py)")
    parser.add_argument("--isa", choices=tuple(ISA_ENVIRONMENTS), default="native",
                        help="CPU: avx2 holds the cpp library, oneDNN and ATen's kernels to AVX2+FMA (what a CPU "
                             "without AVX-512 runs), for a like-for-like comparison; rows go to <machine>-avx2.*")
    parser.add_argument("--warm-only", action="store_true",
                        help="time nothing: call each case once in --jobs worker processes, so that the kernels "
                             "the same command compiles are in Triton's on-disk cache (benchmarks/warm.py)")
    parser.add_argument("--jobs", type=positive_int, default=1, help="worker processes for --warm-only")
    # Test hooks, hidden from --help.
    parser.add_argument("--interrupt-after", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tiny-model", action="store_true", help=argparse.SUPPRESS)
    return parser


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the choices the user left open, by device and quick/full."""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device == "cuda"
    args.quick = args.quick or (not args.full and not gpu)
    backends = args.backends or list(providers.BACKEND_PROVIDERS)
    quick_skips: List[str] = []
    if args.suite is None:
        args.suite = ["layers", "model"] + ([] if gpu else ["shortcut"])
    if args.providers is None:
        # On a GPU, triton's split mode (SEPCONV_TRITON_MODE=split) runs beside its fused kernels.
        modes = [m for m, (b, _) in providers.MODE_PROVIDERS.items() if gpu and b in backends]
        layer = [b for b in backends if not (args.quick and b == "torch")] + modes + ["eager", "compile"]
        model = providers.model_providers_for([b for b in backends if b != "torch"] + modes, compile=not args.quick)
        if args.quick:
            quick_skips += ["torch backend (same ATen ops as eager)", "torch.compile of the whole model"]
        args.providers = layer + model
        args.layer_providers, args.model_providers = layer, model
    else:
        args.providers = [p for p in args.providers if p in ALL_PROVIDERS or p in MODEL_PROVIDER_NAMES]
        if args.backends:
            args.providers = [p for p in args.providers
                              if p in ("eager", "compile") or p.split("-")[0] in args.backends]
        args.providers = list(dict.fromkeys(args.providers))
        args.layer_providers = [p for p in args.providers if p in ALL_PROVIDERS]
        args.model_providers = [p for p in args.providers if p in MODEL_PROVIDER_NAMES or p in ("eager", "compile")]
    args.dtypes = args.dtypes or (["bf16", "fp16", "fp32"] if gpu else ["fp32"])
    args.eager_both_layouts = args.layout is None
    args.layout = args.layout or (["channels_last", "nchw"] if (gpu or not args.quick) else ["channels_last"])
    if args.modes is None:
        args.modes = ["fwd", "full"] if (gpu or args.quick) else ["fwd", "bwd", "full"]
        if args.quick:
            quick_skips.append("bwd-only mode")
    args.layer_batches = args.batch or ([32] if gpu else [1, 8])
    # Every model target (eval at batch 1 and 8, the training step at 8) is in the quick run too.
    args.model_batches = args.batch or [1, 8]
    args.train_batches = args.batch or [8]
    if args.quick and not args.shapes:
        quick_skips.append("the channel/size sweep")
    args.quick_skips = quick_skips
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.min_time is not None and args.min_time < 0:
        parser.error(f"--min-time must be >= 0, got {args.min_time}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    if args.isolate:
        if args.device == "cuda" or (args.device is None and torch.cuda.is_available()):
            parser.error("--isolate: a CPU option (add --device cpu)")
        reason = isolated.supported()
        if reason:
            parser.error(reason)
    if args.isa != "native":
        if args.device == "cuda" or (args.device is None and torch.cuda.is_available()):
            parser.error(f"--isa {args.isa}: a CPU option (add --device cpu)")
        held = ISA_ENVIRONMENTS[args.isa]
        missing = {key: value for key, value in held.items() if os.environ.get(key) != value}
        if missing and not from_command_line:
            parser.error(f"--isa {args.isa}: set {missing} before the process starts")
        if missing:
            os.environ.update(missing)
            os.execv(sys.executable, [sys.executable, "-m", "benchmarks", *argv])
    args = resolve_defaults(args)
    from kernels import gpu_dispatch

    if args.tune:
        gpu_dispatch.tune(True)
    try:
        gpu_dispatch.tuning_enabled()  # a bad SEPCONV_TUNE: the error names it
    except ValueError as error:
        parser.error(str(error))
    try:
        set_threads(args.threads)
        layer_suites = [s for s in args.suite if s != "model"]
        cases = build_cases(layer_suites, args.layer_providers, [], args.dtypes, args.layer_batches, args.modes,
                            args.layout, args.shapes, full=not args.quick, eager_both_layouts=args.eager_both_layouts)
        if "model" in args.suite:
            cases += build_cases(["model"], [], args.model_providers, args.dtypes, args.model_batches,
                                 args.modes, args.layout, train_batches=args.train_batches,
                                 eager_both_layouts=args.eager_both_layouts)
    except ValueError as error:
        parser.error(str(error))
    if args.warm_only:
        from .warm import warm

        model_kwargs = TINY_MODEL_KWARGS if args.tiny_model else None
        return warm(cases, args.device, args.jobs, model_kwargs)
    try:
        return run(args, cases)
    except KeyboardInterrupt:  # before the first case: nothing was written
        print("\nInterrupted before any case finished; no result files were written.", file=sys.stderr)
        return 130


def run(args: argparse.Namespace, cases) -> int:
    from rich.console import Console

    from . import report

    console = Console()
    if not console.is_terminal:  # piped or logged: do not squeeze the tables into 80 columns
        console = Console(width=max(console.width, 180))
    policy = TimingPolicy(
        warmup=2, min_repeats=args.repeats or TimingPolicy.min_repeats,
        min_seconds=args.min_time if args.min_time is not None else (0.3 if args.quick else 0.5))
    info = run_info(args.device, argv="python -m benchmarks " + shlex.join(args.argv))
    if args.device == "cpu":
        info.isolated_models = args.isolate
    else:
        info.cuda_graphs = bool(args.cuda_graphs)
        info.triton_autotune = os.environ.get(AUTOTUNE_ENV, "1") != "0"
        info.triton_configs = pinned_configs()
    console.print(f"[bold]Separable-conv benchmark[/bold] on {info.device_name} ({args.device}), "
                  f"{info.threads} torch threads, torch {info.torch_version}, run {info.run_id}")
    if args.device == "cpu":
        console.print(f"ISA: cpp library {info.cpp_isa}, oneDNN {info.onednn_isa}, ATen {info.aten_cpu_capability}")
    if args.quick_skips:
        console.print(f"--quick leaves out: {'; '.join(args.quick_skips)} (use --full).")
    if args.device == "cuda":
        # Let cuDNN pick its fastest algorithm for the eager pair (the search runs in the warm-up, untimed).
        torch.backends.cudnn.benchmark = True
    options = RunOptions(device=args.device, policy=policy, measure_memory=not args.no_memory,
                         cuda_graphs=args.cuda_graphs, interrupt_after=args.interrupt_after, isolate=args.isolate)
    if args.tiny_model:
        options.model_kwargs = dict(TINY_MODEL_KWARGS)
    if any(case.suite == "model" for case in cases):
        try:
            options.model_flops_per_image = providers.count_model_flops(model_kwargs=options.model_kwargs)
            console.print(f"Xception forward: {options.model_flops_per_image / 1e9:.2f} GFLOP per 299x299 image "
                          f"(counted from its convs and linear layer, 2 FLOPs per multiply-add)")
        except ImportError as error:
            console.print(f"[yellow]model suite: {error}[/yellow]")
    if not args.no_peak:
        with console.status("measuring the machine peak (matmul, 1x1 conv, copy)"):
            peak_policy = TimingPolicy(warmup=1, min_repeats=3, min_seconds=0.3)
            measure_peaks(info, {d: DTYPES[d] for d in args.dtypes}, peak_policy, small=args.tiny_model)
        console.print(f"peak: {info.peak_gflops} GFLOP/s, {info.peak_gbps} GB/s  {info.peak_detail}")

    slug = device_slug(args.device) + ("" if args.isa == "native" else f"-{args.isa}")
    out = Path(args.out)
    jsonl_path, md_path = out / f"{slug}.jsonl", out / f"{slug}.md"
    # The targets are for the cpp backend on CPU; GPU runs report throughput and % of peak only.
    target_backend = "cpp" if args.device == "cpu" else None
    state = RunState()
    exit_code = 0
    with JsonlLog(jsonl_path) as log, report.make_progress(console) as progress:
        task = progress.add_task("benchmark", total=len(cases), case="")

        def on_status(case, text: str) -> None:
            group = f"{case.suite} {case.shape.name} N={case.batch} {case.dtype} {case.mode}"
            progress.update(task, case=f"{group}: {text}")
            # A log gets the whole-model groups' steps (minutes each); layer groups take seconds.
            if case.suite == "model" and not console.is_terminal:
                console.print(f"[{progress.tasks[0].completed:.0f}/{len(cases)}] {group}: {text}", highlight=False)

        options.on_status = on_status

        def on_row(case, row) -> None:
            progress.update(task, advance=1, case=case.label)
            if row is not None and not console.is_terminal:  # a log gets one line per case instead of a live bar
                detail = (f"p50 {row['p50_ms']:.3f} ms" if row["status"] == "ok"
                          else f"{row['status']}: {row['reason']}")
                console.print(f"[{progress.tasks[0].completed:.0f}/{len(cases)}] {case.label}: {detail}",
                              highlight=False)

        try:
            run_cases(cases, options, info, log, state, on_row)
        except KeyboardInterrupt:
            state.interrupted = True
            exit_code = 130
    atomic_write_text(md_path, render_markdown(state.rows, info.as_dict(), state.unavailable, target_backend,
                                               interrupted=state.interrupted))
    report.print_tables(console, state.rows, state.unavailable)
    if target_backend:
        report.print_targets(console, check_targets(state.rows, target_backend), target_backend)
    if state.interrupted:
        console.print(f"[red]Interrupted after {len(state.rows)} of {len(cases)} cases.[/red] Every finished row is "
                      f"saved.")
    console.print(f"rows: {jsonl_path}\nsummary: {md_path}")
    # The chart is drawn from the log just written, so it always shows this run.
    from .plot import plot_results

    try:
        for png in plot_results(out, slug):
            console.print(f"plot: {png}")
    except Exception as error:  # noqa: BLE001 - the measured rows are saved; a chart failure must not hide them
        console.print(f"[yellow]plot not drawn ({type(error).__name__}: {error}); "
                      f"retry with python -m benchmarks.plot --out {out}[/yellow]")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
