"""An evaluation-mode BatchNorm folded into the convolution before it, on the fly.

``kernels.batch_norm_folded`` against BatchNorm after the convolution; ``kernels.separable_conv2d_batch_norm`` and
``kernels.run_sequential`` in evaluation: where they fold (no ``F.batch_norm`` call, the convolution run once with
the folded weights, the same bits as a convolution given those weights), that the result is the BatchNorm's,
gradients included, and every case where they must call the modules as they are; the model's evaluation.
"""

import copy
import sys
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kernels
import xception
from conftest import require_backend

batch_norm_module = sys.modules["kernels.batch_norm"]  # `kernels.batch_norm` is the function


def _batch_norm(channels, dtype=torch.float32, affine=True, relu_output=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    bn = kernels.BatchNorm2d(channels, affine=affine, relu_output=relu_output).to(dtype)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels, generator=g, dtype=dtype) * 0.3)
        bn.running_var.copy_(torch.rand(channels, generator=g, dtype=dtype) + 0.5)
        if affine:
            bn.weight.copy_(torch.rand(channels, generator=g, dtype=dtype) + 0.5)
            bn.bias.copy_(torch.randn(channels, generator=g, dtype=dtype) * 0.2)
    return bn.eval()


# name: (make the conv, input shape)
CONVS = {
    "separable": (lambda backend: kernels.SeparableConv2d(24, 40, 3, 1, 1, backend=backend), (4, 24, 10, 12)),
    "separable-bias-stride-2": (lambda backend: kernels.SeparableConv2d(16, 32, 3, 2, 1, bias=True, backend=backend),
                                (4, 16, 14, 14)),
    "separable-reflect-padding": (
        lambda backend: kernels.SeparableConv2d(8, 24, 3, 1, 1, padding_mode="reflect", backend=backend),
        (4, 8, 9, 9)),
    "pointwise-stride-2": (lambda backend: kernels.PointwiseConv2d(24, 48, stride=2, bias=False, backend=backend),
                           (4, 24, 12, 12)),
    "conv-3x3-stride-2": (lambda backend: kernels.Conv2d(3, 16, 3, 2, 0, bias=False, backend=backend),
                          (2, 3, 21, 21)),
}


def _scaled(conv):
    """The module of ``conv`` whose weight the fold scales."""
    return conv.pointwise if isinstance(conv, kernels.SeparableConv2d) else conv


def _counting_batch_norm():
    return mock.patch.object(F, "batch_norm", wraps=F.batch_norm)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("conv_bias", [True, False], ids=["conv-bias", "no-conv-bias"])
def test_batch_norm_folded_is_the_batch_norm_after_the_conv(conv_bias, affine):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 9, 9, generator=g, dtype=torch.float64)
    weight = torch.randn(7, 5, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(7, generator=g, dtype=torch.float64) if conv_bias else None
    bn = _batch_norm(7, torch.float64, affine=affine)
    folded_weight, folded_bias = kernels.batch_norm_folded(weight, bias, bn)
    assert folded_weight.shape == weight.shape and folded_bias.shape == (7,)
    want = F.batch_norm(F.conv2d(x, weight, bias, padding=1), bn.running_mean, bn.running_var, bn.weight, bn.bias,
                        False, 0.0, bn.eps)
    torch.testing.assert_close(F.conv2d(x, folded_weight, folded_bias, padding=1), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("relu_output", [False, True], ids=["bn", "bn-relu"])
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format], ids=["channels_last", "nchw"])
@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("kind", CONVS.keys())
def test_fold_runs_the_conv_once_with_the_folded_weights(kind, backend, layout, relu_output):
    """No BatchNorm call; the same bits as the convolution given batch_norm_folded's weights (then ReLU where the
    BatchNorm applies one); the BatchNorm's result up to rounding."""
    require_backend(backend)
    make, shape = CONVS[kind]
    torch.manual_seed(0)
    conv = make(backend).eval()
    bn = _batch_norm(_scaled(conv).out_channels, relu_output=relu_output)
    x = torch.randn(*shape).contiguous(memory_format=layout)
    with torch.no_grad():
        want = bn(conv(x))
        given = copy.deepcopy(conv)
        weight, bias = kernels.batch_norm_folded(_scaled(conv).weight, _scaled(conv).bias, bn)
        _scaled(given).weight.copy_(weight)
        _scaled(given).bias = nn.Parameter(bias)
        same = given(x)
        if relu_output:
            same = F.relu(same)
        with _counting_batch_norm() as batch_norm:
            got = kernels.separable_conv2d_batch_norm(conv, bn, x)
            via_sequential = kernels.run_sequential([conv, bn], x)
    assert batch_norm.call_count == 0
    assert torch.equal(got, same) and torch.equal(via_sequential, same)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.is_contiguous(memory_format=layout)


def test_fold_gradients_are_the_batch_norms():
    """In evaluation with grad on, the folded call's gradients (input, both conv weights, the BatchNorm's weight and
    bias) are those of the BatchNorm after the conv."""
    require_backend("cpp", torch.float64)
    torch.manual_seed(0)
    conv = kernels.SeparableConv2d(12, 20, 3, 1, 1, backend="cpp").double().eval()
    bn = _batch_norm(20, torch.float64)
    x = torch.randn(3, 12, 8, 8, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    leaves = [x, conv.conv1.weight, conv.pointwise.weight, bn.weight, bn.bias]
    grad = torch.randn(3, 20, 8, 8, dtype=torch.float64)
    with _counting_batch_norm() as batch_norm:
        folded = torch.autograd.grad(kernels.separable_conv2d_batch_norm(conv, bn, x), leaves, grad)
    assert batch_norm.call_count == 0
    want = torch.autograd.grad(bn(conv(x)), leaves, grad)
    for name, got, expected in zip(["input", "depthwise", "pointwise", "bn weight", "bn bias"], folded, want):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10, msg=name)


