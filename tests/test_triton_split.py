"""The triton backend's split mode (``SEPCONV_TRITON_MODE=split``): depthwise kernel + GEMM.

The shared geometry and option grids of tests/test_separable_conv.py run again in split mode
(their test functions are called with backend "triton"), plus opcheck, 16-bit accuracy, every
GPU config of the depthwise kernel, determinism and the setting's errors.
"""

import pytest
import torch

import kernels
from conftest import require_backend
import test_separable_conv as shared  # its test functions are called, not collected here
from test_separable_conv import GEOMETRIES, check, make_case
from test_triton import _check_pinned, _run, assert_within_torch_error

MODE = "SEPCONV_TRITON_MODE"


@pytest.fixture
def split(monkeypatch):
    require_backend("triton")  # the kernel modules import only where the backend can run
    monkeypatch.setenv(MODE, "split")
    from kernels.triton import mode

    assert mode() == "split"


def _split_calls(monkeypatch):
    """Count the split launchers' calls (so a test knows split mode, not fused, ran)."""
    from kernels.triton import split

    calls = []
    depthwise = split.depthwise

    def counted(*args, **kwargs):
        calls.append(1)
        return depthwise(*args, **kwargs)

    monkeypatch.setattr(split, "depthwise", counted)
    return calls


@pytest.mark.parametrize("kernel,stride,dilation,padding", GEOMETRIES, ids=str)
def test_split_geometry(split, monkeypatch, kernel, stride, dilation, padding):
    require_backend("triton")
    calls = _split_calls(monkeypatch)
    shared.test_geometry("triton", kernel, stride, dilation, padding)
    assert len(calls) == 1, "the forward runs the depthwise kernel; the backward takes its result from the forward"


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("batch", [0, 1, 3, "unbatched"])
@pytest.mark.parametrize("multiplier", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
def test_split_options(split, layout, batch, multiplier, bias):
    if batch == "unbatched" and layout != "contiguous":
        pytest.skip("layouts apply to 4-D input; unbatched input is tested contiguous")
    shared.test_options("triton", layout, batch, multiplier, bias)


@pytest.mark.parametrize("channels,out_channels,size", [(1, 1, 1), (17, 33, 5), (5, 130, 3)])
def test_split_awkward_channels(split, channels, out_channels, size):
    shared.test_awkward_channels("triton", channels, out_channels, size)


def test_split_relu_gradient_with_non_finite_grad_output(split):
    shared.test_relu_input_gradient_with_non_finite_grad_output("triton")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_split_opcheck(split, layout):
    shared.test_opcheck("triton", layout)


@pytest.mark.parametrize("wanted", shared.GRADIENT_NAMES + ("weights only",))
def test_split_backward_op_computes_only_what_the_mask_asks(split, wanted):
    shared.test_backward_op_computes_only_what_the_mask_asks("triton", wanted)


@pytest.mark.parametrize("bias", [False, True])
def test_split_autograd_asks_no_gradient_for_missing_or_frozen_biases(split, bias):
    shared.test_autograd_asks_no_gradient_for_missing_or_frozen_biases("triton", bias)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_split_opcheck_keeping_hidden(split, layout):
    """forward_keeping_hidden returns the forward's output and its depthwise result; backward_from_hidden,
    given that result, returns the gradients that backward (which recomputes it) returns, bit for bit."""
    device = require_backend("triton")
    x, dw, pw, dwb, pwb, stride, padding, dilation = shared._op_args(device, torch.float32, (1, 2, 0, 1))
    x = shared.to_layout(x, layout)
    ops = torch.ops.sepconv_triton
    out, hidden, grad = shared.check_keeping_hidden_ops(ops, x, dw, pw, dwb, pwb, stride, padding, dilation)
    assert hidden.shape == (out.shape[0] * out.shape[2] * out.shape[3], dw.shape[0])
    geometry = (stride, padding, dilation, True)
    with pytest.raises(ValueError, match="hidden must be"):
        ops.backward_from_hidden(grad, x, hidden[1:], dw, pw, dwb, *geometry, [True] * 5)


@pytest.mark.parametrize("pointwise_grad", [True, False])
def test_split_graph_keeps_the_depthwise_result(split, monkeypatch, pointwise_grad):
    """A recorded graph saves the depthwise result, (N*OH*OW, C_hid), where the pointwise weight needs a
    gradient (its one reader), and the backward runs no depthwise kernel; otherwise nothing extra is saved."""
    device = require_backend("triton")
    calls = _split_calls(monkeypatch)
    x, dw, pw, dwb, pwb = make_case(2, 4, 7, 6, (3, 3), 2, 5, True, torch.float32, device)
    leaves = [t.clone().requires_grad_(True) for t in (x, dw, pw, dwb, pwb)]
    leaves[2].requires_grad_(pointwise_grad)
    saved = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = kernels.separable_conv2d(*leaves, padding=1, backend="triton", relu_input=True)
    hidden_shape = (2 * 7 * 6, 8)
    assert (hidden_shape in saved) == pointwise_grad
    out.backward(torch.ones_like(out))
    assert len(calls) == 1, "only the forward runs the depthwise kernel"
    ref, ref_leaves = shared.pair_reference(*leaves, 1, 1, 1, relu_input=True)
    ref.backward(torch.ones_like(ref))
    for name, leaf, ref_leaf in zip(shared.GRADIENT_NAMES, leaves, ref_leaves):
        assert (leaf.grad is not None) == leaf.requires_grad, name
        if leaf.requires_grad:
            torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_split_reads_the_depthwise_weight_in_place(split, monkeypatch, dtype):
    """Both depthwise kernels read the module's (C, 1, kh, kw) weight itself: a contiguous weight is passed as a
    view, so neither pass makes a copy (on a GPU, a launch of its own); a non-contiguous one is copied."""
    device = require_backend("triton", dtype)
    from kernels.triton import split as split_module

    seen = []
    real = split_module.weights_for

    def spy(weight):
        view = real(weight)
        seen.append((view.data_ptr() == weight.data_ptr(), view.is_contiguous(), tuple(view.shape)))
        return view

    monkeypatch.setattr(split_module, "weights_for", spy)
    x, dw, pw, _, _ = make_case(2, 8, 6, 6, (3, 3), 1, 16, False, dtype, device)
    leaves = [t.clone().requires_grad_(True) for t in (x, dw, pw)]
    out = kernels.separable_conv2d(*leaves, padding=1, backend="triton")
    out.backward(torch.ones_like(out))
    assert seen and all(entry == (True, True, (8, 9)) for entry in seen), seen
    seen.clear()
    wide = torch.zeros(8, 1, 3, 6, dtype=dtype, device=device)[..., ::2]  # (8, 1, 3, 3), not contiguous
    wide.copy_(dw)
    kernels.separable_conv2d(x, wide, pw, padding=1, backend="triton")
    assert seen == [(False, True, (8, 9))]


@pytest.mark.parametrize("programs,want_weight,want_bias", [(3, True, True), (700, True, False), (5000, False, True),
                                                          (5000, True, True)])
def test_partial_sums_any_count(programs, want_weight, want_bias):
    """The fixed-order second stage of the depthwise weight and bias gradients at any number of per-program
    partial sums (its block of rows grows with the count, up to 1024 rows a trip and 16 warps): the sums of
    ``part`` over its first axis, in the gradients' layouts and dtypes, and the same bits on a second run."""
    device = require_backend("triton")
    from kernels.triton import split as split_module

    taps, c_hid = 9, 40
    generator = torch.Generator().manual_seed(programs)
    part = torch.randn(programs, taps + 1, c_hid, generator=generator, dtype=torch.float64).float().to(device)
    results = []
    for _ in range(2):
        grad_dw = torch.full((c_hid, 1, 3, 3), float("nan"), device=device)
        grad_db = torch.full((c_hid,), float("nan"), device=device)
        grid, args, constexprs = split_module.partial_sums_launch(part, grad_dw, grad_db, want_weight, want_bias)
        assert constexprs["BLOCK_G"] >= min(1024, programs // 4)
        split_module.partial_sums_kernel[grid](*args, **constexprs, num_stages=1)
        results.append((grad_dw.cpu(), grad_db.cpu()))
    expected = part.double().sum(0).cpu()
    grad_dw, grad_db = results[0]
    if want_weight:
        torch.testing.assert_close(grad_dw.reshape(c_hid, taps).double(), expected[:taps].t(), atol=1e-4, rtol=1e-5)
    else:
        assert grad_dw.isnan().all()
    if want_bias:
        torch.testing.assert_close(grad_db.double(), expected[taps], atol=1e-4, rtol=1e-5)
    else:
        assert grad_db.isnan().all()
    assert all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(results[0], results[1]))


def test_split_torch_compile_fullgraph(split):
    shared.test_torch_compile_fullgraph("triton")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_split_low_precision_within_twice_torch_error(split, dtype, layout):
    device = require_backend("triton", dtype)
    case = make_case(2, 12, 9, 10, (3, 3), 2, 20, True, torch.float64, torch.device("cpu"))
    if layout == "channels_last":
        case = (case[0].contiguous(memory_format=torch.channels_last),) + case[1:]
    assert_within_torch_error(case, dtype, device, stride=(1, 2), padding=1, relu_input=True)


@pytest.mark.parametrize("index", range(5))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_split_every_depthwise_gpu_config(split, monkeypatch, dtype, index):
    device = require_backend("triton", dtype)
    from kernels.triton import forward, split as split_module

    family = forward.family(dtype)
    configs = split_module.GPU_CONFIGS[family]
    assert len(configs) <= 5, "more depthwise configs than this test's indices: extend its range"
    if index >= len(configs):
        pytest.skip(f"the {family} family has {len(configs)} depthwise configs")
    config = configs[index]
    monkeypatch.setitem(forward.forced_configs, split_module.depthwise_autotuned[family].fn, config)
    _check_pinned(dtype, device)


@pytest.mark.parametrize("kernel,stride,padding,dilation", [
    ((3, 3), 1, 1, 1),          # the Xception layers: the bias gradient rides on the centre tap
    ((3, 3), 2, 1, 1),          # stride 2: the bias gradient from its own loop over output pixels
    ((3, 3), 1, "same", 2),
    ((3, 5), 1, 0, 1),          # no "same" tap
    ((5, 5), (2, 1), 2, (1, 2)),
], ids=str)
@pytest.mark.parametrize("relu_input", [False, True])
def test_split_vector_channels(split, monkeypatch, kernel, stride, padding, dilation, relu_input):
    """16 channels, channels_last: both split kernels run with ALIGN = 8 (whole 128-bit channel vectors)."""
    device = require_backend("triton")
    from kernels.triton import split as split_module

    aligns = []
    for name in ("depthwise_launch", "transposed_depthwise_launch"):
        real = getattr(split_module, name)

        def spy(*args, _real=real, **kwargs):
            result = _real(*args, **kwargs)
            aligns.append(result[-1]["ALIGN"])
            return result

        monkeypatch.setattr(split_module, name, spy)
    case = make_case(2, 16, 11, 9, kernel, 1, 24, True, torch.float32, device)
    check("triton", *case, stride, padding, dilation, relu_input=relu_input, layout="channels_last")
    # The backward takes the depthwise result the forward kept: no third depthwise launch.
    assert aligns == [8, 8], "forward depthwise, transposed depthwise"


@pytest.mark.parametrize("target_programs", [1, 10**6])
def test_split_transposed_pixel_split(split, monkeypatch, target_programs):
    """One program walking every pixel, or one program per pixel block: the same gradients."""
    device = require_backend("triton")
    from kernels.triton import split as split_module

    monkeypatch.setattr(split_module, "TARGET_PROGRAMS", target_programs)
    monkeypatch.setattr(split_module, "PIXEL_QUANTUM", 16)
    case = make_case(3, 8, 10, 7, (3, 3), 1, 12, True, torch.float32, device)
    check("triton", *case, 1, 1, 1, relu_input=True, layout="channels_last")
    case = make_case(2, 4, 9, 7, (3, 3), 1, 6, True, torch.float32, device)
    check("triton", *case, 2, 1, 1, relu_input=True, layout="channels_last")


@pytest.mark.parametrize("index", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_split_every_transposed_gpu_config(split, monkeypatch, dtype, index):
    device = require_backend("triton", dtype)
    from kernels.triton import forward, split as split_module

    family = forward.family(dtype)
    config = split_module.TRANSPOSED_CONFIGS[family][index]
    monkeypatch.setitem(forward.forced_configs, split_module.transposed_autotuned[family].fn, config)
    _check_pinned(dtype, device)


@pytest.mark.parametrize("mode", ["fused", "split"])
def test_float64_gradcheck_vector_channels(monkeypatch, mode):
    """float64 (summed in fp64) through the ALIGN = 8 kernels: 8 channels, channels_last, depth multiplier 1,
    so the transposed-depthwise kernel writes the input gradient (test_separable_conv's gradcheck has M = 2)."""
    device = require_backend("triton", torch.float64)
    monkeypatch.setenv(MODE, mode)
    x, dw, pw, dwb, pwb = make_case(1, 8, 4, 5, (3, 3), 1, 3, True, torch.float64, device)
    x = x.contiguous(memory_format=torch.channels_last)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, dw, pw, dwb, pwb)]

    def fn(*args):
        return kernels.separable_conv2d(*args, 1, 1, 1, backend="triton", relu_input=True)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_split_is_deterministic(split):
    device = require_backend("triton")
    case = [t.to(device) for t in make_case(3, 8, 12, 12, (3, 3), 1, 16, True, torch.float32, torch.device("cpu"))]
    first, second = _run(case, "triton", padding=1), _run(case, "triton", padding=1)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_mode_setting(monkeypatch):
    device = require_backend("triton")
    case = [t.to(device) for t in make_case(1, 4, 6, 6, (3, 3), 1, 5, True, torch.float32, torch.device("cpu"))]
    monkeypatch.setenv(MODE, "fast")
    with pytest.raises(ValueError, match="SEPCONV_TRITON_MODE='fast'"):
        kernels.separable_conv2d(*case, padding=1, backend="triton")
    # Both modes agree to fp32 rounding.
    monkeypatch.setenv(MODE, "fused")
    fused = _run(case, "triton", padding=1)
    monkeypatch.setenv(MODE, "split")
    split_result = _run(case, "triton", padding=1)
    for a, b in zip(fused, split_result):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_split_model_matches_eager_conv2d_model(split, monkeypatch):
    """The whole Xception (train mode, every gradient) in split mode against the nn.Conv2d model."""
    import test_model

    calls = _split_calls(monkeypatch)
    test_model.test_every_backend_matches_eager_conv2d_model("triton")
    assert calls, "split mode did not run"


