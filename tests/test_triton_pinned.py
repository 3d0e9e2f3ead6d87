"""Tile configs pinned from a file (``SEPCONV_TRITON_CONFIGS``, ``kernels/triton/pinned.py``): the pinned
config and tile are the ones launched, the results stay right, other kernels and families keep theirs, and
a bad file is a clear error."""

import json

import pytest
import torch

from benchmarks.machine import pinned_configs
from conftest import require_backend
from test_separable_conv import check, make_case

ENV = "SEPCONV_TRITON_CONFIGS"


@pytest.fixture
def pinned(monkeypatch):
    require_backend("triton")  # the kernel modules import only where the backend can run
    monkeypatch.delenv(ENV, raising=False)
    from kernels.triton import pinned

    return pinned


def _write(path, pins):
    path.write_text(json.dumps({"format": "sepconv-triton-configs/1", "pins": pins}))
    return path


DEPTHWISE = {"kernel": "depthwise", "family": "fp32", "kwargs": {"BLOCK_P": 8, "BLOCK_C": 16, "ROWS": 2, "COLS": 3},
             "num_warps": 2, "num_stages": 1, "ms": 0.01}
TRANSPOSED = {"kernel": "transposed", "family": "fp32", "kwargs": {"BLOCK_Q": 8, "BLOCK_C": 16}, "num_warps": 2,
              "num_stages": 1, "tile": [2, 2]}


def test_pinned_configs_are_launched(pinned, monkeypatch, tmp_path):
    """Split mode under a pins file: its two kernels launch the pinned configs and tile, the gradients are right,
    and the other family and the fused kernels keep their own configs."""
    device = require_backend("triton")
    from kernels.triton import forward, split

    depthwise, transposed = split.depthwise_autotuned, split.transposed_autotuned
    assert getattr(forward.launch_config(depthwise["fp32"]), "kwargs", None) != DEPTHWISE["kwargs"]
    path = _write(tmp_path / "pins.json", [DEPTHWISE, TRANSPOSED])
    monkeypatch.setenv(ENV, str(path))
    config = forward.launch_config(depthwise["fp32"])
    assert (config.kwargs, config.num_warps, config.num_stages) == (DEPTHWISE["kwargs"], 2, 1)
    assert forward.launch_config(transposed["fp32"]).kwargs == TRANSPOSED["kwargs"]
    assert split.transposed_tile("fp32") == (2, 2)
    assert split.transposed_tile("16bit") == split.INTERPRET_TILE
    monkeypatch.delenv(ENV)
    unpinned = {(name, family): forward.launch_config(table[family]) for name, table in pinned.kernel_tables().items()
                for family in ("16bit", "fp32")}
    monkeypatch.setenv(ENV, str(path))
    for name, table in pinned.kernel_tables().items():
        for family in ("16bit", "fp32"):
            if (name, family) not in (("depthwise", "fp32"), ("transposed", "fp32")):
                assert forward.launch_config(table[family]) is unpinned[(name, family)], (name, family)
    assert pinned.describe() == [
        "depthwise fp32: BLOCK_P=8,BLOCK_C=16,ROWS=2,COLS=3,warps=2,stages=1",
        "transposed fp32: TILE=2x2,BLOCK_Q=8,BLOCK_C=16,warps=2,stages=1"]
    assert pinned_configs() == pinned.describe()  # what a benchmark row records

    launched = []
    for name in ("depthwise_launch", "transposed_depthwise_launch"):
        real = getattr(split, name)

        def spy(*args, _real=real, **kwargs):
            result = _real(*args, **kwargs)
            launched.append((result[-1].get("ROWS"), result[-1].get("COLS")))
            return result

        monkeypatch.setattr(split, name, spy)
    real_launch = split.launch
    metas = []

    def launch(autotuned, grid, *args, **kwargs):
        metas.append(forward.launch_config(autotuned).kwargs)
        return real_launch(autotuned, grid, *args, **kwargs)

    monkeypatch.setattr(split, "launch", launch)
    monkeypatch.setenv("SEPCONV_TRITON_MODE", "split")
    case = make_case(2, 8, 9, 7, (3, 3), 1, 12, True, torch.float32, device)
    check("triton", *case, 1, 1, 1, relu_input=True, layout="channels_last")
    assert DEPTHWISE["kwargs"] in metas and TRANSPOSED["kwargs"] in metas
    assert (2, 2) in launched, "the transposed kernel ran the pinned tile"


