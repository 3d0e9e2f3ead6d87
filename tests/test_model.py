"""The Xception model: architecture, backends, checkpoints, fusion, features, compile, layouts.

The full 22.9M-parameter network is only built where it is needed (parameter
count, key layout, a few forwards at batch 1); everything else uses
``xception_tiny`` on small inputs to keep the file fast on a busy CPU.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import require_backend
from torch import nn

import kernels
import xception
from xception.layers import Conv2dSeparable

# Tolerance per dtype for whole-model comparisons, relative to the largest magnitude compared.
MODEL_TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-4}
# Training-mode gradients against a float64 oracle: batch-statistics BN over few values per channel
# amplifies float32 rounding through the depth of the network; GPU matmuls may use TF32.
TRAIN_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-3}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str,
                 tolerance: float | None = None) -> None:
    actual, expected = actual.double().cpu(), expected.double().cpu()
    tolerance = MODEL_TOLERANCE[dtype] if tolerance is None else tolerance
    # The 1e-3 floor: some gradients are exactly zero in exact arithmetic (a per-channel shift
    # just before a batch-statistics BN), and rounding makes them tiny but not zero.
    scale = expected.abs().max().item() + 1e-3
    error = (actual - expected).abs().max().item()
    assert error <= tolerance * scale, f"{what}: max error {error:.3g} (scale {scale:.3g}, tolerance {tolerance})"


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN affine parameters and running statistics, so that BN actually does something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.2)
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.2)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)


def tiny(**kwargs) -> xception.Xception:
    torch.manual_seed(0)
    kwargs.setdefault("num_classes", 10)
    return xception.xception_tiny(**kwargs)


def timm_legacy_keys(middle_blocks: int = 8) -> set:
    """The parameter/buffer names of timm's ``legacy_xception`` / Cadene's Xception, spelled out.

    In their ``Block.rep`` every ReLU takes an index; the first block has no
    leading ReLU, so its separable convs sit at 0 and 3, the others' at 1, 4 (, 7).
    """
    def bn(prefix):
        return {f"{prefix}.{name}" for name in ("weight", "bias", "running_mean", "running_var",
                                                "num_batches_tracked")}

    def sep(prefix):
        return {f"{prefix}.conv1.weight", f"{prefix}.pointwise.weight"}

    keys = {"conv1.weight", "conv2.weight", "fc.weight", "fc.bias"} | bn("bn1") | bn("bn2")
    keys |= sep("conv3") | bn("bn3") | sep("conv4") | bn("bn4")
    blocks = [(0, 3)] + [(1, 4)] * 2 + [(1, 4, 7)] * middle_blocks + [(1, 4)]
    for number, separable_indices in enumerate(blocks, start=1):
        for index in separable_indices:
            keys |= sep(f"block{number}.rep.{index}") | bn(f"block{number}.rep.{index + 1}")
        if len(separable_indices) == 2:  # strided blocks have a 1x1/2 projection shortcut
            keys |= {f"block{number}.skip.weight"} | bn(f"block{number}.skipbn")
    return keys


def paper_forward(state: dict, x: torch.Tensor, middle_blocks: int = 8) -> torch.Tensor:
    """Eval-mode Xception written out op by op from a timm-layout state_dict: the oracle.

    Independent of the model's module structure; follows the paper's figure 5:
    every separable conv is ReLU -> depthwise 3x3 -> pointwise 1x1 -> BN (no
    ReLU in between), entry blocks 1-3 and the exit block end in a 3x3/2 max
    pool with a 1x1/2 conv + BN shortcut, middle blocks add their input, no
    ReLU after any sum, block1 has no leading ReLU, conv3/conv4 are followed by ReLU.
    """
    def bn(prefix, t):
        return F.batch_norm(t, state[f"{prefix}.running_mean"], state[f"{prefix}.running_var"],
                            state[f"{prefix}.weight"], state[f"{prefix}.bias"], False, 0.0, 1e-5)

    def sep(prefix, t):
        t = F.conv2d(t, state[f"{prefix}.conv1.weight"], padding=1, groups=t.shape[1])
        return F.conv2d(t, state[f"{prefix}.pointwise.weight"])

    x = F.relu(bn("bn1", F.conv2d(x, state["conv1.weight"], stride=2)))
    x = F.relu(bn("bn2", F.conv2d(x, state["conv2.weight"])))
    blocks = [(0, 3)] + [(1, 4)] * 2 + [(1, 4, 7)] * middle_blocks + [(1, 4)]
    for number, separable_indices in enumerate(blocks, start=1):
        name, y = f"block{number}", x
        for position, index in enumerate(separable_indices):
            if number > 1 or position > 0:
                y = F.relu(y)
            y = bn(f"{name}.rep.{index + 1}", sep(f"{name}.rep.{index}", y))
        if len(separable_indices) == 2:
            y = F.max_pool2d(y, 3, 2, 1)
            x = bn(f"{name}.skipbn", F.conv2d(x, state[f"{name}.skip.weight"], stride=2))
        x = y + x
    x = F.relu(bn("bn3", sep("conv3", x)))
    x = F.relu(bn("bn4", sep("conv4", x)))
    return F.linear(x.mean(dim=(2, 3)), state["fc.weight"], state["fc.bias"])


# --- architecture ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_model():
    torch.manual_seed(0)
    model = xception.xception(backend="torch").eval()
    randomize_batchnorm(model)
    return model


def test_parameter_count_is_the_papers(full_model):
    assert sum(p.numel() for p in full_model.parameters()) == 22_855_952
    assert full_model.num_features == 2048


def test_state_dict_has_timm_legacy_layout(full_model):
    state = full_model.state_dict()
    assert set(state) == timm_legacy_keys()
    shapes = {
        "conv1.weight": (32, 3, 3, 3), "conv2.weight": (64, 32, 3, 3),
        "block1.rep.0.conv1.weight": (64, 1, 3, 3), "block1.rep.0.pointwise.weight": (128, 64, 1, 1),
        "block1.skip.weight": (128, 64, 1, 1), "block3.rep.4.pointwise.weight": (728, 728, 1, 1),
        "block7.rep.7.conv1.weight": (728, 1, 3, 3), "block12.rep.1.pointwise.weight": (728, 728, 1, 1),
        "block12.rep.4.pointwise.weight": (1024, 728, 1, 1), "block12.skip.weight": (1024, 728, 1, 1),
        "conv3.pointwise.weight": (1536, 1024, 1, 1), "conv4.pointwise.weight": (2048, 1536, 1, 1),
        "fc.weight": (1000, 2048),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key


@pytest.mark.parametrize("separable", ["fused", "conv2d"])
def test_full_model_matches_paper_forward(full_model, separable):
    model = full_model
    if separable == "conv2d":
        model = xception.xception(separable="conv2d").eval()
        model.load_state_dict(full_model.state_dict())
    x = torch.randn(1, 3, 79, 71)
    with torch.no_grad():
        expected = paper_forward(full_model.state_dict(), x)
        assert_close(model(x), expected, torch.float32, "logits vs the op-by-op paper forward")


@pytest.mark.parametrize("fold_relu", [False, True])
def test_block_structure_relus_and_pools(full_model, fold_relu):
    model = full_model
    if not fold_relu:
        model = xception.xception(backend="torch", fold_relu=False).eval()
        model.load_state_dict(full_model.state_dict())
    block1, block2, block4, block12 = (getattr(model, f"block{i}") for i in (1, 2, 4, 12))
    relu = "Identity" if fold_relu else "ReLU"
    assert [type(m).__name__ for m in block1.rep] == [
        "SeparableConv2d", "BatchNorm2d", relu, "SeparableConv2d", "BatchNorm2d", "MaxPool2d"]
    assert [type(m).__name__ for m in block4.rep] == [relu, "SeparableConv2d", "BatchNorm2d"] * 3
    assert block4.skip is None
    # With fold_relu every separable conv applies the ReLU before it (all but block1's first and conv3,
    # after a sum, have one); without, none does, and the first ReLU of a block must not overwrite the
    # input that the shortcut reads.
    relu_inputs = [m.relu_input for m in model.separable_convs()]
    assert relu_inputs == [False] + [fold_relu] * 31 + [False, fold_relu]
    assert isinstance(model.act3, nn.Identity if fold_relu else nn.ReLU)
    # ... and each ReLU after a stem or head BatchNorm is applied by that BatchNorm.
    for bn, act in ((model.bn1, model.act1), (model.bn2, model.act2), (model.bn4, model.act4)):
        assert bn.relu_output == fold_relu and isinstance(act, nn.Identity if fold_relu else nn.ReLU)
    for block in (block2, block4, block12):
        assert fold_relu or not block.rep[0].inplace
    pool = block12.rep[-1]
    assert isinstance(pool, nn.MaxPool2d) and (pool.kernel_size, pool.stride, pool.padding) == (3, 2, 1)
    # Middle flow: identity shortcut and no ReLU after the sum, so a block's output can be negative.
    x = torch.randn(1, 728, 5, 5)
    saved = x.clone()
    with torch.no_grad():
        out = block4(x)
    assert (out < 0).any()
    assert torch.equal(x, saved)  # the input the shortcut reads survived the block


@pytest.mark.parametrize("size", [71, 100, 299])
def test_full_model_output_shape(full_model, size):
    with torch.no_grad():
        assert full_model(torch.randn(1, 3, size, size)).shape == (1, 1000)


@pytest.mark.parametrize("num_classes,size,batch", [(10, 32, 2), (1, 71, 1), (37, 100, 3), (0, 64, 2)])
def test_tiny_output_shapes(num_classes, size, batch):
    model = tiny(num_classes=num_classes)
    out = model(torch.randn(batch, 3, size, size))
    assert out.shape == (batch, num_classes if num_classes else model.num_features)


def test_tiny_variant_and_width_rounding():
    model = tiny()
    assert [info["num_chs"] for info in model.feature_info] == [16, 32, 64, 184, 512]
    assert len(model.block_names) == 3 + 2 + 1
    assert xception.make_divisible(728 * 0.25) == 184
    assert all(xception.make_divisible(c) == c for c in (32, 64, 128, 256, 728, 1024, 1536, 2048))
    model = xception.Xception(num_classes=5, width=0.5, middle_blocks=0, in_chans=1)
    assert model.num_features == 1024 and model.block_names == ("block1", "block2", "block3", "block4")
    assert model(torch.randn(1, 1, 71, 71)).shape == (1, 5)


def test_defaults_and_classifier():
    model = tiny(num_classes=7)
    assert xception.DEFAULT_CFG["input_size"] == (3, 299, 299)
    assert xception.DEFAULT_CFG["crop_pct"] == 0.8975 and xception.DEFAULT_CFG["interpolation"] == "bicubic"
    assert xception.DEFAULT_CFG["mean"] == (0.5,) * 3 and xception.DEFAULT_CFG["std"] == (0.5,) * 3
    assert model.default_cfg["num_classes"] == 7 and model.default_cfg["first_conv"] == "conv1"
    assert model.get_classifier() is model.fc and model.fc.out_features == 7
    x = torch.randn(2, 3, 40, 40)
    pre = model.forward_head(model.forward_features(x), pre_logits=True)
    assert pre.shape == (2, model.num_features)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.default_cfg["num_classes"] == 3
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), nn.Identity) and model(x).shape == (2, model.num_features)
    assert isinstance(xception.create_model("xception_tiny", num_classes=4), xception.Xception)


BAD_ARGUMENTS = [
    ({"separable": "depthwise"}, "depthwise"),
    ({"width": 0}, "width"),
    ({"middle_blocks": -1}, "middle_blocks"),
    ({"num_classes": 2.5}, "num_classes"),
    ({"drop_rate": 1.5}, "drop_rate"),
    ({"out_indices": (0, 5)}, "out_indices"),
    ({"backend": "gpu-magic"}, "gpu-magic"),
    ({"separable": "conv2d", "backend": "torch"}, "separable"),
]


@pytest.mark.parametrize("kwargs,text", BAD_ARGUMENTS, ids=[text for _, text in BAD_ARGUMENTS])
def test_bad_arguments_raise(kwargs, text):
    with pytest.raises(ValueError, match=text):
        xception.xception_tiny(**kwargs)


def test_bad_names_and_inputs_raise():
    with pytest.raises(ValueError, match="resnet50"):
        xception.create_model("resnet50")
    with pytest.raises(ValueError, match="separable='fused'"):
        tiny(separable="conv2d").set_backend("torch")
    with pytest.raises(ValueError, match="nope"):
        tiny().set_backend("nope")
    with pytest.raises(ValueError, match="shape"):
        tiny()(torch.randn(1, 4, 32, 32))


# --- backends against the eager nn.Conv2d model ------------------------------------------------


def test_separable_kinds_share_state_dict_keys():
    fused, eager = tiny(separable="fused"), tiny(separable="conv2d")
    assert fused.state_dict().keys() == eager.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(fused.state_dict().values(), eager.state_dict().values()))
    assert all(isinstance(m, Conv2dSeparable) for m in eager.separable_convs())
    assert all(isinstance(m, kernels.SeparableConv2d) for m in fused.separable_convs())
    assert len(fused.separable_convs()) == 2 * 3 + 3 * 2 + 2 + 2
    skips = [(a.skip, b.skip) for a, b in zip(fused.modules(), eager.modules()) if getattr(a, "skip", None) is not None]
    assert len(skips) == 4  # the strided blocks' shortcuts: kernels.PointwiseConv2d, a plain nn.Conv2d
    assert all(isinstance(a, kernels.PointwiseConv2d) and type(b) is nn.Conv2d for a, b in skips)
    stems = [(getattr(fused, name), getattr(eager, name)) for name in ("conv1", "conv2")]
    assert all(isinstance(a, kernels.Conv2d) and type(b) is nn.Conv2d for a, b in stems)


def test_set_backend_switches_every_separable_conv():
    model = tiny()
    assert model.set_backend("torch") is model
    assert {m.backend for m in model.separable_convs()} == {"torch"} and model.backend == "torch"
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == len(model.separable_convs()) + 6  # + stem (2) and skip (4) BatchNorms
    assert all(isinstance(m, kernels.BatchNorm2d) and m.backend == "torch" for m in norms)
    skips = [m for m in model.modules() if isinstance(m, kernels.PointwiseConv2d)]
    assert len(skips) == 4 and all(m.backend == "torch" for m in skips)
    assert model.conv1.backend == model.conv2.backend == "torch"
    assert not any(isinstance(m, kernels.BatchNorm2d) for m in tiny(separable="conv2d").modules())


@contextlib.contextmanager
def no_tf32():
    """Full fp32 for cuDNN convolutions and cuBLAS matmuls on CUDA (both default to TF32 for some ops)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _logits_and_grads(model, x, forward=None):
    x = x.clone().requires_grad_(True)
    out = (model if forward is None else forward)(x)
    # A fixed random projection, so every logit gets a distinct gradient.
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    (out * weights).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return out.detach(), x.grad, grads