def _hook(module):
    module.register_forward_hook(lambda *args: None)


# name: (change the conv, the BatchNorm or the input so that the fold must not apply)
NOT_FOLDED = {
    "training": lambda conv, bn, x: (conv, bn.train(), x),
    "no-running-statistics": lambda conv, bn, x: (
        conv, kernels.BatchNorm2d(bn.num_features, track_running_stats=False).eval(), x),
    "hook-on-bn": lambda conv, bn, x: (conv, _hook(bn) or bn, x),
    "hook-on-pointwise": lambda conv, bn, x: (_hook(conv.pointwise) or conv, bn, x),
    "fewer-pixels-than-weights": lambda conv, bn, x: (conv, bn, x[:1, :, :4, :4]),
    "not-a-batch-norm": lambda conv, bn, x: (conv, nn.Identity(), x),
}


@pytest.mark.parametrize("case", NOT_FOLDED.keys())
def test_no_fold_where_it_must_not_apply(case):
    """Training, batch statistics, hooks, too few output pixels for the weights'
    scaling to pay, a module that is not a BatchNorm: the modules called as they are (the same bits; in training
    the BatchNorm's statistics come from the conv's forward, summed in another order)."""
    require_backend("cpp")
    torch.manual_seed(0)
    conv = kernels.SeparableConv2d(24, 40, 3, 1, 1, backend="cpp").eval()
    x = torch.randn(4, 24, 10, 12).contiguous(memory_format=torch.channels_last)
    conv, bn, x = NOT_FOLDED[case](conv, _batch_norm(40), x)
    with torch.no_grad():
        reference = copy.deepcopy(bn)
        want = reference(conv(x))
        with _counting_batch_norm() as batch_norm:
            got = kernels.separable_conv2d_batch_norm(conv, bn, x)
    if case == "training":  # the cpp training path: statistics from the conv's forward, summed in another order
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        return
    assert torch.equal(got, want)
    if isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
        assert batch_norm.call_count == 1


def test_statistics_in_another_dtype_give_batch_norms_error():
    """Running statistics in float64 for float32 activations: no fold, and the error is F.batch_norm's own."""
    conv = kernels.SeparableConv2d(24, 40, 3, 1, 1, backend="torch").eval()
    bn = _batch_norm(40)
    bn.running_mean, bn.running_var = bn.running_mean.double(), bn.running_var.double()
    x = torch.randn(4, 24, 10, 12)
    with torch.no_grad():
        with pytest.raises(RuntimeError) as plain:
            bn(conv(x))
        with pytest.raises(RuntimeError) as paired:
            kernels.separable_conv2d_batch_norm(conv, bn, x)
    assert str(paired.value) == str(plain.value)


def test_no_fold_under_autocast():
    torch.manual_seed(0)
    conv = kernels.SeparableConv2d(24, 40, 3, 1, 1, backend="torch").eval()
    bn = _batch_norm(40)
    x = torch.randn(4, 24, 10, 12)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), _counting_batch_norm() as batch_norm:
        kernels.separable_conv2d_batch_norm(conv, bn, x)
    assert batch_norm.call_count == 1


def test_no_fold_off_the_cpu():
    """On a GPU each of the fold's small tensor ops would be a kernel launch of its own: CPU tensors only (a meta
    tensor stands in for a GPU's here; the same call on CPU folds)."""
    conv = kernels.SeparableConv2d(24, 40, 3, 1, 1, backend="torch").eval()
    bn = _batch_norm(40)
    with torch.no_grad():
        assert batch_norm_module._with_batch_norm_folded(conv, bn, torch.randn(4, 24, 10, 12)) is not None
        assert batch_norm_module._with_batch_norm_folded(conv, bn, torch.empty(4, 24, 10, 12, device="meta")) is None


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_model_evaluation_folds_every_batch_norm(backend):
    """The tiny Xception in evaluation (separable convs, strided shortcuts, the stem's dense convs) at a batch
    where every BatchNorm's scaling pays: no BatchNorm call, the eager network's logits; at batch 1, 13 of the 22
    stay BatchNorm calls (those after the 184-channel conv on the 12x12 map, the 6x6 maps' and the exit flow's,
    whose convs have fewer output pixels than weights a channel) and the logits are the same."""
    require_backend(backend)
    torch.manual_seed(0)
    model = xception.xception_tiny(num_classes=10, backend=backend)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.num_features, generator=generator) * 0.2)
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.2)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    model = model.to(memory_format=torch.channels_last).eval()
    eager = xception.xception_tiny(num_classes=10, separable="conv2d").to(memory_format=torch.channels_last).eval()
    eager.load_state_dict(model.state_dict())
    for batch, calls in ((48, 0), (1, 13)):
        x = torch.randn(batch, 3, 96, 96).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            with _counting_batch_norm() as batch_norm:
                got = model(x)
            want = eager(x)
        assert batch_norm.call_count == calls, f"batch {batch}"
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
