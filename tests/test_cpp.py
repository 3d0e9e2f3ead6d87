"""C++ backend specifics: determinism, thread counts, 64-bit offsets, realistic shapes, loader errors.

The shared grid (test_separable_conv.py) already runs every geometry, layout, opcheck and
gradcheck through the cpp backend; these tests cover what only the C++ kernels can get wrong.
"""

import pytest
import torch
import torch.nn.functional as F

import kernels
from conftest import TOLERANCES, require_backend
from test_separable_conv import check, make_case


def _run(case, layout=torch.channels_last, **kwargs):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in case]
    leaves[0] = leaves[0].detach().contiguous(memory_format=layout).requires_grad_(True)
    out = kernels.separable_conv2d(*leaves, padding=1, backend="cpp", **kwargs)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    out.backward(grad)
    return [out.detach()] + [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("relu_input", [False, True])
@pytest.mark.parametrize("channels", [320, 64], ids=["channel-chunks", "batch-parts"])
def test_gradients_bitwise_deterministic(threads, relu_input, channels):
    require_backend("cpp")
    torch.set_num_threads(2)
    # Several channel chunks (or, for few channels, batch parts summed afterwards) and pixel
    # blocks; output channels not a multiple of the tile.
    case = make_case(3, channels, 13, 11, (3, 3), 1, 200, True, torch.float32, torch.device("cpu"))
    first, second = _run(case, relu_input=relu_input), _run(case, relu_input=relu_input)
    for name, a, b in zip(("output", "input", "depthwise_weight", "pointwise_weight", "depthwise_bias",
                           "pointwise_bias"), first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


def test_thread_counts_agree(threads):
    require_backend("cpp")
    case = make_case(2, 96, 12, 12, (3, 3), 1, 72, True, torch.float32, torch.device("cpu"))
    results = {}
    for count in (1, 2):
        torch.set_num_threads(count)
        results[count] = _run(case)
    for a, b in zip(results[1], results[2]):
        torch.testing.assert_close(a, b, **TOLERANCES[torch.float32])


def test_forward_bitwise_across_thread_counts(threads):
    """Many pixel blocks share the packed pointwise panels, each packed by whichever thread needs it
    first while the others wait, and blocks visit the panels from different starting points: the
    output is the same to the bit at 1, 2 and 3 threads (every sum runs over the hidden channels
    in order), and matches the reference."""
    require_backend("cpp")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 48, 40, 40, generator=g).contiguous(memory_format=torch.channels_last)
    dw = torch.randn(48, 1, 3, 3, generator=g) / 3
    pw = torch.randn(200, 48, 1, 1, generator=g) / 48 ** 0.5  # 7 panels, the last one partial
    outputs = []
    for count in (1, 2, 3):
        torch.set_num_threads(count)
        outputs.append(kernels.separable_conv2d(x, dw, pw, padding=1, relu_input=True, backend="cpp"))
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])
    expected = F.conv2d(F.conv2d(F.relu(x).double(), dw.double(), padding=1, groups=48), pw.double())
    torch.testing.assert_close(outputs[0].double(), expected, **TOLERANCES[torch.float32])


