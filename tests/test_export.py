"""torch.export of models built on these ops, and kernels.decompositions(): an exported program whose
ops of this library are replaced by ATen ops, which computes the same and runs without the library."""

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import require_backend
from torch import nn

import kernels
import xception
from kernels import ops


def library_ops(program) -> set:
    """The ops of this library (namespaces sepconv_*) that an exported program (or its module) calls,
    in its graph and in the graphs of its submodules (torch 2.6 wraps a call under a grad-mode change in
    one)."""
    root = program.graph_module if isinstance(program, torch.export.ExportedProgram) else program
    return {str(node.target) for module in root.modules() if isinstance(module, torch.fx.GraphModule)
            for node in module.graph.nodes
            if node.op == "call_function" and str(node.target).startswith("sepconv_")}


def export_and_decompose(model, args):
    program = torch.export.export(model, args)
    return program, program.run_decompositions(kernels.decompositions())


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "trainable"])
def test_decomposed_module_matches(backend, channels_last, frozen):
    """padding="same" with a 4x4 kernel (asymmetric), dilation, biases, a depth multiplier, relu_input: the
    decomposed program gives the module's output, in the input's memory format, with no op of this library."""
    require_backend(backend)
    torch.manual_seed(0)
    layer = kernels.SeparableConv2d(6, 10, kernel_size=4, stride=1, padding="same", dilation=2, bias=True,
                                    depth_multiplier=2, backend=backend, relu_input=True)
    layer.requires_grad_(not frozen)
    x = torch.randn(2, 6, 11, 13)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    program, decomposed = export_and_decompose(layer, (x,))
    # Trainable weights under the torch backend record forward_keeping_hidden (the depthwise result kept
    # for a backward), the other cases forward: both kinds must be decomposed.
    kept = backend == "torch" and not frozen
    assert library_ops(program) == {f"sepconv_{backend}.{'forward_keeping_hidden' if kept else 'forward'}.default"}
    assert library_ops(decomposed) == set()
    with torch.no_grad():
        expected = layer(x)
        got = decomposed.module()(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    assert got.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused_for_inference"])
def test_decomposed_xception_matches(fused):
    """The eval network (separable convs, max_pool2d_add, and with fuse_for_inference the ReLUs and
    BatchNorms folded into the ops) exports to a program of ATen ops only, with the same output."""
    backend = "cpp" if kernels.available_backends()["cpp"] is None else "torch"
    torch.manual_seed(0)
    model = xception.xception(num_classes=7, backend=backend).eval().to(memory_format=torch.channels_last)
    if fused:
        model.fuse_for_inference()
    x = torch.randn(2, 3, 96, 96).contiguous(memory_format=torch.channels_last)
    program, decomposed = export_and_decompose(model, (x,))
    assert any(op.startswith(f"sepconv_{backend}.forward") for op in library_ops(program))
    assert library_ops(decomposed) == set()
    with torch.no_grad():
        torch.testing.assert_close(decomposed.module()(x), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("relu_output", [False, True])
def test_decomposed_training_batch_norm_matches(relu_output):
    """kernels.BatchNorm2d in training mode on channels_last runs the cpp batch_norm op; its
    decomposition gives the same output (ReLU'd with relu_output) and running statistics."""
    require_backend("cpp")
    torch.manual_seed(0)
    model = nn.Sequential(kernels.BatchNorm2d(5, relu_output=relu_output, backend="cpp"), nn.Flatten()).train()
    model[0].weight.data.uniform_(0.5, 1.5)
    model[0].bias.data.uniform_(-0.5, 0.5)
    x = (torch.randn(4, 5, 6, 7) * 3 + 1).contiguous(memory_format=torch.channels_last)
    _check_decomposed_training(model, x, {"sepconv_cpp.batch_norm.default"}, "0")


def _check_decomposed_training(model, x, library_ops_exported, bn_name):
    """``model`` (training mode) exported holds ``library_ops_exported``; decomposed, none, and two steps give
    its outputs and leave the running statistics of its BatchNorm ``bn_name`` as the model's."""
    # The exported program holds the module's own buffer tensors (its running statistics are updated in
    # place by the program): export a copy, so that the reference keeps buffers of its own.
    program = torch.export.export(copy.deepcopy(model), (x,))
    assert library_ops(program) == library_ops_exported
    decomposed = program.run_decompositions(kernels.decompositions()).module()
    assert library_ops(decomposed) == set()
    for _ in range(2):
        torch.testing.assert_close(decomposed(x), model(x), atol=1e-5, rtol=1e-5)
    buffers = dict(decomposed.named_buffers())
    bn = model.get_submodule(bn_name)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(buffers[f"{bn_name}.{name}"], getattr(bn, name), atol=1e-6, rtol=1e-5)


class _ConvBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = kernels.SeparableConv2d(5, 7, 3, padding=1, backend="cpp", relu_input=True)
        self.bn = kernels.BatchNorm2d(7, backend="cpp")

    def forward(self, x):
        return kernels.separable_conv2d_batch_norm(self.conv, self.bn, x)


def test_decomposed_training_conv_batch_norm_matches():
    """A separable conv and its BatchNorm in training on cpp export as forward_with_moments and batch_norm given
    the moments; decomposed, the program gives the same output and running statistics."""
    require_backend("cpp")
    torch.manual_seed(0)
    model = _ConvBatchNorm().train()
    x = (torch.randn(3, 5, 8, 9) * 2 + 1).contiguous(memory_format=torch.channels_last)
    _check_decomposed_training(
        model, x, {"sepconv_cpp.forward_with_moments.default", "sepconv_cpp.batch_norm.default"}, "bn")
    overload = torch.ops.sepconv_cpp.forward_with_moments.default
    args = (x, model.conv.conv1.weight.detach(), model.conv.pointwise.weight.detach(), None, None, [1, 1],
            [1, 1, 1, 1], [1, 1], True)
    got, promised = kernels.decompositions()[overload](*args), overload(*(
        a.to("meta") if isinstance(a, torch.Tensor) else a for a in args))
    for value, fake in zip(got, promised):
        assert (value.shape, value.stride(), value.dtype) == (fake.shape, fake.stride(), fake.dtype)
    torch.testing.assert_close(got[1], overload(*args)[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", ops.IMPLEMENTATIONS)
@pytest.mark.parametrize("op_name", ["forward", "forward_keeping_hidden"])
def test_each_decomposition_has_the_ops_shapes(implementation, op_name):
    """Every namespace's entry (triton's too, which cannot run here) computes the torch backend's output,
    and returns what the op's fake (meta) kernel promises: shapes, strides and dtypes."""
    if op_name == "forward_keeping_hidden" and implementation not in ops.KEEPS_HIDDEN:
        pytest.skip(f"sepconv_{implementation} has no forward_keeping_hidden (it keeps no depthwise result)")
    if implementation.startswith("triton") and op_name == "forward_keeping_hidden":
        # The fake kernel of triton's forward_keeping_hidden is registered with the Triton kernels.
        require_backend("triton")
    overload = getattr(getattr(torch.ops, ops.namespace(implementation)), op_name).default
    decomposition = kernels.decompositions()[overload]
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 8).contiguous(memory_format=torch.channels_last)
    args = (x, torch.randn(8, 1, 3, 3), torch.randn(5, 8, 1, 1), torch.randn(8), torch.randn(5),
            [2, 1], [1, 2, 0, 1], [1, 1], True)
    got = decomposition(*args)
    got = got if isinstance(got, tuple) else (got,)
    expected = torch.ops.sepconv_torch.forward.default(*args)
    torch.testing.assert_close(got[0], expected)
    promised = overload(*(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args))
    promised = promised if isinstance(promised, tuple) else (promised,)
    assert len(got) == len(promised)
    for value, fake in zip(got, promised):
        assert (value.shape, value.stride(), value.dtype) == (fake.shape, fake.stride(), fake.dtype)


def test_decomposed_program_runs_without_the_library(tmp_path):
    """The saved decomposed program loads and runs in a process that never imports kernels (nor xception)."""
    require_backend("cpp")
    torch.manual_seed(0)
    layer = kernels.SeparableConv2d(4, 6, kernel_size=3, padding=1, backend="cpp").eval()
    x = torch.randn(1, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    program, decomposed = export_and_decompose(layer, (x,))
    assert library_ops(program) == {"sepconv_cpp.forward.default"}
    path = tmp_path / "layer.pt2"
    torch.export.save(decomposed, str(path))
    torch.save({"x": x, "expected": layer(x).detach()}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        program = torch.export.load({str(path)!r})
        io = torch.load({str(tmp_path / "io.pt")!r})
        torch.testing.assert_close(program.module()(io["x"]), io["expected"], atol=1e-5, rtol=1e-5)
        loaded = sorted(name for name in sys.modules if name.split(".")[0] in ("kernels", "xception"))
        assert not loaded, loaded
        print("ok")
    """)
    # Run from tmp_path, so that neither the repository nor an installed copy is on the path by accident
    # through the current directory; PYTHONPATH is cleared for the same reason.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_decomposed_network_exports_to_onnx(tmp_path):
    """The decomposed network goes through the ONNX exporter and runs in ONNX Runtime with the same output;
    the program before decomposition does not convert (its fused ops have no ONNX translation)."""
    pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript "
                                             "(requirements-dev.txt installs it)")
    onnxruntime = pytest.importorskip("onnxruntime", reason="ONNX Runtime is not installed "
                                                            "(requirements-dev.txt installs it)")
    backend = "cpp" if kernels.available_backends()["cpp"] is None else "torch"
    torch.manual_seed(0)
    model = xception.xception(num_classes=7, backend=backend).eval().fuse_for_inference()
    x = torch.randn(1, 3, 96, 96)
    program, decomposed = export_and_decompose(model, (x,))
    with pytest.raises(Exception, match="ONNX"):
        torch.onnx.export(program, (x,), dynamo=True)
    path = tmp_path / "xception.onnx"
    torch.onnx.export(decomposed, (x,), dynamo=True).save(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), atol=1e-4, rtol=1e-4)
