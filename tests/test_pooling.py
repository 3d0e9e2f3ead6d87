"""kernels.max_pool2d_add: the strided blocks' pool + shortcut sum, one pass on the cpp backend (and its backward)."""

import pytest
import torch
import torch.nn.functional as F

import kernels
from conftest import require_backend


def _layout(tensor, layout):
    if layout == "channels_last":
        return tensor.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other column of a wider tensor
        return torch.cat([tensor, tensor], dim=3)[..., ::2]
    return tensor


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,kernel,stride,padding", [
    ((2, 5, 9, 8), 3, 2, 1), ((1, 40, 19, 19), 3, 2, 1), ((3, 7, 1, 1), 3, 2, 1), ((1, 16, 6, 7), (2, 3), (2, 1), (1, 0)),
    ((2, 33, 10, 10), 3, 1, 0), ((1, 150, 9, 9), 3, 2, 1)])
def test_equals_max_pool_plus_residual(backend, layout, dtype, shape, kernel, stride, padding):
    """Bitwise the same as F.max_pool2d(...) + residual, NaN and -inf included, output in the input's layout."""
    require_backend(backend, dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=dtype)
    x.view(-1)[::11] = float("-inf")
    x.view(-1)[5::37] = float("nan")
    x = _layout(x, layout)
    expected = F.max_pool2d(x, kernel, stride, padding)
    residual = torch.randn(expected.shape, generator=g, dtype=dtype)
    expected = expected + residual
    with torch.no_grad():
        got = kernels.max_pool2d_add(x, residual, kernel, stride, padding, backend=backend)
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got.nan_to_num(0.0), expected.nan_to_num(0.0))
    assert got.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last") or got.shape[2:] == (1, 1)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,kernel,stride,padding", [
    ((2, 5, 9, 8), 3, 2, 1), ((1, 40, 19, 19), 3, 2, 1), ((3, 7, 1, 1), 3, 2, 1), ((1, 16, 6, 7), (2, 3), (2, 1), (1, 0)),
    ((2, 33, 10, 10), 3, 1, 0), ((1, 300, 21, 5), 3, 2, 1), ((2, 3, 4, 4), 1, 1, 0)])
def test_gradients_equal_max_pool_plus_residual(backend, layout, dtype, shape, kernel, stride, padding):
    """Input and residual gradients bitwise as F.max_pool2d + residual's: ties (zeros) go to the first
    maximum, NaNs to the last NaN, -inf windows to their first pixel; the same summation order."""
    require_backend(backend, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g, dtype=dtype)
    x.view(-1)[::7] = 0.0
    x.view(-1)[3::23] = float("-inf")
    x.view(-1)[5::41] = float("nan")
    x = _layout(x, layout)
    pooled = F.max_pool2d(x, kernel, stride, padding)
    residual = torch.randn(pooled.shape, generator=g, dtype=dtype)
    grad = torch.randn(pooled.shape, generator=g, dtype=dtype)
    grad.view(-1)[::9] = -0.0
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, residual)]
    expected = [t.detach().clone().requires_grad_(True) for t in (x, residual)]
    if backend == "cpp":  # the op itself: kernels.max_pool2d_add records NCHW graphs through ATen
        pair = lambda v: list(v) if isinstance(v, tuple) else [v, v]  # noqa: E731
        out = torch.ops.sepconv_cpp.max_pool2d_add(*leaves, pair(kernel), pair(stride), pair(padding))
    else:
        out = kernels.max_pool2d_add(*leaves, kernel, stride, padding, backend=backend)
    out.backward(grad)
    (F.max_pool2d(expected[0], kernel, stride, padding) + expected[1]).backward(grad)
    assert torch.equal(leaves[0].grad, expected[0].grad)
    assert all(a.item() == b.item() and str(a.item()) == str(b.item())  # signed zeros too
               for a, b in zip(leaves[0].grad.reshape(-1)[::13], expected[0].grad.reshape(-1)[::13]))
    assert torch.equal(leaves[1].grad, grad)
    assert leaves[0].grad.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last") \
        or shape[2:] == (1, 1)