def test_every_backend_matches_eager_conv2d_model(backend):
    """Same weights, train mode (batch-stat BN): logits, input gradient and every parameter gradient,
    against the nn.Conv2d model in float64."""
    # triton in float32, its working dtype (its float64 path is gradchecked in tests/test_triton*.py)
    dtype = torch.float32 if backend == "triton" else torch.float64
    device = require_backend(backend, dtype)
    # Triton on CPU is its interpreter: a narrower network (channels 8..128) keeps it near 20 s.
    interpreted = device.type == "cpu" and backend == "triton"
    size, shape = (32, {"width": 0.0625, "middle_blocks": 1}) if interpreted else (48, {"middle_blocks": 2})
    reference = tiny(separable="conv2d", **shape).double()
    randomize_batchnorm(reference)
    model = tiny(backend=backend, **shape).to(device, dtype)
    model.load_state_dict(reference.state_dict())
    x = torch.randn(4, 3, size, size, dtype=torch.float64)
    expected = _logits_and_grads(reference, x)
    # On CUDA the model's other convolutions and the classifier would run in TF32 by default.
    with no_tf32():
        actual = _logits_and_grads(model, x.to(device, dtype))
    tolerance = TRAIN_TOLERANCE[dtype]
    assert_close(actual[0], expected[0], dtype, "logits", tolerance)
    assert_close(actual[1], expected[1], dtype, "input gradient", tolerance)
    for name, grad in expected[2].items():
        assert_close(actual[2][name], grad, dtype, f"gradient of {name}", tolerance)