def test_forward_with_a_weight_of_a_quarter_of_l3(threads):
    """A pointwise weight of a quarter of the usable L3 or more (sized here from the cache sizes the
    library read) takes one block of pixels a thread, each panel packed once per thread, with the depthwise
    tile past L2: the output is the same to the bit at 1, 2 and 3 threads (one, two and three
    blocks) and matches the reference."""
    require_backend("cpp")
    info = kernels.cpp_build_info()
    channels = 512
    out_channels = -(-info["l3_usable_bytes"] // 4 // (channels * 4)) + 5  # the last panel partial
    side = int((2 * info["tile_bytes"] / (channels * 4)) ** 0.5) + 4  # a tile over twice L2's share
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, channels, side, side, generator=g).contiguous(memory_format=torch.channels_last)
    dw = torch.randn(channels, 1, 3, 3, generator=g) / 3
    pw = torch.randn(out_channels, channels, 1, 1, generator=g) / channels ** 0.5
    assert pw.numel() * 4 >= info["l3_usable_bytes"] // 4 and side * side * channels * 4 > 2 * info["tile_bytes"]
    outputs = []
    for count in (1, 2, 3):
        torch.set_num_threads(count)
        outputs.append(kernels.separable_conv2d(x, dw, pw, padding=1, backend="cpp"))
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])
    expected = F.conv2d(F.conv2d(x.double(), dw.double(), padding=1, groups=channels), pw.double())
    torch.testing.assert_close(outputs[0].double(), expected, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("out_channels", [1024, 1536, 256], ids=["rows-4KB-apart", "rows-6KB-apart", "rows-1KB-apart"])
def test_backward_grad_out_row_strides(out_channels):
    """grad_out rows a multiple of 4 KB apart (all of a micro-kernel call's rows in one L1 set), 6 KB
    and 1 KB apart, read in place: output and every gradient match the reference in each case."""
    device = require_backend("cpp")
    case = make_case(2, 24, 9, 9, (3, 3), 1, out_channels, True, torch.float32, device)
    check("cpp", *case, padding=1, layout="channels_last")


@pytest.mark.parametrize("out_channels", [1536, 512, 1024, 200])
def test_backward_pointwise_grad_row_strides(threads, out_channels):
    """With 1024 hidden channels (pointwise weight rows 4 KB apart) each backward task sums its part of
    the pointwise weight gradient in a padded buffer and copies it out at the end, with grad_out rows
    of several strides (1536, 512, 1024 and 200 channels). Every gradient matches the reference, at 1
    and 2 threads."""
    device = require_backend("cpp")
    case = make_case(2, 1024, 9, 12, (3, 3), 1, out_channels, True, torch.float32, device)  # blocks of pixels
    for count in (1, 2):  # one task per chunk of channels, or chunks split into parts
        torch.set_num_threads(count)
        check("cpp", *case, padding=1, layout="channels_last")


@pytest.mark.parametrize("batch,channels,out_channels,size", [(2, 64, 128, 37), (1, 728, 728, 10), (1, 256, 100, 19)])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_realistic_shapes(batch, channels, out_channels, size, layout):
    device = require_backend("cpp")
    case = make_case(batch, channels, size, size, (3, 3), 1, out_channels, True, torch.float32, device)
    check("cpp", *case, padding=1, layout=layout)


# The float32 3x3 forward and backward take a row kernel for runs of pixels whose window is inside
# the input horizontally, and the per-pixel tap walk elsewhere: widths with no interior column,
# windows that just fit, top/bottom rows outside the input, strides, dilations, and channels not a
# multiple of 16. Where stride equals dilation the backward's windows slide along the run (1 or 2).
@pytest.mark.parametrize("stride,padding,dilation,width", [
    (1, 1, 1, 1), (1, 0, 1, 3), (1, 1, 1, 16), (2, 1, 1, 15), (1, 2, 2, 9), (3, 0, 2, 14), (1, 3, 1, 5), (2, 2, 1, 4),
    (2, 2, 2, 13), (2, 0, 2, 5),
])
@pytest.mark.parametrize("relu_input", [False, True])
def test_3x3_row_kernel_edges(stride, padding, dilation, width, relu_input):
    device = require_backend("cpp")
    case = make_case(2, 37, 6, width, (3, 3), 1, 21, True, torch.float32, device)
    check("cpp", *case, stride=stride, padding=padding, dilation=dilation, relu_input=relu_input,
          layout="channels_last")


def test_strided_depth_multiplier_relu():
    device = require_backend("cpp")
    case = make_case(2, 40, 15, 17, (3, 3), 3, 50, True, torch.float32, device)
    check("cpp", *case, stride=2, padding=1, dilation=1, relu_input=True, layout="channels_last")


@pytest.mark.parametrize("kernel,stride,dilation,height",
                         [((3, 3), 1, 1, 29), ((3, 3), 1, 1, 37), ((5, 5), 2, 2, 41), ((3, 5), 1, 3, 30)])
def test_single_image_row_bands(threads, kernel, stride, dilation, height):
    """Batch 1 with <= 256 channels: the backward splits the image into row bands run in two phases.

    Band heights follow the kernel's reach (kernel 5 at dilation 2 reaches 8 input rows), so
    neighbouring bands of one phase must never write the same grad_input rows.
    """
    device = require_backend("cpp")
    torch.set_num_threads(2)
    case = make_case(1, 48, height, 23, kernel, 1, 40, True, torch.float32, device)
    padding = (dilation * (kernel[0] - 1) // 2, dilation * (kernel[1] - 1) // 2)
    check("cpp", *case, stride=stride, padding=padding, dilation=dilation, relu_input=True, layout="channels_last")
    first = _run_geometry(case, stride, padding, dilation)
    assert all(torch.equal(a, b) for a, b in zip(first, _run_geometry(case, stride, padding, dilation)))
    torch.set_num_threads(1)
    for a, b in zip(first, _run_geometry(case, stride, padding, dilation)):
        torch.testing.assert_close(a, b, **TOLERANCES[torch.float32])


def _run_geometry(case, stride, padding, dilation):
    leaves = [t.detach().clone().contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t.detach().clone()
              for t in case]
    leaves = [t.requires_grad_(True) for t in leaves]
    out = kernels.separable_conv2d(*leaves, stride=stride, padding=padding, dilation=dilation, backend="cpp")
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype))
    return [out.detach()] + [leaf.grad for leaf in leaves]


