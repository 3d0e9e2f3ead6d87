"""kernels.conv2d / Conv2d: a dense convolution (Xception's stem) on a backend; the cpp conv2d op."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kernels
from conftest import require_backend
from kernels.conv import FRESH_MAPPING_BYTES


def _op(*args):
    return torch.ops.sepconv_cpp.conv2d.default(*args)


def _ran_kernel(fn) -> bool:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return any(event.name == "sepconv_cpp::conv2d" for event in prof.events())


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,cout,kernel,stride,padding,dilation,bias", [
    ((2, 32, 15, 15), 64, 3, 1, 0, 1, False),        # the stem's second conv, small
    ((2, 3, 17, 17), 32, 3, 2, 0, 1, False),         # the stem's first
    ((1, 5, 9, 11), 7, (2, 3), (2, 1), (1, 2), 1, True),
    ((3, 4, 10, 10), 9, 3, 1, 2, 2, True),           # dilation: taps two pixels apart
    ((2, 6, 6, 7), 40, 1, 1, 0, 1, True),            # 1x1, two panels with a partial one
    ((1, 8, 3, 3), 4, 5, 1, 2, 1, False),            # a window wider than the input
    ((0, 4, 6, 6), 4, 3, 1, 1, 1, True)])            # no image
def test_op_equals_conv2d(layout, dtype, shape, cout, kernel, stride, padding, dilation, bias):
    """The op's result (in the input's layout) as F.conv2d's in float64, every geometry, with and without bias."""
    require_backend("cpp", dtype)
    g = torch.Generator().manual_seed(0)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
    x = torch.randn(shape, generator=g, dtype=dtype).contiguous(memory_format=layout)
    w = torch.randn(cout, shape[1], kh, kw, generator=g, dtype=dtype)
    b = torch.randn(cout, generator=g, dtype=dtype) if bias else None
    got = _op(x, w, b, pair(stride), pair(padding), pair(dilation))
    expected = F.conv2d(x.double(), w.double(), None if b is None else b.double(), stride, padding, dilation)
    # float32: sums of up to 288 products of unit normals (F.conv2d's own float32 result is as far off)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, expected.to(dtype), **tol)
    assert got.numel() == 0 or got.is_contiguous(memory_format=layout)  # an empty input has no layout of its own


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,cout,stride,dilation", [
    ((2, 32, 14, 40), 64, 1, 1),   # the stem's second conv: micro-kernel calls run across rows' ends
    ((1, 16, 21, 33), 20, 2, 1),
    ((1, 3, 19, 30), 8, 1, 2),     # three channels: a tap is a stretch of 3 columns of A
    ((1, 8, 9, 256), 4, 1, 1)])    # 8 channels a 32-byte row: windows at many offsets within a line
def test_windows_read_in_place_or_gathered_give_the_same_bits(dtype, shape, cout, stride, dilation):
    """Windows inside the input are read from it in place and the others (over the padding, or in a
    micro-kernel call that runs across the end of an output row) gathered into a tile; both sum the
    same products in the same order. So the op with padding equals, bit for bit, the op without
    padding on the zero-padded input, where the pixels' windows take the other path in many places."""
    require_backend("cpp", dtype)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=g, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(cout, shape[1], 3, 3, generator=g, dtype=dtype)
    b = torch.randn(cout, generator=g, dtype=dtype)
    pad = dilation
    got = _op(x, w, b, [stride, stride], [pad, pad], [dilation, dilation])
    padded = F.pad(x, (pad, pad, pad, pad)).contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, _op(padded, w, b, [stride, stride], [0, 0], [dilation, dilation]))
    expected = F.conv2d(x.double(), w.double(), b.double(), stride, pad, dilation)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, expected.to(dtype), **tol)


