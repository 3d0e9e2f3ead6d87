"""Every backend against ``nn.Conv2d(groups=C)`` + 1x1: forward and every gradient."""

import contextlib
import itertools
import random

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
from conftest import ALL_BACKENDS, TOLERANCES, require_backend


def make_case(batch, channels, height, width, kernel, multiplier, out_channels, bias, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    kh, kw = kernel

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype=dtype, device=device)

    hidden = channels * multiplier
    x = randn(batch, channels, height, width)
    dw = randn(hidden, 1, kh, kw, scale=(kh * kw) ** -0.5)
    pw = randn(out_channels, hidden, 1, 1, scale=hidden ** -0.5)
    dwb = randn(hidden) if bias else None
    pwb = randn(out_channels) if bias else None
    return x, dw, pw, dwb, pwb


def to_layout(x, layout):
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":
        # Every dimension strided: a view into a larger tensor.
        big = torch.zeros(x.shape[0], x.shape[1] * 2, x.shape[2] + 3, x.shape[3] * 2, dtype=x.dtype, device=x.device)
        view = big[:, ::2, 1:1 + x.shape[2], ::2]
        view.copy_(x)
        assert x.numel() == 0 or not (view.is_contiguous() or view.is_contiguous(memory_format=torch.channels_last))
        return view
    return x.contiguous()


def pair_reference(x, dw, pw, dwb, pwb, stride, padding, dilation, relu_input=False):
    """The nn.Conv2d(groups=C) + 1x1 pair, in float64."""
    args = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in (x, dw, pw, dwb, pwb)]
    out = kernels.separable_conv2d_reference(*args, stride, padding, dilation, relu_input=relu_input)
    return out, args


def check(backend, x, dw, pw, dwb, pwb, stride=1, padding=0, dilation=1, relu_input=False, layout="contiguous"):
    """Run ``backend`` and the float64 pair; compare output and every gradient."""
    tol = TOLERANCES[x.dtype]
    x = to_layout(x, layout) if x.dim() == 4 else x
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, dw, pw, dwb, pwb)]
    if layout == "sliced" and x.dim() == 4:
        leaves[0] = to_layout(leaves[0].detach(), "sliced").requires_grad_(True)
    out = kernels.separable_conv2d(*leaves, stride, padding, dilation, backend=backend, relu_input=relu_input)
    ref, ref_leaves = pair_reference(*leaves, stride, padding, dilation, relu_input)

    assert out.shape == ref.shape
    assert out.dtype == x.dtype
    if x.dim() == 4 and out.numel() > 0:
        expect_cl = layout == "channels_last" or (layout == "sliced" and x.stride(1) < x.stride(3))
        if expect_cl and out.shape[1] > 1 and out.shape[2] * out.shape[3] > 1:
            assert out.is_contiguous(memory_format=torch.channels_last), "output must keep channels_last"
        elif layout == "contiguous":
            assert out.is_contiguous(), "output must keep NCHW"
    torch.testing.assert_close(out.double(), ref, **tol)

    grad = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out.backward(grad.to(out))
    ref.backward(grad.to(ref.device))
    for name, leaf, ref_leaf in zip(("input", "depthwise_weight", "pointwise_weight", "depthwise_bias",
                                     "pointwise_bias"), leaves, ref_leaves):
        if leaf is None:
            continue
        assert leaf.grad is not None, f"no gradient for {name}"
        torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, **grad_tolerance(tol, ref_leaf.grad, x.dtype),
                                   msg=lambda m: f"grad {name}: {m}")


def grad_tolerance(tol, ref_grad, dtype):
    """A weight gradient sums a product per pixel (8,712 of them at batch 2, 66x66), so in float32 its
    rounding error grows with the gradient's scale, not with each element: an element that cancels to
    near zero among elements of 1e3 keeps an error of ~1e-4 to 1e-3 (about 5e-7 of the largest, in
    either accumulation order). Float32 allows 1e-5 of the largest |element| as the absolute error; a
    real fault (a block left out, a wrong index) is off by the order of the elements themselves."""
    if dtype != torch.float32 or ref_grad.numel() == 0:
        return tol
    return dict(tol, atol=max(tol["atol"], 1e-5 * ref_grad.abs().max().item()))


