"""The public API around the op: bad input, backend dispatch, the module."""

import copy
import warnings

import pytest
import torch
from conftest import require_backend
from torch import nn

import kernels
from kernels import dispatch


def tensors(channels=4, hidden=None, out_channels=6, kernel=3, size=8, dtype=torch.float32):
    hidden = hidden or channels
    return (torch.randn(2, channels, size, size, dtype=dtype), torch.randn(hidden, 1, kernel, kernel, dtype=dtype),
            torch.randn(out_channels, hidden, 1, 1, dtype=dtype))


BAD_INPUTS = [
    # (description, kwargs overriding the good call, error type, text the message must contain)
    ("input 2-D", dict(input=torch.randn(4, 8)), ValueError, "input"),
    ("input 5-D", dict(input=torch.randn(1, 2, 4, 8, 8)), ValueError, "input"),
    ("input not a tensor", dict(input=[[1.0]]), TypeError, "input"),
    ("integer input", dict(input=torch.ones(2, 4, 8, 8, dtype=torch.int64)), TypeError, "int64"),
    ("channel mismatch", dict(input=torch.randn(2, 5, 8, 8)), ValueError, "depthwise_weight"),
    ("depthwise not depthwise", dict(depthwise_weight=torch.randn(4, 2, 3, 3)), ValueError, "depthwise_weight"),
    ("depthwise 3-D", dict(depthwise_weight=torch.randn(4, 3, 3)), ValueError, "depthwise_weight"),
    ("depthwise empty kernel", dict(depthwise_weight=torch.randn(4, 1, 0, 3)), ValueError, "kh, kw >= 1"),
    ("pointwise not 1x1", dict(pointwise_weight=torch.randn(6, 4, 3, 3)), ValueError, "pointwise_weight"),
    ("pointwise wrong inputs", dict(pointwise_weight=torch.randn(6, 8, 1, 1)), ValueError, "pointwise_weight"),
    ("no input channels", dict(input=torch.randn(2, 0, 8, 8)), ValueError, "at least one channel"),
    ("no output channels", dict(pointwise_weight=torch.randn(0, 4, 1, 1)), ValueError, "C_out >= 1"),
    ("depthwise bias length", dict(depthwise_bias=torch.randn(5)), ValueError, "depthwise_bias"),
    ("pointwise bias length", dict(pointwise_bias=torch.randn(4)), ValueError, "pointwise_bias"),
    ("dtype mismatch", dict(pointwise_weight=torch.randn(6, 4, 1, 1, dtype=torch.float64)), TypeError,
     "pointwise_weight"),
    ("bias dtype mismatch", dict(depthwise_bias=torch.randn(4, dtype=torch.float64)), TypeError, "depthwise_bias"),
    ("device mismatch", dict(depthwise_weight=torch.randn(4, 1, 3, 3, device="meta")), ValueError, "meta"),
    ("output too small", dict(input=torch.randn(2, 4, 2, 2)), ValueError, "output size"),
    ("same with stride", dict(padding="same", stride=2), ValueError, "stride"),
    ("negative padding", dict(padding=-1), ValueError, "padding"),
    ("negative padding pair", dict(padding=(1, -2)), ValueError, "padding"),
    ("unknown padding string", dict(padding="full"), ValueError, "full"),
    ("zero stride", dict(stride=0), ValueError, "stride"),
    ("zero stride pair", dict(stride=(1, 0)), ValueError, "stride"),
    ("zero dilation", dict(dilation=0), ValueError, "dilation"),
    ("float stride", dict(stride=1.5), TypeError, "stride"),
    ("triple padding", dict(padding=(1, 1, 1)), TypeError, "padding"),
    ("unknown backend", dict(backend="cuda-magic"), ValueError, "cuda-magic"),
]


@pytest.mark.parametrize("description,override,error,text", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises(description, override, error, text):
    x, dw, pw = tensors()
    call = dict(input=x, depthwise_weight=dw, pointwise_weight=pw, depthwise_bias=None, pointwise_bias=None,
                stride=1, padding=0, dilation=1, backend="torch")
    call.update(override)
    with pytest.raises(error, match=None) as info:
        kernels.separable_conv2d(**call)
    assert text in str(info.value), f"message {str(info.value)!r} does not mention {text!r}"


def test_padding_same_and_valid_follow_pytorch():
    x, dw, pw = tensors(kernel=4, size=9)
    for padding in ("same", "valid", (2, 1)):
        out = kernels.separable_conv2d(x, dw, pw, padding=padding, dilation=(1, 2), backend="torch")
        ref = kernels.separable_conv2d_reference(x, dw, pw, padding=padding, dilation=(1, 2))
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref)
    assert kernels.separable_conv2d(x, dw, pw, padding="same", backend="torch").shape[-2:] == x.shape[-2:]


