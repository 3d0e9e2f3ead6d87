"""kernels.pointwise_conv2d / PointwiseConv2d: a 1x1 convolution (Xception's strided shortcut) on a backend."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kernels
from conftest import require_backend


def _ran_kernel(fn) -> bool:
    """Whether ``fn()`` (and the backward of what it returns, when it has a graph) ran the cpp kernels."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
        if out.requires_grad:
            out.sum().backward()
    names = {event.name for event in prof.events()}
    return "sepconv_cpp::forward" in names


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,cout,stride,bias", [
    ((2, 8, 9, 9), 16, 2, False), ((1, 24, 10, 7), 40, 2, True), ((3, 5, 6, 11), 7, (2, 1), True),
    ((2, 33, 5, 5), 64, 3, False), ((2, 16, 6, 6), 8, 1, True), ((1, 4, 1, 1), 3, 2, False)])
def test_cpp_equals_conv2d_forward_and_backward(layout, dtype, shape, cout, stride, bias):
    """Output (in the input's layout) and the input, weight and bias gradients on the cpp backend as
    F.conv2d's, computed in float64 on NCHW copies (ATen's own loops: torch 2.6's oneDNN failed, now
    and then, to build a reorder for the backward of the odd channels_last case here)."""
    require_backend("cpp", dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=dtype).contiguous(memory_format=layout)
    w = torch.randn(cout, shape[1], 1, 1, generator=g, dtype=dtype)
    b = torch.randn(cout, generator=g, dtype=dtype) if bias else None
    leaves = [t.clone().requires_grad_(True) for t in (x, w, b) if t is not None]
    reference = [t.detach().double().contiguous().requires_grad_(True) for t in leaves]
    got = kernels.pointwise_conv2d(*leaves, stride=stride, backend="cpp")
    expected = F.conv2d(*reference, stride=stride)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, expected.to(dtype), **tol)
    assert got.is_contiguous(memory_format=layout)
    grad = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    got_grads = torch.autograd.grad(got, leaves, grad.to(dtype))
    for got_grad, expected_grad in zip(got_grads, torch.autograd.grad(expected, reference, grad)):
        torch.testing.assert_close(got_grad, expected_grad.to(dtype), **tol)


def test_other_backends_are_conv2d():
    """Every backend but cpp (and cpp where its kernel does not run) is F.conv2d itself, bit for bit."""
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    w, b = torch.randn(16, 8, 1, 1, requires_grad=True), torch.randn(16, requires_grad=True)
    assert torch.equal(kernels.pointwise_conv2d(x, w, b, 2, backend="torch"), F.conv2d(x, w, b, 2))
    with torch.no_grad():
        assert torch.equal(kernels.pointwise_conv2d(x, w, b, 2), F.conv2d(x, w, b, 2))


def test_kernel_runs_where_it_measured_faster_only():
    """The cpp kernel: recorded graphs on strided channels_last input. Elsewhere F.conv2d (oneDNN)."""
    require_backend("cpp")
    w = torch.randn(16, 8, 1, 1, requires_grad=True)

    def run(layout, stride, grad):
        x = torch.randn(2, 8, 9, 9).contiguous(memory_format=layout)
        with torch.set_grad_enabled(grad):
            return _ran_kernel(lambda: kernels.pointwise_conv2d(x, w, stride=stride, backend="cpp"))

    assert run(torch.channels_last, 2, True)
    assert not run(torch.channels_last, 2, False)
    assert not run(torch.contiguous_format, 2, True)
    assert not run(torch.channels_last, 1, True)
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last)
    assert not _ran_kernel(lambda: kernels.pointwise_conv2d(x, w, stride=2, backend="torch"))


def test_gradcheck():
    require_backend("cpp", torch.float64)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 7, 6, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    w = torch.randn(6, 5, 1, 1, generator=g, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    leaves = [t.requires_grad_(True) for t in (x, w, b)]
    assert torch.autograd.gradcheck(lambda *t: kernels.pointwise_conv2d(*t, stride=2, backend="cpp"), leaves)


def test_compiles():
    require_backend("cpp")
    x = torch.randn(2, 8, 11, 11).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    w = torch.randn(12, 8, 1, 1, requires_grad=True)
    compiled = torch.compile(lambda a, b: kernels.pointwise_conv2d(a, b, stride=2, backend="cpp"), fullgraph=True)
    got = compiled(x, w)
    got.backward(torch.ones_like(got))
    expected_leaves = [t.detach().clone().requires_grad_(True) for t in (x, w)]
    expected = F.conv2d(*expected_leaves, stride=2)
    expected.backward(torch.ones_like(expected))
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(x.grad, expected_leaves[0].grad)
    torch.testing.assert_close(w.grad, expected_leaves[1].grad)


def test_module_is_the_same_conv2d():
    """Same initial weights under a seed, same state_dict keys, an nn.Conv2d to code that checks."""
    torch.manual_seed(3)
    reference = nn.Conv2d(8, 16, 1, stride=2, bias=True)
    torch.manual_seed(3)
    module = kernels.PointwiseConv2d(8, 16, stride=2, backend="cpp")
    assert isinstance(module, nn.Conv2d)
    assert module.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), reference.state_dict().values()))
    assert "backend='cpp'" in repr(module)
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(module(x), reference(x))
    with torch.no_grad():  # no graph: nn.Conv2d's own call, the same bits
        assert torch.equal(module(x), reference(x))
    with pytest.raises(ValueError, match="backend must be one of"):
        module.backend = "cuda"
    with pytest.raises(TypeError):  # nn.Conv2d(in, out, 1, 2) habits: the kernel size is not an argument here
        kernels.PointwiseConv2d(8, 16, 1, 2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(weight=torch.zeros(16, 8, 3, 3)), r"weight must be \(C_out, 8, 1, 1\) for input with 8 channels, "
                                             r"got shape \(16, 8, 3, 3\)"),
    (dict(weight=torch.zeros(16, 4, 1, 1)), r"weight must be \(C_out, 8, 1, 1\)"),
    (dict(weight=torch.zeros(16, 8)), "weight must be 4-D"),
    (dict(bias=torch.zeros(15)), r"bias must be \(16,\), one value per output channel, got shape \(15,\)"),
    (dict(stride=0), "stride must be >= 1"),
    (dict(input=torch.zeros(8, 9)), "input must be 3-D"),
    (dict(input="x"), "input must be a torch.Tensor"),
    (dict(backend="cuda"), "backend must be one of"),
])
def test_bad_arguments_are_named(kwargs, match):
    args = dict(input=torch.zeros(1, 8, 9, 9), weight=torch.zeros(16, 8, 1, 1), bias=None, stride=2)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        kernels.pointwise_conv2d(**args)


@pytest.mark.parametrize("stride,match", [
    (0, "stride must be >= 1 in every dimension, got 0"),
    ((2, 0), r"stride must be >= 1 in every dimension, got \(2, 0\)"),
    (1.5, "stride must be an int or a pair of ints, got 1.5"),
])
def test_module_checks_its_stride_when_built(stride, match):
    """nn.Conv2d builds with a zero stride and fails only when called."""
    with pytest.raises((ValueError, TypeError), match=match):
        kernels.PointwiseConv2d(8, 16, stride=stride)
