"""The host path of a call: what it skips to save time must not change what it returns.

On a GPU the Python around the kernels decides the speed of a plain (not graph-replayed) call; the
shortcuts taken there (``kernels.autograd``'s positional ``apply`` and calls below the autograd key,
``kernels.ops.as_returned`` restating strides in place, host-side ``cdiv``) are checked here against
the long way round.
"""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compiled_environment, require_backend
from torch._prims_common import make_channels_last_strides_for, make_contiguous_strides_for
from torch._subclasses.fake_tensor import FakeTensorMode

from kernels import autograd, ops
from kernels.functional import separable_conv2d

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("channels_last", [False, True])
def test_strides_for_are_torch_empty_strides(channels_last):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for shape in itertools.product([0, 1, 3], [0, 1, 4], [0, 1, 3], [0, 1, 2, 7]):
        expected = torch.empty(shape, memory_format=memory_format).stride()
        assert ops._strides_for(torch.Size(shape), memory_format) == expected, shape
        assert ops._strides_for(list(shape), memory_format) == expected, shape  # a list works too
    for shape in [(5,), (0,), (3, 4), (2, 0, 3), ()]:
        assert ops._strides_for(torch.Size(shape), torch.contiguous_format) == torch.empty(shape).stride()


def test_strides_for_symbolic_sizes_take_torchs_own_rule():
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    env = ShapeEnv()
    sizes = [env.create_symintnode(env.create_symbol(value, ConstantSource(f"size{i}")), hint=value)
             for i, value in enumerate((2, 3, 4, 5))]
    assert all(isinstance(size, torch.SymInt) for size in sizes)  # unhashable: not looked up in the cache
    assert ops._strides_for(sizes, torch.channels_last) == tuple(make_channels_last_strides_for(sizes))
    assert ops._strides_for(sizes, torch.contiguous_format) == tuple(make_contiguous_strides_for(sizes))


def test_as_returned_restates_unit_dimension_strides_without_a_copy():
    # ATen's weight gradient of a 1x1 convolution: contiguous, with a stride of 1 on the input channels
    # that torch.empty would not give (16 there): the same memory, so no copy.
    grad = torch.empty_strided((16, 8, 1, 1), (8, 1, 8, 8)).copy_(torch.randn(16, 8, 1, 1))
    pointer, values = grad.data_ptr(), grad.clone()
    returned = ops.as_returned(grad, torch.contiguous_format)
    assert returned is grad and returned.data_ptr() == pointer
    assert returned.stride() == (8, 1, 1, 1)
    torch.testing.assert_close(returned, values, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["transposed", "offset", "view"])
def test_as_returned_copies_what_is_laid_out_otherwise(case):
    base = torch.randn(2, 3, 4, 5)
    if case == "transposed":  # its own storage, other strides
        result = base.transpose(2, 3).contiguous().transpose(2, 3)
    elif case == "offset":  # its own tensor (no _base), starting one element into its storage
        result = torch.empty(0).set_(torch.randn(121).untyped_storage(), 1, (2, 3, 4, 5), (60, 20, 5, 1))
    else:  # a view of another tensor
        result = base.view(2, 3, 4, 5)
    returned = ops.as_returned(result, torch.contiguous_format)
    assert returned.stride() == (60, 20, 5, 1) and returned._base is None and returned.storage_offset() == 0
    assert returned.data_ptr() != result.data_ptr()
    torch.testing.assert_close(returned, result, rtol=0, atol=0)


def test_as_returned_under_fake_tensors_copies_instead_of_restriding():
    with FakeTensorMode():
        grad = torch.empty_strided((16, 8, 1, 1), (8, 1, 8, 8))
        returned = ops.as_returned(grad, torch.contiguous_format)
        assert returned.stride() == (8, 1, 1, 1)
        assert returned is not grad and grad.stride() == (8, 1, 8, 8)  # the traced tensor is left as it was


def test_host_cdiv_and_next_power_of_2_are_tritons():
    triton = pytest.importorskip("triton", reason="the triton backend's host helpers need triton installed")
    from kernels.triton.common import cdiv, next_power_of_2

    assert all(cdiv(a, b) == triton.cdiv(a, b) for a in range(0, 300) for b in range(1, 70))
    assert all(next_power_of_2(n) == triton.next_power_of_2(n) for n in range(0, 5000))


