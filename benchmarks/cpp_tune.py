"""Tuning script for the C++ backend: fused op vs the eager channels_last nn.Conv2d pair.

    python -m benchmarks.cpp_tune [--batch 1 8] [--mode fwd full] [--repeats 15] [--shapes 0 3 ...]

Baseline and fused runs are interleaved (the machine is shared) and the median of
``--repeats`` timings is reported, with the speedup and GFLOP/s, and the fastest call of each. ``--peak`` also
times a large oneDNN 1x1 convolution as the machine's practical fp32 peak.

    python -m benchmarks.cpp_tune --packing [--batch 1 8] [--repeats 15]

times the fused-for-inference Xception on cpp (299x299, channels_last) with its pointwise weights packed
once (``fuse_for_inference()``'s default) against packing them on every call (``pack_weights=False``),
interleaved call by call, and checks that both give the same logits to the bit.
Not the official benchmark suite (``python -m benchmarks``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import kernels

# (Cin, Cout, H): Xception's separable convolutions at 299x299 (3x3, pad 1, stride 1).
XCEPTION_SHAPES = [(64, 128, 147), (128, 128, 147), (128, 256, 74), (256, 256, 74), (256, 728, 37),
                   (728, 728, 37), (728, 728, 19), (728, 1024, 19), (1024, 1536, 10), (1536, 2048, 10)]


def flops(batch: int, cin: int, cout: int, size: int) -> float:
    return 2.0 * batch * size * size * cin * (9 + cout)


def make(batch, cin, cout, size, requires_grad):
    x = torch.randn(batch, cin, size, size).contiguous(memory_format=torch.channels_last)
    dw = torch.randn(cin, 1, 3, 3) / 3
    pw = (torch.randn(cout, cin, 1, 1) / cin ** 0.5).contiguous(memory_format=torch.channels_last)
    return [t.requires_grad_(requires_grad) for t in (x, dw, pw)]


def eager(x, dw, pw):
    return F.conv2d(F.conv2d(x, dw, None, 1, 1, 1, x.shape[1]), pw)


def fused(x, dw, pw):
    return kernels.separable_conv2d(x, dw, pw, padding=1, backend="cpp")


def timed(fn, args, full, grad):
    start = time.perf_counter()
    out = fn(*args)
    if full:
        out.backward(grad)
    return time.perf_counter() - start


def measure_peak(repeats: int) -> float:
    x = torch.randn(8, 1024, 28, 28).contiguous(memory_format=torch.channels_last)
    w = torch.randn(1024, 1024, 1, 1).contiguous(memory_format=torch.channels_last)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        F.conv2d(x, w)
        times.append(time.perf_counter() - start)
    return 2.0 * x.numel() * 1024 / statistics.median(times) / 1e9


def measure_packing(batches, repeats: int) -> None:
    """The fused Xception's eval with packed pointwise weights against packing them per call (see the docstring)."""
    import xception

    torch.manual_seed(0)
    model = xception.xception(backend="cpp").eval().fuse_for_inference().to(memory_format=torch.channels_last)
    separable = [m for m in model.modules() if isinstance(m, kernels.SeparableConv2d)]

    def run(packed: bool, x: torch.Tensor) -> torch.Tensor:
        for module in separable:
            if module._pack != packed:
                module.pack_for_inference(packed)
        return model(x)

    with torch.inference_mode():
        for batch in batches:
            x = torch.randn(batch, 3, 299, 299).contiguous(memory_format=torch.channels_last)
            if not torch.equal(run(False, x), run(True, x)):
                raise SystemExit(f"batch {batch}: packed and unpacked logits differ")
            times = {False: [], True: []}
            for _ in range(repeats):
                for packed in (False, True):
                    run(packed, x)  # the first packed call after a switch packs
                    start = time.perf_counter()
                    run(packed, x)
                    times[packed].append(time.perf_counter() - start)
            per_call, once = statistics.median(times[False]), statistics.median(times[True])
            print(f"eval N={batch}: packed per call {per_call * 1e3:8.2f} ms  packed once {once * 1e3:8.2f} ms  "
                  f"speedup {per_call / once:5.3f}x  (fastest calls: {min(times[False]) * 1e3:.2f} ms, "
                  f"{min(times[True]) * 1e3:.2f} ms; logits equal to the bit)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--mode", nargs="+", default=["fwd", "full"], choices=["fwd", "full"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--shapes", type=int, nargs="+", default=list(range(len(XCEPTION_SHAPES))))
    parser.add_argument("--peak", action="store_true")
    parser.add_argument("--packing", action="store_true", help="the fused model's eval, pointwise weights packed "
                                                                "once against per call, instead of the layers")
    args = parser.parse_args()
    print(f"threads={torch.get_num_threads()}")
    if args.packing:
        kernels.available_backends()
        measure_packing(args.batch, args.repeats)
        return
    if args.peak:
        print(f"peak (oneDNN 1x1, 8x1024x28x28 -> 1024): {measure_peak(args.repeats):.0f} GFLOP/s")
    kernels.available_backends()
    for mode in args.mode:
        full = mode == "full"
        for batch in args.batch:
            for index in args.shapes:
                cin, cout, size = XCEPTION_SHAPES[index]
                tensors = make(batch, cin, cout, size, full)
                grad = torch.randn(batch, cout, size, size).contiguous(memory_format=torch.channels_last)
                for fn in (eager, fused, eager, fused):  # warm-up
                    timed(fn, tensors, full, grad)
                base, ours = [], []
                for _ in range(args.repeats):
                    base.append(timed(eager, tensors, full, grad))
                    ours.append(timed(fused, tensors, full, grad))
                b, o = statistics.median(base), statistics.median(ours)
                work = flops(batch, cin, cout, size) * (3 if full else 1)
                print(f"{mode:4} N={batch} {cin:4}->{cout:4} @{size:3}: eager {b * 1e3:8.2f} ms  cpp {o * 1e3:8.2f} ms"
                      f"  speedup {b / o:5.2f}x  cpp {work / o / 1e9:6.0f} GFLOP/s  (fastest calls: eager "
                      f"{min(base) * 1e3:.2f} ms, cpp {min(ours) * 1e3:.2f} ms, {work / min(ours) / 1e9:.0f} GFLOP/s)",
                      flush=True)


if __name__ == "__main__":
    main()
