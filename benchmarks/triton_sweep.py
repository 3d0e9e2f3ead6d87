"""Tile-config sweep for the Triton kernels: every candidate config of a kernel, pinned, timed per shape.

    python -m benchmarks.triton_sweep [--shapes 728->728@19,...] [--dtypes bf16,fp32] [--batch 32]
                                      [--kernels forward,grad_hidden,grad_input,grad_pointwise,depthwise,transposed]
                                      [--budget SECONDS] [--jsonl PATH] [--pins PATH] [--jobs N]

For the forward, each candidate runs the whole op (one kernel); ``depthwise`` is split mode's
depthwise kernel alone (``kernels/triton/split.py``); ``transposed`` is split mode's backward
without the pointwise weight's gradient (the g_h GEMM, the transposed depthwise kernel, the
partial sums), so its rows differ in that kernel's config only. For a backward kernel (fused mode), the
candidate is pinned and the other two backward kernels run their first config, so rows of one
kernel differ only in that kernel's config. The eager cuDNN pair is timed next to them, and the
kernel's current GPU configs are marked, so a better candidate shows up as such. A config that
fails to compile or launch (e.g. out of shared memory) is reported, not fatal.
Not the benchmark suite (``python -m benchmarks``): this is the tool for choosing the configs
in ``kernels/triton/forward.py``, ``backward.py`` and ``split.py``. GPU only (``--interpret`` runs one tiny
case in Triton's interpreter, to test the script).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import List, Optional
from unittest import mock

import torch
import torch.nn.functional as F

from kernels.triton import CONFIGS_ENV

from .cases import DTYPES, XCEPTION_LAYERS, Shape, resolve_shapes
from .cli import positive_int
from .machine import run_info
from .warm import error_line, worker_pool

KERNELS = ("forward", "grad_hidden", "grad_input", "grad_pointwise", "depthwise", "transposed")


def candidates(kernel: str, family: str) -> List["triton.Config"]:  # noqa: F821
    """The configs tried for ``kernel`` in a dtype family ("16bit" or "fp32")."""
    import triton

    k_16, k_32 = (32, 64) if family == "16bit" else (16, 32)
    if kernel == "depthwise":  # split mode's depthwise kernel (kernels/triton/split.py)
        # ROWS x COLS output pixels a slot: input reuse across rows and columns against registers. Fewer
        # slots a program (BLOCK_P) and smaller slots make more programs and leave registers for more of
        # them on an SM: at 728->728@19, batch 32, the first GPU config makes 276 programs of 4 warps, about
        # two an SM, and its kernel measured 35 us where its bytes take 8 at the copy bandwidth.
        # Round robin over the slot shapes, so that a sweep cut short by its budget has timed every shape.
        slots = ((10, 8), (5, 8), (10, 5), (5, 5), (5, 4), (2, 4), (1, 4), (1, 1))
        per_slot = [[triton.Config(dict(BLOCK_P=p, BLOCK_C=c, ROWS=r, COLS=k), num_warps=max(1, p * c // 128),
                                   num_stages=1)
                     for c, p in itertools.product((32, 64), (16, 8, 4))] for r, k in slots]
        # Then 8 channels a thread on the small slots (128-bit accesses, twice the registers for the taps' weights).
        wide = [[triton.Config(dict(BLOCK_P=p, BLOCK_C=c, ROWS=r, COLS=k), num_warps=p * c // 256, num_stages=1)
                 for c, p in itertools.product((64, 32), (16, 8))] for r, k in slots[4:]]
        return [config for groups in (per_slot, wide) for group in zip(*groups) for config in group]
    if kernel == "transposed":  # split mode's transposed depthwise kernel: its tile shapes are fixed per dtype
        return [triton.Config(dict(BLOCK_Q=q, BLOCK_C=c), num_warps=w, num_stages=1)
                for q, c, w in itertools.product((4, 8, 16, 32), (32, 64, 128), (2, 4, 8))
                if 2 <= q * c // (w * 32) <= 16]
    if kernel == "grad_input":
        return [triton.Config(dict(BLOCK_Q=q, BLOCK_C=c), num_warps=w, num_stages=1)
                for q, c, w in itertools.product((32, 64, 128), (32, 64), (4, 8))]
    if kernel == "forward":  # (BLOCK_P, BLOCK_CO, BLOCK_K)
        tiles = [(64, 64, k_16), (64, 128, k_16), (128, 64, k_16), (128, 128, k_16), (64, 256, k_16),
                 (64, 128, k_32), (128, 128, k_32)]
        metas = [dict(BLOCK_P=p, BLOCK_CO=co, BLOCK_K=k, UNROLL_TAPS=u) for p, co, k in tiles for u in (False, True)]
    elif kernel == "grad_hidden":
        metas = [dict(BLOCK_P=p, BLOCK_K=k, BLOCK_CO=co)
                 for p, k, co in itertools.product((64, 128), (64, 128), (k_16, k_32))]
    else:  # grad_pointwise
        metas = [dict(BLOCK_P=p, BLOCK_CO=co, BLOCK_K=k, UNROLL_TAPS=u)
                 for p, co, k, u in itertools.product((k_16, k_32), (64, 128), (64, 128), (False, True))]
    configs = []
    for meta in metas:
        small = all(v <= 64 for name, v in meta.items() if name.startswith("BLOCK"))
        for warps in ((4, 8) if small else (8,)):
            stages = (2, 3) if kernel != "grad_pointwise" else (2,)
            configs += [triton.Config(dict(meta), num_warps=warps, num_stages=s) for s in stages]
    return configs


# The transposed depthwise kernel's tile (input pixels a program slot covers) is set per dtype family by
# ``split.TRANSPOSED_TILES``, not by its configs: the largest that compile without spills, 232 registers and 2 to 4
# programs an SM at 728->728@19 in 16-bit. Smaller tiles read g_h more often but leave registers for more programs;
# the static model ranks them within 1.5x of each other and misjudges this kernel by about 2x (docs/gpu-model.md),
# so a GPU decides. Swept: every tile with the kernel's own configs, then the other candidates with the current tile.
TRANSPOSED_TILE_CANDIDATES = {"16bit": ((4, 3), (2, 3), (2, 2), (1, 1)), "fp32": ((3, 3), (2, 2), (1, 1))}


def sweep_candidates(kernel: str, family: str) -> List[tuple]:
    """(tile, config) pairs in the order the sweep times them; the tile is None but for the transposed kernel."""
    if kernel != "transposed":
        return [(None, config) for config in candidates(kernel, family)]
    from kernels.triton import split

    own = split.TRANSPOSED_CONFIGS[family]
    current = split.TRANSPOSED_TILES[family]
    tiles = [current] + [t for t in TRANSPOSED_TILE_CANDIDATES[family] if t != current]
    pairs = [(tile, config) for tile in tiles for config in own]
    seen = {describe(config) for config in own}
    return pairs + [(current, config) for config in candidates(kernel, family) if describe(config) not in seen]


def transposed_tile(family: str, tile: Optional[tuple]):
    """A context in which the transposed kernel's tile for ``family`` is ``tile`` (the interpreter's tile too, so
    that the interpreted sweep exercises it), restored afterwards; no change when ``tile`` is None."""
    from kernels.triton import split

    stack = contextlib.ExitStack()
    if tile is not None:
        stack.enter_context(mock.patch.dict(split.TRANSPOSED_TILES, {family: tile}))
        stack.enter_context(mock.patch.object(split, "INTERPRET_TILE", tile))
    return stack


def describe(config, tile: Optional[tuple] = None) -> str:
    meta = ",".join(f"{k}={v}" for k, v in config.kwargs.items() if not (k == "UNROLL_TAPS" and not v))
    prefix = f"TILE={tile[0]}x{tile[1]}," if tile is not None else ""
    return f"{prefix}{meta},warps={config.num_warps},stages={config.num_stages}"


def make_inputs(shape: Shape, batch: int, dtype: torch.dtype, device: str):
    generator = torch.Generator().manual_seed(0)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=generator) * scale).to(device=device, dtype=dtype)

    x = randn(batch, shape.cin, shape.h, shape.w).contiguous(memory_format=torch.channels_last)
    dw = randn(shape.cin, 1, shape.k, shape.k, scale=1 / shape.k)
    pw = randn(shape.cout, shape.cin, 1, 1, scale=shape.cin ** -0.5)
    dwb, pwb = randn(shape.cin), randn(shape.cout)
    oh, ow = shape.out_hw
    grad = randn(batch, shape.cout, oh, ow).contiguous(memory_format=torch.channels_last)
    return x, dw, pw, dwb, pwb, grad


def timer(device: str, repeats: int):
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=5, rep=repeats, return_mode="median")

    def cpu(fn):
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    return cpu


def current_configs() -> dict:
    """Kernel name -> {family: the kernel's own GPU configs}."""
    from kernels.triton import backward, forward, split

    return {"forward": forward.GPU_CONFIGS, "depthwise": split.GPU_CONFIGS, "transposed": split.TRANSPOSED_CONFIGS,
            "grad_hidden": backward.GRAD_HIDDEN_CONFIGS_GPU,
            "grad_input": backward.GRAD_INPUT_CONFIGS_GPU, "grad_pointwise": backward.GRAD_POINTWISE_CONFIGS_GPU}


def candidate_call(kernel: str, shape: Shape, inputs: tuple):
    """The call a row of ``kernel`` times on ``inputs`` (``make_inputs``'s six tensors)."""
    from kernels.triton import split

    x, dw, pw, dwb, pwb, grad = inputs
    geometry = ([shape.stride] * 2, [shape.padding] * 4, [1, 1])
    ops = torch.ops.sepconv_triton
    if kernel == "forward":
        return lambda: ops.forward(x, dw, pw, dwb, pwb, *geometry, False)
    if kernel == "depthwise":
        return lambda: split.depthwise(x, dw, dwb, shape.out_hw, *geometry, False)
    if kernel == "transposed":  # with the g_h GEMM and the partial sums (the same in every row)
        return lambda: split.backward(grad, x, dw, pw, dwb, *geometry, False, [True, True, False, True, False])
    return lambda: ops.backward(grad, x, dw, pw, dwb, *geometry, False, [True] * 5)


@contextlib.contextmanager
def candidate(kernel: str, family: str, config, tile: Optional[tuple]):
    """Within: ``kernel`` runs ``config`` (the transposed kernel in ``tile`` too); for a fused-mode backward
    kernel, the other two backward kernels run their first config, so rows of one kernel differ in its config
    only."""
    from kernels.triton import forward, pinned

    tables, current = pinned.kernel_tables(), current_configs()
    backward_kernels = ("grad_hidden", "grad_input", "grad_pointwise")
    pins = {}
    if kernel in backward_kernels:
        pins = {tables[k][family].fn: current[k][family][0] for k in backward_kernels if k != kernel}
    saved = dict(forward.forced_configs)
    forward.forced_configs.update(pins)
    forward.forced_configs[tables[kernel][family].fn] = config
    try:
        with transposed_tile(family, tile):
            yield
    finally:
        forward.forced_configs.clear()
        forward.forced_configs.update(saved)


def _compile_candidate(task: tuple) -> Optional[str]:
    """In a worker process: one candidate called once (so Triton compiles it into its on-disk cache); the error,
    or None."""
    shape, batch, dtype_name, kernel, tile, config, device = task
    from kernels.triton import forward

    family = forward.family(DTYPES[dtype_name])
    try:
        call = candidate_call(kernel, shape, make_inputs(shape, batch, DTYPES[dtype_name], device))
        with candidate(kernel, family, config, tile):
            call()
        if device == "cuda":
            torch.cuda.synchronize()
    except Exception as error:  # noqa: BLE001 - reported again (and timed as failed) by the sweep itself
        return error_line(error, 100)
    return None


def precompile(shape: Shape, batch: int, dtype_name: str, kernel: str, pairs: List[tuple], device: str, jobs: int,
               seconds: float) -> bool:
    """Calls each (tile, config) of ``kernel`` in ``pairs`` once in ``jobs`` worker processes, so that their
    compiles run in parallel into Triton's on-disk cache and the timing loop loads them (a compile takes a
    second or two, a timed candidate a tenth of that). Stops after ``seconds``; whether every call ended."""
    pool = worker_pool(min(jobs, len(pairs)))
    try:
        tasks = [(shape, batch, dtype_name, kernel, tile, config, device) for tile, config in pairs]
        result = pool.map_async(_compile_candidate, tasks, chunksize=1)
        result.wait(timeout=max(0.0, seconds))
        return result.ready()
    finally:
        pool.terminate()
        pool.join()


def sweep(args) -> int:
    from kernels.triton import forward, pinned, split

    device = "cpu" if args.interpret else "cuda"
    current = current_configs()
    time_ms = timer(device, args.rep)
    run = run_info(device, argv="python -m benchmarks.triton_sweep " + shlex.join(args.argv)).as_dict()
    deadline = time.monotonic() + args.budget
    out = open(args.jsonl, "a") if args.jsonl else None
    stopped = False
    for shape, dtype_name in itertools.product(args.shapes, args.dtypes):
        dtype = DTYPES[dtype_name]
        family = forward.family(dtype)
        inputs = make_inputs(shape, args.batch, dtype, device)
        x, dw, pw, dwb, pwb, grad = inputs
        flops = 2.0 * args.batch * shape.out_hw[0] * shape.out_hw[1] * shape.cin * (shape.k ** 2 + shape.cout)

        def eager():
            hidden = F.conv2d(x, dw, dwb, shape.stride, shape.padding, 1, shape.cin)
            return F.conv2d(hidden, pw, pwb)

        leaves = [t.detach().clone().requires_grad_(True) for t in (x, dw, pw, dwb, pwb)]

        def eager_full():
            hidden = F.conv2d(leaves[0], leaves[1], leaves[3], shape.stride, shape.padding, 1, shape.cin)
            F.conv2d(hidden, leaves[2], leaves[4]).backward(grad)

        eager_ms, eager_full_ms = time_ms(eager), time_ms(eager_full)
        print(f"\n{shape.name} N={args.batch} {dtype_name}: eager pair forward {eager_ms:.3f} ms "
              f"({flops / eager_ms / 1e9:.1f} TFLOP/s), forward+backward {eager_full_ms:.3f} ms", flush=True)
        for kernel in args.kernels:
            call = candidate_call(kernel, shape, inputs)
            rows = []
            pairs = sweep_candidates(kernel, family)
            if args.interpret:  # the kernel's first config (the transposed kernel's in its first two tiles)
                tiles = list(dict.fromkeys(tile for tile, _ in pairs))[:2]
                pairs = [(tile, current[kernel][family][0]) for tile in tiles]
            if args.jobs > 1:
                # Most of the budget at most: what did not compile in it compiles in the loop below.
                seconds = 0.6 * (deadline - time.monotonic())
                began = time.monotonic()
                done = precompile(shape, args.batch, dtype_name, kernel, pairs, device, args.jobs, seconds)
                print(f"  {kernel}: {len(pairs)} candidates compiled in {args.jobs} processes in "
                      f"{time.monotonic() - began:.1f} s" + ("" if done else " (cut short: the rest compile as timed)"),
                      flush=True)
            own_tile = split.TRANSPOSED_TILES[family] if kernel == "transposed" else None
            for tile, config in pairs:
                if time.monotonic() > deadline:
                    stopped = True
                    break
                try:
                    with candidate(kernel, family, config, tile):
                        ms, error = time_ms(call), None
                except Exception as exc:  # a config that does not fit this GPU: report it, go on
                    ms, error = None, error_line(exc, 100)
                is_current = tile == own_tile and any(describe(config) == describe(c) for c in current[kernel][family])
                rows.append((ms, describe(config, tile), is_current, error, config, tile))
                if out:
                    out.write(json.dumps(dict(shape=shape.name, batch=args.batch, dtype=dtype_name, kernel=kernel,
                                              config=describe(config, tile), current=is_current, ms=ms, error=error,
                                              eager_forward_ms=eager_ms, eager_full_ms=eager_full_ms,
                                              run=run)) + "\n")
                    out.flush()
            ok = sorted((r for r in rows if r[0] is not None), key=lambda r: r[0])
            print(f"  {kernel}: {len(ok)}/{len(rows)} configs ran", flush=True)
            for ms, name, is_current, *_ in ok[:args.top]:
                rate = f"  {flops / ms / 1e9:6.1f} TFLOP/s" if kernel == "forward" else ""
                print(f"    {ms:8.3f} ms{rate}  {name}{'  (current)' if is_current else ''}", flush=True)
            best_current = [r for r in ok if r[2]]
            if best_current and best_current[0] not in ok[:args.top]:
                print(f"    {best_current[0][0]:8.3f} ms  {best_current[0][1]}  (best current)", flush=True)
            for ms, name, _, error, *_ in rows:
                if error:
                    print(f"    failed: {name}: {error}", flush=True)
            if args.pins and ok:
                ms, _, _, _, config, tile = ok[0]
                pinned.write(args.pins, [pinned.entry(kernel, family, config, tile, ms=round(ms, 6), shape=shape.name,
                                                      batch=args.batch, dtype=dtype_name, run_id=run["run_id"])],
                             device=run["device_name"], written_by="python -m benchmarks.triton_sweep")
                print(f"  {kernel}: the fastest pinned in {args.pins}", flush=True)
            if stopped:
                break
        if stopped:
            print(f"\n--budget of {args.budget:.0f} s reached: stopped early", flush=True)
            break
    if out:
        out.close()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.triton_sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="728->728@19,128->128@147,1536->2048@10",
                        help="Xception layer names or parts of them, comma-separated")
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--kernels", default=",".join(KERNELS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rep", type=int, default=25, help="do_bench rep (ms of timed calls per config)")
    parser.add_argument("--top", type=int, default=5, help="fastest configs printed per kernel")
    parser.add_argument("--budget", type=float, default=600.0, help="stop after this many seconds")
    parser.add_argument("--jsonl", type=Path, help="append one JSON row per (shape, dtype, kernel, config)")
    parser.add_argument("--interpret", action="store_true", help="tiny CPU run in Triton's interpreter (tests)")
    parser.add_argument("--jobs", type=positive_int, default=1,
                        help="compile each kernel's candidates in this many worker processes before timing them")
    parser.add_argument("--pins", type=Path,
                        help="write the fastest config of each (kernel, dtype) swept into this pinned-configs file "
                             "(read by SEPCONV_TRITON_CONFIGS; entries for other kernels are kept)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    args.kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    for name, values, allowed in (("--dtypes", args.dtypes, DTYPES), ("--kernels", args.kernels, KERNELS)):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            parser.error(f"{name}: {bad or values!r} not in {list(allowed)}")
    if os.environ.get(CONFIGS_ENV):
        parser.error(f"{CONFIGS_ENV} is set: its pins would override the configs the sweep times; unset it")
    if args.interpret:
        if os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--interpret needs TRITON_INTERPRET=1 in the environment (set before Triton is imported)")
        args.shapes = [Shape("tiny 8->20@6", 8, 20, 6, 6)]
        args.batch = 2
    else:
        if not torch.cuda.is_available():
            parser.error("the sweep times GPU kernels: CUDA is not available here (--interpret for a CPU smoke run)")
        try:
            args.shapes = resolve_shapes([s.strip() for s in args.shapes.split(",") if s.strip()], XCEPTION_LAYERS)
        except ValueError as error:
            parser.error(str(error))
    import kernels

    reason = kernels.available_backends()["triton"]
    if reason is not None:
        print(f"the triton backend is unavailable: {reason}", file=sys.stderr)
        return 1
    return sweep(args)


if __name__ == "__main__":
    raise SystemExit(main())