def _layer(requires_grad):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 6, 6, generator=generator).contiguous(memory_format=torch.channels_last)
    dw = torch.randn(8, 1, 3, 3, generator=generator)
    pw = torch.randn(12, 8, 1, 1, generator=generator)
    return [t.requires_grad_(requires_grad) for t in (x, dw, pw)]


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_calls_below_autograd_match_the_op_through_its_autograd_kernel(backend):
    device = require_backend(backend)
    x, dw, pw = (t.to(device) for t in _layer(False))
    name = "triton" if backend == "triton" else backend
    args = (x, dw, pw, None, None, [1, 1], [1, 1, 1, 1], [1, 1], False)
    assert autograd.below_autograd()
    direct = autograd.forward_op(name)(*args)
    below = autograd.call_below_autograd(autograd.forward_op(name), args)
    torch.testing.assert_close(below, direct, rtol=0, atol=0)
    assert below.stride() == direct.stride()


@pytest.mark.parametrize("mode", ["fused", "split"])
def test_triton_ops_run_their_launchers_directly_unless_observed(monkeypatch, mode):
    """A plain call runs the Triton launcher without the dispatcher (``kernels.ops.DIRECT``), forward and
    backward, with the outputs and gradients of the dispatcher's path; a dispatch mode or the profiler, which
    see ops by name, still get every op through the dispatcher."""
    from torch.utils._python_dispatch import TorchDispatchMode

    device = require_backend("triton")
    monkeypatch.setenv("SEPCONV_TRITON_MODE", mode)
    ran = []
    for op, by_device in list(ops.DIRECT.items()):
        if op.namespace == "sepconv_triton":
            function = by_device[device.type]
            monkeypatch.setitem(by_device, device.type,
                                lambda *args, _op=op, _f=function: ran.append(str(_op)) or _f(*args))

    def step():
        x, dw, pw = (t.to(device) for t in _layer(True))
        out = separable_conv2d(x, dw, pw, padding=1, backend="triton")
        return (out, *torch.autograd.grad(out.square().sum(), (x, dw, pw)))

    with torch.no_grad():
        x, dw, pw = (t.to(device) for t in _layer(False))
        separable_conv2d(x, dw, pw, padding=1, backend="triton")
    assert ran == ["sepconv_triton.forward.default"]
    del ran[:]
    direct = step()
    # The triton ops keep the depthwise result for the backward where the mode computes one (split).
    forward, backward = "forward_keeping_hidden", "backward_from_hidden"
    assert ran == [f"sepconv_triton.{forward}.default", f"sepconv_triton.{backward}.default"]

    class Census(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    del ran[:]
    seen = []
    with Census():
        through_dispatcher = step()
    assert ran == [] and f"sepconv_triton.{forward}.default" in seen and f"sepconv_triton.{backward}.default" in seen
    for got, expected in zip(direct, through_dispatcher):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with torch.profiler.profile() as profile:
        step()
    assert ran == []
    names = {event.name for event in profile.events()}
    assert {f"sepconv_triton::{forward}", f"sepconv_triton::{backward}"} <= names


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_positional_apply_gives_the_gradients_of_the_long_way(backend):
    """Function.apply's own path (binding the arguments) and the positional one agree, gradients included."""
    require_backend(backend)
    x, dw, pw = _layer(True)
    out = separable_conv2d(x, dw, pw, padding=1, backend=backend)
    grads = torch.autograd.grad(out.square().sum(), (x, dw, pw))
    args = (x, dw, pw, None, None, [1, 1], [1, 1, 1, 1], [1, 1], False, backend)
    function = (autograd.SeparableConv2dKeepingHidden if autograd.keeps_hidden(backend, pw)
                else autograd.SeparableConv2dFunction)
    long_way = torch.autograd.Function.apply.__func__(function, *args)
    long_out = long_way[0] if isinstance(long_way, tuple) else long_way
    torch.testing.assert_close(out, long_out, rtol=0, atol=0)
    for got, expected in zip(grads, torch.autograd.grad(long_out.square().sum(), (x, dw, pw))):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_functorch_grad_takes_functions_own_apply():
    """Under torch.func transforms the positional apply and the below-autograd calls step aside."""
    x, dw, pw = _layer(False)

    def loss(x):
        assert not autograd.below_autograd()
        return separable_conv2d(x, dw, pw, padding=1, backend="torch").square().sum()

    x_ref = x.detach().requires_grad_()
    reference = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x_ref, dw, padding=1, groups=8), pw)
    (expected,) = torch.autograd.grad(reference.square().sum(), x_ref)
    torch.testing.assert_close(torch.func.grad(loss)(x), expected, rtol=1e-5, atol=1e-5)