GEOMETRIES = [
    (kernel, stride, dilation, padding)
    for kernel, stride, dilation, padding in itertools.product(
        [(1, 1), (3, 3), (5, 5), (7, 7), (3, 5), (2, 4)], [1, 2], [1, 2], [0, 1, "same", "valid"])
    if not (padding == "same" and stride != 1)
]


@pytest.mark.parametrize("kernel,stride,dilation,padding", GEOMETRIES, ids=str)
def test_geometry(backend, kernel, stride, dilation, padding):
    device = require_backend(backend)
    # Odd sizes, large enough for the widest dilated kernel even without padding.
    height = max(11, dilation * (kernel[0] - 1) + 2)
    width = max(9, dilation * (kernel[1] - 1) + 3)
    case = make_case(2, 3, height, width, kernel, 1, 5, True, torch.float32, device)
    check(backend, *case, stride, padding, dilation)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("batch", [0, 1, 3, "unbatched"])
@pytest.mark.parametrize("multiplier", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
def test_options(backend, layout, batch, multiplier, bias):
    device = require_backend(backend)
    if batch == "unbatched" and layout != "contiguous":
        pytest.skip("layouts apply to 4-D input; unbatched input is tested contiguous")
    case = make_case(1 if batch == "unbatched" else batch, 6, 7, 10, (3, 3), multiplier, 4, bias, torch.float32, device)
    if batch == "unbatched":
        case = (case[0][0],) + case[1:]
    check(backend, *case, stride=(1, 2), padding=(1, 2), dilation=1, layout=layout)


@pytest.mark.parametrize("channels,out_channels,size", [(1, 1, 1), (17, 33, 5), (64, 72, 6), (5, 130, 3)])
def test_awkward_channels(backend, channels, out_channels, size):
    device = require_backend(backend)
    case = make_case(2, channels, size, size + 2, (3, 3), 1, out_channels, True, torch.float32, device)
    check(backend, *case, padding=1, layout="channels_last")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_relu_input(backend, layout):
    device = require_backend(backend)
    case = make_case(2, 4, 8, 8, (3, 3), 1, 6, True, torch.float32, device)
    check(backend, *case, padding=1, relu_input=True, layout=layout)


def test_relu_input_gradient_with_non_finite_grad_output(backend):
    """Where the input is <= 0 the input gradient is exactly 0, as nn.ReLU's backward gives, even
    where grad_output carries an inf into that pixel."""
    device = require_backend(backend)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 4, 8, 8, generator=g).to(device).requires_grad_(True)
    dw, pw = torch.randn(4, 1, 3, 3, generator=g).to(device), torch.randn(5, 4, 1, 1, generator=g).to(device)
    grad = torch.randn(1, 5, 8, 8, generator=g)
    grad[0, :, 4, 4] = float("inf")
    kernels.separable_conv2d(x, dw, pw, padding=1, relu_input=True, backend=backend).backward(grad.to(device))
    window = x.grad[0, :, 3:6, 3:6]
    assert not torch.isfinite(window[x.detach()[0, :, 3:6, 3:6] > 0]).any()  # inf (or inf - inf) reached them
    assert (x.grad[x.detach() <= 0] == 0).all()


def random_geometry(seed):
    """A seeded geometry unlike the grid's: kernel size, stride, dilation and padding chosen per dimension, a
    depth multiplier, any channel counts, batch 0 to 3, with or without biases and relu_input, either layout."""
    rng = random.Random(seed)
    while True:
        kernel = (rng.randint(1, 5), rng.randint(1, 5))
        stride, dilation = (rng.randint(1, 3), rng.randint(1, 3)), (rng.randint(1, 3), rng.randint(1, 2))
        padding = (rng.randint(0, 3), rng.randint(0, 3))
        height, width = rng.randint(1, 16), rng.randint(1, 16)
        if (height + 2 * padding[0] >= dilation[0] * (kernel[0] - 1) + 1
                and width + 2 * padding[1] >= dilation[1] * (kernel[1] - 1) + 1):
            break
    return dict(batch=rng.randint(0, 3), channels=rng.randint(1, 40), multiplier=rng.choice([1, 1, 2, 3]),
                out_channels=rng.randint(1, 70), size=(height, width), kernel=kernel, stride=stride,
                dilation=dilation, padding=padding, bias=rng.random() < 0.5, relu_input=rng.random() < 0.5,
                layout=rng.choice(["contiguous", "channels_last"]))