def test_gradients_and_opcheck():
    """The op's backward (ATen's, from the saved input and weight) passes gradcheck; opcheck on the op."""
    require_backend("cpp", torch.float64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 7, 6, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    w = torch.randn(5, 3, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    leaves = [t.requires_grad_(True) for t in (x, w, b)]
    assert torch.autograd.gradcheck(lambda *t: _op(*t, [2, 1], [1, 0], [1, 1]), leaves)
    assert torch.autograd.gradcheck(lambda a, c: _op(a, c, None, [1, 1], [0, 0], [2, 1]), leaves[:2])
    torch.library.opcheck(torch.ops.sepconv_cpp.conv2d.default, (x, w, b, [2, 1], [1, 0], [1, 1]))
    torch.library.opcheck(torch.ops.sepconv_cpp.conv2d.default, (x.detach(), w.detach(), None, [1, 1], [0, 0], [1, 1]))


def _large_input(channels_last=True, dtype=torch.float32):
    """An input whose 3x3 result (8 channels, 1024 x 1024) is exactly 32 MiB: the smallest the kernel takes."""
    x = torch.randn(1, 4, 1026, 1026, dtype=dtype)
    assert 8 * 1024 * 1024 * x.element_size() == FRESH_MAPPING_BYTES
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def test_kernel_runs_for_large_channels_last_results_only():
    """cpp where the result is at least 32 MiB on channels_last float input; F.conv2d (bit for bit) elsewhere:
    a smaller result, NCHW input, another backend, groups > 1."""
    require_backend("cpp")
    w, b = torch.randn(8, 4, 3, 3), torch.randn(8)
    x = _large_input()
    with torch.no_grad():
        assert _ran_kernel(lambda: kernels.conv2d(x, w, b, backend="cpp"))
        torch.testing.assert_close(kernels.conv2d(x, w, b, backend="cpp"), F.conv2d(x, w, b), rtol=1e-5, atol=1e-5)
        small = x[:, :, :1000, :1000]
        assert not _ran_kernel(lambda: kernels.conv2d(small, w, b, backend="cpp"))
        assert torch.equal(kernels.conv2d(small, w, b, backend="cpp"), F.conv2d(small, w, b))
        assert not _ran_kernel(lambda: kernels.conv2d(_large_input(False), w, b, backend="cpp"))
        assert not _ran_kernel(lambda: kernels.conv2d(x, w, b, backend="torch"))
        grouped = torch.randn(8, 2, 3, 3)
        assert torch.equal(kernels.conv2d(x, grouped, b, groups=2, backend="cpp"), F.conv2d(x, grouped, b, groups=2))
    x.requires_grad_(True)
    w.requires_grad_(True)
    out = kernels.conv2d(x, w, padding=1, backend="cpp")
    out.backward(torch.ones_like(out))
    x2, w2 = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    F.conv2d(x2, w2, padding=1).backward(torch.ones_like(out))
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-4, atol=1e-2)


def test_module_is_the_same_conv2d():
    """Same initial weights under a seed, same state_dict keys, an nn.Conv2d to code that checks; string padding
    and other padding modes are nn.Conv2d's own forward."""
    torch.manual_seed(3)
    reference = nn.Conv2d(4, 8, 3, 2, 1, bias=True)
    torch.manual_seed(3)
    module = kernels.Conv2d(4, 8, 3, 2, 1, backend="cpp")
    assert isinstance(module, nn.Conv2d)
    assert module.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), reference.state_dict().values()))
    assert "backend='cpp'" in repr(module)
    x = torch.randn(2, 4, 9, 9).contiguous(memory_format=torch.channels_last)
    assert torch.equal(module(x), reference(x))
    same = kernels.Conv2d(4, 8, 3, padding="same", padding_mode="reflect", backend="cpp")
    assert same(x).shape == (2, 8, 9, 9)
    with pytest.raises(ValueError, match="backend must be one of"):
        module.backend = "cuda"


@pytest.mark.parametrize("kwargs,match", [
    (dict(weight=torch.zeros(8, 4, 3)), "weight must be 4-D"),
    (dict(weight=torch.zeros(8, 4, 0, 3)), r"weight must have a kernel of at least 1x1, got shape \(8, 4, 0, 3\)"),
    (dict(stride=0), "stride must be >= 1"),
    (dict(padding=-1), "padding must be >= 0"),
    (dict(dilation=(1, 0)), "dilation must be >= 1"),
    (dict(input="x"), "input must be a torch.Tensor"),
    (dict(backend="cuda"), "backend must be one of"),
])
def test_bad_arguments_are_named(kwargs, match):
    args = dict(input=torch.zeros(1, 4, 9, 9), weight=torch.zeros(8, 4, 3, 3))
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        kernels.conv2d(**args)


def test_op_errors_name_the_argument():
    require_backend("cpp")
    x = torch.zeros(1, 4, 9, 9)
    with pytest.raises(RuntimeError, match=r"weight must be \(Cout, 4, kh, kw\)"):
        _op(x, torch.zeros(8, 3, 3, 3), None, [1, 1], [0, 0], [1, 1])
    with pytest.raises(RuntimeError, match="expected stride\\[2\\], padding\\[2\\], dilation\\[2\\]"):
        _op(x, torch.zeros(8, 4, 3, 3), None, [1, 1], [0, 0, 0, 0], [1, 1])
    with pytest.raises(RuntimeError, match="must have the input's dtype"):
        _op(x, torch.zeros(8, 4, 3, 3, dtype=torch.float64), None, [1, 1], [0, 0], [1, 1])
    # A zero stride divided by zero in the kernel (SIGFPE: the process died); a 0x0 kernel ran.
    with pytest.raises(RuntimeError, match=r"stride must be >= 1, got \[1, 0\]"):
        _op(x, torch.zeros(8, 4, 3, 3), None, [1, 0], [0, 0], [1, 1])
    with pytest.raises(RuntimeError, match="the kernel must be at least 1x1, got 0x0"):
        _op(x, torch.zeros(8, 4, 0, 0), None, [1, 1], [0, 0], [1, 1])
    with pytest.raises(RuntimeError, match=r"padding must be >= 0, got \[-1, 0\]"):
        _op(x, torch.zeros(8, 4, 3, 3), None, [1, 1], [-1, 0], [1, 1])


def test_decomposes_to_conv2d():
    """kernels.decompositions() maps the op to F.conv2d: an exported program of the large case holds ATen ops only."""
    require_backend("cpp")
    module = kernels.Conv2d(4, 8, 3, backend="cpp").eval()
    x = _large_input()
    program = torch.export.export(module, (x,))
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "sepconv_cpp.conv2d.default" in ops
    decomposed = program.run_decompositions(kernels.decompositions())
    assert not any("sepconv" in str(node.target) for node in decomposed.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(decomposed.module()(x), module(x), rtol=1e-5, atol=1e-5)