def test_large_input_gradient_equals_max_pool_plus_residual():
    """An input gradient over 24 MB leaves through streaming stores (where its rows are 64-byte multiples and
    it is larger than three quarters of L3): bitwise ATen's still, ties and NaNs included."""
    require_backend("cpp")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 64, 224, 224, generator=g)
    assert x.numel() * 4 > 24 << 20
    x.view(-1)[::5] = 0.0
    x.view(-1)[7::4099] = float("nan")
    x = x.contiguous(memory_format=torch.channels_last)
    pooled = F.max_pool2d(x, 3, 2, 1)
    residual, grad = (torch.randn(pooled.shape, generator=g).contiguous(memory_format=torch.channels_last)
                      for _ in range(2))
    leaf, expected = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    kernels.max_pool2d_add(leaf, residual, 3, 2, 1, backend="cpp").backward(grad)
    (F.max_pool2d(expected, 3, 2, 1) + residual).backward(grad)
    assert torch.equal(leaf.grad, expected.grad)
    assert leaf.grad.is_contiguous(memory_format=torch.channels_last)


def test_graphs_take_the_kernel_in_channels_last_only():
    require_backend("cpp")

    def ran_kernel(layout, requires_grad):
        x = torch.randn(2, 4, 9, 9).contiguous(memory_format=layout).requires_grad_(requires_grad)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            kernels.max_pool2d_add(x, torch.randn(2, 4, 5, 5), 3, 2, 1, backend="cpp")
        return any(event.name == "sepconv_cpp::max_pool2d_add" for event in prof.events())

    assert ran_kernel(torch.channels_last, True) and ran_kernel(torch.channels_last, False)
    assert ran_kernel(torch.contiguous_format, False) and not ran_kernel(torch.contiguous_format, True)


def test_gradient_of_one_argument_only():
    require_backend("cpp")
    x = torch.randn(2, 4, 9, 9).contiguous(memory_format=torch.channels_last)
    residual = torch.randn(2, 4, 5, 5, requires_grad=True)
    kernels.max_pool2d_add(x, residual, 3, 2, 1, backend="cpp").sum().backward()
    assert torch.equal(residual.grad, torch.ones(2, 4, 5, 5))
    x.requires_grad_(True)
    out = kernels.max_pool2d_add(x, residual.detach(), 3, 2, 1, backend="cpp")
    (grad_x,) = torch.autograd.grad(out.sum(), [x])
    assert torch.equal(grad_x, torch.autograd.grad(F.max_pool2d(x, 3, 2, 1).sum(), [x])[0])


def test_opcheck():
    require_backend("cpp")
    ops = torch.ops.sepconv_cpp
    x = torch.randn(2, 6, 9, 8).contiguous(memory_format=torch.channels_last)
    residual = torch.randn(2, 6, 5, 4)
    torch.library.opcheck(ops.max_pool2d_add.default, (x, residual, [3, 3], [2, 2], [1, 1]))
    torch.library.opcheck(ops.max_pool2d_add.default,
                          (x.clone().requires_grad_(), residual.clone().requires_grad_(), [3, 3], [2, 2], [1, 1]))
    torch.library.opcheck(ops.max_pool2d_add_backward.default, (torch.randn(2, 6, 5, 4), x, [3, 3], [2, 2], [1, 1]))
    with pytest.raises(RuntimeError, match="grad_output must be a Float CPU tensor of shape \\(2, 6, 5, 4\\)"):
        ops.max_pool2d_add_backward(torch.randn(2, 6, 4, 4), x, [3, 3], [2, 2], [1, 1])


def test_compiles():
    require_backend("cpp")
    x = torch.randn(2, 8, 11, 11).contiguous(memory_format=torch.channels_last)
    residual = torch.randn(2, 8, 6, 6)
    compiled = torch.compile(lambda a, b: kernels.max_pool2d_add(a, b, 3, 2, 1, backend="cpp"), fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(x, residual), F.max_pool2d(x, 3, 2, 1) + residual)
    leaves = [t.clone().requires_grad_(True) for t in (x, residual)]
    compiled(*leaves).backward(torch.ones(2, 8, 6, 6))
    expected = x.clone().requires_grad_(True)
    F.max_pool2d(expected, 3, 2, 1).backward(torch.ones(2, 8, 6, 6))
    assert torch.equal(leaves[0].grad, expected.grad)


@pytest.mark.parametrize("kwargs,match", [
    (dict(residual=torch.zeros(1, 4, 4, 4)), r"residual must have the pooled shape \(1, 4, 5, 5\)"),
    (dict(padding=2), "padding must be at most half of kernel_size"),
    (dict(kernel_size=0), "kernel_size must be >= 1"),
    (dict(input=torch.zeros(4, 9, 9)), "input must be 4-D"),
    (dict(backend="cuda"), "backend must be one of"),
])
def test_bad_arguments_are_named(kwargs, match):
    args = dict(input=torch.zeros(1, 4, 9, 9), residual=torch.zeros(1, 4, 5, 5), kernel_size=3, stride=2, padding=1)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        kernels.max_pool2d_add(**args)
