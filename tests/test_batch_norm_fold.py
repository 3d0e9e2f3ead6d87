"""A training-mode BatchNorm folded into the next separable convolution's input read.

``sepconv_cpp::batch_norm_separable`` against BatchNorm (batch statistics) then ReLU then the eager conv pair
(output, moments, statistics, all seven gradients) over geometries and dtypes; its op contract; and
``kernels.run_sequential``: where it folds (counted ops), that it matches the modules called in turn (outputs,
gradients, running statistics, num_batches_tracked), where it must not fold, and that a fold keeps one
activation less for the backward.
"""

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kernels
from conftest import require_backend

batch_norm_module = sys.modules["kernels.batch_norm"]  # `kernels.batch_norm` is the function

# (N, C, C_out, H, W, kernel, stride, padding, dilation)
GEOMETRIES = {
    "3x3": (2, 19, 23, 9, 11, 3, 1, 1, 1),
    "stride-2": (2, 64, 40, 12, 12, 3, 2, 1, 1),
    "dilation-2": (1, 40, 8, 7, 9, 3, 1, 2, 2),
    "5x5": (3, 33, 17, 6, 5, 5, 1, 2, 1),
    "1x1": (2, 16, 16, 8, 8, 1, 1, 0, 1),
    "interior-runs": (2, 48, 32, 15, 15, 3, 1, 1, 1),
    # One image of few channels, tall: the separable backward splits it into row bands, and BatchNorm's backward
    # takes its sums in a pass of its own (elsewhere the separable backward takes them as it finishes rows).
    "one-image-bands": (1, 16, 8, 24, 10, 3, 1, 1, 1),
}


def _tensors(geometry, dtype, seed=0, biases=True, affine=True):
    n, c, cout, h, w, k, *_ = geometry
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape, scale=1.0, offset=0.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale + offset).requires_grad_()

    z = leaf(n, c, h, w, scale=2.0, offset=0.5).detach().contiguous(memory_format=torch.channels_last)
    bn_weight = (torch.rand(c, generator=g, dtype=dtype) + 0.5).requires_grad_() if affine else None
    bn_bias = leaf(c) if affine else None
    return (z.requires_grad_(), bn_weight, bn_bias, leaf(c, 1, k, k), leaf(cout, c, 1, 1, scale=c ** -0.5),
            leaf(c) if biases else None, leaf(cout) if biases else None)


def _reference(z, bn_weight, bn_bias, eps, depthwise, pointwise, depthwise_bias, pointwise_bias, geometry, relu):
    *_, stride, padding, dilation = geometry
    y = F.batch_norm(z, None, None, bn_weight, bn_bias, True, 0.0, eps)
    if relu:
        y = F.relu(y)
    hidden = F.conv2d(y, depthwise, depthwise_bias, stride, padding, dilation, groups=z.shape[1])
    return F.conv2d(hidden, pointwise, pointwise_bias)


def _call(z, bn_weight, bn_bias, eps, depthwise, pointwise, depthwise_bias, pointwise_bias, geometry, relu,
          moments=None, with_moments=True):
    *_, stride, padding, dilation = geometry
    return torch.ops.sepconv_cpp.batch_norm_separable(z, moments, bn_weight, bn_bias, eps, depthwise, pointwise,
                                                      depthwise_bias, pointwise_bias, [stride] * 2, [padding] * 4,
                                                      [dilation] * 2, relu, with_moments)


def _assert_near(got, want, rel, what):
    bound = rel * max(want.abs().max().item(), 1.0)
    error = (got.double() - want.double()).abs().max().item()
    assert error <= bound, f"{what}: max error {error:.3g} > {bound:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("relu", [False, True], ids=["no-relu", "relu"])
