"""kernels.BatchNorm2d / kernels.batch_norm: the cpp backend's training-mode BatchNorm.

Against nn.BatchNorm2d (output, the three gradients, running statistics, num_batches_tracked)
and a float64 computation; which calls take the kernel and which fall back to F.batch_norm;
determinism; the op contract (opcheck, errors).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kernels
from conftest import require_backend


def _input(shape, dtype, seed=0, layout=torch.channels_last):
    g = torch.Generator().manual_seed(seed)
    # An offset mean, so a sum-of-squares variance would lose digits that deviations from a mean keep.
    x = torch.randn(shape, generator=g, dtype=dtype) * 3 + 20
    return x.contiguous(memory_format=layout)


def _pair(channels, dtype, seed=1, **kwargs):
    reference = nn.BatchNorm2d(channels, dtype=dtype, **kwargs)
    if reference.affine:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            reference.weight.copy_(torch.rand(channels, generator=g, dtype=dtype) + 0.5)
            reference.bias.copy_(torch.randn(channels, generator=g, dtype=dtype))
    ours = kernels.BatchNorm2d(channels, dtype=dtype, backend="cpp", **kwargs)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def _step(module, x, grad):
    x = x.detach().clone().requires_grad_(True)
    out = module(x)
    out.backward(grad)
    params = {name: p.grad for name, p in module.named_parameters()}
    return out.detach(), x.grad, params


def _float64_truth(x, weight, bias, eps, grad):
    """Batch-statistics BatchNorm and its gradients, computed in float64 from the definition."""
    x = x.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True) if weight is not None else None
    b = bias.detach().double().requires_grad_(True) if bias is not None else None
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    out = (x - mean) / torch.sqrt(var + eps)
    if w is not None:
        out = out * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)
    leaves = [t for t in (x, w, b) if t is not None]
    return out.detach(), torch.autograd.grad(out, leaves, grad.double())


def _assert_near(got, want, rel, what, scale=None):
    """max |got - want| <= rel * max(|want|, scale): errors relative to the tensor's magnitude."""
    bound = rel * max(want.abs().max().item(), scale or 0.0) + 1e-30
    error = (got.double() - want.double()).abs().max().item()
    assert error <= bound, f"{what}: max error {error:.3g} > {bound:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 5, 3, 7), (8, 40, 12, 12), (3, 1030, 2, 2), (1, 17, 1, 2), (4, 64, 37, 37)])
def test_matches_nn_batchnorm_in_training(dtype, shape):
    """Output, input/weight/bias gradients and running statistics as nn.BatchNorm2d's, over two steps;
    within fp tolerance of a float64 computation (the kernel sums in double: in float32 it is the
    closer of the two on the larger shapes)."""
    require_backend("cpp", dtype)
    reference, ours = _pair(shape[1], dtype)
    rel = 1e-12 if dtype == torch.float64 else 1e-5
    for step in range(2):
        x = _input(shape, dtype, seed=step)
        grad = torch.randn(shape, generator=torch.Generator().manual_seed(10 + step), dtype=dtype)
        expected, got = _step(reference, x, grad), _step(ours, x, grad)
        # grad_input cancels to ~0 when a channel has two values: measure it against its terms' size.
        invstd = 1 / torch.sqrt(x.double().var(dim=(0, 2, 3), unbiased=False) + ours.eps)
        scale = (grad.abs().max() * (ours.weight.abs() * invstd).max()).item()
        _assert_near(got[1], expected[1], 4 * rel, "grad input vs nn.BatchNorm2d", scale)
        for what, a, b in (("output", got[0], expected[0]),
                           ("grad weight", got[2]["weight"], expected[2]["weight"]),
                           ("grad bias", got[2]["bias"], expected[2]["bias"]),
                           ("running mean", ours.running_mean, reference.running_mean),
                           ("running var", ours.running_var, reference.running_var)):
            _assert_near(a, b, 4 * rel, f"{what} vs nn.BatchNorm2d")
        assert int(ours.num_batches_tracked) == int(reference.num_batches_tracked) == step + 1
        assert got[0].is_contiguous(memory_format=torch.channels_last)
        assert got[1].is_contiguous(memory_format=torch.channels_last)
        truth, truth_grads = _float64_truth(x, ours.weight, ours.bias, ours.eps, grad)
        # x - mean loses digits of x (~20) where the spread is small: the output's error scales with |x|.
        _assert_near(got[0], truth, rel, "output vs float64", (x.abs().max() * (ours.weight.abs() * invstd).max()).item())
        _assert_near(got[1], truth_grads[0], rel, "grad input vs float64", scale)
        _assert_near(got[2]["weight"], truth_grads[1], rel, "grad weight vs float64")
        _assert_near(got[2]["bias"], truth_grads[2], rel, "grad bias vs float64")
        reference.zero_grad(set_to_none=True)
        ours.zero_grad(set_to_none=True)