def test_available_backends_reports_reasons():
    report = kernels.available_backends()
    assert set(report) == {"torch", "cpp", "triton"}
    assert report["torch"] is None
    for name, reason in report.items():
        assert reason is None or (isinstance(reason, str) and reason), f"{name} needs a reason"


@pytest.fixture
def broken_backend(monkeypatch):
    """The cpp backend made to fail loading, with a known reason."""
    backend = copy.copy(dispatch.BACKENDS["cpp"])
    backend._state = "RuntimeError: no compiler in this test"
    monkeypatch.setitem(dispatch.BACKENDS, "cpp", backend)
    monkeypatch.setattr(dispatch, "_resolved", {})
    monkeypatch.setattr(dispatch, "_warned", set())
    return backend


def test_auto_falls_back_with_one_warning(broken_backend):
    x, dw, pw = tensors()
    with pytest.warns(RuntimeWarning, match="no compiler in this test"):
        kernels.separable_conv2d(x, dw, pw, backend="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels.separable_conv2d(x, dw, pw, backend="auto")
    assert dispatch.resolve("auto", x.device, x.dtype) == "torch"


def test_explicit_unavailable_backend_raises_with_reason(broken_backend):
    x, dw, pw = tensors()
    with pytest.raises(kernels.BackendUnavailableError, match="no compiler in this test"):
        kernels.separable_conv2d(x, dw, pw, backend="cpp")


def test_environment_variable_picks_backend(monkeypatch):
    monkeypatch.setattr(dispatch, "_resolved", {})
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert dispatch.resolve("auto", torch.device("cpu"), torch.float32) == "torch"
    monkeypatch.setenv(dispatch.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="nonsense"):
        dispatch.resolve("auto", torch.device("cpu"), torch.float32)


def test_auto_prefers_cpp_on_cpu_when_it_loads():
    reason = kernels.available_backends()["cpp"]
    expected = "cpp" if reason is None else "torch"
    assert dispatch.resolve("auto", torch.device("cpu"), torch.float32) in (expected,)


def test_triton_is_never_auto_on_cpu():
    assert dispatch.resolve("auto", torch.device("cpu"), torch.float32) != "triton"


# --- the module ---------------------------------------------------------------------------------

def test_module_initialises_like_the_conv2d_pair():
    torch.manual_seed(0)
    module = kernels.SeparableConv2d(8, 16, 3, padding=1, bias=True, depth_multiplier=2)
    torch.manual_seed(0)
    depthwise = nn.Conv2d(8, 16, 3, padding=1, groups=8, bias=True)
    pointwise = nn.Conv2d(16, 16, 1, bias=True)
    for mine, theirs in ((module.conv1, depthwise), (module.pointwise, pointwise)):
        assert torch.equal(mine.weight, theirs.weight) and torch.equal(mine.bias, theirs.bias)
    assert set(module.state_dict()) == {"conv1.weight", "conv1.bias", "pointwise.weight", "pointwise.bias"}
    module.reset_parameters()
    assert not torch.equal(module.conv1.weight, depthwise.weight)


def test_module_rejects_bad_arguments():
    with pytest.raises(ValueError, match="depth_multiplier"):
        kernels.SeparableConv2d(4, 4, 3, depth_multiplier=0)
    with pytest.raises(ValueError, match="backend"):
        kernels.SeparableConv2d(4, 4, 3, backend="fast")
    with pytest.raises(ValueError, match="in_channels"):
        kernels.SeparableConv2d(0, 4, 3)


@pytest.mark.parametrize("module", [kernels.SeparableConv2d, kernels.Conv2d])
@pytest.mark.parametrize("kwargs,match", [
    (dict(kernel_size=0), r"kernel_size must be >= 1 in every dimension, got 0"),
    (dict(kernel_size=(3, 0)), r"kernel_size must be >= 1 in every dimension, got \(3, 0\)"),
    (dict(stride=0), r"stride must be >= 1 in every dimension, got 0"),
    (dict(dilation=(1, 0)), r"dilation must be >= 1 in every dimension, got \(1, 0\)"),
    (dict(padding=-1), r"padding must be >= 0 in every dimension, got -1"),
], ids=["kernel 0", "kernel (3, 0)", "stride 0", "dilation (1, 0)", "padding -1"])
def test_modules_check_the_window_when_built(module, kwargs, match):
    """nn.Conv2d builds with a zero kernel or stride and fails only when called (oneDNN's message, or none:
    a 0x0 kernel ran); these modules say which argument is wrong when they are built."""
    arguments = dict(kernel_size=3)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        module(4, 4, **arguments)


@pytest.mark.parametrize("implementation", ["cpp", "triton", "triton_split"])
@pytest.mark.parametrize("window,match", [
    (dict(stride=[0, 1]), r"stride must be >= 1, got \[0, 1\]"),
    (dict(padding=[1, 1, -1, 1]), r"padding must be >= 0, got \[1, 1, -1, 1\]"),
    (dict(dilation=[1, 0]), r"dilation must be >= 1, got \[1, 0\]"),
    (dict(kernel=(0, 3)), r"the kernel must be at least 1x1, got 0x3"),
], ids=["stride 0", "padding -1", "dilation 0", "kernel 0x3"])
def test_ops_reject_a_bad_window_without_crashing(implementation, window, match):
    """The registered ops are public (torch.ops.sepconv_*) and skip separable_conv2d's checks; a zero stride
    divided by zero in the C++ kernels (the process died of SIGFPE), a 0x0 kernel returned zeros."""
    require_backend("triton" if implementation.startswith("triton") else implementation)
    op = getattr(torch.ops, f"sepconv_{implementation}")
    call = dict(stride=[1, 1], padding=[1, 1, 1, 1], dilation=[1, 1], kernel=(3, 3))
    call.update(window)
    x, go = torch.randn(1, 4, 6, 6), torch.randn(1, 6, 6, 6)
    dw, pw = torch.randn(4, 1, *call["kernel"]), torch.randn(6, 4, 1, 1)
    geometry = [call["stride"], call["padding"], call["dilation"]]
    with pytest.raises((RuntimeError, ValueError), match=match):
        op.forward.default(x, dw, pw, None, None, *geometry, False)
    with pytest.raises((RuntimeError, ValueError), match=match):
        op.backward.default(go, x, dw, pw, None, *geometry, False, [True, True, True, False, False])


def test_from_conv2d_converts_a_pair():
    depthwise = nn.Conv2d(6, 12, (3, 5), stride=2, padding=(1, 2), dilation=1, groups=6, bias=True)
    pointwise = nn.Conv2d(12, 7, 1, bias=False)
    module = kernels.SeparableConv2d.from_conv2d(depthwise, pointwise, backend="torch")
    x = torch.randn(2, 6, 13, 11)
    torch.testing.assert_close(module(x), pointwise(depthwise(x)))
    assert module.depth_multiplier == 2 and module.in_channels == 6 and module.out_channels == 7
    module.conv1.weight.data.zero_()
    assert depthwise.weight.abs().sum() > 0, "from_conv2d must copy, not share, the weights"


@pytest.mark.parametrize("depthwise,pointwise,text", [
    (nn.Conv2d(6, 6, 3, groups=3), nn.Conv2d(6, 4, 1), "groups"),
    (nn.Conv2d(6, 6, 3, groups=6), nn.Conv2d(6, 4, 3), "1x1"),
    (nn.Conv2d(6, 6, 3, groups=6), nn.Conv2d(5, 4, 1), "in_channels"),
    (nn.Linear(6, 6), nn.Conv2d(6, 4, 1), "nn.Conv2d"),
])
def test_from_conv2d_rejects(depthwise, pointwise, text):
    with pytest.raises((ValueError, TypeError), match=text):
        kernels.SeparableConv2d.from_conv2d(depthwise, pointwise)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding,kernel_size,dilation,relu_input", [
    (1, 3, 1, False),
    ((2, 1), (3, 5), (1, 2), True),
    ("same", (2, 4), (1, 3), False),  # asymmetric: the odd element on the right and the bottom
])
def test_module_padding_modes_match_the_conv2d_pair(backend, padding_mode, padding, kernel_size, dilation,
                                                     relu_input):
    """padding_mode as in nn.Conv2d: output and every gradient equal the nn.Conv2d pair's, in the
    input's memory format (F.pad returns circular padding contiguous)."""
    device = require_backend(backend)
    torch.manual_seed(0)
    module = kernels.SeparableConv2d(4, 6, kernel_size, padding=padding, dilation=dilation, bias=True,
                                     depth_multiplier=2, backend=backend, relu_input=relu_input,
                                     padding_mode=padding_mode).to(device)
    torch.manual_seed(0)
    depthwise = nn.Conv2d(4, 8, kernel_size, padding=padding, dilation=dilation, groups=4, bias=True,
                          padding_mode=padding_mode).to(device)
    pointwise = nn.Conv2d(8, 6, 1, bias=True).to(device)
    assert module.padding_mode == padding_mode and f"padding_mode={padding_mode!r}" in repr(module)
    x = torch.randn(2, 4, 9, 11, device=device).contiguous(memory_format=torch.channels_last)
    x_mine, x_pair = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = module(x_mine)
    expected = pointwise(depthwise(torch.relu(x_pair) if relu_input else x_pair))
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    grad = torch.randn_like(expected)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x_mine.grad, x_pair.grad, rtol=1e-4, atol=1e-4)
    for mine, theirs in ((module.conv1, depthwise), (module.pointwise, pointwise)):
        torch.testing.assert_close(mine.weight.grad, theirs.weight.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(mine.bias.grad, theirs.bias.grad, rtol=1e-4, atol=1e-4)
    unbatched = module(x[0])  # (C, H, W), as nn.Conv2d takes it
    torch.testing.assert_close(unbatched, expected[0].detach(), rtol=1e-4, atol=1e-4)


def test_module_rejects_an_unknown_padding_mode():
    with pytest.raises(ValueError, match="padding_mode.*'mirror'"):
        kernels.SeparableConv2d(4, 4, 3, padding=1, padding_mode="mirror")


def test_from_conv2d_keeps_the_padding_mode():
    depthwise = nn.Conv2d(6, 6, 3, groups=6, padding=1, padding_mode="reflect")
    pointwise = nn.Conv2d(6, 4, 1)
    module = kernels.SeparableConv2d.from_conv2d(depthwise, pointwise, backend="torch")
    assert module.padding_mode == "reflect"
    x = torch.randn(2, 6, 7, 7)
    torch.testing.assert_close(module(x), pointwise(depthwise(x)))


def _small_net(sepconv_factory):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        sepconv_factory(8, 16), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


def test_module_trains_like_the_conv2d_pair():
    """Same init, same data, same SGD: the losses of both networks stay equal and go down."""
    sep = _small_net(lambda c, o: kernels.SeparableConv2d(c, o, 3, padding=1, backend="auto"))
    pair = _small_net(lambda c, o: nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False),
                                                 nn.Conv2d(c, o, 1, bias=False)))
    generator = torch.Generator().manual_seed(1)
    data = torch.randn(16, 3, 12, 12, generator=generator)
    labels = torch.randint(0, 4, (16,), generator=generator)
    losses = {}
    for name, net in (("sep", sep), ("pair", pair)):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        losses[name] = []
        for _ in range(30):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(net(data.contiguous(memory_format=torch.channels_last)), labels)
            loss.backward()
            optimizer.step()
            losses[name].append(loss.item())
    torch.testing.assert_close(torch.tensor(losses["sep"]), torch.tensor(losses["pair"]), atol=1e-4, rtol=1e-4)
    assert losses["sep"][-1] < 0.6 * losses["sep"][0], losses["sep"]


