"""Where a layer's GPU time goes: each kernel's time per call, from ``torch.profiler``.

    python -m benchmarks.kernel_profile --layers "728->728@19,256->728@37" --providers triton-split,eager

For each layer, provider and mode (``fwd``: forward without grad; ``full``: forward and backward), a
few untimed calls, then ``--steps`` profiled ones; the CUDA kernels' device time per call is listed,
largest first, with how many times each ran per call. Against the layer's time in plain calls
(``python -m benchmarks``) the gap is the host's share; against the bytes and FLOPs of each kernel it
says which kernel is far from its floor. GPU only (the profiler's CUDA activity). The listing is
appended to ``<out>/kernel-profile-<machine>.txt`` under a header with the machine, versions, commit, the TF32
flag and whether the Triton kernels were autotuned or ran their first tile config;
``python -m benchmarks.gpu_model --validate`` compares each Triton kernel's time there with the static model.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from . import providers
from .cases import DTYPES, XCEPTION_LAYERS, Case, resolve_shapes
from .cli import choices, positive_int
from .machine import device_slug, run_info
from .results import DEFAULT_DIR

MODES = ("fwd", "full")


def kernel_times(fn, steps: int, top: int) -> List[tuple]:
    """(microseconds a call, launches a call, kernel name) of the ``top`` kernels by device time."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
    return [(e.device_time_total / steps, e.count / steps, e.key) for e in events[:top] if e.device_time_total > 0]


def header(info, dtype: str, batch: int) -> List[str]:
    """The lines above a run's listing (``benchmarks.gpu_model.validate.parse_kernel_profile`` reads them back):
    machine, versions, commit and run; dtype, batch and the TF32 flag; which tile config each Triton kernel ran."""
    from kernels.triton.forward import autotune_enabled

    from .machine import pinned_configs, pinned_note

    configs = "autotuned" if autotune_enabled() else "the first of each kernel (autotuning off)"
    configs += pinned_note(pinned_configs())
    return [f"# {info.device_name}, torch {info.torch_version}, triton {info.triton_version}, "
            f"commit {info.git_commit}, run {info.run_id} ({info.utc_time})",
            f"# {dtype}, batch {batch}, channels_last; device time per call, us (launches per call); "
            f"cudnn.allow_tf32 {torch.backends.cudnn.allow_tf32}",
            f"# tile configs: {configs}"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="728->728@19,256->728@37,1536->2048@10",
                        help="comma-separated layer names (or parts of names, or a shape set: xception, sweep, tiny)")
    parser.add_argument("--providers", type=choices("provider", providers.LAYER_PROVIDERS),
                        default="triton-split,eager", help="comma-separated layer providers")
    parser.add_argument("--modes", type=choices("mode", MODES), default="full", help="fwd,full")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--steps", type=positive_int, default=5, help="profiled calls")
    parser.add_argument("--top", type=positive_int, default=8, help="kernels listed per case")
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR, help=f"results folder (default {DEFAULT_DIR})")
    args = parser.parse_args(argv)
    try:
        shapes = resolve_shapes([x.strip() for x in args.layers.split(",") if x.strip()], XCEPTION_LAYERS,
                                option="--layers")
    except ValueError as error:
        parser.error(str(error))
    if not torch.cuda.is_available():
        parser.error("kernel_profile needs a CUDA device (it lists CUDA kernels)")
    info = run_info("cuda", argv="python -m benchmarks.kernel_profile " + shlex.join(
        sys.argv[1:] if argv is None else list(argv)))
    lines = header(info, args.dtype, args.batch)
    for shape in shapes:
        for provider in args.providers:
            reason = providers.availability("layers", provider, "cuda", args.dtype)
            if reason is not None:
                lines.append(f"== {shape.name} {provider}: skipped ({reason})")
                continue
            for mode in args.modes:
                case = Case("layers", shape, args.batch, args.dtype, "channels_last", mode, provider)
                prepared = providers.prepare(case, "cuda")
                with prepared.timed() as call:
                    listed = kernel_times(call, args.steps, args.top)
                total = sum(us for us, _, _ in listed)
                lines.append(f"== {shape.name} {mode} {provider}: {total:.1f} us in the kernels listed")
                lines += [f"{us:10.1f}  ({count:g})  {name[:100]}" for us, count, name in listed]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    path = args.out / f"kernel-profile-{device_slug('cuda')}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(text)
    print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
