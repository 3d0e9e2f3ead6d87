"""Run by tests/test_fast_launch.py in a process of its own (TRITON_INTERPRET unset): each case's launches
through Triton's own path and through ``kernels.triton.fast_launch``, compiled for sm_90 and recorded by
``benchmarks.null_gpu`` instead of run. Prints one JSON object: per case, the two launch sequences as
comparable descriptions, and how many launches of the fast run went through Triton's path; and what happened
to the kept entries when they reached their limit."""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.null_gpu import NullDriver, null_gpu  # noqa: E402
from kernels.functional import separable_conv2d  # noqa: E402


def describe(launches, handles):
    """Each launch as plain data; a kernel handle as its name and the order it was first seen in."""
    out = []
    for launch in launches:
        function = handles.setdefault(id(launch.function), (launch.function.name, len(handles)))
        args = [["tensor", str(a.dtype), list(a.shape), list(a.stride()), a.data_ptr() % 16 == 0]
                if isinstance(a, torch.Tensor) else [type(a).__name__, repr(a)] for a in launch.args]
        enter, exit_, metadata = launch.hooks
        from triton import knobs

        hooks = [enter is knobs.runtime.launch_enter_hook, exit_ is knobs.runtime.launch_exit_hook,
                 type(metadata).__name__]
        out.append({"grid": list(launch.grid), "kernel": list(function), "args": args, "hooks": hooks})
    return out


def layer(batch, cin, cout, size, stride, dtype, offset=0):
    """A call of separable_conv2d (forward and, when its input wants a gradient, backward)."""
    storage = torch.randn(batch * cin * size * size + offset, dtype=dtype)
    x = storage[offset:].view(batch, size, size, cin).permute(0, 3, 1, 2)  # channels_last, maybe misaligned
    x.requires_grad_(True)
    dw = torch.randn(cin, 1, 3, 3, dtype=dtype, requires_grad=True)
    pw = torch.randn(cout, cin, 1, 1, dtype=dtype, requires_grad=True)

    def call():
        out = separable_conv2d(x, dw, pw, stride=stride, padding=1, backend="triton")
        torch.autograd.grad(out, (x, dw, pw), torch.ones_like(out))

    return call


def main():
    from kernels.triton import fast_launch

    cases = {
        "bf16 16->24 b2": layer(2, 16, 24, 6, 1, torch.bfloat16),
        "bf16 16->24 b2 misaligned": layer(2, 16, 24, 6, 1, torch.bfloat16, offset=1),
        "bf16 16->24 b1": layer(1, 16, 24, 6, 1, torch.bfloat16),
        "fp32 24->40 b2 stride 2": layer(2, 24, 40, 7, 2, torch.float32),
    }
    cases["bf16 16->24 b2 autotune off"] = cases["bf16 16->24 b2"]
    launches = []
    handles = {}
    result = {}
    # Each timing run reports a shorter time than the one before, so the autotuner keeps a kernel's last
    # config, not the first one it would run with autotuning off (the case "... autotune off" below).
    timings = iter(range(10**6, 0, -1))

    def benchmarker(self):
        def bench(fn, quantiles=None, **_):
            fn()
            return [float(next(timings))] * 3 if quantiles else float(next(timings))

        return bench

    NullDriver.get_benchmarker = benchmarker
    triton_path_calls = []
    real = fast_launch._triton_launch

    def counted(*args, **kwargs):
        triton_path_calls.append(1)
        return real(*args, **kwargs)

    fast_launch._triton_launch = counted
    with null_gpu(launches=launches):
        for name, call in cases.items():
            os.environ["SEPCONV_TRITON_AUTOTUNE"] = "0" if name.endswith("autotune off") else "1"
            fast_launch.ENABLED = False
            call()  # compiles (and autotunes) through Triton's path
            launches.clear()
            call()
            expected = describe(launches, handles)
            fast_launch.ENABLED = True
            call()  # keeps the kernels of this signature
            launches.clear()
            del triton_path_calls[:]
            call()
            result[name] = {"triton": expected, "fast": describe(launches, handles),
                            "fast_through_triton": len(triton_path_calls)}
        # Full: the next new signature drops every kept entry first, then keeps its own.
        fast_launch.MAX_ENTRIES = len(fast_launch._entries)
        call = layer(3, 16, 24, 6, 1, torch.bfloat16)
        del triton_path_calls[:]
        call()
        first = len(triton_path_calls)
        kept_after_overflow = len(fast_launch._entries)
        launches.clear()
        del triton_path_calls[:]
        call()
        entries = {"kept after overflow": kept_after_overflow, "limit": fast_launch.MAX_ENTRIES,
                             "launches": len(launches), "first call through triton": first,
                             "second call through triton": len(triton_path_calls)}
    print(json.dumps({"cases": result, "entries": entries}))


if __name__ == "__main__":
    main()
