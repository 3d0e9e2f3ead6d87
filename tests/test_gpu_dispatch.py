"""How ``backend="auto"`` chooses per layer: on CUDA the recorded table, the tuner, and the table's
builder; on CPU the tuner (cpp against the oneDNN pair).

The CUDA cases run without a GPU: what a CUDA device would report (capability, name) and
whether ``auto`` chooses per layer are small functions of ``kernels.gpu_dispatch``
that the tests stand in for, and the Triton candidates run on CPU tensors in
Triton's interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1`` there).
"""

import json
import logging
import shlex
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
from benchmarks import dispatch_table
from conftest import require_backend
from kernels import dispatch, gpu_dispatch

ROOT = Path(__file__).resolve().parents[1]
H200 = ((9, 0), "NVIDIA H200")


@pytest.fixture(autouse=True)
def fresh_dispatch(monkeypatch):
    """Empty caches and default settings before and after each test."""
    monkeypatch.setattr(dispatch, "_resolved_layers", {})
    monkeypatch.setattr(gpu_dispatch, "_tune_setting", None)
    monkeypatch.setattr(gpu_dispatch, "_timer", None)
    monkeypatch.delenv(gpu_dispatch.TUNE_ENV, raising=False)
    monkeypatch.delenv(dispatch.TRITON_MODE_ENV, raising=False)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    gpu_dispatch.clear_caches()
    yield
    gpu_dispatch.clear_caches()


@pytest.fixture
def gpu(monkeypatch):
    """CPU tensors (in Triton's interpreter) or CUDA tensors take the CUDA path of ``auto``, on a device
    that reports itself as an H200. TF32 off: results are compared with fp32 tolerances."""
    monkeypatch.setattr(gpu_dispatch, "shape_dispatch_applies", lambda device: True)
    monkeypatch.setattr(gpu_dispatch, "device_capability", lambda device: H200[0])
    monkeypatch.setattr(gpu_dispatch, "device_name", lambda device: H200[1])
    # Set and restored by hand: monkeypatch cannot restore torch.backends.cuda.matmul's flag.
    flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


class OpsRun(TorchDispatchMode):
    """Records the separable-conv ops that run (``sepconv_<implementation>::forward`` / ``::backward``)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name.startswith("sepconv_"):
            self.names.append(name)
        return func(*args, **(kwargs or {}))


def make_case(requires_grad=False, device="cpu"):
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(shape, generator=generator) for shape in ((2, 4, 6, 6), (4, 1, 3, 3), (5, 4, 1, 1))]
    return [t.to(device).requires_grad_(requires_grad) for t in tensors]


def layer_of_case(grad=False, batch=2):
    return gpu_dispatch.Layer(batch=batch, in_channels=4, out_channels=5, multiplier=1, height=6, width=6,
                              kernel=(3, 3), stride=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1),
                              depthwise_bias=False, pointwise_bias=False, relu_input=False, channels_last=False,
                              grad=grad)


def entry(choice, mode="fwd", **overrides):
    """A table entry for ``make_case``'s layer on the stand-in H200."""
    row = dict(device_class="sm_90 H200", dtype="fp32", mode=mode, layout="nchw", in_channels=4, out_channels=5,
               multiplier=1, height=6, width=6, kernel=3, stride=1, padding=1, dilation=1, batch_bucket=2,
               cudnn_allow_tf32=torch.backends.cudnn.allow_tf32, choice=choice,
               times_ms={"torch": 1.0}, source="test", run_id="test-run")
    row.update(overrides)
    return row


@pytest.fixture
def write_table(monkeypatch, tmp_path):
    def write(*entries):
        path = tmp_path / "table.json"
        path.write_text(json.dumps({"format": gpu_dispatch.TABLE_FORMAT, "entries": list(entries)}))
        monkeypatch.setattr(gpu_dispatch, "TABLE_PATH", path)
        gpu_dispatch.clear_caches()
        return path
    return write


def reference(x, dw, pw):
    return kernels.separable_conv2d_reference(x, dw, pw, padding=1)


# --- the device class ------------------------------------------------------------------------

@pytest.mark.parametrize("name, family", [
    ("NVIDIA H200", "H200"), ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA A100-SXM4-80GB", "A100"),
    ("Tesla V100-SXM2-16GB", "V100"), ("NVIDIA GeForce RTX 4090", "RTX 4090"), ("NVIDIA L40S", "L40S"),
    ("NVIDIA GH200 480GB", "GH200"), ("Some Accelerator", "Some Accelerator"),
])
def test_name_family(name, family):
    assert gpu_dispatch.name_family(name) == family