def test_cpp_training_kernels_match_conv2d_model_channels_last():
    """channels_last training on cpp runs the BatchNorm, max_pool2d_add and shortcut (PointwiseConv2d) kernels
    too; every separable conv and shortcut conv as forward_with_moments, whose moments its BatchNorm takes, except
    the separable convs that a BatchNorm feeds directly (all but the first of each block's, and the exit's second),
    which take that BatchNorm into their input read (batch_norm_separable; checked in the profiler trace): logits,
    every gradient and the running statistics after the step as the nn.Conv2d model's, in float64."""
    require_backend("cpp", torch.float64)
    shape = {"middle_blocks": 2}
    reference = tiny(separable="conv2d", **shape).double().to(memory_format=torch.channels_last)
    randomize_batchnorm(reference)
    model = tiny(backend="cpp", **shape).double().to(memory_format=torch.channels_last)
    model.load_state_dict(reference.state_dict())
    x = torch.randn(4, 3, 48, 48, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    expected = _logits_and_grads(reference, x)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        actual = _logits_and_grads(model, x)
    ran = {event.name for event in prof.events()}
    assert {"sepconv_cpp::batch_norm", "sepconv_cpp::batch_norm_backward", "sepconv_cpp::max_pool2d_add",
            "sepconv_cpp::max_pool2d_add_backward"} <= ran
    count = {name: sum(event.name == f"sepconv_cpp::{name}" for event in prof.events())
             for name in ("forward", "forward_with_moments", "batch_norm_separable")}
    shortcuts = sum(isinstance(module, kernels.PointwiseConv2d) for module in model.modules())
    folded = sum(sum(isinstance(m, kernels.SeparableConv2d) for m in getattr(model, name).rep) - 1
                 for name in model.block_names) + 1
    assert shortcuts == 4 and count == {"forward": 0, "batch_norm_separable": folded,
                                        "forward_with_moments": len(model.separable_convs()) - folded + shortcuts}
    tolerance = TRAIN_TOLERANCE[torch.float64]
    assert_close(actual[0], expected[0], torch.float64, "logits", tolerance)
    assert_close(actual[1], expected[1], torch.float64, "input gradient", tolerance)
    for name, grad in expected[2].items():
        assert_close(actual[2][name], grad, torch.float64, f"gradient of {name}", tolerance)
    for name, buffer in reference.named_buffers():
        assert_close(dict(model.named_buffers())[name], buffer, torch.float64, name, tolerance)


@pytest.mark.parametrize("backend_name", ["torch", "cpp"])
def test_full_model_backends_match_conv2d_forward(full_model, backend_name):
    require_backend(backend_name)
    eager = xception.xception(separable="conv2d").eval()
    eager.load_state_dict(full_model.state_dict())
    x = torch.randn(1, 3, 71, 71)
    with torch.no_grad():
        expected = eager(x)
        full_model.set_backend(backend_name)
        try:
            actual = full_model(x)
        finally:
            full_model.set_backend("torch")
    assert_close(actual, expected, torch.float32, f"full model logits on {backend_name}")


# --- checkpoints -------------------------------------------------------------------------------


def cadene_style(state_dict):
    """What Cadene's / the original port's files look like: ``last_linear``, 2-D pointwise and
    3-D depthwise weights, no ``num_batches_tracked``, DDP prefix, wrapped under ``state_dict``."""
    old = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.endswith("pointwise.weight"):
            value = value[:, :, 0, 0]
        elif key.endswith(".conv1.weight") and key != "conv1.weight":
            value = value[:, 0]
        old["module." + key.replace("fc.", "last_linear.")] = value.clone()
    return {"state_dict": old, "epoch": 3}


@pytest.mark.parametrize("layout", ["timm", "cadene", "wrapped-model"])
def test_checkpoint_round_trip(tmp_path, layout):
    source = tiny()
    randomize_batchnorm(source, seed=1)
    source.eval()
    state = source.state_dict()
    if layout == "cadene":
        state = cadene_style(state)
        assert state["state_dict"]["module.block1.rep.0.pointwise.weight"].dim() == 2
    elif layout == "wrapped-model":
        state = {"model": state, "optimizer": {"lr": 0.1}}
    path = tmp_path / f"{layout}.pth"
    torch.save(state, path)
    torch.manual_seed(123)
    target = xception.xception_tiny(num_classes=10).eval()
    x = torch.randn(2, 3, 40, 40)
    assert not torch.equal(target(x), source(x))
    result = xception.load_weights(target, path)
    assert result.missing_keys == [] and result.unexpected_keys == []
    with torch.no_grad():
        assert torch.equal(target(x), source(x))


def test_checkpoint_into_other_kinds(tmp_path):
    """One file feeds the eager model and a features_only model (its classifier keys are ignored)."""
    source = tiny().eval()
    path = tmp_path / "weights.pt"
    xception.save_weights(source, path)
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp")]
    eager = tiny(separable="conv2d")
    xception.load_weights(eager, str(path))
    x = torch.randn(1, 3, 36, 36)
    with torch.no_grad():
        assert_close(eager.eval()(x), source(x), torch.float32, "eager model from the fused model's file")
        features = tiny(features_only=True)
        xception.load_weights(features, path)
        assert torch.equal(features.eval()(x)[-1], source.forward_features(x))


def _broken(state, kind):
    state = dict(state)
    if kind == "missing":
        del state["block2.rep.4.pointwise.weight"]
    elif kind == "shape":
        state["block3.skip.weight"] = torch.zeros(3, 3, 1, 1)
    elif kind == "unexpected":
        state["block99.rep.1.conv1.weight"] = torch.zeros(1)
    return state


@pytest.mark.parametrize("kind,text", [("missing", "block2.rep.4.pointwise.weight"),
                                       ("shape", "block3.skip.weight"),
                                       ("unexpected", "block99.rep.1.conv1.weight")])
def test_broken_state_dict_names_the_key(kind, text):
    model = tiny()
    state = _broken(model.state_dict(), kind)
    with pytest.raises(xception.CheckpointError, match=kind if kind != "shape" else "shape mismatch") as info:
        xception.load_weights(model, state)
    assert text in str(info.value)


def test_non_strict_load_reports_and_skips():
    model = tiny()
    result = xception.load_weights(model, _broken(model.state_dict(), "missing"), strict=False)
    assert result.missing_keys == ["block2.rep.4.pointwise.weight"]
    with pytest.raises(xception.CheckpointError, match="block3.skip.weight"):
        xception.load_weights(model, _broken(model.state_dict(), "shape"), strict=False)


class NotATensor:
    pass


@pytest.mark.parametrize("content", ["garbage", "pickle-object", "list", "missing-file"])
def test_bad_checkpoint_file_names_the_path(tmp_path, content):
    path = tmp_path / f"{content}.pth"
    if content == "garbage":
        path.write_bytes(os.urandom(64))
    elif content == "pickle-object":
        torch.save({"conv1.weight": NotATensor()}, path)
    elif content == "list":
        torch.save([torch.zeros(1)], path)
    error = FileNotFoundError if content == "missing-file" else xception.CheckpointError
    with pytest.raises(error) as info:
        xception.load_weights(tiny(), path)
    assert str(path) in str(info.value)


def test_state_dict_with_non_tensor_value_is_rejected():
    with pytest.raises(xception.CheckpointError, match="conv1.weight"):
        xception.load_weights(tiny(), {"conv1.weight": [1.0, 2.0]})


@pytest.mark.skipif(importlib.util.find_spec("safetensors") is not None,
                    reason="safetensors is installed; the missing-package message cannot be produced")
def test_safetensors_without_package_says_so(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"{}")
    with pytest.raises(xception.CheckpointError, match="safetensors"):
        xception.load_weights(tiny(), path)


@pytest.mark.skipif(importlib.util.find_spec("safetensors") is None, reason="safetensors is not installed")
def test_safetensors_round_trip(tmp_path):
    from safetensors.torch import save_file

    source = tiny().eval()
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    target = xception.xception_tiny(num_classes=10).eval()
    xception.load_weights(target, path)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))