def test_variance_of_values_far_from_zero():
    """1000 + N(0, 1) (about 16 bits of the float32 mantissa above the spread): the kernel's variance
    within float32 rounding of the float64 variance of the same values. A sum of squares would lose
    all of it, and so would a merge of 64-row steps that took a float sum's rounded mean as exact."""
    require_backend("cpp")
    x = torch.randn(4, 48, 37, 37, generator=torch.Generator().manual_seed(3)) + 1000
    x = x.contiguous(memory_format=torch.channels_last)
    _, mean, _, var = torch.ops.sepconv_cpp.batch_norm(x, None, None, 1e-5)
    torch.testing.assert_close(var.double(), x.double().var(dim=(0, 2, 3)), rtol=2e-6, atol=0)
    torch.testing.assert_close(mean.double(), x.double().mean(dim=(0, 2, 3)), rtol=1e-7, atol=0)


@pytest.mark.parametrize("kwargs", [dict(momentum=None), dict(affine=False), dict(track_running_stats=False),
                                    dict(momentum=0.3, eps=1e-3)],
                         ids=["cumulative-average", "no-affine", "no-running-stats", "momentum-eps"])
def test_options_as_nn_batchnorm(kwargs):
    require_backend("cpp", torch.float64)
    reference, ours = _pair(12, torch.float64, **kwargs)
    for step in range(3):
        x = _input((3, 12, 5, 6), torch.float64, seed=step)
        grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
        expected, got = _step(reference, x, grad), _step(ours, x, grad)
        torch.testing.assert_close(got[0], expected[0], atol=1e-12, rtol=1e-11)
        torch.testing.assert_close(got[1], expected[1], atol=1e-12, rtol=1e-11)
        assert got[2].keys() == expected[2].keys()
        for name in got[2]:
            torch.testing.assert_close(got[2][name], expected[2][name], atol=1e-12, rtol=1e-11)
    for name, buffer in reference.named_buffers():
        torch.testing.assert_close(dict(ours.named_buffers())[name], buffer, atol=1e-12, rtol=1e-11)
    # Evaluation: running statistics where kept, batch statistics where not (as nn.BatchNorm2d).
    reference.eval()
    ours.eval()
    x = _input((2, 12, 4, 4), torch.float64, seed=9)
    torch.testing.assert_close(ours(x), reference(x), atol=1e-12, rtol=1e-11)


def _ran_kernel(fn) -> bool:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return any(event.name == "sepconv_cpp::batch_norm" for event in prof.events())