def test_device_class_names_capability_and_model():
    assert gpu_dispatch.device_class_of((9, 0), "NVIDIA H100 80GB HBM3") == "sm_90 H100"
    assert gpu_dispatch.device_class_of((8, 6), "NVIDIA GeForce RTX 3090") == "sm_86 RTX 3090"


@pytest.mark.parametrize("batch, bucket", [(1, 1), (2, 2), (3, 4), (22, 16), (23, 32), (32, 32), (45, 32), (46, 64)])
def test_batch_bucket(batch, bucket):
    assert gpu_dispatch.batch_bucket(batch) == bucket


# --- the recorded table ----------------------------------------------------------------------

def test_committed_table_is_what_the_builder_makes_from_its_sources(tmp_path):
    """The table is regenerated from recorded results by the command it names, never edited by hand."""
    committed = json.loads(gpu_dispatch.TABLE_PATH.read_text())
    command = shlex.split(committed["generated_by"])
    assert command[:3] == ["python", "-m", "benchmarks.dispatch_table"]
    arguments = [str(ROOT / a) if (ROOT / a).is_file() else a for a in command[3:]]
    out = tmp_path / "table.json"
    assert dispatch_table.main(arguments + ["--out", str(out)]) == 0
    rebuilt = json.loads(out.read_text())
    assert rebuilt["entries"] == committed["entries"]
    assert committed["entries"], "the committed table has no entries"
    assert gpu_dispatch.read_table(gpu_dispatch.TABLE_PATH)


def test_auto_runs_what_the_table_recorded(gpu, write_table):
    device = require_backend("triton")
    write_table(entry("triton_split", mode="fwd"), entry("triton", mode="full"))
    with OpsRun() as ops:
        out = kernels.separable_conv2d(*make_case(device=device), padding=1)
    assert ops.names == ["sepconv_triton_split::forward"]
    torch.testing.assert_close(out.cpu(), reference(*make_case()), atol=1e-4, rtol=1e-4)

    leaves = make_case(requires_grad=True, device=device)
    with OpsRun() as ops:  # a call that needs gradients is chosen by the forward + backward entry
        kernels.separable_conv2d(*leaves, padding=1).sum().backward()
    # A recorded graph whose pointwise weight needs a gradient runs the triton pair that keeps the
    # depthwise result (kernels.autograd.SeparableConv2dKeepingHidden); the namespace says which mode.
    assert ops.names == ["sepconv_triton::forward_keeping_hidden", "sepconv_triton::backward_from_hidden"]
    expected = make_case(requires_grad=True)
    reference(*expected).sum().backward()
    for leaf, want in zip(leaves, expected):
        torch.testing.assert_close(leaf.grad.cpu(), want.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:separable_conv2d. backend 'cpp' skipped:RuntimeWarning")
@pytest.mark.parametrize("case", ["other device class", "other batch bucket", "other layout", "other TF32 flag",
                                  "other dtype"])
def test_auto_runs_cudnn_where_the_table_has_no_measurement(gpu, write_table, monkeypatch, case):
    device = require_backend("triton")
    layer, dtype = layer_of_case(), torch.float32
    write_table(entry("triton"))
    assert dispatch.resolve("auto", device, dtype, layer) == "triton"
    dispatch._resolved_layers.clear()
    if case == "other device class":
        monkeypatch.setattr(gpu_dispatch, "device_name", lambda device: "NVIDIA H100 80GB HBM3")
    elif case == "other batch bucket":
        layer = layer_of_case(batch=8)
    elif case == "other layout":
        layer = layer._replace(channels_last=True)
    elif case == "other TF32 flag":
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", not torch.backends.cudnn.allow_tf32)
    else:
        dtype = torch.bfloat16
    assert dispatch.resolve("auto", device, dtype, layer) == "torch"


def test_table_choice_that_cannot_run_falls_back_to_cudnn(gpu, write_table, monkeypatch):
    write_table(entry("triton"))
    monkeypatch.setattr(dispatch.BACKENDS["triton"], "_state", "ImportError: no triton here")
    with pytest.warns(RuntimeWarning, match="the dispatch table chose triton .* cannot run here"):
        assert dispatch.resolve("auto", torch.device("cpu"), torch.float32, layer_of_case()) == "torch"


def test_triton_mode_setting_limits_auto_to_that_mode(gpu, write_table, monkeypatch):
    device = require_backend("triton")
    write_table(entry("triton"))
    monkeypatch.setenv(dispatch.TRITON_MODE_ENV, "split")
    with pytest.warns(RuntimeWarning, match="candidates \\['torch', 'triton_split'\\]"):
        assert dispatch.resolve("auto", device, torch.float32, layer_of_case()) == "torch"
    monkeypatch.setenv(dispatch.TRITON_MODE_ENV, "fused")
    assert dispatch.resolve("auto", device, torch.float32, layer_of_case()) == "triton"
    monkeypatch.setenv(dispatch.TRITON_MODE_ENV, "fast")
    with pytest.raises(ValueError, match="SEPCONV_TRITON_MODE='fast'"):
        dispatch.resolve("auto", device, torch.float32, layer_of_case())


def test_named_backends_ignore_the_table(gpu, write_table):
    device = require_backend("triton")
    write_table(entry("triton_split"))
    for name in ("torch", "triton"):
        assert dispatch.resolve(name, device, torch.float32, layer_of_case()) == name


def test_backend_variable_naming_a_backend_bypasses_the_table(gpu, write_table, monkeypatch):
    device = require_backend("triton")
    write_table(entry("triton_split"))
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert dispatch.resolve("auto", device, torch.float32, layer_of_case()) == "torch"
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")
    assert dispatch.resolve("auto", device, torch.float32, layer_of_case()) == "triton_split"


def test_malformed_table_is_a_clear_error(tmp_path):
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"format": gpu_dispatch.TABLE_FORMAT, "entries": [entry("cudnn")]}))
    with pytest.raises(gpu_dispatch.TableError, match="entry 0 has choice 'cudnn'"):
        gpu_dispatch.read_table(path)
    path.write_text("{not json")
    with pytest.raises(gpu_dispatch.TableError, match=str(path)):
        gpu_dispatch.read_table(path)