def test_every_sweep_candidate_of_the_depthwise_kernels(split, monkeypatch):
    """Every tile config and tile the sweep may pin for split mode's two kernels (``benchmarks.triton_sweep``,
    whose fastest ``benchmarks/gpu_check.sh`` runs the layer benchmarks with): the depthwise result, and the
    input and depthwise-weight gradients of the transposed kernel, against float64 (the interpreter runs the
    kernels' logic for each setting; a GPU compiles the same)."""
    if require_backend("triton").type != "cpu":
        pytest.skip("the interpreter checks every sweep config's arithmetic; compiled one by one on a GPU they "
                    "would take minutes (the sweep itself reports a config that fails there)")
    from benchmarks.triton_sweep import candidate, sweep_candidates
    from kernels.triton import split as split_module

    # 16 channels, channels_last: 128-bit channel vectors (ALIGN = 8); 7 x 9 pixels leave partial slots.
    x, dw, pw, dwb, _ = make_case(2, 16, 7, 9, (3, 3), 1, 8, True, torch.float64, torch.device("cpu"))
    x = x.contiguous(memory_format=torch.channels_last)
    geometry = ([1, 1], [1, 1, 1, 1], [1, 1])
    hidden = torch.nn.functional.conv2d(x, dw, dwb, 1, 1, 1, 16)
    expected = hidden.permute(0, 2, 3, 1).reshape(-1, 16)
    grad = torch.randn(2, 8, 7, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, dw)]
    torch.nn.functional.conv2d(torch.nn.functional.conv2d(leaves[0], leaves[1], dwb, 1, 1, 1, 16), pw).backward(grad)
    xf = x.float().contiguous(memory_format=torch.channels_last)
    dwf, pwf, dwbf = dw.float(), pw.float(), dwb.float()
    gradf = grad.float().contiguous(memory_format=torch.channels_last)
    seen = set()
    for kernel in ("depthwise", "transposed"):
        for tile, config in sweep_candidates(kernel, "fp32"):
            key = (kernel, tile, tuple(sorted(config.kwargs.items())))
            if key in seen:  # the same arithmetic in another warp count
                continue
            seen.add(key)
            with candidate(kernel, "fp32", config, tile):
                if kernel == "depthwise":
                    result = split_module.depthwise(xf, dwf, dwbf, (7, 9), *geometry, False)
                    torch.testing.assert_close(result.double(), expected, atol=1e-5, rtol=1e-5, msg=str(key))
                else:
                    grads = split_module.backward(gradf, xf, dwf, pwf, dwbf, *geometry, False,
                                                  [True, True, False, False, False])
                    torch.testing.assert_close(grads[0].double(), leaves[0].grad, atol=1e-4, rtol=1e-4, msg=str(key))
                    torch.testing.assert_close(grads[1].double(), leaves[1].grad, atol=1e-4, rtol=1e-4, msg=str(key))
    assert len(seen) > 40