RANDOM_GEOMETRIES = [random_geometry(seed) for seed in range(8)]


@pytest.mark.parametrize("geometry", RANDOM_GEOMETRIES,
                         ids=lambda g: "-".join(f"{k}={v}" for k, v in g.items()).replace(" ", ""))
def test_random_geometries(backend, geometry):
    """Eight seeded geometries beyond the grid (each argument drawn per dimension), in float32 and float64."""
    g = geometry
    for dtype in (torch.float32, torch.float64):
        device = require_backend(backend, dtype)
        case = make_case(g["batch"], g["channels"], *g["size"], g["kernel"], g["multiplier"], g["out_channels"],
                         g["bias"], dtype, device, seed=7)
        check(backend, *case, g["stride"], g["padding"], g["dilation"], relu_input=g["relu_input"],
              layout=g["layout"])


def test_float64_matches(backend):
    device = require_backend(backend, torch.float64)
    case = make_case(2, 3, 8, 7, (3, 3), 2, 4, True, torch.float64, device)
    check(backend, *case, stride=2, padding=1, dilation=1)


@pytest.mark.parametrize("relu_input", [False, True])
def test_gradcheck(backend, relu_input):
    device = require_backend(backend, torch.float64)
    x, dw, pw, dwb, pwb = make_case(2, 3, 6, 5, (3, 2), 2, 4, True, torch.float64, device)
    if relu_input:  # keep inputs away from the kink of the ReLU
        x = x + 0.1 * torch.sign(x)
    leaves = [t.requires_grad_(True) for t in (x, dw, pw, dwb, pwb)]

    def fn(*tensors):
        return kernels.separable_conv2d(*tensors, stride=(2, 1), padding="valid", dilation=(1, 2),
                                        backend=backend, relu_input=relu_input)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


def _op_args(device, dtype, padding=(1, 1, 1, 1)):
    x, dw, pw, dwb, pwb = make_case(2, 3, 7, 6, (3, 3), 2, 5, True, dtype, device)
    return x, dw, pw, dwb, pwb, [1, 2], list(padding), [1, 1]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(backend, layout):
    device = require_backend(backend)
    x, dw, pw, dwb, pwb, stride, padding, dilation = _op_args(device, torch.float32, (1, 2, 0, 1))
    x = to_layout(x, layout)
    namespace = getattr(torch.ops, kernels.ops.namespace(backend))
    out = namespace.forward(x, dw, pw, dwb, pwb, stride, padding, dilation, False)
    grad = torch.randn_like(out)
    torch.library.opcheck(namespace.forward.default, (x, dw, pw, dwb, pwb, stride, padding, dilation, False))
    torch.library.opcheck(namespace.forward.default,
                          (x.requires_grad_(), dw.requires_grad_(), pw, None, pwb, stride, padding, dilation, True))
    for mask in ([True] * 5, [False, True, False, False, False], [True, False, True, False, True],
                 [False, False, False, True, True]):
        torch.library.opcheck(namespace.backward.default,
                              (grad, x.detach(), dw.detach(), pw, dwb, stride, padding, dilation, False, mask))