def test_unreadable_table_warns_and_runs_cudnn(gpu, monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_dispatch, "TABLE_PATH", tmp_path / "missing.json")
    with pytest.warns(RuntimeWarning, match="missing.json"):
        assert dispatch.resolve("auto", torch.device("cpu"), torch.float32, layer_of_case()) == "torch"


def test_layer_is_passed_on_cuda_only(monkeypatch, gpu):
    """The CPU path of auto resolves as before: no layer, no table."""
    seen = []
    resolve = dispatch.resolve

    def spy(backend, device, dtype, layer=None):
        seen.append(layer)
        return resolve(backend, device, dtype, layer)

    monkeypatch.setattr(kernels.functional, "resolve", spy)
    monkeypatch.setattr(gpu_dispatch, "shape_dispatch_applies", lambda device: device.type == "cuda")
    kernels.separable_conv2d(*make_case(), padding=1)
    assert seen == [None]
    monkeypatch.setattr(gpu_dispatch, "shape_dispatch_applies", lambda device: True)
    monkeypatch.setattr(gpu_dispatch, "TABLE_PATH", Path("/nonexistent/table.json"))
    with pytest.warns(RuntimeWarning, match="table.json"):
        kernels.separable_conv2d(*make_case(requires_grad=True), padding=1)
    assert seen[1] == tuple(layer_of_case(grad=True))


# --- the tuner -------------------------------------------------------------------------------

def fake_timer(times, calls):
    """A timer that runs each candidate once (it must work) and reports ``times[name]`` milliseconds."""
    def timer(name, call):
        call()
        calls.append(name)
        return times[name]
    return timer