# --- fused inference ---------------------------------------------------------------------------


@pytest.mark.parametrize("separable", ["fused", "conv2d"])
def test_fuse_for_inference_matches_unfused(separable):
    model = tiny(separable=separable, backend="auto")
    randomize_batchnorm(model, seed=2)
    model.eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = model(x)
        assert model.fuse_for_inference() is model
        actual = model(x)
    assert_close(actual, expected, torch.float32, "fused logits")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(isinstance(act, nn.ReLU) for act in (model.act1, model.act2, model.act4))  # back from their BNs
    relu_inputs = [m.relu_input for m in model.separable_convs()]
    # Every separable conv absorbs the ReLU before it, except the two that have none:
    # the first of block1 (after the stem's act2... which feeds the shortcut too) and conv3 (after a sum).
    assert relu_inputs.count(False) == 2
    assert not model.block1.rep[0].relu_input and not model.conv3.relu_input
    assert all(m.pointwise.bias is not None for m in model.separable_convs())
    with pytest.raises(RuntimeError, match="inference"):
        model.train()
    with pytest.raises(xception.CheckpointError, match="fused"):
        xception.load_weights(model, tiny().state_dict())


def test_fuse_for_inference_full_model_and_channels_last():
    torch.manual_seed(0)
    model = xception.xception(backend="torch").eval()
    randomize_batchnorm(model, seed=3)
    x = torch.randn(1, 3, 71, 71)
    with torch.no_grad():
        expected = model(x)
        model.fuse_for_inference().to(memory_format=torch.channels_last)
        actual = model(x.to(memory_format=torch.channels_last))
    assert_close(actual, expected, torch.float32, "fused full-model logits")


