"""``kernels.triton.fast_launch``: a kernel launched again without Triton's per-call binding must get exactly
what Triton's own launch path gives it: the same compiled kernel, grid, arguments and launch hooks.

The launches are compiled for sm_90 and recorded, not run (``benchmarks.null_gpu``), in a process of its own
without Triton's interpreter (``tests/fast_launch_probe.py``), so this runs on any machine with Triton."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import OLDEST_TRITON_PYTHON, compiled_environment, needs_oldest_triton, require_backend

ROOT = Path(__file__).resolve().parent.parent


def _environment(**settings):
    env = compiled_environment()
    env.pop("SEPCONV_TRITON_FAST_LAUNCH", None)
    env.update(settings)
    return env


def _probe(python: str) -> dict:
    """Mode -> {"cases": case -> the launches made both ways, "entries": the limit's check}
    (``tests/fast_launch_probe.py`` run by ``python``)."""
    results = {}
    for mode in ("split", "fused"):
        done = subprocess.run([python, str(ROOT / "tests" / "fast_launch_probe.py")], cwd=ROOT,
                              env=_environment(SEPCONV_TRITON_MODE=mode), capture_output=True, text=True,
                              timeout=1200)
        assert done.returncode == 0, done.stderr[-4000:]
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])  # {"cases": ..., "entries": ...}
    return results


@pytest.fixture(scope="module")
def probes():
    require_backend("triton")
    return _probe(sys.executable)


@needs_oldest_triton
def test_the_same_holds_with_the_oldest_supported_triton():
    """Triton's launch path differs between versions (3.6 may hand back an asynchronous compile's future)."""
    for mode, probe in _probe(OLDEST_TRITON_PYTHON).items():
        for name, case in probe["cases"].items():
            assert case["triton"] and case["fast"] == case["triton"], (mode, name)
            assert case["fast_through_triton"] == 0, (mode, name)


@pytest.mark.parametrize("mode", ["split", "fused"])
def test_a_kept_kernel_is_launched_as_triton_launches_it(probes, mode):
    cases = probes[mode]["cases"]
    assert len(cases) == 5
    for name, case in cases.items():
        assert case["triton"], name
        assert case["fast"] == case["triton"], name
        assert case["fast_through_triton"] == 0, f"{name}: a repeated call went through Triton's path"


@pytest.mark.parametrize("mode", ["split", "fused"])
def test_kept_entries_are_bounded(probes, mode):
    """Past ``MAX_ENTRIES`` the kept entries are dropped, and the calls after keep theirs again."""
    entries = probes[mode]["entries"]
    launches = 3 if mode == "split" else 4
    assert entries["kept after overflow"] == launches < entries["limit"]
    assert entries["launches"] == launches == entries["first call through triton"]
    assert entries["second call through triton"] == 0


@pytest.mark.parametrize("mode", ["split", "fused"])
def test_each_signature_keeps_its_own_kernel(probes, mode):
    """Triton compiles the first kernel again for a misaligned input, for a batch of 1 (an integer argument
    equal to 1 is a constant to it) and for the first config where the autotuner chose another: the fast
    path, seeing the same calls, keeps them apart (the first test shows it launches the same ones)."""
    cases = probes[mode]["cases"]
    first = {name: case["fast"][0]["kernel"] for name, case in cases.items()}
    assert first["bf16 16->24 b2 misaligned"] != first["bf16 16->24 b2"]
    assert first["bf16 16->24 b1"] != first["bf16 16->24 b2"]
    assert first["bf16 16->24 b2 autotune off"] != first["bf16 16->24 b2"]
    aligned = [arg for arg in cases["bf16 16->24 b2"]["fast"][0]["args"] if arg[0] == "tensor"]
    misaligned = [arg for arg in cases["bf16 16->24 b2 misaligned"]["fast"][0]["args"] if arg[0] == "tensor"]
    assert aligned[0][-1] and not misaligned[0][-1]  # the input's 16-byte alignment


def _run(code: str, **settings) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_environment(**settings),
                          capture_output=True, text=True, timeout=300)


def test_setting_turns_it_off_and_is_checked():
    require_backend("triton")
    code = "from kernels.triton import fast_launch; print(fast_launch.ENABLED)"
    assert _run(code).stdout.split() == ["True"]
    assert _run(code, SEPCONV_TRITON_FAST_LAUNCH="0").stdout.split() == ["False"]
    assert _run(code, TRITON_INTERPRET="1").stdout.split() == ["False"]  # the interpreter runs Triton's path
    code = "import kernels; print(kernels.available_backends()['triton'])"
    done = _run(code, SEPCONV_TRITON_FAST_LAUNCH="yes", TRITON_INTERPRET="1")
    assert "SEPCONV_TRITON_FAST_LAUNCH='yes' is not valid" in done.stdout, done.stdout + done.stderr


def test_triton_direct_launches_compute_what_tritons_own_do_on_a_gpu(monkeypatch):
    """On a GPU: a layer's output and gradients with every launch through Triton's path, then from kept kernels
    (the second call with fast launch on), bit for bit, in both modes."""
    import torch

    device = require_backend("triton")
    if device.type != "cuda":
        pytest.skip("needs a GPU: on CPU the interpreter runs Triton's own path (the launch arguments are compared "
                    "above, through a stand-in driver)")
    from kernels.functional import separable_conv2d
    from kernels.triton import fast_launch

    generator = torch.Generator().manual_seed(0)
    x, dw, pw = (torch.randn(shape, generator=generator).to(device, torch.bfloat16)
                 for shape in ((4, 64, 19, 19), (64, 1, 3, 3), (96, 64, 1, 1)))
    x = x.contiguous(memory_format=torch.channels_last)
    for mode in ("split", "fused"):
        monkeypatch.setenv("SEPCONV_TRITON_MODE", mode)
        results = []
        for enabled in (False, True, True):
            monkeypatch.setattr(fast_launch, "ENABLED", enabled)
            inputs = [t.detach().requires_grad_() for t in (x, dw, pw)]
            out = separable_conv2d(inputs[0], inputs[1], inputs[2], padding=1, backend="triton")
            results.append((out, *torch.autograd.grad(out.float().square().sum(), inputs)))
        for got in results[1:]:
            for a, b in zip(got, results[0]):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