def _available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@pytest.mark.slow
@pytest.mark.skipif(_available_memory_bytes() < 12 * 2**30, reason="needs ~9 GiB free for a 2**31-element output")
def test_output_past_2_31_elements():
    """Offsets past 2**31 elements: a (1, 512, 2049, 2048) channels_last float32 output (8.6 GB)."""
    require_backend("cpp")
    generator = torch.Generator().manual_seed(0)
    height, width, out_channels = 2049, 2048, 512
    x = torch.randn(1, 2, height, width, generator=generator).contiguous(memory_format=torch.channels_last)
    dw = torch.randn(2, 1, 1, 1, generator=generator)
    pw = torch.randn(out_channels, 2, 1, 1, generator=generator)
    pwb = torch.randn(out_channels, generator=generator)
    out = kernels.separable_conv2d(x, dw, pw, None, pwb, backend="cpp")
    assert out.numel() > 2**31 and out.is_contiguous(memory_format=torch.channels_last)

    def expected(row):  # the 1x1 depthwise makes output row `row` depend on input row `row` only
        hidden = x[0, :, row, :].double() * dw.view(2, 1).double()
        return pw.view(out_channels, 2).double() @ hidden + pwb.double()[:, None]

    for row in (0, height // 2, height - 1):
        torch.testing.assert_close(out[0, :, row, :].double(), expected(row), **TOLERANCES[torch.float32])


def test_missing_compiler_is_reported(monkeypatch):
    from kernels import cpp_backend

    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        cpp_backend._jit_build()


# Run in a fresh interpreter (settings read once per process): `check(x, dw, pw, **kwargs)` compares
# the cpp output and gradients (padding 1) with the float64 reference; the body must not fail.
_CHECKS_PRELUDE = """
import torch, kernels
from kernels.reference import separable_conv2d_reference as reference
g = torch.Generator().manual_seed(0)

def check(x, dw, pw, **kwargs):
    leaves = [t.requires_grad_() for t in (x, dw, pw)]
    out = kernels.separable_conv2d(*leaves, padding=1, backend="cpp", **kwargs)
    grad = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad(out, leaves, grad)
    doubles = [t.detach().double().requires_grad_() for t in leaves]
    expected = reference(*doubles, padding=1, **kwargs)
    expected_grads = torch.autograd.grad(expected, doubles, grad.double())
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.double(), want, atol=1e-3, rtol=1e-4)
    return out
"""


def _run_checks(body: str, **env: str) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    script = _CHECKS_PRELUDE + body + "\nprint('ok')\n"
    result = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, PYTHONPATH=str(root), **env),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.mark.parametrize("hugepages", ["1", "0"])
def test_fresh_large_buffers_with_and_without_huge_pages(hugepages):
    """Results and gradients of >= 32 MiB (huge-page advised) buffers, with SEPCONV_HUGEPAGES=0 too.

    The switch is read once per process, so each setting runs in a fresh interpreter.
    """
    require_backend("cpp")
    _run_checks("""
x = torch.randn(1, 8, 256, 256, generator=g).contiguous(memory_format=torch.channels_last)
out = check(x, torch.randn(8, 1, 3, 3, generator=g), torch.randn(128, 8, 1, 1, generator=g))
assert out.numel() * 4 >= 32 << 20
""", SEPCONV_HUGEPAGES=hugepages)