def test_fused_model_packs_its_pointwise_weights():
    """fuse_for_inference keeps the separable convs' pointwise weights packed for cpp by default: the same
    logits to the bit as without (pack_weights=False), and nothing new in the state_dict."""
    require_backend("cpp")
    model = tiny(backend="cpp")
    randomize_batchnorm(model, seed=4)
    model.eval()
    x = torch.randn(2, 3, 48, 48).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        model.fuse_for_inference(pack_weights=False)
        keys = list(model.state_dict())
        expected = model(x)
        assert all(m._packed is None for m in model.separable_convs())
        model.fuse_for_inference()
        actual = model(x)
    assert torch.equal(actual, expected)
    assert all(m._packed is not None for m in model.separable_convs()) and list(model.state_dict()) == keys


def test_fuse_needs_eval_mode():
    with pytest.raises(RuntimeError, match="eval"):
        tiny().fuse_for_inference()


# --- features ----------------------------------------------------------------------------------


def test_features_only_shapes_and_strides():
    model = tiny(features_only=True).eval()
    assert not isinstance(model.get_classifier(), nn.Linear)
    assert [info["reduction"] for info in model.feature_info] == [2, 4, 8, 16, 32]
    assert [info["module"] for info in model.feature_info] == [
        "act2", "block2.rep.0", "block3.rep.0", "block6.rep.0", "act4"]
    x = torch.randn(2, 3, 128, 96)
    with torch.no_grad():
        features = model(x)
    assert [f.shape[1] for f in features] == [info["num_chs"] for info in model.feature_info]
    # The stem is unpadded (128 -> 63 -> 61); each later stage halves with ceil.
    assert [tuple(f.shape[2:]) for f in features] == [(61, 45), (31, 23), (16, 12), (8, 6), (4, 3)]
    assert all((f >= 0).all() for f in features)  # ReLU'd, as timm's hooks on the next ReLU give
    full = tiny().eval()
    xception.load_weights(model, full.state_dict())
    with torch.no_grad():
        features = model(x)
        assert torch.equal(features[-1], full.forward_features(x))
        assert torch.equal(features[1], torch.relu(full.block1(full._stem(x))))


