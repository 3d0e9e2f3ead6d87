"""Resident memory of the whole-model training step, per provider, each in a fresh process.

    python -m benchmarks.rss [--batch 8] [--steps 3] [--size 299] [--out FILE]

The suite's ``peak_alloc_mb`` column counts live tensor bytes (torch.profiler's allocation
trace). The cpp backend's buffer cache (kernels/csrc/buffer_cache.h) also keeps freed blocks
resident for reuse, which that column does not see; this script measures what the operating
system sees: the process's peak resident set (``ru_maxrss``) after ``--steps`` training steps
(the model suite's: forward, loss, backward, SGD) of Xception in channels_last fp32, for the
eager model, the cpp model, and the cpp model with recycling off (``SEPCONV_CACHE_MB=0``). It
prints one JSON line per provider and writes them to ``--out`` (atomically) when given. Each
row carries the run's metadata under ``"run"`` (machine, torch and triton versions, git commit,
time), as the benchmark suite's rows do.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .machine import run_info

PROVIDERS = {  # name: (the suite's model provider, extra environment)
    "eager": ("eager", {}),
    "cpp": ("cpp-unfused", {}),
    "cpp, SEPCONV_CACHE_MB=0": ("cpp-unfused", {"SEPCONV_CACHE_MB": "0"}),
}

# The training step is the model suite's own (benchmarks.providers.prepare_model).
_CHILD = """
import dataclasses, json, resource, sys, torch
from benchmarks.cases import MODEL_SHAPE, Case
from benchmarks.providers import prepare_model
provider, batch, steps, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
shape = dataclasses.replace(MODEL_SHAPE, h=size, w=size)
step = prepare_model(Case("model", shape, batch, "fp32", "channels_last", "train", provider), "cpu").fn
for _ in range(steps):
    step()
row = {"max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
if provider.startswith("cpp"):
    live, idle, cap = torch.ops.sepconv_cpp.cache_stats()
    row.update(cache_live_mib=round(live / 2**20, 1), cache_idle_mib=round(idle / 2**20, 1))
print(json.dumps(row))
"""


def measure(batch: int, steps: int, size: int, argv: str = "") -> List[Dict[str, object]]:
    """One row per provider, each measured in a fresh process, each with the run's metadata under "run"."""
    root = Path(__file__).resolve().parent.parent
    run = {"run": run_info("cpu", argv=argv).as_dict()}
    rows = []
    for name, (provider, env) in PROVIDERS.items():
        result = subprocess.run(
            [sys.executable, "-c", _CHILD, provider, str(batch), str(steps), str(size)],
            env=dict(os.environ, PYTHONPATH=str(root), **env), capture_output=True, text=True)
        if result.returncode != 0:
            rows.append({"provider": name, "status": "error", "reason": result.stderr.strip()[-500:], **run})
            continue
        row = json.loads(result.stdout.strip().splitlines()[-1])
        rows.append({"provider": name, "status": "ok", "batch": batch, "steps": steps, "size": size, **row, **run})
    return rows


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rss", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--size", type=int, default=299)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON lines here (atomically)")
    args = parser.parse_args(argv)
    for name, value, low in (("--batch", args.batch, 1), ("--steps", args.steps, 1), ("--size", args.size, 71)):
        if value < low:
            parser.error(f"{name} must be >= {low}, got {value}")
    rows = measure(args.batch, args.steps, args.size, argv="python -m benchmarks.rss " + shlex.join(argv))
    text = "".join(json.dumps(row) + "\n" for row in rows)
    print(text, end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        partial = args.out.with_name(args.out.name + ".partial")
        partial.write_text(text)
        os.replace(partial, args.out)


if __name__ == "__main__":
    main()