@pytest.mark.parametrize("batch,channels,size", [(1, 16, 20), (3, 24, 10), (2, 300, 8), (1, 300, 6), (2, 300, 66)],
                         ids=["row-bands", "batch-parts", "channel-chunks", "one-image-chunks", "wide-chunks"])
def test_grad_input_written_everywhere(threads, batch, channels, size):
    """The kernel zeroes grad_input itself (lazily, per task): run it on buffers that start as NaN
    (the buffer cache NaN-fills too under deterministic mode; wide-chunks' buffers come from it)."""
    device = require_backend("cpp")
    torch.set_num_threads(2)
    case = make_case(batch, channels, size, size, (3, 3), 1, 20, True, torch.float32, device)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # with fill_uninitialized_memory: torch.empty is NaN-filled
    try:
        assert torch.utils.deterministic.fill_uninitialized_memory
        # stride 2 without padding leaves the last input row and column outside every window
        check("cpp", *case, stride=2, padding=0, dilation=1, relu_input=True, layout="channels_last")
        check("cpp", *case, stride=1, padding=1, dilation=1, relu_input=False, layout="channels_last")
    finally:
        torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("batch,channels,size", [(1, 16, 20), (3, 24, 10), (2, 300, 8)],
                         ids=["row-bands", "batch-parts", "channel-chunks"])