def test_which_calls_take_the_kernel():
    """The kernel in training on channels_last float CPU input with backend cpp (or auto); F.batch_norm
    otherwise, with nn.BatchNorm2d's exact bits and errors."""
    require_backend("cpp")
    reference, ours = _pair(6, torch.float32)
    x = _input((2, 6, 5, 5), torch.float32)

    def call(backend="cpp", train=True, input=x, autocast=False):
        ours.backend = backend
        ours.train(train)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return ours(input)

    assert _ran_kernel(lambda: call())
    assert _ran_kernel(lambda: call(backend="auto"))
    fallbacks = {"nchw": dict(input=x.contiguous()), "torch backend": dict(backend="torch"),
                 "eval": dict(train=False), "autocast": dict(autocast=True)}
    for name, kwargs in fallbacks.items():
        assert not _ran_kernel(lambda: call(**kwargs)), name
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        call(input=_input((1, 6, 1, 1), torch.float32))
    ours.load_state_dict(reference.state_dict())
    assert torch.equal(call(input=x.contiguous()), reference(x.contiguous()))
    assert torch.equal(ours.running_var, reference.running_var)


@pytest.mark.parametrize("shape", [(8, 33, 20, 20), (2, 300, 9, 9)])
def test_bitwise_deterministic_across_runs_and_threads(threads, shape):
    """Column sums over fixed row parts: the same bits run to run and for 1 or 2 threads."""
    require_backend("cpp")
    x = _input(shape, torch.float32)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    results = []
    for count in (2, 2, 1):
        torch.set_num_threads(count)
        _, ours = _pair(shape[1], torch.float32)
        results.append(_step(ours, x, grad) + (ours.running_var.clone(),))
    for other in results[1:]:
        assert torch.equal(other[0], results[0][0]) and torch.equal(other[1], results[0][1])
        assert all(torch.equal(other[2][k], results[0][2][k]) for k in ("weight", "bias"))
        assert torch.equal(other[3], results[0][3])


def test_module_is_an_nn_batchnorm():
    module = kernels.BatchNorm2d(8, backend="cpp")
    plain = nn.BatchNorm2d(8)
    assert isinstance(module, nn.BatchNorm2d)
    assert list(module.state_dict()) == list(plain.state_dict())
    assert "backend='cpp'" in repr(module) and "backend" not in repr(kernels.BatchNorm2d(8))
    assert copy.deepcopy(module).backend == "cpp"
    with pytest.raises(ValueError, match="backend must be one of .*got 'cuda'"):
        kernels.BatchNorm2d(8, backend="cuda")
    with pytest.raises(ValueError, match="got 3"):
        module.backend = 3
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.batch_norm(torch.randn(2, 8, 3, 3), None, None, training=True, backend="gpu")


def test_opcheck_and_errors():
    require_backend("cpp")
    ops = torch.ops.sepconv_cpp
    x = _input((2, 5, 4, 3), torch.float32)
    w, b = torch.rand(5) + 0.5, torch.randn(5)
    torch.library.opcheck(ops.batch_norm.default, (x, w, b, 1e-5))
    torch.library.opcheck(ops.batch_norm.default, (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), 1e-5))
    torch.library.opcheck(ops.batch_norm.default, (x.detach().contiguous(), None, None, 1e-3))
    _, mean, invstd, _ = ops.batch_norm(x.detach(), w.detach(), b.detach(), 1e-5)
    grad = torch.randn_like(x)
    for mask in ([True, True, True], [False, True, False], [True, False, False]):
        torch.library.opcheck(ops.batch_norm_backward.default, (grad, x.detach(), w.detach(), mean, invstd, mask))
    with pytest.raises(RuntimeError, match="weight must be a 1-D Float CPU tensor of 5 elements, got Float \\[4\\]"):
        ops.batch_norm(x.detach(), torch.ones(4), None, 1e-5)
    with pytest.raises(RuntimeError, match="input must be a 4-D"):
        ops.batch_norm(torch.randn(5, 3), None, None, 1e-5)
    with pytest.raises(RuntimeError, match="grad_output must be a Float CPU tensor of shape \\[2, 5, 4, 3\\]"):
        ops.batch_norm_backward(torch.randn(2, 5, 4), x.detach(), None, mean, invstd, [True, True, True])


