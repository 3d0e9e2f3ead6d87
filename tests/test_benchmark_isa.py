"""The benchmark records which ISA each side runs (the cpp library's vector path, oneDNN's, ATen's) and
``--isa avx2`` holds all three to AVX2 for a like-for-like comparison on an AVX-512 machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.__main__ import ISA_ENVIRONMENTS, main
from benchmarks.machine import device_slug, run_info
from benchmarks.results import read_rows
from conftest import require_backend
from kernels import cpp_backend

ROOT = Path(__file__).resolve().parent.parent


def test_cpu_run_metadata_names_the_isas():
    require_backend("cpp")
    info = run_info("cpu")
    assert info.cpp_isa == cpp_backend.build_info()["isa"] and info.cpp_build == cpp_backend.build_info()
    assert info.onednn_isa, "oneDNN's verbose header named no ISA"
    assert info.aten_cpu_capability


def test_isa_flag_from_python_needs_the_environment_set(monkeypatch, capsys):
    """Called as a function (not the command line) main cannot re-execute itself: it says what to set."""
    for key in ISA_ENVIRONMENTS["avx2"]:
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(SystemExit):
        main(["--isa", "avx2", "--device", "cpu", "--suite", "smoke"])
    assert "ONEDNN_MAX_CPU_ISA" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(cpp_backend.host_isa() not in ("avx2", "avx512"),
                    reason="--isa avx2 needs an x86-64 CPU with AVX2 and FMA")
def test_isa_avx2_run_holds_every_side_to_avx2(tmp_path):
    """``python -m benchmarks --isa avx2`` re-executes itself with the variables set (cpp, oneDNN, ATen and
    MKL); its rows say cpp avx2 and oneDNN AVX2 and go to <machine>-avx2.jsonl, beside the default run's file."""
    require_backend("cpp")
    env = {key: value for key, value in os.environ.items()
           if key not in ISA_ENVIRONMENTS["avx2"]}
    result = subprocess.run([sys.executable, "-m", "benchmarks", "--isa", "avx2", "--suite", "smoke", "--batch", "2",
                             "--modes", "fwd", "--repeats", "1", "--min-time", "0", "--device", "cpu", "--no-peak",
                             "--no-memory", "--out", str(tmp_path)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = list(read_rows(tmp_path / f"{device_slug('cpu')}-avx2.jsonl"))
    assert rows and not (tmp_path / f"{device_slug('cpu')}.jsonl").exists()
    for row in rows:
        assert row["run"]["cpp_isa"] == "avx2" and row["run"]["cpp_build"]["lanes"] == 8
        assert "AVX2" in row["run"]["onednn_isa"] and "512" not in row["run"]["onednn_isa"]
        assert row["run"]["aten_cpu_capability"] == "AVX2"
    summary = (tmp_path / f"{device_slug('cpu')}-avx2.md").read_text()
    assert "- ISA: cpp library `avx2`, oneDNN Intel AVX2, ATen AVX2" in summary


def _layer_row(batch: int, mode: str, speedup: float, cpp_isa: str, onednn_isa: str, h: int = 147) -> dict:
    return dict(suite="layers", provider="cpp", layout="channels_last", shape=f"64->128@{h}", batch=batch,
                dtype="fp32", mode=mode, h=h, status="ok", speedup_vs_eager_cl=speedup, pct_peak=10.0,
                run=dict(cpp_isa=cpp_isa, onednn_isa=onednn_isa))


def test_avx2_runs_are_checked_against_the_avx2_targets():
    """Rows of an --isa avx2 run: forward >= 1.0x at every batch, fwd+bwd >= 1.0x at batch 8 (not the
    AVX-512 path's 2x and % of peak); a run whose oneDNN ran AVX-512 keeps the default targets."""
    from benchmarks.results import check_targets

    avx2 = [_layer_row(8, "fwd", 1.5, "avx2", "Intel AVX2"), _layer_row(1, "fwd", 0.9, "avx2", "Intel AVX2"),
            _layer_row(1, "full", 0.5, "avx2", "Intel AVX2"), _layer_row(8, "full", 1.1, "avx2", "Intel AVX2")]
    checks = check_targets(avx2, "cpp")
    assert [(c["case"], c["goal"], c["ok"]) for c in checks] == [
        ("64->128@147 N=8 fp32 fwd", 1.0, True), ("64->128@147 N=1 fp32 fwd", 1.0, False),
        ("64->128@147 N=8 fp32 full", 1.0, True)]
    mixed = [_layer_row(8, "fwd", 1.5, "avx2", "Intel AVX-512 with Intel DL Boost")]
    assert [c["goal"] for c in check_targets(mixed, "cpp")] == [2.0]