def test_features_only_out_indices():
    model = tiny(features_only=True, out_indices=(3, 1)).eval()
    assert [info["reduction"] for info in model.feature_info] == [4, 16]
    features = model(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in features] == [(32, 15, 15), (184, 4, 4)]


# --- compile, layouts, dtypes, dropout -----------------------------------------------------------


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_compile_aot_eager_matches_eager(backend, layout):
    """Training forward and backward through one graph; on cpp in channels_last that graph holds the
    BatchNorm and max_pool2d_add ops too."""
    require_backend(backend)
    model = tiny(backend=backend, middle_blocks=1).to(memory_format=layout)
    randomize_batchnorm(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 40, 40).contiguous(memory_format=layout)
    expected = _logits_and_grads(model, x)
    model.zero_grad()
    actual = _logits_and_grads(model, x, forward=compiled)
    assert_close(actual[0], expected[0], torch.float32, "compiled logits")
    assert_close(actual[1], expected[1], torch.float32, "compiled input gradient")
    for name, grad in expected[2].items():
        assert_close(actual[2][name], grad, torch.float32, f"compiled gradient of {name}")


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_compile_fused_for_inference(backend):
    """BN and ReLU folded, the strided blocks ending in max_pool2d_add (the cpp op under no_grad), compiled."""
    require_backend(backend)
    model = tiny(backend=backend, middle_blocks=1)
    randomize_batchnorm(model)
    model.eval()
    x = torch.randn(2, 3, 40, 40).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = model(x)
        model.fuse_for_inference()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        assert_close(compiled(x), expected, torch.float32, "compiled fused logits")