def test_functional_matches_f_batch_norm():
    require_backend("cpp", torch.float64)
    x = _input((4, 9, 6, 6), torch.float64)
    running = [torch.zeros(9, dtype=torch.float64), torch.ones(9, dtype=torch.float64)]
    expected_running = [t.clone() for t in running]
    got = kernels.batch_norm(x, *running, training=True, momentum=0.2, eps=1e-4, backend="cpp")
    expected = F.batch_norm(x, *expected_running, training=True, momentum=0.2, eps=1e-4)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-11)
    for a, b in zip(running, expected_running):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-11)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format], ids=["channels_last", "nchw"])
def test_relu_output_is_batchnorm_then_relu(backend, layout):
    """relu_output=True gives the values and gradients of the same BatchNorm followed by F.relu, bit for bit
    (the kernel's backward masks the gradient where the output is zero, as ReLU's does), NaN included."""
    require_backend(backend)
    plain, fused = _pair(16, torch.float32)[1], _pair(16, torch.float32)[1]
    plain.backend = fused.backend = backend
    fused.relu_output = True
    # Zero-mean input: about half of every channel is clipped. Channel 3 holds a NaN (NaN statistics).
    x = torch.randn(4, 16, 9, 7, generator=torch.Generator().manual_seed(0)).contiguous(memory_format=layout)
    x[1, 3, 2, 2] = float("nan")
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).contiguous(memory_format=layout)
    grad[0, 5, 0, :] = float("inf")  # where the output is zero the gradient is 0, even an infinite one

    def run(module, then_relu):
        leaf = x.detach().clone().requires_grad_(True)
        out = module(leaf)
        if then_relu:
            out = F.relu(out)
        out.backward(grad)
        return [out.detach(), leaf.grad, module.weight.grad, module.bias.grad, module.running_mean,
                module.running_var]

    expected, got = run(plain, True), run(fused, False)
    assert (got[0] == 0).float().mean() > 0.3 and got[0][1, 3].isnan().all()
    for name, a, b in zip(("output", "grad input", "grad weight", "grad bias", "running mean", "running var"),
                          got, expected):
        assert torch.equal(a.nan_to_num(7.0, 8.0, 9.0), b.nan_to_num(7.0, 8.0, 9.0)), name
    assert _ran_kernel(lambda: fused(x)) == (backend == "cpp" and layout == torch.channels_last)
    assert "relu_output=True" in repr(fused) and "relu_output" not in repr(plain)
    with pytest.raises(TypeError, match="relu_output must be a bool, got 1"):
        kernels.BatchNorm2d(4, relu_output=1)


def test_relu_output_opcheck_and_errors():
    require_backend("cpp")
    ops = torch.ops.sepconv_cpp
    x = _input((2, 5, 4, 3), torch.float32) - 20
    w, b = torch.rand(5) + 0.5, torch.randn(5)
    torch.library.opcheck(ops.batch_norm.default, (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), 1e-5,
                                                   True))
    out, mean, invstd, _ = ops.batch_norm(x.detach(), w.detach(), b.detach(), 1e-5, True)
    grad = torch.randn_like(x)
    for mask in ([True, True, True], [False, True, True]):
        torch.library.opcheck(ops.batch_norm_backward.default,
                              (grad, x.detach(), w.detach(), mean, invstd, mask, out))
    with pytest.raises(RuntimeError, match="output must be a Float CPU tensor of shape \\[2, 5, 4, 3\\], got Float"):
        ops.batch_norm_backward(grad, x.detach(), None, mean, invstd, [True, True, True], out[:, :, :2])