def test_relu_input_gradient_is_relu_backward(threads, batch, channels, size):
    """With relu_input the kernel masks grad_input itself (per task, or after the row bands): where the
    input is <= 0 the gradient is exactly 0 even when grad_output holds inf, as nn.ReLU's backward gives."""
    require_backend("cpp")
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(batch, channels, size, size, generator=g).contiguous(memory_format=torch.channels_last)
    dw = torch.randn(channels, 1, 3, 3, generator=g)
    pw = torch.randn(20, channels, 1, 1, generator=g)
    grad = torch.randn(batch, 20, size, size, generator=g)
    grad[0, :, size // 2, size // 3] = float("inf")
    got_x, want_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    kernels.separable_conv2d(got_x, dw, pw, padding=1, relu_input=True, backend="cpp").backward(grad)
    torch.nn.functional.conv2d(torch.nn.functional.conv2d(want_x.relu(), dw, padding=1, groups=channels), pw).backward(grad)
    assert not got_x.grad.isfinite().all()  # the inf reached positive inputs
    assert torch.equal(got_x.grad[x <= 0], torch.zeros_like(got_x.grad[x <= 0]))
    torch.testing.assert_close(got_x.grad, want_x.grad, rtol=1e-4, atol=1e-4, equal_nan=True)


def test_work_buffers_are_written_before_read():
    """The kernels' work buffers are left uninitialised: with glibc filling every fresh allocation with
    a junk byte (MALLOC_PERTURB_), forward and backward over every work split still match the reference."""
    require_backend("cpp")
    _run_checks("""
torch.set_num_threads(2)
# row bands, batch parts, channel chunks, the few-pixel forward splits, a partial last panel
for batch, channels, out_channels, size in [(1, 16, 20, 20), (3, 24, 40, 10), (2, 300, 70, 8), (1, 728, 100, 5),
                                            (1, 64, 1500, 3)]:
    x = torch.randn(batch, channels, size, size, generator=g).contiguous(memory_format=torch.channels_last)
    pw = torch.randn(out_channels, channels, 1, 1, generator=g) / channels ** 0.5
    check(x, torch.randn(channels, 1, 3, 3, generator=g), pw, relu_input=True)
""", MALLOC_PERTURB_="165")


def test_large_results_are_recycled_and_profiled():
    """Results of >= 1 MiB come from the buffer cache: a freed block serves the next request of its
    size class, live blocks show in torch.profiler's memory trace, kernels.empty_cache frees idle ones."""
    require_backend("cpp")
    from benchmarks.memory import peak_allocated_mb

    ops = torch.ops.sepconv_cpp
    x = torch.randn(2, 64, 48, 48).contiguous(memory_format=torch.channels_last)  # 1.2 MB, a 2 MiB block
    residual = torch.randn(2, 64, 24, 24)
    kernels.empty_cache()
    live, idle, cap = ops.cache_stats()
    assert idle == 0 and cap == 2048 << 20
    out = ops.batch_norm(x, None, None, 1e-5)[0]
    address = out.data_ptr()
    assert ops.cache_stats()[0] == live + (2 << 20)
    del out
    assert ops.cache_stats()[:2] == [live, 2 << 20]
    again = ops.batch_norm(x, None, None, 1e-5)[0]
    assert again.data_ptr() == address and ops.cache_stats()[1] == 0
    torch.testing.assert_close(again, F.batch_norm(x, None, None, training=True), atol=1e-5, rtol=1e-5)
    del again
    small = ops.max_pool2d_add(x, residual, [3, 3], [2, 2], [1, 1])  # 147 KB: plain at::empty
    assert ops.cache_stats()[0] == live
    del small
    assert peak_allocated_mb(lambda: ops.batch_norm(x, None, None, 1e-5), "cpu") >= 2.0
    assert kernels.empty_cache() >= 2 << 20 and ops.cache_stats()[1] == 0


@pytest.mark.parametrize("setting,expect", [("0", "off"), ("64", "capped"), ("lots", "error")])
def test_cache_setting(setting, expect):
    """SEPCONV_CACHE_MB: 0 turns recycling off (results still right), a number caps idle bytes, anything
    else is an error naming the variable. Read once per process, so each runs in a fresh interpreter."""
    require_backend("cpp")
    body = {
        "off": """
x = torch.randn(1, 8, 256, 256, generator=g).contiguous(memory_format=torch.channels_last)
out = check(x, torch.randn(8, 1, 3, 3, generator=g), torch.randn(16, 8, 1, 1, generator=g))
del out
assert torch.ops.sepconv_cpp.cache_stats() == [0, 0, 0], torch.ops.sepconv_cpp.cache_stats()
""",
        "capped": """
x = torch.randn(1, 8, 256, 256, generator=g).contiguous(memory_format=torch.channels_last)
outs = [check(x, torch.randn(8, 1, 3, 3, generator=g), torch.randn(64, 8, 1, 1, generator=g)) for _ in range(3)]
del outs  # three 16 MiB results (plus gradients): at most 64 MiB stay idle
live, idle, cap = torch.ops.sepconv_cpp.cache_stats()
assert cap == 64 << 20 and 0 < idle <= cap, (live, idle, cap)
""",
        "error": """
from kernels import cpp_backend
cpp_backend.load()
try:
    torch.ops.sepconv_cpp.cache_stats()
except RuntimeError as error:
    assert "SEPCONV_CACHE_MB must be a whole number of MiB >= 0, got 'lots'" in str(error), error
else:
    raise AssertionError("no error")
""",
    }[expect]
    _run_checks(body, SEPCONV_CACHE_MB=setting)


def test_grad_out_rows_in_place_or_padded(tmp_path):
    """The backward reads grad_out in place, or from padded rows where a micro-kernel call's rows need more
    ways of one L1 set than the L1 has (1024 channels: rows 4 KB apart). SEPCONV_L1D_WAYS sets the ways the
    rule sees (the sets stay the machine's): 4 pads on every vector path (6 or 12 rows in one set), 16 on
    none. Each setting runs in a fresh interpreter; both match float64 and give the same bits."""
    require_backend("cpp")
    for ways in ("4", "16"):
        _run_checks(f"""
from kernels import cpp_backend
x = torch.randn(2, 40, 9, 9, generator=g).contiguous(memory_format=torch.channels_last)
dw, pw = torch.randn(40, 1, 3, 3, generator=g), torch.randn(1024, 40, 1, 1, generator=g) / 6
out = check(x, dw, pw)
assert cpp_backend.build_info()["l1d_ways"] == {ways}, cpp_backend.build_info()
leaves = [t.detach().requires_grad_() for t in (x, dw, pw)]
out = kernels.separable_conv2d(*leaves, padding=1, backend="cpp")
torch.save(torch.autograd.grad(out, leaves, torch.randn(out.shape, generator=g)), {str(tmp_path / ways)!r})
""", SEPCONV_L1D_WAYS=ways)
    for padded, in_place in zip(torch.load(tmp_path / "4"), torch.load(tmp_path / "16")):
        assert torch.equal(padded, in_place)


def test_backward_interleaved_over_chunks(tmp_path):
    """Where the input and grad_out together exceed ``interleave_bytes`` (the usable L3, or
    SEPCONV_INTERLEAVE_BYTES), a thread with several channel chunks takes each block of pixels through all of
    them in turn. 768 hidden channels at batch 2 are four chunks (two a thread at two threads, four at one);
    with the setting 0 every such backward interleaves, with one above the tensors' size none does. Each
    setting runs in a fresh interpreter; both match float64 and give the same bits (each chunk sums its
    blocks in the same order either way), with ReLU input and biases, and with a BatchNorm folded into the
    input read."""
    require_backend("cpp")
    for setting in ("0", str(1 << 40)):
        _run_checks(f"""
from kernels import cpp_backend
cpp_backend.load()
assert cpp_backend.build_info()["interleave_bytes"] == {setting}, cpp_backend.build_info()
x = torch.randn(2, 768, 9, 11, generator=g).contiguous(memory_format=torch.channels_last)
dw, pw = torch.randn(768, 1, 3, 3, generator=g), torch.randn(40, 768, 1, 1, generator=g) / 28
db, pb = torch.randn(768, generator=g), torch.randn(40, generator=g)
results = []
for threads in (1, 2):
    torch.set_num_threads(threads)
    check(x, dw, pw)
    leaves = [t.detach().requires_grad_() for t in (x, dw, pw, db, pb)]
    out = kernels.separable_conv2d(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4], padding=1,
                                   relu_input=True, backend="cpp")
    results += [out, *torch.autograd.grad(out, leaves, torch.randn(out.shape, generator=g))]
    # A BatchNorm folded into the second separable conv's input read (its backward takes the input-gradient sums).
    torch.manual_seed(3)
    sequence = torch.nn.Sequential(kernels.SeparableConv2d(64, 768, 3, padding=1, backend="cpp"),
                                   kernels.BatchNorm2d(768, backend="cpp"),
                                   kernels.SeparableConv2d(768, 40, 3, padding=1, relu_input=True, backend="cpp"))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        leaf = x[:, :64].detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        out = kernels.run_sequential(sequence.train(), leaf)
        results += [out, *torch.autograd.grad(out, [leaf, *sequence.parameters()], torch.randn(out.shape, generator=g))]
    assert [event.name for event in prof.events()].count("sepconv_cpp::batch_norm_separable") == 1
torch.save(results, {str(tmp_path / setting)!r})
""", SEPCONV_INTERLEAVE_BYTES=setting)
    interleaved, in_turn = torch.load(tmp_path / "0"), torch.load(tmp_path / str(1 << 40))
    assert len(interleaved) == len(in_turn) == 2 * (6 + 1 + 7)
    for a, b in zip(interleaved, in_turn):
        assert torch.equal(a, b)


@pytest.mark.parametrize("variable, value, message", [
    ("SEPCONV_L1D_WAYS", "0", "SEPCONV_L1D_WAYS must be a whole number >= 1, got '0'"),
    ("SEPCONV_INTERLEAVE_BYTES", "-1", "SEPCONV_INTERLEAVE_BYTES must be a whole number of bytes >= 0, got '-1'"),
])
def test_blocking_setting_is_checked(variable, value, message):
    """A blocking setting out of its range keeps the backend from loading, with an error naming the variable and
    the value."""
    require_backend("cpp")
    _run_checks(f"""
from kernels import cpp_backend
try:
    cpp_backend.load()
except RuntimeError as error:
    assert {message!r} in str(error), error
else:
    raise AssertionError("no error")
""", **{variable: value})


def test_buffer_cache_in_forked_children():
    """Children forked while another thread recycles blocks (as DataLoader workers are) use the cache.
    (The pthread_atfork handlers make a child that inherits a held lock impossible; 20 forks during
    the churn do not force that race, they check that forked children allocate and free.) The child
    runs on one thread, as DataLoader workers do: OpenMP (ATen's too) cannot start a parallel
    region in a child forked after the parent used one."""
    require_backend("cpp")
    _run_checks("""
import os, threading
from kernels import cpp_backend
cpp_backend.load()
x = torch.randn(2, 64, 48, 48).contiguous(memory_format=torch.channels_last)
stop = threading.Event()
def churn():
    while not stop.is_set():
        torch.ops.sepconv_cpp.batch_norm(x, None, None, 1e-5)
thread = threading.Thread(target=churn)
thread.start()
try:
    for _ in range(20):
        pid = os.fork()
        if pid == 0:
            torch.set_num_threads(1)
            out = torch.ops.sepconv_cpp.batch_norm(x, None, None, 1e-5)[0]
            os._exit(0 if torch.isfinite(out).all() else 1)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
finally:
    stop.set()
    thread.join()
""")


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format], ids=["channels_last", "nchw"])
@pytest.mark.parametrize("multiplier", [1, 2])
def test_gradients_are_not_views(layout, multiplier):
    """The backward op returns freshly allocated gradients, never views of a temporary: autograd adds a
    second gradient into a tensor in place only when nothing else holds its storage."""
    require_backend("cpp")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 9, 9, generator=g).contiguous(memory_format=layout)
    dw = torch.randn(8 * multiplier, 1, 3, 3, generator=g)
    pw = torch.randn(24, 8 * multiplier, 1, 1, generator=g)
    grad = torch.randn(2, 24, 9, 9, generator=g).contiguous(memory_format=layout)
    grads = torch.ops.sepconv_cpp.backward.default(grad, x, dw, pw, None, [1, 1], [1, 1, 1, 1], [1, 1], True,
                                                   [True] * 5)
    for name, tensor in zip(("input", "depthwise_weight", "pointwise_weight", "depthwise_bias", "pointwise_bias"),
                            grads):
        assert not tensor._is_view(), f"grad of {name} is a view"
    assert grads[0].is_contiguous(memory_format=layout)


