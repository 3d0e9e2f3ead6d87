"""Shared test fixtures: the backends under test and the dtype tolerance table.

On a machine without CUDA, the Triton backend is tested through its
interpreter (``TRITON_INTERPRET=1`` must be set before Triton is imported).
Set ``SEPCONV_REQUIRE_BACKENDS=cpp,triton`` (``make test`` does) to turn a
backend that fails to load into a test failure instead of a skip.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # The fp32 tolerances below assume IEEE fp32 products. PyTorch's convolutions, and the triton
    # backend following them, use TF32 by default; the tests of that behaviour set the flag themselves.
    torch.backends.cudnn.allow_tf32 = False

import pytest  # noqa: E402

import kernels  # noqa: E402

ALL_BACKENDS = ("torch", "cpp", "triton")

# Absolute and relative tolerance per dtype, against a float64 reference.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
}


# A Python with torch and the oldest Triton the backend supports (the GPU machine's), where .ci/run made one.
OLDEST_TRITON_PYTHON = os.environ.get("SEPCONV_OLDEST_TRITON_PYTHON")
needs_oldest_triton = pytest.mark.skipif(
    not OLDEST_TRITON_PYTHON,
    reason="SEPCONV_OLDEST_TRITON_PYTHON is not set: a Python with torch and the oldest supported triton (3.6); "
           ".ci/run makes one (docs/verification.md)")


def compiled_environment(**settings) -> dict:
    """This process's environment without TRITON_INTERPRET (a child compiles kernels for a GPU), plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(settings)
    return env


def required_backends():
    value = os.environ.get("SEPCONV_REQUIRE_BACKENDS", "")
    return {name.strip() for name in value.split(",") if name.strip()}


def device_for(backend: str) -> torch.device:
    if backend == "triton" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def require_backend(backend: str, dtype: torch.dtype = torch.float32) -> torch.device:
    """Skip (with the reason) when ``backend`` cannot run ``dtype`` here, unless it is required."""
    reason = kernels.available_backends()[backend]
    device = device_for(backend)
    if reason is None:
        reason = kernels.dispatch.BACKENDS[backend].supports(device, dtype)
        if reason is not None:
            pytest.skip(f"backend {backend!r} does not support {dtype} on {device}: {reason}")
        return device
    if backend in required_backends():
        pytest.fail(f"backend {backend!r} is required (SEPCONV_REQUIRE_BACKENDS) but unavailable: {reason}")
    pytest.skip(f"backend {backend!r} unavailable: {reason}")


@pytest.fixture
def threads():
    """Restore the thread count a test changes."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    return request.param