@pytest.mark.parametrize("channels", [64, 40], ids=["streamed", "rows-not-64-byte-multiples"])
def test_large_output_matches_nn_batchnorm(channels):
    """Outputs and input gradients over 24 MB go out through streaming stores (when their rows are
    64-byte multiples): nn.BatchNorm2d's values within fp32 tolerance, and with relu_output those of
    the same kernel followed by F.relu, bit for bit."""
    require_backend("cpp")
    reference, ours = _pair(channels, torch.float32)
    x = torch.randn(8, channels, 160, 160, generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).contiguous(memory_format=torch.channels_last)
    assert x.numel() * 4 > 24 << 20
    expected, got = _step(reference, x, grad), _step(ours, x, grad)
    for a, b in zip(got[:2], expected[:2]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    relu_reference, fused = copy.deepcopy(ours), copy.deepcopy(ours)
    fused.relu_output = True
    leaf = x.clone().requires_grad_(True)
    relu_expected = F.relu(relu_reference(leaf))
    relu_expected.backward(grad)
    relu_got = _step(fused, x, grad)
    assert torch.equal(relu_got[0], relu_expected.detach()) and torch.equal(relu_got[1], leaf.grad)


# --- separable_conv2d_batch_norm: BatchNorm's statistics from the separable forward ----------------

def _conv_bn(cin, cout, dtype, seed=2, bn_kwargs=None, pointwise=False, **conv_kwargs):
    """A cpp SeparableConv2d (with ``pointwise``, a PointwiseConv2d shortcut) and BatchNorm2d, and copies of both
    (the two calls' reference)."""
    torch.manual_seed(seed)
    if pointwise:
        conv = kernels.PointwiseConv2d(cin, cout, backend="cpp", dtype=dtype, **conv_kwargs)
    else:
        conv = kernels.SeparableConv2d(cin, cout, 3, backend="cpp", dtype=dtype, **conv_kwargs)
    bn = kernels.BatchNorm2d(cout, backend="cpp", dtype=dtype, **(bn_kwargs or {}))
    if bn.affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return conv, bn, copy.deepcopy(conv), copy.deepcopy(bn)


def _ops_ran(fn) -> dict:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    names = [event.name for event in prof.events()]
    return {name: names.count(f"sepconv_cpp::{name}") for name in ("forward", "forward_with_moments", "batch_norm")}


def _train_step(fn, x, grad, modules):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    out.backward(grad)
    grads = [p.grad for module in modules for p in module.parameters()]
    return out.detach(), x.grad, grads


CONV_BN_CASES = {
    "728ch": dict(cin=728, cout=728, size=19, batch=2),
    "relu-input": dict(cin=16, cout=40, size=13, batch=3, conv=dict(padding=1, relu_input=True)),
    "stride-dilation-biases": dict(cin=6, cout=10, size=17, batch=2,
                                   conv=dict(stride=2, padding=2, dilation=2, bias=True)),
    "depth-multiplier": dict(cin=5, cout=7, size=8, batch=4, conv=dict(padding=1, depth_multiplier=3)),
    "batch-1-large-map": dict(cin=32, cout=64, size=74, batch=1, conv=dict(padding=1)),
    "momentum-none-no-affine": dict(cin=8, cout=12, size=6, batch=2, conv=dict(padding=1),
                                    bn=dict(momentum=None, affine=False)),
    "pointwise-shortcut": dict(cin=24, cout=40, size=15, batch=2, conv=dict(pointwise=True, stride=2, bias=False)),
    "pointwise-shortcut-bias": dict(cin=7, cout=9, size=9, batch=3, conv=dict(pointwise=True, stride=(2, 3))),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CONV_BN_CASES.values(), ids=CONV_BN_CASES.keys())
def test_separable_conv2d_batch_norm_matches_the_two_calls(case, dtype):
    """In training on cpp the separable forward (also a strided PointwiseConv2d's: the separable op with an
    identity depthwise stage) hands BatchNorm its output's moments (forward_with_moments, then no pass of
    BatchNorm's own): output, every gradient, the running statistics and num_batches_tracked as conv then
    BatchNorm, over two steps."""
    require_backend("cpp", dtype)
    conv, bn, ref_conv, ref_bn = _conv_bn(case["cin"], case["cout"], dtype, bn_kwargs=case.get("bn"),
                                          **case.get("conv", {}))
    rel = 2e-5 if dtype == torch.float32 else 1e-12
    for step in range(2):
        x = _input((case["batch"], case["cin"], case["size"], case["size"]), dtype, seed=step)
        shape = conv(x).shape
        grad = torch.randn(shape, generator=torch.Generator().manual_seed(7 + step), dtype=dtype)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            got = _train_step(lambda t: kernels.separable_conv2d_batch_norm(conv, bn, t), x, grad, (conv, bn))
        ran = [event.name for event in prof.events()]
        assert ran.count("sepconv_cpp::forward_with_moments") == 1 and "sepconv_cpp::forward" not in ran
        want = _train_step(lambda t: ref_bn(ref_conv(t)), x, grad, (ref_conv, ref_bn))
        _assert_near(got[0], want[0], rel, "output")
        _assert_near(got[1], want[1], rel, "input gradient")
        for a, b in zip(got[2], want[2]):  # the biases before a BatchNorm: gradients that are 0 but for rounding
            _assert_near(a, b, rel, "parameter gradient", scale=1.0)
        for module in (conv, bn, ref_conv, ref_bn):
            module.zero_grad(set_to_none=True)
    for name, buffer in ref_bn.named_buffers():
        _assert_near(dict(bn.named_buffers())[name].double(), buffer.double(), rel, name)


def test_separable_conv2d_batch_norm_falls_back_to_the_two_calls():
    """Anywhere the moments path does not apply (and BatchNorm is in training: in evaluation it folds into the conv,
    tests/test_eval_fold.py), exactly bn(conv(x)): the same ops, the same bits."""
    require_backend("cpp")
    conv, bn, ref_conv, ref_bn = _conv_bn(6, 8, torch.float32, padding=1)
    x = _input((2, 6, 9, 9), torch.float32)
    cases = {
        "nchw": None,
        "torch backend": lambda: setattr(conv, "backend", "torch"),
        "hook on the conv": lambda: conv.register_forward_hook(lambda *args: None),
        "hook on the BatchNorm": lambda: bn.register_forward_pre_hook(lambda *args: None),
        "an nn.BatchNorm2d": lambda: None,
    }
    for name, prepare in cases.items():
        conv, bn, ref_conv, ref_bn = _conv_bn(6, 8, torch.float32, padding=1)
        input = x.contiguous() if name == "nchw" else x
        if name == "an nn.BatchNorm2d":
            bn, ref_bn = nn.BatchNorm2d(8), nn.BatchNorm2d(8)
        if prepare is not None:
            prepare()
        ref_conv.load_state_dict(conv.state_dict())
        ref_conv.backend = conv.backend
        ref_bn.train(bn.training)
        ref_conv.train(conv.training)
        ran = _ops_ran(lambda: kernels.separable_conv2d_batch_norm(conv, bn, input))
        assert ran["forward_with_moments"] == 0, name
        assert torch.equal(kernels.separable_conv2d_batch_norm(conv, bn, input), ref_bn(ref_conv(input))), name
    # A module that is not a separable conv (the model's eager flavour): the two calls.
    # A PointwiseConv2d whose call is F.conv2d (stride 1, or no graph recorded): the two calls. Other channel
    # counts: the conv's own error.
    for stride, grad in ((1, True), (2, False)):
        conv, bn, ref_conv, ref_bn = _conv_bn(6, 8, torch.float32, pointwise=True, stride=stride)
        with torch.set_grad_enabled(grad):
            ran = _ops_ran(lambda: kernels.separable_conv2d_batch_norm(conv, bn, x))
            assert ran["forward_with_moments"] == 0 and ran["forward"] == 0, (stride, grad)
            assert torch.equal(kernels.separable_conv2d_batch_norm(conv, bn, x), ref_bn(ref_conv(x))), (stride, grad)
    conv, bn, _, _ = _conv_bn(6, 8, torch.float32, pointwise=True, stride=2)
    with pytest.raises(ValueError, match=r"weight must be \(C_out, 5, 1, 1\)"):
        kernels.separable_conv2d_batch_norm(conv, bn, _input((2, 5, 9, 9), torch.float32))
    pair = nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8)
    torch.testing.assert_close(kernels.separable_conv2d_batch_norm(*pair, x), pair[1](pair[0](x)))
    # One value per channel: BatchNorm's own error, as the two calls give it.
    conv, bn, _, _ = _conv_bn(6, 8, torch.float32)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        kernels.separable_conv2d_batch_norm(conv, bn, _input((1, 6, 3, 3), torch.float32))