def test_a_later_file_value_is_read_again(pinned, monkeypatch, tmp_path):
    """The file is read once per value of the variable; another path (or none) takes effect at the next launch."""
    require_backend("triton")
    from kernels.triton import forward, split

    first = _write(tmp_path / "a.json", [DEPTHWISE])
    other = dict(DEPTHWISE, kwargs={"BLOCK_P": 4, "BLOCK_C": 32, "ROWS": 1, "COLS": 4})
    second = _write(tmp_path / "b.json", [other])
    monkeypatch.setenv(ENV, str(first))
    assert forward.launch_config(split.depthwise_autotuned["fp32"]).kwargs == DEPTHWISE["kwargs"]
    monkeypatch.setenv(ENV, str(second))
    assert forward.launch_config(split.depthwise_autotuned["fp32"]).kwargs == other["kwargs"]
    monkeypatch.setenv(ENV, "")
    assert pinned.config_for(split.depthwise_autotuned["fp32"]) is None and pinned.describe() is None


@pytest.mark.parametrize("document,message", [
    (None, "cannot read a JSON file there"),
    ("not json", "cannot read a JSON file there"),
    ({"pins": []}, "not a pinned-configs file"),
    ({"format": "sepconv-triton-configs/1", "pins": [dict(DEPTHWISE, kernel="nope")]},
     r"pins\[0\]: kernel='nope' is not one of"),
    ({"format": "sepconv-triton-configs/1", "pins": [DEPTHWISE, dict(DEPTHWISE, family="fp16")]},
     r"pins\[1\]: family='fp16' is not one of \['16bit', 'fp32'\]"),
    ({"format": "sepconv-triton-configs/1", "pins": [dict(DEPTHWISE, kwargs={"BLOCK_P": 8, "BLOCK_C": 16})]},
     r"missing \['COLS', 'ROWS'\]"),
    ({"format": "sepconv-triton-configs/1",
      "pins": [dict(DEPTHWISE, kwargs=dict(DEPTHWISE["kwargs"], BLOCK_X=4))]}, r"unknown \['BLOCK_X'\]"),
    ({"format": "sepconv-triton-configs/1",
      "pins": [dict(DEPTHWISE, kwargs=dict(DEPTHWISE["kwargs"], ROWS=0))]}, "ROWS=0 is not a positive integer"),
    ({"format": "sepconv-triton-configs/1", "pins": [dict(DEPTHWISE, num_warps=3)]},
     "num_warps=3 is not a power of two"),
    ({"format": "sepconv-triton-configs/1", "pins": [dict(DEPTHWISE, num_stages=0)]},
     "num_stages=0 is not a positive integer"),
    ({"format": "sepconv-triton-configs/1", "pins": [dict(DEPTHWISE, tile=[2, 2])]},
     "only the 'transposed' kernel has a tile"),
    ({"format": "sepconv-triton-configs/1", "pins": [dict(TRANSPOSED, tile=[2])]},
     r"tile=\[2\] is not \[rows, columns\]"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_pins_file(pinned, monkeypatch, tmp_path, document, message):
    """A bad file raises ValueError naming the variable, the file and the entry, at the first launch that reads it."""
    require_backend("triton")
    from kernels.triton import forward, split

    path = tmp_path / "pins.json"
    if document is not None:
        path.write_text(document if isinstance(document, str) else json.dumps(document))
    monkeypatch.setenv(ENV, str(path))
    with pytest.raises(ValueError, match=message) as error:
        forward.launch_config(split.depthwise_autotuned["fp32"])
    assert f"{ENV}='{path}'" in str(error.value)


def test_write_merges_and_replaces(pinned, tmp_path):
    """``write`` keeps the other kernels' entries, replaces the same kernel and family's, leaves no temporary
    file, and refuses to overwrite a file it cannot read."""
    require_backend("triton")
    import triton

    path = tmp_path / "sub" / "pins.json"
    first = triton.Config({"BLOCK_Q": 8, "BLOCK_C": 16}, num_warps=2, num_stages=1)
    pinned.write(path, [pinned.entry("transposed", "fp32", first, (2, 2), ms=0.5)], device="here")
    second = triton.Config(dict(DEPTHWISE["kwargs"]), num_warps=4, num_stages=1)
    pinned.write(path, [pinned.entry("depthwise", "fp32", second, ms=0.25)])
    third = triton.Config({"BLOCK_Q": 4, "BLOCK_C": 32}, num_warps=4, num_stages=1)
    pinned.write(path, [pinned.entry("transposed", "fp32", third, (1, 1))])
    document = json.loads(path.read_text())
    assert document["device"] == "here" and [p["kernel"] for p in document["pins"]] == ["depthwise", "transposed"]
    pins = pinned.read(path)
    assert pins[("transposed", "fp32")].tile == (1, 1) and pins[("transposed", "fp32")].config.kwargs == third.kwargs
    assert pins[("depthwise", "fp32")].config.num_warps == 4 and document["pins"][0]["ms"] == 0.25
    assert sorted(p.name for p in path.parent.iterdir()) == ["pins.json"]
    path.write_text("{}")
    with pytest.raises(ValueError, match="not a pinned-configs file"):
        pinned.write(path, [pinned.entry("depthwise", "fp32", second)])
    assert path.read_text() == "{}"