def test_host_time_writes_rows_with_the_run(tmp_path, capsys):
    from benchmarks.host_time import main

    assert main(["--device", "cpu", "--providers", "eager,torch", "--modes", "fwd,full", "--calls", "3",
                 "--profile", "5", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("host-time-cpu-*.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["provider"], r["mode"]) for r in rows] == [("eager", "fwd"), ("eager", "full"), ("torch", "fwd"),
                                                          ("torch", "full")]
    assert all(r["host_us"] > 0 and r["run"]["git_commit"] and r["run"]["device"] == "cpu" for r in rows)
    assert not any(r["triton_launches_stubbed"] for r in rows)
    printed = capsys.readouterr().out
    assert "-- torch full: the 5 functions with the most own time" in printed and "ncalls" in printed


def test_host_time_stubs_the_interpreter_only_while_it_runs(tmp_path, monkeypatch):
    require_backend("triton")
    from triton.runtime import interpreter

    from benchmarks.host_time import main

    run = interpreter.InterpretedFunction.run
    assert main(["--device", "cpu", "--stub-triton", "--providers", "triton-split", "--modes", "full",
                 "--calls", "2", "--out", str(tmp_path)]) == 0
    assert interpreter.InterpretedFunction.run is run
    (row,) = [json.loads(line) for line in next(tmp_path.glob("host-time-*.jsonl")).read_text().splitlines()]
    assert row["provider"] == "triton-split" and row["triton_launches_stubbed"]


def test_host_time_on_a_null_gpu(tmp_path):
    """``--null-gpu`` (its own process: the kernels are compiled for sm_90, outside the interpreter): a row per
    provider and mode, saying how the Triton launches went; with ``--dispatcher`` no op ran directly."""
    require_backend("triton")
    env = compiled_environment(SEPCONV_TRITON_AUTOTUNE="0")  # one config a kernel to compile
    for extra in ([], ["--dispatcher"]):
        done = subprocess.run([sys.executable, "-m", "benchmarks.host_time", "--device", "cpu", "--null-gpu",
                               "--calls", "3", "--out", str(tmp_path), *extra], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in next(tmp_path.glob("host-time-*.jsonl")).read_text().splitlines()]
    assert [(r["provider"], r["mode"], r["ops_direct"]) for r in rows] == [
        (provider, mode, direct) for direct in (True, False) for provider in ("triton-split", "triton")
        for mode in ("fwd", "full")]
    assert all(r["triton_null_gpu"] and r["triton_fast_launch"] and not r["triton_launches_stubbed"]
               and r["dtype"] == "bf16" and r["host_us"] > 0 for r in rows)


@pytest.mark.parametrize("argv, named", [
    (["--providers", "eager,tensorrt"], "'tensorrt'"),
    (["--modes", "bwd"], "'bwd'"),
    (["--calls", "0"], "expected a positive integer, got '0'"),
    (["--profile", "-1"], "--profile must be >= 0, got -1"),
    (["--device", "cpu", "--stub-triton"], "TRITON_INTERPRET=1"),
    (["--device", "cpu", "--null-gpu", "--stub-triton"], "--null-gpu is for --device cpu, without --stub-triton"),
    (["--device", "cpu", "--null-gpu"], "--null-gpu needs TRITON_INTERPRET unset"),
])
def test_host_time_bad_flags_name_the_value(argv, named, capsys, monkeypatch, tmp_path):
    from benchmarks.host_time import main

    if "--null-gpu" in argv:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit) as raised:
        main([*argv, "--out", str(tmp_path)])
    assert raised.value.code == 2
    assert named in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_kernel_profile_needs_cuda_and_names_bad_layers(capsys):
    from benchmarks.kernel_profile import main

    with pytest.raises(SystemExit) as raised:
        main(["--layers", "728->728@19"])
    assert raised.value.code == 2 and "needs a CUDA device" in capsys.readouterr().err
    for argv, named in ((["--layers", "no-such-layer"], "'no-such-layer'"), (["--modes", "bwd"], "'bwd'"),
                        (["--steps", "0"], "--steps: expected a positive integer, got '0'")):
        with pytest.raises(SystemExit):
            main(argv)
        assert named in capsys.readouterr().err