@pytest.mark.parametrize("shape", [(8, 64, 37, 37), (1, 128, 74, 74), (2, 1024, 10, 10), (3, 40, 7, 5)],
                         ids=["many-blocks", "batch-1", "4k-rows", "small"])
def test_forward_with_moments_output_and_moments(shape):
    """The output is forward's, bit for bit (moments or not; 1024 channels: not streamed, same sums); the
    moments are the output's mean and sum of squared deviations, within float32 rounding of float64, also for
    values 1000 times their spread; run to run the same bits."""
    require_backend("cpp")
    ops = torch.ops.sepconv_cpp
    n, cout, size, _ = shape
    cin = 48
    g = torch.Generator().manual_seed(4)
    x = torch.randn(n, cin, size, size, generator=g).contiguous(memory_format=torch.channels_last)
    args = (x, torch.randn(cin, 1, 3, 3, generator=g), torch.randn(cout, cin, 1, 1, generator=g) / cin ** 0.5,
            None, torch.randn(cout, generator=g) + 1000, [1, 1], [1, 1, 1, 1], [1, 1], True)
    out, moments = ops.forward_with_moments(*args)
    assert moments.dtype == torch.float64 and moments.shape == (2, cout)
    assert torch.equal(out, ops.forward(*args))
    var, mean = torch.var_mean(out.double(), (0, 2, 3), correction=0)
    count = out.numel() // cout
    torch.testing.assert_close(moments[0], mean, rtol=1e-7, atol=0)
    torch.testing.assert_close(moments[1] / count, var, rtol=2e-6, atol=0)
    again = ops.forward_with_moments(*args)
    assert torch.equal(again[0], out) and torch.equal(again[1], moments)


def test_forward_with_moments_opcheck_and_errors():
    require_backend("cpp")
    ops = torch.ops.sepconv_cpp
    x = _input((2, 4, 6, 5), torch.float32)
    args = (x, torch.randn(4, 1, 3, 3), torch.randn(6, 4, 1, 1), None, None, [1, 1], [1, 1, 1, 1], [1, 1], False)
    torch.library.opcheck(ops.forward_with_moments.default, args)
    leaves = tuple(a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(ops.forward_with_moments.default, leaves)
    out, moments = ops.forward_with_moments(*args)
    torch.library.opcheck(ops.batch_norm.default, (out, torch.rand(6) + 0.5, torch.randn(6), 1e-5, True, moments))
    torch.library.opcheck(ops.batch_norm.default, (out.requires_grad_(), None, None, 1e-5, False, moments))
    with pytest.raises(RuntimeError, match="moments must be a \\(2, 6\\) float64 CPU tensor .*got \\[2, 5\\] Float"):
        ops.batch_norm(out.detach(), None, None, 1e-5, False, torch.zeros(2, 5))
    with pytest.raises(RuntimeError, match="forward_with_moments: needs at least one output pixel"):
        ops.forward_with_moments(torch.randn(0, 4, 6, 5), *args[1:])