def test_unbatched_and_empty_batch():
    module = kernels.SeparableConv2d(3, 5, 3, padding=1, backend="torch")
    assert module(torch.randn(3, 8, 8)).shape == (5, 8, 8)
    empty = module(torch.randn(0, 3, 8, 8, requires_grad=True))
    assert empty.shape == (0, 5, 8, 8)
    empty.sum().backward()


def test_autocast_runs_in_the_autocast_dtype():
    module = kernels.SeparableConv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), module(x), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_inference_calls_skip_autograd_and_match(backend):
    if kernels.available_backends()[backend]:
        pytest.skip(f"backend {backend!r} unavailable: {kernels.available_backends()[backend]}")
    x, dw, pw = tensors()
    dw.requires_grad_(True)
    recorded = kernels.separable_conv2d(x, dw, pw, padding=1, backend=backend)
    # torch in a plain eager call is the ATen pair under autograd (kernels.autograd.plain_eager)
    recorded_by = "ConvolutionBackward" if backend == "torch" else "SeparableConv2d"
    assert recorded.grad_fn is not None and recorded_by in type(recorded.grad_fn).__name__
    with torch.no_grad():
        plain = kernels.separable_conv2d(x, dw, pw, padding=1, backend=backend)
    with torch.inference_mode():
        inference = kernels.separable_conv2d(x, dw, pw, padding=1, backend=backend)
    untracked = kernels.separable_conv2d(x, dw.detach(), pw, padding=1, backend=backend)
    for out in (plain, inference, untracked):
        assert out.grad_fn is None and not out.requires_grad
        assert torch.equal(out, recorded.detach())


