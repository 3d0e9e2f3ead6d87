"""pytest-benchmark view of the layer suite, for tracking regressions between commits.

    pytest benchmarks --benchmark-autosave            # on the old commit
    pytest benchmarks --benchmark-compare             # on the new one

A small subset by default (three Xception shapes, batch 1, fp32, channels_last,
fwd and full, every project backend that runs here and the eager pair); set
``SEPCONV_BENCH_ALL=1`` for every Xception shape at batch 1 and 8 with torch.compile too.
``make test`` does not collect this folder (pyproject's testpaths is ``tests``).
"""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks import providers
from benchmarks.cases import XCEPTION_LAYERS, Case

ALL = os.environ.get("SEPCONV_BENCH_ALL") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = XCEPTION_LAYERS if ALL else tuple(s for s in XCEPTION_LAYERS if s.name in ("128->256@74", "728->728@19",
                                                                                      "1024->1536@10"))
BATCHES = (1, 8) if ALL else (1,)
PROVIDERS = providers.BACKEND_PROVIDERS + (("eager", "compile") if ALL else ("eager",))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ("fwd", "full"))
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_layer(benchmark, shape, batch, mode, provider):
    reason = providers.availability("layers", provider, DEVICE, "fp32")
    if reason:
        pytest.skip(f"{provider} unavailable: {reason}")
    case = Case("layers", shape, batch, "fp32", "channels_last", mode, provider)
    prepared = providers.prepare(case, DEVICE)
    prepared.fn()  # compile / autotune outside the timing
    with prepared.timed() as run:  # a triton provider's mode entered once, not in every timed call
        if DEVICE == "cuda":
            def call():
                run()
                torch.cuda.synchronize()
        else:
            call = run
        benchmark.extra_info.update(provider=provider, shape=shape.name, batch=batch, mode=mode,
                                    threads=torch.get_num_threads())
        benchmark(call)