def test_two_consumers_accumulate_in_place():
    """An input read by two cpp separable convs gets the sum of their gradients without an out-of-place add."""
    require_backend("cpp")
    torch.manual_seed(0)
    first, second = (kernels.SeparableConv2d(16, 32, 3, padding=1, backend="cpp") for _ in range(2))
    x = torch.randn(2, 16, 40, 40).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        (first(x).sum() + second(x).sum()).backward()
    adds = [e.name for e in prof.events() if e.name in ("aten::add", "aten::add_") and e.input_shapes
            and e.input_shapes[0] == list(x.shape)]
    assert adds == ["aten::add_"], f"the two input gradients were summed by {adds}"
    expected = torch.autograd.grad(F.conv2d(F.conv2d(x, first.conv1.weight, padding=1, groups=16),
                                            first.pointwise.weight).sum(), x)[0]
    expected += torch.autograd.grad(F.conv2d(F.conv2d(x, second.conv1.weight, padding=1, groups=16),
                                             second.pointwise.weight).sum(), x)[0]
    torch.testing.assert_close(x.grad, expected, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("out_channels", [128, 200], ids=["streamed", "cout-not-multiple-of-16"])
def test_large_output_forward(out_channels):
    """A float32 output over 24 MB with 64-byte rows leaves the forward through non-temporal stores;
    it matches the reference like any other (and so does one whose rows are not 64-byte multiples)."""
    require_backend("cpp")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 24, 160, 160, generator=g).contiguous(memory_format=torch.channels_last)
    dw = torch.randn(24, 1, 3, 3, generator=g) / 3
    pw = torch.randn(out_channels, 24, 1, 1, generator=g) / 24 ** 0.5
    out = kernels.separable_conv2d(x, dw, pw, padding=1, relu_input=True, backend="cpp")
    assert out.numel() * 4 > 24 << 20
    expected = F.conv2d(F.conv2d(F.relu(x).double(), dw.double(), padding=1, groups=24), pw.double())
    torch.testing.assert_close(out.double(), expected, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("out_channels", [1024, 2048])
def test_forward_with_rows_4kb_apart(threads, out_channels):
    """Output rows a multiple of 4 KB apart (1024 or 2048 float32 channels) leave the forward through
    non-temporal stores at any size (here 0.1-0.3 MB): the result is complete once the call returns,
    the same to the bit at 1 and 2 threads, and matches the reference."""
    require_backend("cpp")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 40, 5, 3, generator=g).contiguous(memory_format=torch.channels_last)
    dw = torch.randn(40, 1, 3, 3, generator=g) / 3
    pw = torch.randn(out_channels, 40, 1, 1, generator=g) / 40 ** 0.5
    bias = torch.randn(out_channels, generator=g)
    outputs = []
    for count in (1, 2):
        torch.set_num_threads(count)
        outputs.append(kernels.separable_conv2d(x, dw, pw, pointwise_bias=bias, padding=1, backend="cpp"))
    assert torch.equal(outputs[0], outputs[1])
    expected = F.conv2d(F.conv2d(x.double(), dw.double(), padding=1, groups=40), pw.double(), bias.double())
    torch.testing.assert_close(outputs[0].double(), expected, **TOLERANCES[torch.float32])