def test_meta_device_gives_shapes_like_the_conv2d_pair():
    module = kernels.SeparableConv2d(4, 6, 3, stride=2, padding=1, device="meta")
    x = torch.empty(2, 4, 9, 9, device="meta", requires_grad=True)
    out = module(x)
    pair = nn.Sequential(module.conv1, module.pointwise)(x)
    assert out.device.type == "meta" and out.shape == pair.shape == (2, 6, 5, 5)
    out.sum().backward()
    assert module.conv1.weight.grad.shape == module.conv1.weight.shape


def test_from_conv2d_refuses_a_subclass_that_computes_something_else():
    class ScaledConv2d(nn.Conv2d):
        def forward(self, input):
            return 2 * super().forward(input)

    class TaggedConv2d(nn.Conv2d):  # a subclass that computes what nn.Conv2d does is fine
        pass

    with pytest.raises(TypeError, match="ScaledConv2d.*overrides forward"):
        kernels.SeparableConv2d.from_conv2d(ScaledConv2d(4, 4, 3, groups=4), nn.Conv2d(4, 6, 1))
    kernels.SeparableConv2d.from_conv2d(TaggedConv2d(4, 4, 3, groups=4), TaggedConv2d(4, 6, 1))


def test_backend_warning_points_at_the_callers_line(monkeypatch):
    """bfloat16 on the CPU: "auto" skips the cpp backend with a warning that names this file, not kernels/."""
    x, dw, pw = tensors(dtype=torch.bfloat16)
    module = kernels.SeparableConv2d(4, 6, 3, dtype=torch.bfloat16)
    for call in (lambda: kernels.separable_conv2d(x, dw, pw), lambda: module(x)):
        monkeypatch.setattr(dispatch, "_warned", set())
        monkeypatch.setattr(dispatch, "_resolved", {})
        with pytest.warns(RuntimeWarning, match="backend 'cpp' skipped") as record:
            call()
        assert [w.filename for w in record if "skipped" in str(w.message)][0] == __file__