@pytest.mark.slow
def test_compile_full_model_fused_for_inference(full_model):
    """The whole network, BN/ReLU folded (relu_input and pointwise bias in every op), compiled."""
    torch.manual_seed(0)
    model = xception.xception(backend="torch").eval()
    model.load_state_dict(full_model.state_dict())
    model.fuse_for_inference()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(1, 3, 71, 71)
    with torch.no_grad():
        assert_close(compiled(x), full_model(x), torch.float32, "compiled fused full-model logits")


def test_channels_last_end_to_end():
    model = tiny(backend="torch")
    randomize_batchnorm(model)
    model.eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        x_last = x.to(memory_format=torch.channels_last)
        features = model.forward_intermediates(x_last)
        actual = model(x_last)
    assert_close(actual, expected, torch.float32, "channels_last logits")
    for feature in features[1:]:
        assert feature.is_contiguous(memory_format=torch.channels_last)


def test_autocast_bfloat16_cpu():
    model = tiny(backend="torch").eval()
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        expected = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            actual = model(x)
    assert actual.dtype == torch.bfloat16
    error = (actual.float() - expected).abs().max().item()
    assert error <= 0.05 * expected.abs().max().item() + 1e-3, error


def test_dropout_applies_in_training_only():
    model = tiny(drop_rate=0.5)
    features = torch.rand(8, model.num_features, 2, 2) + 0.1
    pooled = features.mean(dim=(2, 3))
    model.train()
    dropped = model.forward_head(features, pre_logits=True)
    zeros = (dropped == 0).float().mean().item()
    assert 0.3 < zeros < 0.7, zeros
    kept = dropped != 0
    assert torch.allclose(dropped[kept], 2 * pooled[kept])
    model.eval()
    assert torch.equal(model.forward_head(features, pre_logits=True), pooled)
    logits_a, logits_b = model(torch.randn(2, 3, 32, 32).repeat(2, 1, 1, 1)).chunk(2)
    assert torch.equal(logits_a, logits_b)


