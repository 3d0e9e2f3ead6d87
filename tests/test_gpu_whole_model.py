"""The whole-network estimate of the static GPU model: layer census and substitution arithmetic."""

import pytest

from benchmarks.cases import MODEL_SHAPE, XCEPTION_LAYERS
from benchmarks.gpu_model import whole_model


def test_layer_counts_are_xceptions_separable_convs():
    counts = whole_model.layer_counts()
    # Entry flow 6, middle flow 8 blocks x 3, exit flow 2 + the two head convs.
    assert sum(counts.values()) == 34
    assert counts["728->728@19"] == 25
    assert set(counts) == {shape.name for shape in XCEPTION_LAYERS}


def _row(suite, shape, dtype, mode, provider, ms, batch=32):
    return dict(suite=suite, shape=shape, dtype=dtype, mode=mode, provider=provider, batch=batch, status="ok",
                p50_ms=ms)


COUNTS = {"a": 1, "b": 3}


def _recorded():
    return [_row("model", MODEL_SHAPE.name, "bf16", "eval", "eager", 10.0),
            _row("model", MODEL_SHAPE.name, "bf16", "train", "eager", 50.0),
            _row("layers", "a", "bf16", "fwd", "eager", 1.0), _row("layers", "b", "bf16", "fwd", "eager", 2.0),
            _row("layers", "a", "bf16", "full", "eager", 4.0), _row("layers", "b", "bf16", "full", "eager", 5.0)]


def test_substitution_replaces_each_layer_by_its_prediction():
    predicted = [_row("layers", "a", "bf16", "fwd", "x-predicted", 0.5),
                 _row("layers", "b", "bf16", "fwd", "x-predicted", 3.0),
                 _row("layers", "a", "bf16", "full", "x-predicted", 2.0),
                 _row("layers", "b", "bf16", "full", "x-predicted", 1.0)]
    estimates = {(e["mode"], e["provider"]): e for e in whole_model.predict(_recorded(), predicted, COUNTS)}
    # eval: 10 - (1*1 + 3*2) + (1*0.5 + 3*3) = 12.5; auto keeps eager's 2.0 for b: 10 - 7 + 0.5 + 6 = 9.5.
    assert estimates[("eval", "x-predicted")]["p50_ms"] == pytest.approx(12.5)
    assert estimates[("eval", "auto-predicted")]["p50_ms"] == pytest.approx(9.5)
    # train: 50 - (4 + 15) + (2 + 3) = 36.
    assert estimates[("train", "x-predicted")]["p50_ms"] == pytest.approx(36.0)
    assert estimates[("eval", "x-predicted")]["layer_share"] == pytest.approx(0.7)


def test_a_provider_missing_a_layer_gets_no_estimate():
    predicted = [_row("layers", "a", "bf16", "fwd", "x-predicted", 0.5)]
    assert whole_model.predict(_recorded(), predicted, COUNTS) == []


def test_network_rows_say_predicted():
    predicted = [_row("layers", name, "bf16", mode, "x-predicted", 1.0) for name in COUNTS for mode in ("fwd", "full")]
    rows = whole_model.network_rows(whole_model.predict(_recorded(), predicted, COUNTS), {"predicted": True},
                                    MODEL_SHAPE)
    assert rows and all(r["provider"].endswith("-predicted") and "predicted" in r["reason"] for r in rows)
    assert {r["suite"] for r in rows} == {"model"}
    eval_row = next(r for r in rows if r["mode"] == "eval" and r["provider"] == "x-predicted")
    assert eval_row["speedup_vs_eager_cl"] == pytest.approx(10.0 / eval_row["p50_ms"])