def check_keeping_hidden_ops(ops, x, dw, pw, dwb, pwb, stride, padding, dilation):
    """``ops.forward_keeping_hidden`` returns ``ops.forward``'s output (and the depthwise result, returned
    for the caller to check); ``ops.backward_from_hidden``, given that result, returns ``ops.backward``'s
    gradients bit for bit, for several masks; both pass opcheck."""
    args = (x, dw, pw, dwb, pwb, stride, padding, dilation, True)
    out, hidden = ops.forward_keeping_hidden(*args)
    assert torch.equal(out, ops.forward(*args))
    torch.library.opcheck(ops.forward_keeping_hidden.default, args)
    grad = torch.randn_like(out)
    geometry = (stride, padding, dilation, True)
    for mask in ([True] * 5, [False, False, True, False, False], [True, True, False, True, True]):
        kept = ops.backward_from_hidden(grad, x, hidden, dw, pw, dwb, *geometry, mask)
        recomputed = ops.backward(grad, x, dw, pw, dwb, *geometry, mask)
        for a, b in zip(kept, recomputed):
            assert torch.equal(a, b)
        torch.library.opcheck(ops.backward_from_hidden.default, (grad, x, hidden, dw, pw, dwb, *geometry, mask))
    return out, hidden, grad


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_torch_opcheck_keeping_hidden(layout):
    """The torch backend keeps the depthwise convolution's (N, C_hid, OH, OW) result."""
    x, dw, pw, dwb, pwb, stride, padding, dilation = _op_args(torch.device("cpu"), torch.float32, (1, 2, 0, 1))
    out, hidden, _ = check_keeping_hidden_ops(torch.ops.sepconv_torch, to_layout(x, layout), dw, pw, dwb, pwb,
                                              stride, padding, dilation)
    assert hidden.shape == (out.shape[0], dw.shape[0], out.shape[2], out.shape[3])


GRADIENT_NAMES = ("input", "depthwise_weight", "pointwise_weight", "depthwise_bias", "pointwise_bias")


@pytest.mark.parametrize("wanted", GRADIENT_NAMES + ("weights only",))
def test_backward_op_computes_only_what_the_mask_asks(backend, wanted):
    """Each gradient the mask leaves out comes back empty; the ones it asks for equal the whole backward's."""
    device = require_backend(backend)
    x, dw, pw, dwb, pwb, stride, padding, dilation = _op_args(device, torch.float32, (1, 2, 0, 1))
    namespace = getattr(torch.ops, kernels.ops.namespace(backend))
    grad = torch.randn_like(namespace.forward(x, dw, pw, dwb, pwb, stride, padding, dilation, True))
    full = namespace.backward(grad, x, dw, pw, dwb, stride, padding, dilation, True, [True] * 5)
    mask = [name == wanted or (wanted == "weights only" and name.endswith("weight")) for name in GRADIENT_NAMES]
    part = namespace.backward(grad, x, dw, pw, dwb, stride, padding, dilation, True, mask)
    for name, asked, whole, got in zip(GRADIENT_NAMES, mask, full, part):
        if asked:
            torch.testing.assert_close(got, whole, **TOLERANCES[torch.float32], msg=lambda m: f"grad {name}: {m}")
        else:
            assert got.shape == (0,), f"grad {name} was not asked for, got shape {tuple(got.shape)}"


class _Copies(TorchDispatchMode):
    """Records the shape of every ``aten.copy_`` destination."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.copy_.default:
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("size, padding, copies_input_grad", [(6, (1, 1, 1, 1), False), (1, (1, 1, 1, 1), False),
                                                            (6, (0, 1, 1, 2), True)],
                         ids=["6x6", "1x1", "asymmetric"])
def test_torch_backend_returns_results_in_the_promised_strides_without_copying(layout, size, padding,
                                                                                 copies_input_grad):
    """The torch backend hands back what ATen computed when it already has the strides its fake kernel
    promises (no pass over the output); a padded-then-sliced input gradient is copied."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, size, size, generator=generator).contiguous(memory_format=layout)
    dw, pw = torch.randn(4, 1, 3, 3, generator=generator), torch.randn(5, 4, 1, 1, generator=generator)
    geometry = ([1, 1], list(padding), [1, 1], False)
    promised = kernels._args.memory_format_of(x)  # what the fake kernels give (either, for a 1x1 image)
    out = torch.ops.sepconv_torch.forward(x, dw, pw, None, None, *geometry)
    assert out.stride() == torch.empty(out.shape, memory_format=promised).stride()
    grad = torch.randn(out.shape, generator=generator).contiguous(memory_format=layout)
    mask = [True, True, True, False, False]
    grads = torch.ops.sepconv_torch.backward(grad, x, dw, pw, None, *geometry, mask)
    assert grads[0].stride() == torch.empty(x.shape, memory_format=promised).stride()
    # The ops' Python kernels, called directly: a mode does not see inside the op it dispatches.
    with _Copies() as copies:
        kernels.ops._torch_forward(x, dw, pw, None, None, *geometry)
    assert tuple(out.shape) not in copies.shapes, copies.shapes
    with _Copies() as copies:
        kernels.ops._torch_backward(grad, x, dw, pw, None, *geometry, mask)
    assert (tuple(x.shape) in copies.shapes) == copies_input_grad, copies.shapes
    top, bottom, left, right = padding
    x.requires_grad_(), dw.requires_grad_(), pw.requires_grad_()
    expected = kernels.separable_conv2d_reference(F.pad(x, [left, right, top, bottom]), dw, pw)
    torch.testing.assert_close(out, expected)
    for got, want in zip(grads, torch.autograd.grad(expected, (x, dw, pw), grad)):
        torch.testing.assert_close(got, want)