def _packed_call(case, stride, dilation, relu_input, packed=None):
    x, dw, pw, dwb, pwb = case
    kh, kw = dw.shape[2:]
    padding = [dilation * (kh // 2)] * 2 + [dilation * (kw // 2)] * 2
    args = (x, dw, pw, dwb, pwb, [stride, stride], padding, [dilation, dilation], relu_input)
    if packed is None:
        return torch.ops.sepconv_cpp.forward(*args)
    return torch.ops.sepconv_cpp.forward_packed(*args[:3], packed, *args[3:])


@pytest.mark.parametrize("batch, channels, size, multiplier, out_channels, stride, dilation, bias, layout", [
    (1, 40, 9, 1, 70, 1, 1, False, torch.channels_last),  # a partial last panel, a block or two a thread
    (2, 17, 12, 2, 32, 2, 2, True, torch.contiguous_format),  # NCHW in, depth multiplier, both biases
    (8, 64, 64, 1, 100, 1, 1, True, torch.channels_last),  # many blocks: shared panels when not packed
], ids=["batch1-partial-panel", "nchw-multiplier-strided", "many-blocks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_packed_equals_forward(threads, batch, channels, size, multiplier, out_channels, stride, dilation,
                                       bias, layout, dtype):
    """The forward given its pointwise weight packed ahead (pack_pointwise) reads the same panels that it
    packs per call otherwise: the same output to the bit, at 1 and 2 threads, with and without ReLU."""
    require_backend("cpp")
    case = list(make_case(batch, channels, size, size, (3, 3), multiplier, out_channels, bias, dtype,
                          torch.device("cpu")))
    case[0] = case[0].contiguous(memory_format=layout)
    packed = torch.ops.sepconv_cpp.pack_pointwise(case[2])
    assert packed.shape == (-(-out_channels // 32) * channels * multiplier * 32,) and packed.dtype == dtype
    for count in (1, 2):
        torch.set_num_threads(count)
        for relu_input in (False, True):
            expected = _packed_call(case, stride, dilation, relu_input)
            got = _packed_call(case, stride, dilation, relu_input, packed)
            assert got.is_contiguous(memory_format=layout) and torch.equal(got, expected), (count, relu_input)


def test_forward_packed_checks_the_packed_weight():
    require_backend("cpp")
    case = make_case(1, 8, 5, 5, (3, 3), 1, 40, False, torch.float32, torch.device("cpu"))
    packed = torch.ops.sepconv_cpp.pack_pointwise(case[2])
    for bad in (packed[:-1], packed.double(), packed.view(2, -1)):
        with pytest.raises(RuntimeError, match="packed_pointwise must be what sepconv_cpp::pack_pointwise returns"):
            _packed_call(case, 1, 1, False, bad)
    with pytest.raises(RuntimeError, match="pointwise_weight must be a \\(Cout, K, 1, 1\\)"):
        torch.ops.sepconv_cpp.pack_pointwise(torch.randn(4, 3, 3, 3))


def test_forward_packed_opcheck():
    require_backend("cpp")
    case = make_case(2, 8, 6, 6, (3, 3), 1, 40, True, torch.float32, torch.device("cpu"))
    packed = torch.ops.sepconv_cpp.pack_pointwise(case[2])
    torch.library.opcheck(torch.ops.sepconv_cpp.pack_pointwise.default, (case[2],))
    torch.library.opcheck(torch.ops.sepconv_cpp.forward_packed.default,
                          (*case[:3], packed, *case[3:], [1, 1], [1, 1, 1, 1], [1, 1], True))