def test_pack_for_inference_same_bits_and_follows_the_weight(threads):
    """A module keeping its pointwise weight packed gives the unpacked results to the bit in no-grad calls,
    packs again when the weight changes through PyTorch, records graphs as before, and keeps the copy out
    of its state_dict, deep copies and pickles."""
    require_backend("cpp")
    torch.manual_seed(0)
    module = kernels.SeparableConv2d(24, 70, 3, padding=1, bias=True, backend="cpp")
    x = torch.randn(2, 24, 11, 11).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = module(x)
        assert module.pack_for_inference() is module
        assert torch.equal(module(x), expected)
        packed = module._packed
        assert packed is not None and torch.equal(module(x), expected) and module._packed is packed  # reused
        module.pointwise.weight.mul_(-2)  # an in-place update: packed again
        changed = module(x)
        assert module._packed is not packed
        module.pack_for_inference(False)
        assert module._packed is None and torch.equal(module(x), changed) and module._packed is None
        module.pack_for_inference()
        module.pointwise.weight = nn.Parameter(torch.randn_like(module.pointwise.weight))  # replaced
        replaced = module(x)
        module.pack_for_inference(False)
        assert torch.equal(module(x), replaced)
    module.pack_for_inference()
    y = module(x.requires_grad_())  # records a graph: the op with autograd, not the packed forward
    y.sum().backward()
    assert module._packed is None and x.grad is not None and module.pointwise.weight.grad is not None
    with torch.no_grad():
        module(x)
    assert module._packed is not None and list(module.state_dict()) == [
        "conv1.weight", "conv1.bias", "pointwise.weight", "pointwise.bias"]
    copied = copy.deepcopy(module)
    assert copied._packed is None and copied._pack
    with torch.no_grad():
        assert torch.equal(copied(x), module(x))


def test_pack_for_inference_is_ignored_off_cpp():
    module = kernels.SeparableConv2d(4, 6, 3, padding=1, backend="torch").pack_for_inference()
    with torch.no_grad():
        module(torch.randn(1, 4, 8, 8))
    assert module._packed is None


def test_pack_for_inference_skips_inference_tensor_weights():
    """Weights made under torch.inference_mode() count no changes, so nothing is packed for them (and
    nothing fails): such a module runs as unpacked."""
    require_backend("cpp")
    with torch.inference_mode():
        module = kernels.SeparableConv2d(8, 40, 3, padding=1, backend="cpp")
        x = torch.randn(2, 8, 10, 10)
        expected = module(x)
        module.pack_for_inference()
        assert torch.equal(module(x), expected) and module._packed is None