@pytest.mark.parametrize("geometry", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_op_is_batch_norm_then_the_conv_pair(geometry, relu, dtype):
    """Output, its moments, BatchNorm's statistics and the seven gradients as F.batch_norm (batch statistics),
    ReLU, then the two convolutions; the statistics from given moments as from the op's own pass."""
    require_backend("cpp", dtype)
    tensors = _tensors(geometry, dtype)
    out, moments, mean, invstd, var = _call(*tensors[:3], 1e-5, *tensors[3:], geometry, relu)
    want = _reference(*tensors[:3], 1e-5, *tensors[3:], geometry, relu)
    rel = 5e-5 if dtype == torch.float32 else 1e-11
    assert out.is_contiguous(memory_format=torch.channels_last) and out.shape == want.shape
    _assert_near(out, want, rel, "output")
    var_want, mean_want = torch.var_mean(want.detach().double(), (0, 2, 3), correction=0)
    _assert_near(moments[0], mean_want, rel, "output mean")
    _assert_near(moments[1] / (want.numel() // want.shape[1]), var_want, rel, "output variance")
    z = tensors[0].detach().double()
    _assert_near(mean, z.mean((0, 2, 3)), rel, "mean")
    _assert_near(invstd, (z.var((0, 2, 3), correction=0) + 1e-5).rsqrt(), rel, "invstd")
    _assert_near(var, z.var((0, 2, 3)), rel, "unbiased variance")
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
    got_grads = torch.autograd.grad(out, tensors, grad)
    want_grads = torch.autograd.grad(want, tensors, grad)
    for name, a, b in zip(("input", "bn_weight", "bn_bias", "depthwise", "pointwise", "depthwise_bias",
                           "pointwise_bias"), got_grads, want_grads):
        _assert_near(a, b, 10 * rel, f"{name} gradient")
    # Statistics from the moments a separable forward gathered: the same op, no pass of its own.
    given = torch.stack([z.mean((0, 2, 3)), z.var((0, 2, 3), correction=0) * (z.numel() // z.shape[1])])
    again = _call(*tensors[:3], 1e-5, *tensors[3:], geometry, relu, moments=given, with_moments=False)
    _assert_near(again[0], out.detach(), rel, "output from given moments")
    assert again[1].numel() == 0


def test_no_biases_no_affine_and_gradcheck():
    """BatchNorm without weight and bias, a conv without biases: the reference; float64 gradcheck."""
    require_backend("cpp", torch.float64)
    geometry = (2, 5, 4, 5, 6, 3, 1, 1, 1)
    tensors = _tensors(geometry, torch.float64, biases=False, affine=False)
    out = _call(*tensors[:3], 1e-3, *tensors[3:], geometry, True)[0]
    _assert_near(out, _reference(*tensors[:3], 1e-3, *tensors[3:], geometry, True), 1e-11, "output")
    z, _, _, depthwise, pointwise, _, _ = tensors
    bn_weight = (torch.rand(5, dtype=torch.float64) + 0.5).requires_grad_()
    bn_bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda *t: _call(t[0], t[1], t[2], 1e-3, t[3], t[4], None, None, geometry, True)[0],
                             (z, bn_weight, bn_bias, depthwise, pointwise))


def test_opcheck_and_errors():
    require_backend("cpp")
    ops = torch.ops.sepconv_cpp
    geometry = (2, 6, 4, 5, 7, 3, 1, 1, 1)
    z, bn_weight, bn_bias, depthwise, pointwise, depthwise_bias, pointwise_bias = _tensors(geometry, torch.float32)
    args = (z, None, bn_weight, bn_bias, 1e-5, depthwise, pointwise, depthwise_bias, pointwise_bias, [1, 1],
            [1, 1, 1, 1], [1, 1], True, True)
    torch.library.opcheck(ops.batch_norm_separable.default, args)
    detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(ops.batch_norm_separable.default, detached)
    out, _, mean, invstd, _ = ops.batch_norm_separable(*detached)
    torch.library.opcheck(ops.batch_norm_separable_backward.default,
                          (torch.randn_like(out), z.detach(), bn_weight.detach(), bn_bias.detach(), mean, invstd,
                           depthwise.detach(), pointwise.detach(), depthwise_bias.detach(), [1, 1], [1, 1, 1, 1],
                           [1, 1], True, [True, True, False, True, False, True, True]))
    with pytest.raises(RuntimeError, match=r"needs a depth multiplier of 1 \(depthwise_weight of 6 channels\)"):
        ops.batch_norm_separable(z.detach(), None, None, None, 1e-5, torch.randn(12, 1, 3, 3),
                                 torch.randn(4, 12, 1, 1), None, None, [1, 1], [1, 1, 1, 1], [1, 1], False, False)
    with pytest.raises(RuntimeError, match=r"moments must be a \(2, 6\) float64 CPU tensor"):
        ops.batch_norm_separable(z.detach(), torch.zeros(2, 5, dtype=torch.float64), *detached[2:])
    with pytest.raises(RuntimeError, match="bn_weight must be a 1-D Float CPU tensor of 6 elements"):
        ops.batch_norm_separable(z.detach(), None, torch.ones(5), *detached[3:])
    with pytest.raises(RuntimeError, match="needs at least one value per channel"):
        ops.batch_norm_separable(torch.randn(0, 6, 5, 7), *detached[1:])


# --- run_sequential -----------------------------------------------------------------------------

def _block(dtype, channels=(24, 24, 24), cin=16, first_relu_output=False):
    """[SepConv, BN, Identity, SepConv, BN, ...] as Xception's blocks lay them out with fold_relu."""
    torch.manual_seed(5)
    layers = []
    for index, cout in enumerate(channels):
        if index:
            layers.append(nn.Identity())
        layers.append(kernels.SeparableConv2d(cin, cout, 3, padding=1, relu_input=index > 0, backend="cpp",
                                              dtype=dtype))
        bn = kernels.BatchNorm2d(cout, backend="cpp", dtype=dtype, relu_output=first_relu_output and index == 0)
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        layers.append(bn)
        cin = cout
    return nn.Sequential(*layers).to(memory_format=torch.channels_last)


def _steps(run, sequence, x, grads):
    results = []
    for x_step, grad in zip(x, grads):
        leaf = x_step.detach().clone().requires_grad_()
        out = run(sequence, leaf)
        out.backward(grad)
        results.append((out.detach(), leaf.grad, [p.grad.clone() for p in sequence.parameters()]))
        sequence.zero_grad(set_to_none=True)
    return results


def _in_turn(sequence, x):
    for module in sequence:
        x = module(x)
    return x


def _count_folds(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [event.name for event in prof.events()].count("sepconv_cpp::batch_norm_separable")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("variant", ["plain", "relu-output", "momentum-none-no-affine"])
def test_run_sequential_folds_and_matches_the_calls_in_turn(variant, dtype):
    """Each BatchNorm that feeds a separable conv is folded into it (two of three here); over two training
    steps the output, input and parameter gradients, running statistics and num_batches_tracked are the
    modules' called in turn."""
    require_backend("cpp", dtype)
    sequence = _block(dtype, first_relu_output=variant == "relu-output")
    if variant == "momentum-none-no-affine":
        for index, module in enumerate(sequence):
            if isinstance(module, kernels.BatchNorm2d):
                sequence[index] = kernels.BatchNorm2d(module.num_features, momentum=None, affine=False,
                                                      backend="cpp", dtype=dtype)
    reference = copy.deepcopy(sequence)
    g = torch.Generator().manual_seed(1)
    x = [(torch.randn(3, 16, 11, 11, generator=g, dtype=dtype) * 2 + 1).contiguous(memory_format=torch.channels_last)
         for _ in range(2)]
    grads = [torch.randn(3, 24, 11, 11, generator=g, dtype=dtype) for _ in range(2)]
    assert _count_folds(lambda: kernels.run_sequential(copy.deepcopy(sequence), x[0])) == 2
    got = _steps(kernels.run_sequential, sequence, x, grads)
    want = _steps(_in_turn, reference, x, grads)
    rel = 5e-5 if dtype == torch.float32 else 1e-11
    for (out, x_grad, p_grads), (out_w, x_grad_w, p_grads_w) in zip(got, want):
        _assert_near(out, out_w, rel, "output")
        _assert_near(x_grad, x_grad_w, rel, "input gradient")
        for a, b in zip(p_grads, p_grads_w):
            _assert_near(a, b, rel, "parameter gradient")
    for (name, buffer), (_, buffer_w) in zip(sequence.named_buffers(), reference.named_buffers()):
        if buffer_w.is_floating_point():
            _assert_near(buffer, buffer_w, rel, name)
        else:
            assert torch.equal(buffer, buffer_w), name


def test_run_sequential_does_not_fold_where_it_must_not():
    """Evaluation, hooks that would see the normalised activation, a ReLU module between, a depth multiplier,
    the torch backend, NCHW input: no fold, and exactly the modules called in turn."""
    require_backend("cpp")
    x = torch.randn(2, 16, 9, 9).contiguous(memory_format=torch.channels_last)

    def with_relu_module(sequence):
        sequence[2] = nn.ReLU()

    def with_multiplier(sequence):
        sequence[3] = kernels.SeparableConv2d(24, 24, 3, padding=1, depth_multiplier=2, backend="cpp")

    cases = {
        "eval": lambda s: s.eval(),
        "hook on the second conv": lambda s: s[3].register_forward_pre_hook(lambda *args: None),
        "hook on its pointwise child": lambda s: s[3].pointwise.register_forward_hook(lambda *args: None),
        "hook on the Identity": lambda s: s[2].register_forward_hook(lambda *args: None),
        "a ReLU module between": with_relu_module,
        "depth multiplier 2": with_multiplier,
        "torch backend": lambda s: setattr(s[3], "backend", "torch"),
        "nchw": None,
    }
    for name, prepare in cases.items():
        sequence = _block(torch.float32, channels=(24, 24))
        if prepare is not None:
            prepare(sequence)
        reference = copy.deepcopy(sequence)
        input = x.contiguous() if name == "nchw" else x
        assert _count_folds(lambda: kernels.run_sequential(sequence, input)) == 0, name
        torch.testing.assert_close(kernels.run_sequential(sequence, input), _in_turn(reference, input),
                                   atol=1e-5, rtol=1e-5, msg=name)


def test_fold_keeps_one_activation_less_for_the_backward():
    """The folded pair saves the BatchNorm's input once (for both), not also its normalised output: the
    tensors kept for the backward are smaller by that activation's bytes (less BatchNorm's bias, which the
    fold keeps)."""
    require_backend("cpp")
    x = torch.randn(2, 16, 21, 21).contiguous(memory_format=torch.channels_last).requires_grad_()

    def saved_bytes(fold):
        sequence = _block(torch.float32, channels=(24, 24))
        seen = {}

        def pack(tensor):
            seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
            return tensor
        original = batch_norm_module._fold
        if not fold:
            batch_norm_module._fold = lambda *args: None
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                kernels.run_sequential(sequence, x)
        finally:
            batch_norm_module._fold = original
        return sum(seen.values())

    activation, bn_bias = 2 * 24 * 21 * 21 * 4, 24 * 4  # the fold keeps the bias, to write the activation again
    assert saved_bytes(fold=False) - saved_bytes(fold=True) == activation - bn_bias