def test_tuner_times_each_candidate_once_and_runs_the_fastest(gpu, caplog):
    device = require_backend("triton")
    calls = []
    kernels.tune(True, timer=fake_timer({"torch": 3.0, "triton": 1.0, "triton_split": 2.0}, calls))
    x, dw, pw = make_case(device=device)
    with caplog.at_level(logging.INFO, logger="kernels.gpu_dispatch"), OpsRun() as ops:
        first = kernels.separable_conv2d(x, dw, pw, padding=1)
        second = kernels.separable_conv2d(x, dw, pw, padding=1)
    assert sorted(calls) == ["torch", "triton", "triton_split"]  # timed once, then the cached choice
    assert ops.names[-2:] == ["sepconv_triton::forward", "sepconv_triton::forward"]
    torch.testing.assert_close(first.cpu(), reference(*make_case()), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(second, first)
    logged = [r.getMessage() for r in caplog.records if "separable_conv2d auto" in r.getMessage()]
    assert len(logged) == 1 and logged[0].startswith("separable_conv2d auto: triton for 4->5@6x6")
    (measured,) = gpu_dispatch.tuned_choices().values()
    assert measured == {"times_ms": {"torch": 3.0, "triton": 1.0, "triton_split": 2.0}, "choice": "triton"}


def test_tuner_keys_on_gradients_and_keeps_results_correct(gpu):
    device = require_backend("triton")
    calls = []
    kernels.tune(True, timer=fake_timer({"torch": 3.0, "triton": 2.0, "triton_split": 1.0}, calls))
    leaves = make_case(requires_grad=True, device=device)
    with OpsRun() as ops:
        out = kernels.separable_conv2d(*leaves, padding=1)
        out.sum().backward()
    assert sorted(calls) == ["torch", "triton", "triton_split"]
    assert ops.names[-2:] == ["sepconv_triton_split::forward_keeping_hidden",
                              "sepconv_triton_split::backward_from_hidden"]
    expected = make_case(requires_grad=True)
    want = reference(*expected)
    want.sum().backward()
    torch.testing.assert_close(out.cpu(), want, atol=1e-4, rtol=1e-4)
    for leaf, reference_leaf in zip(leaves, expected):
        torch.testing.assert_close(leaf.grad.cpu(), reference_leaf.grad, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # no gradients: another layer, timed again
        kernels.separable_conv2d(*leaves, padding=1)
    assert len(calls) == 6


def test_tuner_ties_go_to_cudnn_and_a_failing_candidate_is_skipped(gpu):
    device = require_backend("triton")

    def timer(name, call):
        if name == "triton":
            raise RuntimeError("out of shared memory")
        return 1.0

    kernels.tune(True, timer=timer)
    with pytest.warns(RuntimeWarning, match="tuner: triton could not run .*out of shared memory"):
        assert dispatch.resolve("auto", device, torch.float32, layer_of_case()) == "torch"
    (measured,) = gpu_dispatch.tuned_choices().values()
    assert measured["times_ms"]["triton"] == "RuntimeError: out of shared memory"


def test_tuner_from_the_environment(gpu, monkeypatch):
    device = require_backend("triton")
    calls = []
    monkeypatch.setattr(gpu_dispatch, "_timer", fake_timer({"torch": 1.0, "triton": 5.0, "triton_split": 2.0}, calls))
    monkeypatch.setenv(gpu_dispatch.TUNE_ENV, "1")
    assert dispatch.resolve("auto", device, torch.float32, layer_of_case()) == "torch"
    assert len(calls) == 3
    kernels.tune(False)  # the function overrides the variable: back to the table
    assert not gpu_dispatch.tuning_enabled()


@pytest.mark.parametrize("value", ["yes", "2", "true"])
def test_bad_tune_setting_names_the_variable(gpu, monkeypatch, value):
    monkeypatch.setenv(gpu_dispatch.TUNE_ENV, value)
    with pytest.raises(ValueError, match=f"SEPCONV_TUNE={value!r} is not valid"):
        kernels.separable_conv2d(*make_case(), padding=1)
    with pytest.raises(TypeError, match="tune\\(enabled=...\\) must be a bool, got 'on'"):
        kernels.tune("on")


def test_tuner_leaves_the_random_state_alone(gpu):
    device = require_backend("triton")
    kernels.tune(True, timer=fake_timer({"torch": 1.0, "triton": 1.0, "triton_split": 1.0}, []))
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    dispatch.resolve("auto", device, torch.float32, layer_of_case(grad=True))
    assert torch.equal(torch.rand(3), expected)


def test_compile_fullgraph_with_the_tuner(gpu):
    """Under torch.compile the choice is made at trace time and kept as a constant (no graph break)."""
    device = require_backend("triton")
    calls = []
    kernels.tune(True, timer=fake_timer({"torch": 3.0, "triton": 2.0, "triton_split": 1.0}, calls))
    x, dw, pw = make_case(device=device)

    def fn(x, dw, pw):
        return kernels.separable_conv2d(x, dw, pw, padding=1, relu_input=True)

    torch._dynamo.reset()
    out = torch.compile(fn, fullgraph=True, backend="eager")(x, dw, pw)
    assert sorted(calls) == ["torch", "triton", "triton_split"]
    expected = kernels.separable_conv2d_reference(*make_case(), padding=1, relu_input=True)
    torch.testing.assert_close(out.cpu(), expected, atol=1e-4, rtol=1e-4)


# --- the tuner on CPU: cpp against the oneDNN pair -------------------------------------------

@pytest.fixture
def cpu_auto_takes_cpp(monkeypatch):
    """``auto`` takes cpp on CPU here (as on any CPU its build has a vector path for)."""
    require_backend("cpp")
    monkeypatch.setattr(dispatch.BACKENDS["cpp"], "auto_check", lambda: None)
    monkeypatch.setattr(dispatch, "_resolved", {})


def test_cpu_tuner_keeps_the_faster_per_layer(cpu_auto_takes_cpp, caplog):
    calls, times = [], {"torch": 2.0, "cpp": 1.0}
    kernels.tune(True, timer=fake_timer(times, calls))
    x, dw, pw = make_case()
    with caplog.at_level(logging.INFO, logger="kernels.gpu_dispatch"), OpsRun() as ops:
        first = kernels.separable_conv2d(x, dw, pw, padding=1)
        kernels.separable_conv2d(x, dw, pw, padding=1)
    assert calls == ["torch", "cpp"]  # timed once for the layer, then the cached choice
    assert ops.names[-2:] == ["sepconv_cpp::forward", "sepconv_cpp::forward"]
    torch.testing.assert_close(first, reference(x, dw, pw), atol=1e-5, rtol=1e-5)
    times["cpp"] = 3.0  # another layer (a larger batch), where the oneDNN pair measures faster
    wide = torch.cat([x, x])
    with OpsRun() as ops:
        out = kernels.separable_conv2d(wide, dw, pw, padding=1)
        kernels.separable_conv2d(x, dw, pw, padding=1)  # the first layer keeps its choice
    assert calls == ["torch", "cpp"] * 2
    assert ops.names[-2:] == ["sepconv_torch::forward", "sepconv_cpp::forward"]  # after the timed calls
    torch.testing.assert_close(out, reference(wide, dw, pw), atol=1e-5, rtol=1e-5)
    logged = [r.getMessage() for r in caplog.records if "separable_conv2d auto" in r.getMessage()]
    assert logged == [("separable_conv2d auto: cpp for 4->5@6x6 k3x3 s1 M1 N2 fp32 nchw forward on cpu "
                       "(tuned: torch 2.000 ms, cpp 1.000 ms)")]
    choices = gpu_dispatch.tuned_choices()
    key = ("cpu", None, torch.float32, layer_of_case(), torch.get_num_threads())
    assert choices[key] == {"times_ms": {"torch": 2.0, "cpp": 1.0}, "choice": "cpp"}
    assert {value["choice"] for value in choices.values()} == {"cpp", "torch"}


def test_cpu_tuner_keys_on_gradients_and_threads(cpu_auto_takes_cpp, threads):
    calls = []
    kernels.tune(True, timer=fake_timer({"torch": 1.0, "cpp": 2.0}, calls))
    leaves = make_case(requires_grad=True)
    with OpsRun() as ops:
        out = kernels.separable_conv2d(*leaves, padding=1)
        out.sum().backward()
    assert calls == ["torch", "cpp"]
    assert ops.names[-2:] == ["sepconv_torch::forward_keeping_hidden", "sepconv_torch::backward_from_hidden"]
    expected = make_case(requires_grad=True)
    reference(*expected).sum().backward()
    for leaf, reference_leaf in zip(leaves, expected):
        torch.testing.assert_close(leaf.grad, reference_leaf.grad, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # no graph: the forward alone, timed as a layer of its own
        kernels.separable_conv2d(*leaves, padding=1)
    assert len(calls) == 4
    torch.set_num_threads(1 if torch.get_num_threads() > 1 else 2)  # speeds differ: timed again
    with torch.no_grad():
        kernels.separable_conv2d(*leaves, padding=1)
    assert len(calls) == 6


def test_cpu_tuner_times_nothing_where_auto_would_not_take_cpp(cpu_auto_takes_cpp, monkeypatch):
    calls = []
    kernels.tune(True, timer=fake_timer({"torch": 2.0, "cpp": 1.0}, calls))
    x, dw, pw = make_case()
    with OpsRun() as ops:
        kernels.separable_conv2d(x, dw, pw, padding=1, backend="torch")  # a backend named: no tuning
        monkeypatch.setenv(dispatch.ENV_VAR, "torch")  # the variable names one: no tuning
        kernels.separable_conv2d(x, dw, pw, padding=1)
        monkeypatch.delenv(dispatch.ENV_VAR)
        # A build without a vector path for this CPU: auto runs torch, untimed.
        monkeypatch.setattr(dispatch.BACKENDS["cpp"], "auto_check", lambda: "no vector path (test)")
        monkeypatch.setattr(dispatch, "_resolved", {})
        with pytest.warns(RuntimeWarning, match="no vector path"):
            kernels.separable_conv2d(x, dw, pw, padding=1)
    assert calls == [] and ops.names == ["sepconv_torch::forward"] * 3


def test_cpu_tuner_off_runs_cpp_and_builds_no_layer(cpu_auto_takes_cpp, monkeypatch):
    calls, seen = [], []
    resolve = dispatch.resolve

    def spy(backend, device, dtype, layer=None):
        seen.append(layer)
        return resolve(backend, device, dtype, layer)

    monkeypatch.setattr(kernels.functional, "resolve", spy)
    monkeypatch.setattr(gpu_dispatch, "_timer", fake_timer({"torch": 1.0, "cpp": 2.0}, calls))
    with OpsRun() as ops:
        kernels.separable_conv2d(*make_case(), padding=1)
        monkeypatch.setenv(gpu_dispatch.TUNE_ENV, "1")
        kernels.separable_conv2d(*make_case(), padding=1)
    assert seen == [None, tuple(layer_of_case())]
    assert (ops.names[0], ops.names[-1]) == ("sepconv_cpp::forward", "sepconv_torch::forward")
    assert calls == ["torch", "cpp"]
    monkeypatch.setenv(gpu_dispatch.TUNE_ENV, "on")
    with pytest.raises(ValueError, match="SEPCONV_TUNE='on' is not valid"):
        kernels.separable_conv2d(*make_case(), padding=1)


@pytest.mark.parametrize("budget_s, rounds", [(0.0, gpu_dispatch.TUNE_MIN_CPU_CALLS),
                                              (60.0, gpu_dispatch.TUNE_TIMED_CALLS)])
def test_cpu_round_times_alternate_the_candidates(monkeypatch, budget_s, rounds):
    monkeypatch.setattr(gpu_dispatch, "TUNE_CPU_SECONDS", budget_s)
    order = []
    times = gpu_dispatch.cpu_round_times({"torch": lambda: order.append("torch"), "cpp": lambda: order.append("cpp")},
                                         on_error=pytest.fail)
    # An untimed round, then `rounds` timed ones, the order reversed every other round.
    expected = ["torch", "cpp"] + [name for r in range(rounds) for name in (("cpp", "torch") if r % 2 else
                                                                            ("torch", "cpp"))]
    assert order == expected
    assert sorted(times) == ["cpp", "torch"] and all(0.0 <= ms < 50.0 for ms in times.values())


def test_cpu_round_times_drop_a_failing_candidate(cpu_auto_takes_cpp, monkeypatch):
    monkeypatch.setattr(gpu_dispatch, "TUNE_CPU_SECONDS", 0.0)
    calls = {"cpp": 0}

    def cpp():
        calls["cpp"] += 1
        if calls["cpp"] == 2:
            raise RuntimeError("cpp failed (test)")

    errors = []
    times = gpu_dispatch.cpu_round_times({"torch": lambda: None, "cpp": cpp},
                                         on_error=lambda name, error: errors.append((name, str(error))))
    assert list(times) == ["torch"] and errors == [("cpp", "cpp failed (test)")] and calls["cpp"] == 2
    # Through the tuner: the failure is a warning and the layer runs torch.
    real = gpu_dispatch.candidate_call

    def failing_cpp(implementation, *args):
        call = real(implementation, *args)
        if implementation != "cpp":
            return call

        def broken():
            raise RuntimeError("cpp failed (test)")
        return broken

    monkeypatch.setattr(gpu_dispatch, "candidate_call", failing_cpp)
    kernels.tune(True)
    with pytest.warns(RuntimeWarning, match="tuner: cpp could not run .*cpp failed"):
        assert dispatch.resolve("auto", torch.device("cpu"), torch.float32, layer_of_case()) == "torch"


def test_cpu_tuner_with_the_host_clock(cpu_auto_takes_cpp):
    kernels.tune(True)
    generator = torch.Generator().manual_seed(0)
    x, dw, pw = (torch.randn(shape, generator=generator) for shape in ((2, 32, 12, 12), (32, 1, 3, 3), (48, 32, 1, 1)))
    x = x.contiguous(memory_format=torch.channels_last)
    out = kernels.separable_conv2d(x, dw, pw, padding=1)
    (measured,) = gpu_dispatch.tuned_choices().values()
    times = measured["times_ms"]
    assert sorted(times) == ["cpp", "torch"]
    assert all(isinstance(ms, float) and ms > 0 for ms in times.values()), times
    assert measured["choice"] == min(times, key=lambda name: (times[name], name != "torch"))
    torch.testing.assert_close(out, reference(x, dw, pw), atol=1e-4, rtol=1e-4)


# --- the table's builder ---------------------------------------------------------------------

def result_row(provider, p50, mode="fwd", dtype="bf16", run_id="run-a", utc="2026-01-01T00:00:00+00:00", **extra):
    run = {"run_id": run_id, "utc_time": utc, "device": "cuda", "gpu_model": "NVIDIA H100 80GB HBM3",
           "gpu_capability": "sm_90", "torch_version": "2.11", "triton_version": "3.6", "git_commit": "abc",
           "peak_detail": {"cudnn_allow_tf32": 1.0, "matmul_allow_tf32": 0.0}}
    row = {"suite": "layers", "cin": 64, "cout": 128, "h": 147, "w": 147, "k": 3, "stride": 1, "batch": 32,
           "dtype": dtype, "layout": "channels_last", "mode": mode, "provider": provider, "status": "ok",
           "p50_ms": p50, "run": run}
    row.update(extra)
    return ("results.jsonl", row)


def test_builder_chooses_triton_only_past_the_margin():
    entry_full, entry_fwd = dispatch_table.build_entries([
        result_row("eager", 1.0), result_row("triton", 0.9), result_row("triton-split", 0.97),
        result_row("eager", 1.0, mode="full"), result_row("triton", 0.97, mode="full"),
    ])
    assert (entry_fwd["mode"], entry_fwd["choice"]) == ("fwd", "triton")
    assert entry_fwd["times_ms"] == {"torch": 1.0, "triton": 0.9, "triton_split": 0.97}
    assert entry_fwd["device_class"] == "sm_90 H100" and entry_fwd["torch_provider"] == "eager"
    assert (entry_full["mode"], entry_full["choice"]) == ("full", "torch")  # 3% faster: within the noise


def test_builder_takes_one_run_per_key_and_prefers_the_torch_provider():
    entries = dispatch_table.build_entries([
        result_row("eager", 1.0), result_row("triton", 0.5),
        result_row("eager", 1.2, run_id="run-b", utc="2026-02-01T00:00:00+00:00"),
        result_row("torch", 1.1, run_id="run-b", utc="2026-02-01T00:00:00+00:00"),
        result_row("triton", 1.5, run_id="run-b", utc="2026-02-01T00:00:00+00:00"),
        result_row("triton", 0.1, run_id="run-c", utc="2026-03-01T00:00:00+00:00"),  # no cuDNN time: unused
    ])
    (only,) = entries
    assert only["run_id"] == "run-b" and only["times_ms"] == {"torch": 1.1, "triton": 1.5}
    assert only["torch_provider"] == "torch" and only["choice"] == "torch"


@pytest.mark.parametrize("recorded", ["field", "argv"])
def test_builder_leaves_out_runs_timed_through_cuda_graphs(recorded):
    """auto runs plain calls: a graph-timed run (no launch overhead) says nothing about what it would choose."""
    graph_rows = [result_row("eager", 1.0, run_id="run-g", utc="2026-02-01T00:00:00+00:00"),
                  result_row("triton-split", 0.5, run_id="run-g", utc="2026-02-01T00:00:00+00:00")]
    for _, row in graph_rows:
        if recorded == "field":
            row["run"]["cuda_graphs"] = True
        else:  # runs from before the field: the command line says it
            row["run"]["argv"] = "python -m benchmarks --device cuda --cuda-graphs --out /tmp/g"
    (entry,) = dispatch_table.build_entries([result_row("eager", 1.0), result_row("triton-split", 2.0), *graph_rows])
    assert entry["run_id"] == "run-a" and entry["choice"] == "torch"
    _, plain = result_row("eager", 1.0)
    plain["run"]["cuda_graphs"] = False
    plain["run"]["argv"] = "python -m benchmarks --cuda-graphs"  # the recorded field wins over the command line
    assert dispatch_table.build_entries([("results.jsonl", plain)])[0]["run_id"] == "run-a"


def test_builder_records_tf32_flags_and_skips_fp32_rows_without_them():
    row_flags = dispatch_table.build_entries([
        result_row("eager", 1.0, dtype="fp32", cudnn_allow_tf32=False, matmul_allow_tf32=False),
        result_row("triton", 2.0, dtype="fp32", cudnn_allow_tf32=False, matmul_allow_tf32=False)])
    assert [(e["cudnn_allow_tf32"], e["tf32_flags_from"]) for e in row_flags] == [(False, "row")]
    _, no_flags = result_row("eager", 1.0, dtype="fp32")
    no_flags["run"]["peak_detail"] = {}
    assert dispatch_table.build_entries([("results.jsonl", no_flags)]) == []


def test_builder_needs_the_capability():
    _, row = result_row("eager", 1.0)
    del row["run"]["gpu_capability"]
    with pytest.raises(ValueError, match="pass --capability"):
        dispatch_table.build_entries([("results.jsonl", row)])
    (built,) = dispatch_table.build_entries([("results.jsonl", row)], capability="sm_80")
    assert built["device_class"] == "sm_80 H100"
    (recorded,) = dispatch_table.build_entries([result_row("eager", 1.0)], capability="sm_80")
    assert recorded["device_class"] == "sm_90 H100"  # the run's own record wins
    with pytest.raises(ValueError, match="--capability must look like sm_90"):
        dispatch_table.build_entries([("results.jsonl", row)], capability="hopper")


def test_builder_output_is_read_back_by_the_dispatcher(tmp_path):
    results = tmp_path / "cuda.jsonl"
    results.write_text("".join(json.dumps(row) + "\n" for _, row in (
        result_row("eager", 1.0), result_row("triton-split", 0.5))))
    out = tmp_path / "table.json"
    assert dispatch_table.main([str(results), "--out", str(out)]) == 0
    (key, stored), = gpu_dispatch.read_table(out).items()
    layer = gpu_dispatch.Layer(batch=32, in_channels=64, out_channels=128, multiplier=1, height=147, width=147,
                               kernel=(3, 3), stride=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1),
                               depthwise_bias=False, pointwise_bias=False, relu_input=True, channels_last=True,
                               grad=False)
    assert gpu_dispatch.layer_table_key("sm_90 H100", torch.bfloat16, layer, True) == key
    assert stored["choice"] == "triton_split"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="times the candidates with CUDA events: needs a GPU")
def test_tuner_with_cuda_events_on_this_gpu():
    require_backend("triton", torch.bfloat16)
    kernels.tune(True)
    generator = torch.Generator().manual_seed(0)
    x, dw, pw = (torch.randn(shape, generator=generator) for shape in ((8, 64, 28, 28), (64, 1, 3, 3), (96, 64, 1, 1)))
    x = x.contiguous(memory_format=torch.channels_last)
    out = kernels.separable_conv2d(*(t.to("cuda", torch.bfloat16) for t in (x, dw, pw)), padding=1)
    (measured,) = gpu_dispatch.tuned_choices().values()
    times = measured["times_ms"]
    assert sorted(times) == ["torch", "triton", "triton_split"]
    assert all(isinstance(ms, float) and ms > 0 for ms in times.values()), times
    assert measured["choice"] == min(times, key=times.get)
    torch.testing.assert_close(out.float().cpu(), reference(x, dw, pw), atol=0.1, rtol=0.05)


# --- the benchmark's providers ---------------------------------------------------------------

def test_auto_provider_times_what_a_user_gets():
    from benchmarks import providers
    from benchmarks.cases import TINY_LAYERS, Case

    assert providers.backend_and_mode("auto") == ("auto", None)
    assert providers.availability("layers", "auto", "cpu", "fp32") is None
    assert providers.availability("model", "auto-unfused", "cpu", "fp32") is None
    for mode in ("fwd", "full"):
        prepared = providers.prepare(Case("layers", TINY_LAYERS[0], 2, "fp32", "channels_last", mode, "auto"), "cpu")
        assert prepared.fn() is not None


def test_triton_provider_runs_fused_whatever_the_variable_says(monkeypatch):
    import os

    from benchmarks import providers
    from benchmarks.cases import TINY_LAYERS, Case

    monkeypatch.setenv(dispatch.TRITON_MODE_ENV, "split")
    seen = []
    monkeypatch.setattr(providers, "prepare_layer", lambda case, device: providers.Prepared(
        lambda: seen.append(os.environ.get(dispatch.TRITON_MODE_ENV))))
    providers.prepare(Case("layers", TINY_LAYERS[0], 2, "fp32", "channels_last", "fwd", "triton"), "cpu").fn()
    assert seen == ["fused"] and os.environ[dispatch.TRITON_MODE_ENV] == "split"