def test_backward_op_rejects_a_short_mask():
    x, dw, pw, dwb, pwb, stride, padding, dilation = _op_args(torch.device("cpu"), torch.float32)
    grad = torch.randn(2, 5, 7, 3)
    with pytest.raises((ValueError, RuntimeError), match="output_mask"):
        torch.ops.sepconv_torch.backward(grad, x, dw, pw, dwb, stride, padding, dilation, False, [True] * 3)


@pytest.mark.parametrize("bias", [False, True])
def test_autograd_asks_no_gradient_for_missing_or_frozen_biases(backend, bias):
    """A layer without biases (Xception's) asks the backward op for neither bias gradient, and a frozen
    pointwise bias is not asked for either; the gradients asked for still match the reference."""
    from torch.utils._python_dispatch import TorchDispatchMode

    device = require_backend(backend)
    x, dw, pw, dwb, pwb = make_case(2, 4, 7, 6, (3, 3), 1, 5, bias, torch.float32, device)
    masks = []

    class RecordMasks(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._schema.name.startswith("sepconv_") and "::backward" in func._schema.name:
                masks.append(list(args[-1]))
            return func(*args, **(kwargs or {}))

    leaves = [t.clone().requires_grad_(True) for t in (x, dw, pw)] + [dwb, pwb]
    if bias:
        leaves[3] = dwb.clone().requires_grad_(True)  # the pointwise bias stays frozen
    with RecordMasks():  # under a dispatch mode the torch backend runs its ops too (kernels.autograd.plain_eager)
        out = kernels.separable_conv2d(*leaves, padding=1, backend=backend)
        out.backward(torch.ones_like(out))
    assert masks == [[True, True, True, bias, False]]
    ref, ref_leaves = pair_reference(*leaves, 1, 1, 1)
    ref.backward(torch.ones_like(ref))
    for name, leaf, ref_leaf in zip(GRADIENT_NAMES, leaves, ref_leaves):
        if leaf is not None and leaf.requires_grad:
            torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, **TOLERANCES[torch.float32],
                                       msg=lambda m: f"grad {name}: {m}")


def test_torch_compile_fullgraph(backend):
    device = require_backend(backend)
    x, dw, pw, dwb, pwb = make_case(2, 4, 9, 9, (3, 3), 1, 6, True, torch.float32, device)
    x = x.contiguous(memory_format=torch.channels_last)

    def fn(x, dw, pw, dwb, pwb):
        return kernels.separable_conv2d(x, dw, pw, dwb, pwb, 1, "same", backend=backend).square().sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_(True) for t in (x, dw, pw, dwb, pwb)]
    eager_leaves = [t.clone().requires_grad_(True) for t in (x, dw, pw, dwb, pwb)]
    loss = compiled(*leaves)
    loss.backward()
    eager = fn(*eager_leaves)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    for leaf, eager_leaf in zip(leaves, eager_leaves):
        torch.testing.assert_close(leaf.grad, eager_leaf.grad)


def test_torch_compile_inductor():
    """The default compiler (Inductor) on the auto backend, forward and backward."""
    x, dw, pw, dwb, pwb = make_case(2, 4, 9, 9, (3, 3), 1, 6, True, torch.float32, torch.device("cpu"))
    module = kernels.SeparableConv2d(4, 6, 3, padding=1, bias=True)
    compiled = torch.compile(module, fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, module(x))
    assert module.conv1.weight.grad is not None