# --- starting from weights files -----------------------------------------------------------------


@pytest.mark.parametrize("layout", ["save_weights", "cadene", "safetensors"])
def test_constructor_loads_weights_of_every_layout(tmp_path, layout):
    source = tiny().eval()
    randomize_batchnorm(source, seed=2)
    path = tmp_path / f"weights.{'safetensors' if layout == 'safetensors' else 'pt'}"
    if layout == "save_weights":
        xception.save_weights(source, path)
    elif layout == "cadene":
        torch.save(cadene_style(source.state_dict()), path)
    else:
        if importlib.util.find_spec("safetensors") is None:
            pytest.skip("safetensors is not installed")
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = xception.xception_tiny(weights=path).eval()  # num_classes from the file's classifier
    assert model.num_classes == 10
    x = torch.randn(1, 3, 36, 36)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))
    assert xception.create_model("xception_tiny", weights=str(path)).num_classes == 10


def test_constructor_with_other_num_classes_replaces_the_classifier(tmp_path):
    source = tiny()
    path = tmp_path / "weights.pt"
    xception.save_weights(source, path)
    model = xception.xception_tiny(num_classes=3, weights=path)
    assert model.fc.out_features == 3
    assert torch.equal(model.block3.skip.weight, source.block3.skip.weight)
    # every other weight is still checked: a file of the full model does not load into the tiny one
    with torch.device("meta"):
        full = xception.xception(num_classes=10, separable="conv2d")
    with pytest.raises(xception.CheckpointError, match="shape mismatch"):
        xception.xception_tiny(weights=full.state_dict())
    with pytest.raises(TypeError, match="weights=PATH"):
        xception.xception(pretrained=True)


def test_non_strict_load_skips_a_classifier_of_another_size():
    model = tiny(num_classes=4)
    before = model.fc.weight.clone()
    result = xception.load_weights(model, tiny().state_dict(), strict=False)
    assert result.missing_keys == ["fc.weight", "fc.bias"] and torch.equal(model.fc.weight, before)
    with pytest.raises(xception.CheckpointError, match="fc.weight"):
        xception.load_weights(model, tiny().state_dict())  # strict: the classifier must fit


def test_matching_model_names_the_architecture():
    from xception.weights import matching_model

    assert matching_model(tiny().state_dict()) == ("xception_tiny", 10)
    with torch.device("meta"):
        full = xception.xception(num_classes=7, separable="conv2d")
    assert matching_model(cadene_style(full.state_dict())["state_dict"]) == ("xception", 7)
    with pytest.raises(xception.CheckpointError, match="fits none"):
        matching_model({"conv1.weight": torch.zeros(3, 3, 3, 3)})


@pytest.mark.parametrize("content,text", [("empty", "is empty"), ("pickle-object", "pickled Python objects"),
                                          ("truncated", "truncated")])
def test_unreadable_files_get_our_message(tmp_path, content, text):
    path = tmp_path / "weights.pt"
    if content == "empty":
        path.write_bytes(b"")
    elif content == "pickle-object":
        torch.save({"conv1.weight": NotATensor()}, path)
    else:
        xception.save_weights(tiny(), path)
        path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(xception.CheckpointError, match=text) as info:
        xception.load_weights(tiny(), path)
    assert "weights_only=False" not in str(info.value) and str(path) in str(info.value)