def test_torch_compile_before_any_eager_call(monkeypatch):
    """A first call made under torch.compile(fullgraph=True) resolves the backend without a graph break."""
    from kernels import dispatch

    monkeypatch.setattr(dispatch, "_resolved", {})
    module = kernels.SeparableConv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 9, 9)
    out = torch.compile(module, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(out, module(x))


class _PassThrough(TorchDispatchMode):
    """A dispatch mode that changes nothing: under one, the torch backend runs through its ops."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend_name, pointwise_grad, through_ops", [
    ("cpp", True, True), ("torch", True, True), ("torch", False, True), ("torch", True, False),
    ("torch", False, False)])
def test_what_backward_saves(backend_name, pointwise_grad, through_ops):
    """cpp saves the input and weights only (its backward recomputes the depthwise result tile by tile).
    torch through its ops (under tracing or a dispatch mode) also keeps the depthwise result, as the eager
    nn.Conv2d pair does, where the pointwise weight's gradient (its one reader) is wanted; in plain eager
    calls it is the ATen pair itself and saves exactly what the pair saves."""
    device = require_backend(backend_name)
    x, dw, pw, dwb, pwb = make_case(2, 4, 9, 9, (3, 3), 1, 6, True, torch.float32, device)
    leaves = [t.requires_grad_(True) for t in (x, dw, pw, dwb, pwb)]
    pw.requires_grad_(pointwise_grad)

    def saved_by(call):
        saved = []

        def pack(tensor):
            saved.append(tuple(tensor.shape))
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return call(), sorted(saved)

    def ours():
        with _PassThrough() if through_ops else contextlib.nullcontext():
            return kernels.separable_conv2d(*leaves, padding=1, backend=backend_name)

    out, saved = saved_by(ours)
    want, saved_by_pair = saved_by(lambda: kernels.separable_conv2d_reference(*leaves, padding=1))
    if through_ops:
        expected = [tuple(x.shape), tuple(dw.shape), tuple(pw.shape), tuple(dwb.shape)]
        if backend_name == "torch" and pointwise_grad:
            expected.append((2, dw.shape[0], 9, 9))
        assert saved == sorted(expected)
    else:
        assert saved == saved_by_pair
    grads = torch.autograd.grad(out, [t for t in leaves if t.requires_grad], torch.ones_like(out))
    for got, reference in zip(grads, torch.autograd.grad(want, [t for t in leaves if t.requires_grad],
                                                         torch.ones_like(want))):
        torch.testing.assert_close(got, reference, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("backend_name", ALL_BACKENDS)
def test_backends_agree_bitwise_with_themselves(backend_name):
    """Two runs of the same backend give identical gradients (determinism)."""
    device = require_backend(backend_name)
    case = make_case(3, 8, 12, 12, (3, 3), 1, 16, True, torch.float32, device)
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_(True) for t in case]
        kernels.separable_conv2d(*leaves, padding=1, backend=backend_name).sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    for first, second in zip(*grads):
        assert torch.equal(first, second)


def test_input_requires_no_grad(backend):
    """Gradients only for the weights (frozen input) and only for the input (frozen weights)."""
    device = require_backend(backend)
    x, dw, pw, dwb, pwb = make_case(2, 3, 6, 6, (3, 3), 1, 4, True, torch.float32, device)
    dw.requires_grad_(True)
    kernels.separable_conv2d(x, dw, pw, dwb, pwb, padding=1, backend=backend).sum().backward()
    ref_dw = dw.detach().double().requires_grad_(True)
    F.conv2d(F.conv2d(x.double(), ref_dw, dwb.double(), padding=1, groups=3), pw.double(), pwb.double()).sum().backward()
    torch.testing.assert_close(dw.grad.double(), ref_dw.grad, **TOLERANCES[torch.float32])

    x.requires_grad_(True)
    dw = dw.detach()
    kernels.separable_conv2d(x, dw, pw, dwb, pwb, padding=1, backend=backend).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
