"""The benchmark pipeline end to end on tiny shapes, plus its pieces (timers, work counts, files, flags)."""

from __future__ import annotations

import functools
import json
import sys
import types

import pytest
import torch

from benchmarks import providers, timing
from benchmarks.__main__ import main
from benchmarks.cases import XCEPTION_LAYERS, Shape, build_cases, resolve_shapes, separable_bytes, separable_flops
from benchmarks.machine import device_slug
from benchmarks.plot import main as plot_main
from benchmarks.results import ROW_KEYS, JsonlLog, latest_run, read_rows
from benchmarks.triton_sweep import (KERNELS, TRANSPOSED_TILE_CANDIDATES, candidates, describe, sweep_candidates,
                                     transposed_tile)
from benchmarks.triton_sweep import main as sweep_main
from conftest import require_backend

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RUN_KEYS = ("run_id", "utc_time", "device", "device_name", "cpu_model", "gpu_model", "threads", "torch_version",
            "triton_version", "git_commit", "peak_gflops", "peak_gbps")
FAST = ["--suite", "smoke", "--batch", "2", "--modes", "fwd,full", "--repeats", "2", "--min-time", "0",
        "--tiny-model", "--device", "cpu"]


def _run(tmp_path, *extra):
    return main([*FAST, "--out", str(tmp_path), *extra])


def _rows(tmp_path):
    return list(read_rows(tmp_path / f"{device_slug('cpu')}.jsonl"))


def test_pipeline_end_to_end(tmp_path, capsys):
    assert _run(tmp_path, "--providers", "eager,cpp,triton,torch") == 0
    rows = _rows(tmp_path)
    measured = [r for r in rows if r["status"] == "ok"]
    # 2 tiny shapes x 2 modes x (eager in 2 layouts + torch), plus cpp when it builds here.
    assert len(measured) >= 2 * 2 * 3
    for row in rows:
        assert set(ROW_KEYS) <= set(row), set(ROW_KEYS) - set(row)
        assert set(RUN_KEYS) <= set(row["run"])
    for row in measured:
        assert 0 < row["p20_ms"] <= row["p50_ms"] <= row["p80_ms"]
        assert row["gflop_s"] > 0 and row["gb_s"] > 0 and row["pct_peak"] > 0
        assert row["speedup_vs_eager_cl"] > 0 and row["peak_alloc_mb"] is not None
    baselines = [r for r in measured if r["provider"] == "eager" and r["layout"] == "channels_last"]
    assert baselines and all(r["speedup_vs_eager_cl"] == 1.0 for r in baselines)
    # The fp32 peak on CPU includes the FMA probe, so "% of peak" is never measured against a library.
    run = rows[0]["run"]
    assert run["peak_gflops"]["fp32"] >= run["peak_detail"]["fma_fp32_gflops"] > 0
    assert {r["layout"] for r in measured if r["provider"] == "eager"} == {"channels_last", "nchw"}

    # Triton on CPU is the interpreter: listed as not run, with the reason, never timed.
    triton = [r for r in rows if r["provider"] == "triton"]
    assert len(triton) == 1 and triton[0]["status"] == "unavailable" and "interpreter" in triton[0]["reason"]

    summary = (tmp_path / f"{device_slug('cpu')}.md").read_text()
    assert "Providers not run" in summary and "interpreter" in summary
    assert "speedup vs eager CL" in summary and "tiny 8->16@12" in summary
    assert "interrupted" not in summary
    printed = capsys.readouterr().out
    assert "tiny 8->16@12" in printed and "Providers not run" in printed
    # The run draws its own chart: the PNG is never older than the rows.
    png = tmp_path / f"{device_slug('cpu')}.png"
    assert f"plot: {png}" in printed and png.read_bytes()[:8] == PNG_SIGNATURE
    png.unlink()

    rss_log = tmp_path / f"rss-{device_slug('cpu')}.jsonl"  # another tool's log beside the suite's
    rss_log.write_text('{"provider": "eager", "status": "ok", "max_rss_mib": 1.0}\n')
    assert plot_main(["--out", str(tmp_path)]) == 0
    assert not rss_log.with_suffix(".png").exists()
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    import matplotlib.pyplot as plt

    image = plt.imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_interrupted_run_keeps_finished_rows(tmp_path, capsys):
    assert _run(tmp_path, "--providers", "eager", "--interrupt-after", "3") == 130
    rows = _rows(tmp_path)
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)
    summary = (tmp_path / f"{device_slug('cpu')}.md").read_text()
    assert "interrupted" in summary
    assert summary.count("| tiny ") == 3
    assert "Interrupted after 3" in capsys.readouterr().out
    # A later run appends, and the summary shows only the latest run.
    assert _run(tmp_path, "--providers", "eager", "--interrupt-after", "1") == 130
    rows = _rows(tmp_path)
    assert len(rows) == 4 and len(latest_run(rows)) == 1


def test_warm_only_calls_each_case_once_in_workers(tmp_path, capsys):
    """--warm-only --jobs 2: the cases of the same command line, less the providers that compile nothing,
    each called once in one of two worker processes (the Triton provider in its interpreter, which the
    workers inherit); nothing is timed or written."""
    require_backend("cpp")
    from kernels import available_backends

    providers_asked = "eager,cpp,cpp-unfused" + (",triton-split" if available_backends()["triton"] is None else "")
    assert main(["--device", "cpu", "--suite", "layers,model", "--shapes", "tiny", "--batch", "2", "--modes",
                 "fwd,full", "--tiny-model", "--providers", providers_asked, "--out", str(tmp_path), "--warm-only",
                 "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("[")]
    assert out.startswith("warming ") and "in 2 worker processes (nothing is timed)" in out and "warmed in" in out
    assert lines and all(line.rsplit(": ", 1)[1].startswith("ran (") for line in lines), out
    labels = [line.split("] ", 1)[1].rsplit(": ", 1)[0] for line in lines]
    assert len(set(labels)) == len(labels) and not any(label.endswith(" eager") for label in labels)
    assert {label.split()[0] for label in labels} == {"layers", "model"}
    if "triton-split" in providers_asked:
        assert any(label.endswith(" triton-split") for label in labels)
    assert list(tmp_path.iterdir()) == []


def test_warm_reports_failures_and_interrupts(monkeypatch):
    """A case that fails is reported (exit 1) and the others still run; an interrupt stops the pool (exit 130)."""
    from benchmarks import warm
    from benchmarks.cases import TINY_LAYERS, Case

    good = Case("layers", TINY_LAYERS[0], 2, "fp32", "channels_last", "fwd", "auto")
    bad = Case("layers", TINY_LAYERS[0], 2, "fp32", "channels_last", "fwd", "nope")
    eager = Case("layers", TINY_LAYERS[0], 2, "fp32", "channels_last", "fwd", "eager")
    model = Case("model", TINY_LAYERS[0], 2, "fp32", "channels_last", "eval", "cpp-unfused")
    assert warm.warm_cases([good, eager, good, model]) == [model, good]
    label, _, error = warm.call_once((bad, "cpu", None))
    assert label == bad.label and error.startswith("ValueError: backend must be one of")

    class Pool:
        def __init__(self, interrupt):
            self.interrupt, self.terminated = interrupt, False

        def imap_unordered(self, fn, tasks):
            for task in tasks:
                if self.interrupt:
                    raise KeyboardInterrupt
                yield fn(task)

        def close(self):
            pass

        def terminate(self):
            self.terminated = True

        def join(self):
            pass

    for interrupt, expected in ((False, 1), (True, 130)):
        pool = Pool(interrupt)
        context = types.SimpleNamespace(Pool=lambda processes, initializer: pool)
        monkeypatch.setattr(warm.multiprocessing, "get_context", lambda method: context)
        lines = []
        assert warm.warm([bad, good], "cpu", 2, log=lines.append) == expected
        assert pool.terminated
        if interrupt:
            assert "interrupted after" in lines[-1]
        else:
            assert lines[1].startswith("[1/2] ") and "failed: ValueError" in lines[1] and lines[2].endswith(")")
            assert lines[-1].endswith("1 case(s) failed")


def test_isolate_runs_each_model_in_its_own_process(tmp_path, monkeypatch):
    """--isolate: the whole-model cases run in worker processes (this process never builds a model),
    timed in turns; their rows carry the workers' page faults and peak memory, the run says so."""
    from benchmarks import isolated
    from benchmarks.cases import MODEL_SHAPE, Case

    if isolated.supported():
        pytest.skip(isolated.supported())
    require_backend("cpp")
    built = []
    monkeypatch.setattr(providers, "prepare_model", lambda *args, **kwargs: built.append(args))
    assert main(["--suite", "model", "--providers", "eager,cpp-unfused", "--batch", "1", "--modes", "full",
                 "--repeats", "2", "--min-time", "0", "--tiny-model", "--no-peak", "--isolate", "--device", "cpu",
                 "--out", str(tmp_path)]) == 0
    assert built == []  # the patch does not reach the spawned workers, which did the work
    rows = [r for r in _rows(tmp_path) if r["status"] == "ok"]
    assert {(r["mode"], r["provider"], r["layout"]) for r in rows} >= {
        ("train", "eager", "channels_last"), ("train", "cpp-unfused", "channels_last")}
    for row in rows:
        assert row["run"]["isolated_models"] is True and "--isolate" in row["run"]["argv"]
        assert row["p50_ms"] > 0 and row["peak_alloc_mb"] > 0 and row["minor_faults"] >= 0
    assert "each provider in a worker process of its own" in (tmp_path / f"{device_slug('cpu')}.md").read_text()
    # A worker that cannot prepare its case: the error comes back to this process, naming the cause.
    with pytest.raises(RuntimeError, match="in the worker process: ValueError: backend must be one of .*got 'nosuch'"):
        isolated.Worker(Case("model", MODEL_SHAPE, 1, "fp32", "channels_last", "train", "nosuch-unfused"),
                        "cpu", {"middle_blocks": 1, "width": 0.125}, 1)


def test_model_suite_runs_or_says_why(tmp_path, capsys):
    assert main(["--suite", "model", "--providers", "eager", "--batch", "1", "--modes", "fwd", "--repeats", "1",
                 "--min-time", "0", "--tiny-model", "--no-memory", "--device", "cpu", "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path)
    assert rows
    for row in rows:
        if row["status"] == "unavailable":
            assert row["reason"].startswith("xception model not importable")
        else:
            assert row["status"] == "ok" and row["suite"] == "model" and row["gflop_s"] > 0
            assert row["images_per_s"] == pytest.approx(row["batch"] / (row["p50_ms"] / 1e3))
    if any(row["status"] == "ok" for row in rows):
        assert "| images/s |" in (tmp_path / f"{device_slug('cpu')}.md").read_text()
        # A whole-model group takes minutes before its rows exist: a log shows each step of it.
        printed = capsys.readouterr().out
        assert "model xception 299x299 N=1 fp32 eval: preparing eager channels_last (1/" in printed
        assert "timed round 1 of at least" in printed


def test_fma_probe_measures_or_says_why(monkeypatch):
    from benchmarks import cpu_peak

    gflops, reason = cpu_peak.fma_gflops(1, seconds=0.02)
    assert reason is None and gflops > 1.0
    monkeypatch.setattr(cpu_peak, "_modules", {})
    monkeypatch.setattr(cpu_peak.shutil, "which", lambda name: None)
    assert cpu_peak.fma_gflops(1) == (None, "no C++ compiler (c++) to build the FMA probe")
    monkeypatch.setenv("SEPCONV_CPU_ISA", "avx3")
    gflops, reason = cpu_peak.fma_gflops(1)
    assert gflops is None and "SEPCONV_CPU_ISA" in reason and "'avx3'" in reason


def test_model_flops_match_paper():
    try:
        providers.import_xception()
    except ImportError as error:
        pytest.skip(str(error))
    flops = providers.count_model_flops()
    assert 16.0e9 < flops < 17.5e9  # ~8.4 GMACs per 299x299 image


def test_torn_last_line_is_skipped_and_repaired(tmp_path):
    path = tmp_path / "log.jsonl"
    with JsonlLog(path) as log:
        log.append({"a": 1, "run": {"run_id": "r1"}})
    with open(path, "a") as handle:
        handle.write('{"a": 2, "ru')  # a write cut short by a kill
    assert [r["a"] for r in read_rows(path)] == [1]
    with JsonlLog(path) as log:
        log.append({"a": 3, "run": {"run_id": "r2"}})
    assert [r["a"] for r in read_rows(path)] == [1, 3]
    assert [r["a"] for r in latest_run(read_rows(path))] == [3]


@pytest.mark.parametrize("argv, named", [
    (["--backends", "cuda_magic"], "'cuda_magic'"),
    (["--providers", "eager,tensorrt"], "'tensorrt'"),
    (["--dtypes", "fp64"], "'fp64'"),
    (["--batch", "0"], "'0'"),
    (["--batch", "two"], "'two'"),
    (["--modes", "sideways"], "'sideways'"),
    (["--layout", "nhwc"], "'nhwc'"),
    (["--suite", "everything"], "'everything'"),
    (["--threads", "-1"], "'-1'"),
    (["--shapes", "no-such-shape"], "'no-such-shape'"),
    (["--quick", "--full"], "--full"),
])
def test_bad_flags_name_the_value(argv, named, capsys, tmp_path):
    with pytest.raises(SystemExit) as raised:
        main([*argv, "--out", str(tmp_path)])
    assert raised.value.code == 2
    assert named in capsys.readouterr().err


def test_cpu_timer_is_time_budgeted():
    now = [0.0]
    calls = []

    def clock():
        return now[0]

    def fn():
        calls.append(1)
        now[0] += 0.125  # every call takes 125 ms (exact in binary floating point)

    policy = timing.TimingPolicy(warmup=2, min_repeats=3, min_seconds=0.5, max_repeats=100)
    times = timing.time_cpu(fn, policy, clock=clock)
    assert len(calls) == 2 + 4  # warm-up excluded; stops once 0.5 s of timed calls are done
    assert times == pytest.approx([125.0] * 4)
    slow = timing.TimingPolicy(warmup=1, min_repeats=3, min_seconds=0.0)
    assert len(timing.time_cpu(fn, slow, clock=clock)) == 3  # a slow case still gets min_repeats
    capped = timing.TimingPolicy(warmup=1, min_repeats=2, min_seconds=100.0, max_repeats=6)
    assert len(timing.time_cpu(fn, capped, clock=clock)) == 6  # max_repeats caps the time budget


def test_cpu_timer_interleaves_cases_in_rounds():
    now = [0.0]
    order = []

    def make(name, seconds):
        def fn():
            order.append(name)
            now[0] += seconds
        return fn

    fns = [make("slow", 0.25), make("fast", 0.125)]
    policy = timing.TimingPolicy(warmup=1, min_repeats=2, min_seconds=0.5, max_repeats=100)
    rounds_done = []
    times = timing.time_cpu_interleaved(fns, policy, clock=lambda: now[0], settle=0, on_round=rounds_done.append)
    # warm-ups first, then rounds of one call each, until 0.5 s per callable (1 s) of timed calls
    assert order == ["slow", "fast"] + ["slow", "fast"] * 3
    assert rounds_done == [1, 2, 3]
    assert times == [pytest.approx([250.0] * 3), pytest.approx([125.0] * 3)]
    assert timing.time_cpu_interleaved([], policy) == []
    order.clear()
    settled = timing.time_cpu_interleaved(fns, policy, clock=lambda: now[0])  # one untimed call before each
    assert order == ["slow", "fast"] + ["slow", "slow", "fast", "fast"] * 3
    assert settled == times
    capped = timing.TimingPolicy(warmup=1, min_repeats=1, min_seconds=100.0, max_repeats=4)
    assert [len(t) for t in timing.time_cpu_interleaved(fns, capped, clock=lambda: now[0])] == [4, 4]


@pytest.mark.skipif(timing.resource is None, reason="the resource module (page-fault counts) is POSIX-only")
def test_interleaved_timer_counts_page_faults_per_timed_call():
    """A call that maps and touches 4 MiB afresh faults ~1024 pages every time; a no-op faults none."""
    import mmap

    def touch_fresh_pages():
        with mmap.mmap(-1, 4 << 20) as fresh:
            for offset in range(0, 4 << 20, 4096):
                fresh[offset] = 1

    faults = []
    policy = timing.TimingPolicy(warmup=1, min_repeats=5, min_seconds=0.0, max_repeats=5)
    times = timing.time_cpu_interleaved([lambda: None, touch_fresh_pages], policy, faults=faults)
    assert [len(f) for f in faults] == [len(t) for t in times] == [5, 5]
    assert sorted(faults[0])[2] < 50 and min(faults[1]) >= 1000


def test_summary_percentiles():
    summary = timing.summarize([5.0, 1.0, 2.0, 4.0, 3.0])
    assert (summary.p20_ms, summary.p50_ms, summary.p80_ms, summary.repeats) == (1.8, 3.0, 4.2, 5)


def test_gpu_timer_uses_do_bench_with_all_times(monkeypatch):
    seen = {}

    def do_bench(fn, warmup, rep, grad_to_none=None, quantiles=None, return_mode="mean"):
        seen.update(warmup=warmup, rep=rep, return_mode=return_mode)
        fn()
        return [1.0, 2.0, 3.0]

    fake = types.ModuleType("triton.testing")
    fake.do_bench = do_bench
    monkeypatch.setitem(sys.modules, "triton.testing", fake)
    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(testing=fake))
    called = []
    times = timing.time_cuda(lambda: called.append(1), timing.TimingPolicy(min_seconds=0.5))
    assert times == [1.0, 2.0, 3.0] and called == [1]
    assert seen["return_mode"] == "all" and seen["rep"] >= 100


def test_work_counts():
    shape = Shape("s", 64, 128, 147, 147)
    assert separable_flops(shape, 8) == 2 * 8 * 147 * 147 * (64 * 9 + 64 * 128)
    x, y, weights = 8 * 64 * 147 * 147, 8 * 128 * 147 * 147, 64 * 9 + 64 * 128
    assert separable_bytes(shape, 8, 4, "fwd") == 4 * (x + weights + y)
    strided = Shape("s2", 16, 16, 7, 7, stride=2)
    assert strided.out_hw == (4, 4)
    assert [s.name for s in XCEPTION_LAYERS][:2] == ["64->128@147", "128->128@147"] and len(XCEPTION_LAYERS) == 10


def test_shortcut_suite_times_nn_conv2d_against_pointwise_conv2d():
    """The shortcut suite: Xception's four 1x1 stride-2 convs and two stem 3x3 convs, eager (nn.Conv2d)
    first, then cpp (kernels.PointwiseConv2d, kernels.Conv2d); other providers have nothing of their own to
    time there. FLOPs and bytes of a dense conv, without a depthwise stage."""
    from benchmarks.cases import SHORTCUT_LAYERS, STEM_LAYERS, Case
    from benchmarks.runner import RunOptions, work

    cases = build_cases(["shortcut"], ["cpp", "triton", "eager", "compile"], [], ["fp32"], [8], ["full"],
                        ["channels_last"])
    assert [(c.shape.name, c.provider) for c in cases[:2]] == [("shortcut 64->128@147", "eager"),
                                                               ("shortcut 64->128@147", "cpp")]
    assert len(cases) == 12 and {c.provider for c in cases} == {"eager", "cpp"}
    assert [(s.cin, s.cout, s.h, s.out_hw) for s in SHORTCUT_LAYERS] == [
        (64, 128, 147, (74, 74)), (128, 256, 74, (37, 37)), (256, 728, 37, (19, 19)), (728, 1024, 19, (10, 10))]
    assert [(s.cin, s.cout, s.h, s.k, s.padding, s.out_hw) for s in STEM_LAYERS] == [
        (3, 32, 299, 3, 0, (149, 149)), (32, 64, 149, 3, 0, (147, 147))]
    stem_case = [c for c in cases if c.shape == STEM_LAYERS[1]][0]
    flops, nbytes = work(stem_case, RunOptions(device="cpu", policy=timing.TimingPolicy(), measure_memory=False))
    assert flops == 3 * 2 * 8 * 147 * 147 * 32 * 64 * 9
    flops, nbytes = work(cases[0], RunOptions(device="cpu", policy=timing.TimingPolicy(), measure_memory=False))
    assert flops == 3 * 2 * 8 * 74 * 74 * 64 * 128
    x, y, weight = 8 * 64 * 147 * 147, 8 * 128 * 74 * 74, 64 * 128
    assert nbytes == 4 * ((x + weight + y) + (y + x + weight + x + weight))
    eager = providers.prepare_layer(Case("shortcut", SHORTCUT_LAYERS[3], 1, "fp32", "channels_last", "fwd",
                                         "eager"), "cpu")
    assert type(eager.keepalive[0]) is torch.nn.Conv2d and eager.keepalive[0].stride == (2, 2)
    require_backend("cpp")
    ours = providers.prepare_layer(Case("shortcut", SHORTCUT_LAYERS[3], 1, "fp32", "channels_last", "full",
                                        "cpp"), "cpu")
    import kernels
    assert isinstance(ours.keepalive[0], kernels.PointwiseConv2d) and ours.keepalive[0].backend == "cpp"
    assert providers.implementations_run(ours.fn) == "cpp"
    stem = providers.prepare_layer(Case("shortcut", STEM_LAYERS[1], 1, "fp32", "channels_last", "fwd", "cpp"), "cpu")
    assert isinstance(stem.keepalive[0], kernels.Conv2d) and stem.keepalive[0].padding == (0, 0)


def test_cases_put_the_baseline_first_and_both_eager_layouts():
    cases = build_cases(["layers"], ["cpp", "eager"], [], ["fp32"], [1], ["fwd"], ["channels_last"], ["@10"])
    assert [(c.provider, c.layout) for c in cases[:3]] == [("eager", "channels_last"), ("eager", "nchw"),
                                                          ("cpp", "channels_last")]
    assert {c.shape.name for c in cases} == {"1024->1536@10", "1536->2048@10"}


def test_results_rows_are_json_lines(tmp_path):
    assert _run(tmp_path, "--providers", "eager", "--interrupt-after", "1") == 130
    text = (tmp_path / f"{device_slug('cpu')}.jsonl").read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 1
    json.loads(text)
    assert torch.get_num_threads() >= 1


def test_quick_defaults_on_cpu():
    from benchmarks.__main__ import build_parser, resolve_defaults

    quick = resolve_defaults(build_parser().parse_args(["--device", "cpu"]))
    assert quick.quick and quick.layer_batches == [1, 8] and quick.modes == ["fwd", "full"]
    assert quick.layout == ["channels_last"] and quick.eager_both_layouts
    assert "compile" in quick.layer_providers and "compile" not in quick.model_providers
    assert "cpp-fused" in quick.model_providers and quick.model_batches == [1, 8] and quick.train_batches == [8]
    model_cases = build_cases(["model"], [], quick.model_providers, quick.dtypes, quick.model_batches, quick.modes,
                              quick.layout, train_batches=quick.train_batches)
    assert {(c.mode, c.batch) for c in model_cases} == {("eval", 1), ("eval", 8), ("train", 8)}
    full = resolve_defaults(build_parser().parse_args(["--device", "cpu", "--full"]))
    assert "compile" in full.model_providers and "bwd" in full.modes and full.train_batches == [8]


def test_a_failing_case_gets_an_error_row_and_its_group_still_runs(tmp_path, monkeypatch):
    real_prepare = providers.prepare

    def prepare(case, device, model_kwargs=None):
        prepared = real_prepare(case, device, model_kwargs)
        if case.provider == "torch" and case.mode == "full":
            def broken():
                raise RuntimeError("deliberately broken")
            prepared.fn = broken
        return prepared

    monkeypatch.setattr(providers, "prepare", prepare)
    assert _run(tmp_path, "--providers", "eager,torch") == 0
    rows = [r for r in _rows(tmp_path) if r["suite"] == "smoke"]
    broken = [r for r in rows if r["provider"] == "torch" and r["mode"] == "full"]
    assert broken and all(r["status"] == "error" and "deliberately broken" in r["reason"] for r in broken)
    others = [r for r in rows if r not in broken]
    assert others and all(r["status"] == "ok" and r["speedup_vs_eager_cl"] > 0 for r in others)


def test_cpu_speedup_is_the_median_of_paired_ratios(monkeypatch):
    from benchmarks import runner
    from benchmarks.machine import run_info

    # Slow spells (x3) over rounds 2-5 catch the cases unevenly: the ratio of the medians would be 10/15,
    # the median of the round-by-round ratios (2, 2/3, 2/3, 2, 6) is 2.
    rounds = [[10.0, 10.0, 10.0, 30.0, 30.0], [5.0, 15.0, 15.0, 15.0, 5.0]]
    def fake_timer(fns, policy, faults, on_round=None, fault_counters=None):
        faults[:] = [[0, 0, 7, 7, 7], [3, 3, 3, 0, 0]]
        return rounds
    monkeypatch.setattr(runner, "time_cpu_interleaved", fake_timer)
    monkeypatch.setattr(providers, "prepare", lambda case, device, model_kwargs=None: providers.Prepared(lambda: None))
    cases = build_cases(["smoke"], ["eager", "cpp"], [], ["fp32"], [1], ["fwd"], ["channels_last"], ["tiny"],
                        eager_both_layouts=False)[:2]
    assert [c.provider for c in cases] == ["eager", "cpp"]
    options = runner.RunOptions(device="cpu", policy=timing.TimingPolicy(), measure_memory=False)
    rows = runner.measure_group(cases, options, run_info("cpu", argv="test"), {})
    assert rows[0]["speedup_vs_eager_cl"] == 1.0 and rows[0]["p50_ms"] == 10.0
    assert rows[1]["speedup_vs_eager_cl"] == 2.0 and rows[1]["p50_ms"] == 15.0
    assert (rows[0]["minor_faults"], rows[1]["minor_faults"]) == (7, 3)  # medians over the rounds


def test_paired_speedup_carries_its_95_percent_interval(monkeypatch):
    """Twelve rounds: the case's interval is the order statistics (x_(3), x_(10)) of its round ratios, which
    holds the median; the baseline's own row (ratio 1 by definition) has none."""
    from benchmarks import runner
    from benchmarks.machine import run_info

    case_ms = [10.0, 8.0, 12.5, 5.0, 20.0, 10.0, 4.0, 25.0, 9.0, 11.0, 6.25, 40.0]
    rounds = [[10.0] * len(case_ms), case_ms]
    monkeypatch.setattr(runner, "time_cpu_interleaved",
                        lambda fns, policy, faults, on_round=None, fault_counters=None:
                        faults.extend([[0] * len(case_ms)] * 2) or rounds)
    monkeypatch.setattr(providers, "prepare", lambda case, device, model_kwargs=None: providers.Prepared(lambda: None))
    cases = build_cases(["smoke"], ["eager", "cpp"], [], ["fp32"], [1], ["fwd"], ["channels_last"], ["tiny"],
                        eager_both_layouts=False)[:2]
    options = runner.RunOptions(device="cpu", policy=timing.TimingPolicy(), measure_memory=False)
    rows = runner.measure_group(cases, options, run_info("cpu", argv="test"), {})
    ratios = sorted(10.0 / t for t in case_ms)  # 0.25, 0.4, 0.5, 0.8, 0.91, 1.0, 1.0, 1.11, 1.25, 1.6, 2.0, 2.5
    assert rows[1]["speedup_ci95"] == [ratios[2], ratios[9]] == [0.5, 1.6]
    assert rows[1]["speedup_ci95"][0] <= rows[1]["speedup_vs_eager_cl"] <= rows[1]["speedup_ci95"][1]
    assert rows[0]["speedup_vs_eager_cl"] == 1.0 and rows[0]["speedup_ci95"] is None


@pytest.mark.parametrize("n, expected", [(5, None), (6, (1, 6)), (10, (2, 9)), (100, (40, 61))])
def test_median_interval_matches_the_binomial_tables(n, expected):
    values = list(range(n, 0, -1))  # order does not matter
    assert timing.median_interval(values) == expected
    with pytest.raises(ValueError, match="level must lie strictly between 0 and 1, got 1.5"):
        timing.median_interval(values, level=1.5)


def test_missed_speedup_targets_say_whether_the_interval_reaches_the_goal():
    """A cell under its goal is missed either way; the report adds "within the run's spread" only where the
    row's 95% interval reaches the goal, and prints the interval beside the speedup."""
    from benchmarks.results import check_targets, render_markdown, within_spread

    def row(shape, speedup, interval):
        return {**{key: None for key in ROW_KEYS}, "suite": "layers", "provider": "cpp", "layout": "channels_last",
                "shape": shape, "batch": 8, "dtype": "fp32", "mode": "fwd", "h": 19, "status": "ok", "p50_ms": 1.0,
                "p20_ms": 0.9, "p80_ms": 1.1, "speedup_vs_eager_cl": speedup, "speedup_ci95": interval}

    rows = [row("728->728@19", 0.98, [0.95, 1.01]), row("1024->1536@10", 0.90, [0.86, 0.94]),
            row("728->1024@19", 1.05, [1.02, 1.08]), row("256->728@37", 0.97, None)]
    checks = [c for c in check_targets(rows, "cpp") if c["unit"] == "x"]
    assert [(c["ok"], within_spread(c)) for c in checks] == [(False, True), (False, False), (True, False),
                                                            (False, False)]
    text = render_markdown(rows, {"run_id": "r", "device": "cpu"}, {}, "cpp")
    assert "| 0.98x (0.95–1.01) | 1.00x | ❌ (within the run's spread) |" in text
    assert "| 0.90x (0.86–0.94) | 1.00x | ❌ |" in text and "| 0.97x | 1.00x | ❌ |" in text
    assert "1.05x (1.02–1.08) ✅" in text


def test_rss_script(tmp_path, capsys):
    """benchmarks.rss: a row per provider from fresh processes, the cache's bytes for cpp (none idle with
    SEPCONV_CACHE_MB=0), the file written; bad arguments rejected by name."""
    from benchmarks import rss
    from conftest import require_backend

    require_backend("cpp")
    out = tmp_path / "rss.jsonl"
    rss.main(["--batch", "2", "--steps", "1", "--size", "96", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["provider"] for row in rows] == list(rss.PROVIDERS)
    assert all(row["status"] == "ok" and row["max_rss_mib"] > 0 and row["batch"] == 2 for row in rows), rows
    for row in rows:  # machine, versions and commit, as in the suite's rows
        assert set(RUN_KEYS) - {"peak_gflops", "peak_gbps"} <= set(row["run"])
        assert row["run"]["torch_version"] == torch.__version__ and row["run"]["git_commit"]
        assert row["run"]["argv"].startswith("python -m benchmarks.rss --batch 2")
    cached, uncached = rows[1], rows[2]
    assert cached["cache_idle_mib"] > 0 and uncached["cache_idle_mib"] == uncached["cache_live_mib"] == 0
    assert capsys.readouterr().out.count("max_rss_mib") == 3
    with pytest.raises(SystemExit):
        rss.main(["--size", "32"])
    assert "--size must be >= 71, got 32" in capsys.readouterr().err


def test_triton_sweep_interpreted(tmp_path, capsys, monkeypatch):
    """The sweep end to end on a tiny shape in Triton's interpreter: one row per kernel, each timed; the transposed
    kernel in two tiles (its own, then another), restored afterwards; the fastest of each kernel pinned in --pins."""
    require_backend("triton")
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: the sweep runs on the GPU there, not in the interpreter")
    from kernels.triton import pinned, split

    monkeypatch.delenv(pinned.PINS_ENV, raising=False)
    tiles = dict(split.TRANSPOSED_TILES), split.INTERPRET_TILE
    out, pins = tmp_path / "sweep.jsonl", tmp_path / "pins.json"
    assert sweep_main(["--interpret", "--dtypes", "fp32", "--kernels", "forward,grad_input,depthwise,transposed",
                       "--jsonl", str(out), "--pins", str(pins)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["kernel"] for row in rows] == ["forward", "grad_input", "depthwise", "transposed", "transposed"]
    assert all(row["ms"] > 0 and row["error"] is None for row in rows)
    assert [row["current"] for row in rows] == [True, True, True, True, False]
    own, other = (row["config"] for row in rows[3:])
    assert own.startswith("TILE=3x3,") and other.startswith("TILE=2x2,") and own[9:] == other[9:]
    fastest = {}
    for row in rows:
        if row["kernel"] not in fastest or row["ms"] < fastest[row["kernel"]]["ms"]:
            fastest[row["kernel"]] = row
    written = pinned.read(pins)
    assert sorted(written) == sorted((kernel, "fp32") for kernel in fastest)
    for (kernel, _), pin in written.items():
        assert describe(pin.config, pin.tile) == fastest[kernel]["config"], kernel
    assert (dict(split.TRANSPOSED_TILES), split.INTERPRET_TILE) == tiles
    assert "eager pair forward" in capsys.readouterr().out
    # The launcher reads the tile at each call, so the sweep's setting is the one launched.
    x = torch.zeros(1, 8, 5, 5)
    launch = functools.partial(split.transposed_depthwise_launch, torch.zeros(25, 8), x, torch.zeros(8, 1, 3, 3),
                               torch.zeros_like(x), (5, 5), (1, 1), (1, 1, 1, 1), (1, 1), False, True, True, False)
    with transposed_tile("fp32", (1, 2)):
        assert (launch()[3]["ROWS"], launch()[3]["COLS"]) == (1, 2)
    assert (launch()[3]["ROWS"], launch()[3]["COLS"]) == split.INTERPRET_TILE
    monkeypatch.setenv(pinned.PINS_ENV, str(pins))
    with pytest.raises(SystemExit):
        sweep_main(["--interpret"])
    assert "SEPCONV_TRITON_CONFIGS is set" in capsys.readouterr().err


def test_triton_sweep_precompiles_in_workers(tmp_path, capsys, monkeypatch):
    """--jobs 2: each kernel's candidates are called once in two worker processes before the timing loop (on a
    GPU their compiles then run in parallel); the rows are timed as without it, and a cut-short precompile
    says so."""
    require_backend("triton")
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: the sweep runs on the GPU there, not in the interpreter")
    from benchmarks import triton_sweep
    from kernels.triton import pinned

    monkeypatch.delenv(pinned.PINS_ENV, raising=False)
    out = tmp_path / "sweep.jsonl"
    assert sweep_main(["--interpret", "--dtypes", "fp32", "--kernels", "depthwise,transposed", "--jobs", "2",
                       "--jsonl", str(out)]) == 0
    text = capsys.readouterr().out
    assert "depthwise: 1 candidates compiled in 2 processes" in text
    assert "transposed: 2 candidates compiled in 2 processes" in text and "cut short" not in text
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["kernel"] for row in rows] == ["depthwise", "transposed", "transposed"]
    assert all(row["ms"] > 0 and row["error"] is None for row in rows)
    # A worker's failure is its return value; the sweep times (and reports) the candidate itself.
    shape = Shape("tiny 8->20@6", 8, 20, 6, 6)
    config = triton_sweep.current_configs()["depthwise"]["fp32"][0]
    assert triton_sweep._compile_candidate((shape, 2, "fp32", "depthwise", None, config, "cpu")) is None
    bad = type(config)({"BLOCK_P": 16}, num_warps=4, num_stages=1)
    assert triton_sweep._compile_candidate((shape, 2, "fp32", "depthwise", None, bad, "cpu")) is not None
    assert not triton_sweep.precompile(shape, 2, "fp32", "depthwise", [(None, config)], "cpu", 1, 0.0)


def test_resolve_shapes_names_the_option():
    """Shape names resolve by substring; one that matches nothing names the caller's flag."""
    assert [s.name for s in resolve_shapes(["1536->2048", "@19"], XCEPTION_LAYERS)] == [
        "1536->2048@10", "728->728@19", "728->1024@19"]
    with pytest.raises(ValueError, match="^--layers: '1536-2048' matches no shape"):
        resolve_shapes(["1536-2048"], XCEPTION_LAYERS, "--layers")
    with pytest.raises(ValueError, match="^--shapes: 'nope'"):
        resolve_shapes(["nope"], XCEPTION_LAYERS)


def test_triton_sweep_candidates_and_errors(capsys):
    require_backend("triton")
    from kernels.triton import backward, forward, split

    current = {"forward": forward.GPU_CONFIGS, "depthwise": split.GPU_CONFIGS,
               "grad_hidden": backward.GRAD_HIDDEN_CONFIGS_GPU, "grad_input": backward.GRAD_INPUT_CONFIGS_GPU,
               "grad_pointwise": backward.GRAD_POINTWISE_CONFIGS_GPU, "transposed": split.TRANSPOSED_CONFIGS}
    for kernel in KERNELS:
        for family in ("16bit", "fp32"):
            names = [describe(config) for config in candidates(kernel, family)]
            assert names and len(set(names)) == len(names), (kernel, family)
            # The candidates set the kernel's own tile parameters (a renamed one would fail to launch).
            tiles = set(current[kernel][family][0].kwargs) | {"UNROLL_TAPS"}
            assert all(set(c.kwargs) <= tiles for c in candidates(kernel, family)), (kernel, family, tiles)
            # ... and every tile parameter the kernel's own configs set (a new one must be swept too).
            required = set(current[kernel][family][0].kwargs) - {"UNROLL_TAPS"}
            assert all(required <= set(c.kwargs) for c in candidates(kernel, family)), (kernel, family, required)
    # The transposed kernel: its own configs in every candidate tile (its own tile first), then the rest in its own.
    for family, own_tile in split.TRANSPOSED_TILES.items():
        pairs = sweep_candidates("transposed", family)
        names = [describe(config, tile) for tile, config in pairs]
        assert len(set(names)) == len(names) and pairs[0] == (own_tile, split.TRANSPOSED_CONFIGS[family][0])
        assert own_tile in TRANSPOSED_TILE_CANDIDATES[family]
        for tile in TRANSPOSED_TILE_CANDIDATES[family]:
            assert [c for t, c in pairs if t == tile][:3] == split.TRANSPOSED_CONFIGS[family]
    with pytest.raises(SystemExit):
        sweep_main(["--dtypes", "fp64"])
    assert "--dtypes" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            sweep_main([])
        assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.parametrize("suite,provider", [("layers", "triton-split"), ("model", "triton-split-fused")])
def test_mode_provider_runs_its_backend_in_that_mode(monkeypatch, suite, provider):
    """triton-split builds and times the triton backend with SEPCONV_TRITON_MODE=split, and restores the variable."""
    import os

    from benchmarks.cases import Case

    monkeypatch.delenv("SEPCONV_TRITON_MODE", raising=False)
    seen = []

    def fake_prepare(case, *args):
        seen.append(("prepare", os.environ.get("SEPCONV_TRITON_MODE")))
        return providers.Prepared(lambda: seen.append(("call", os.environ.get("SEPCONV_TRITON_MODE"))))

    monkeypatch.setattr(providers, "prepare_layer" if suite == "layers" else "prepare_model", fake_prepare)
    prepared = providers.prepare(Case(suite, XCEPTION_LAYERS[0], 1, "fp32", "channels_last", "fwd", provider), "cpu")
    prepared.fn()
    assert seen == [("prepare", "split"), ("call", "split")]
    assert "SEPCONV_TRITON_MODE" not in os.environ
    assert providers.backend_and_mode(provider.rpartition("-fused")[0] or provider) == ("triton", "split")
    # On this CPU machine, a triton provider is never benchmarked: the reason is the triton one.
    assert providers.availability(suite, provider, "cpu", "fp32") == providers.TRITON_CPU_REASON


def test_mode_provider_is_timed_inside_its_mode_entered_once(monkeypatch):
    """A timer of many calls (runner.measure_case, host_time, kernel_profile) takes ``prepared.timed()``: for a
    triton provider, its mode set once around all the calls and a callable that does not switch it (the
    switch, a few microseconds of environment updates, is not timed with every call); for the others, fn."""
    import os

    from benchmarks import runner
    from benchmarks.cases import Case
    from benchmarks.machine import run_info

    monkeypatch.setenv("SEPCONV_TRITON_MODE", "fused")
    seen = []
    monkeypatch.setattr(providers, "prepare_layer", lambda case, device: providers.Prepared(
        lambda: seen.append(os.environ.get("SEPCONV_TRITON_MODE"))))
    case = Case("layers", XCEPTION_LAYERS[0], 1, "fp32", "channels_last", "fwd", "triton-split")
    prepared = providers.prepare(case, "cpu")
    with prepared.timed() as call:
        assert os.environ["SEPCONV_TRITON_MODE"] == "split"
        call()
        call()
    assert seen == ["split", "split"] and os.environ["SEPCONV_TRITON_MODE"] == "fused"
    call()  # outside the block the bare call runs in whatever mode is set: it switches nothing itself
    prepared.fn()  # fn still sets the mode around each call (the interleaved CPU rounds time it so)
    assert seen[2:] == ["fused", "split"] and os.environ["SEPCONV_TRITON_MODE"] == "fused"
    plain = providers.Prepared(lambda: None)
    with plain.timed() as call:
        assert call is plain.fn

    timed = []

    def measure(fn, device, policy, **options):
        timed.append((fn is prepared.bare, os.environ.get("SEPCONV_TRITON_MODE")))
        return timing.summarize([1.0, 1.0, 1.0])

    monkeypatch.setattr(providers, "prepare", lambda case, device, model_kwargs=None: prepared)
    monkeypatch.setattr(runner, "measure", measure)
    options = runner.RunOptions(device="cpu", policy=timing.TimingPolicy(), measure_memory=False)
    row = runner.measure_case(case, options, run_info("cpu", argv="test"), {})
    assert timed == [(True, "split")] and row["status"] == "ok"
    assert os.environ["SEPCONV_TRITON_MODE"] == "fused"


def test_gpu_check_script_parses_and_its_selections_collect_tests():
    """benchmarks/gpu_check.sh (run only where a GPU is lent) is valid bash and each of its test runs selects
    tests in the files it names: the two broad Triton selections at least 40 each."""
    import re
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = root / "benchmarks" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text().replace("\\\n", " ")
    runs = re.findall(r'^tests \S+ ((?:tests/\S+\.py\s+)+)-k "([^"]+)"', text, flags=re.MULTILINE)
    assert len(runs) == 3, runs
    counts = []
    for files, expression in runs:
        result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *files.split(), "-k",
                                 expression], cwd=root, capture_output=True, text=True, timeout=300)
        found = re.search(r"(\d+)/\d+ tests collected", result.stdout)
        assert found, result.stdout[-2000:]
        counts.append(int(found.group(1)))
    assert min(counts) >= 1 and sorted(counts)[-2] >= 40, counts


def _plot_rows():
    """A made-up run: two layer groups, a whole-model group, providers in both layouts."""
    run = {"device": "cpu", "device_name": "Test CPU", "threads": 2, "torch_version": "9.9", "triton_version": "8.8",
           "git_commit": "0123456789abcdef-dirty", "utc_time": "2026-01-01T00:00:00+00:00", "run_id": "r1",
           "peak_gflops": {"fp32": 500.0}, "peak_gbps": 50.0}
    rows = []
    for mode in ("fwd", "full"):
        for shape in XCEPTION_LAYERS:
            for provider, layout, speedup in (("eager", "channels_last", 1.0), ("eager", "nchw", 0.5),
                                              ("cpp", "channels_last", 2.5), ("compile", "channels_last", 0.9)):
                rows.append(dict(suite="layers", shape=shape.name, batch=8, dtype="fp32", mode=mode, layout=layout,
                                 provider=provider, status="ok", speedup_vs_eager_cl=speedup, gflop_s=100.0 * speedup,
                                 gb_s=2.0, run=run))
    for provider, speedup in (("eager", 1.0), ("cpp-fused", 1.4), ("cpp-unfused", 1.2)):
        rows.append(dict(suite="model", shape="xception 299x299", batch=8, dtype="fp32", mode="eval",
                         layout="channels_last", provider=provider, status="ok", speedup_vs_eager_cl=speedup,
                         gflop_s=50.0, images_per_s=20.0, run=run))
    return rows


def test_plot_panels_ratio_axes_and_one_colour_per_provider():
    import matplotlib.pyplot as plt

    from benchmarks.plot import build_figure, format_ratio, provider_color

    figure = build_figure(_plot_rows(), source="benchmarks/results/cpu-test.jsonl")
    try:
        title = figure._suptitle.get_text()
        assert "benchmarks/results/cpu-test.jsonl" in title and "0123456789-dirty" in title and "torch 9.9" in title
        axes = [axis for axis in figure.axes if axis.axison]
        titles = [axis.get_title() for axis in axes]
        assert titles == ["layers: N=8 fp32, forward", "layers: N=8 fp32, forward + backward",
                          "Whole model (xception 299x299)", "Layers against the roofline"]
        width, height = figure.get_size_inches() * figure.dpi
        assert width <= 2000 and height <= 2000
        for axis in axes[:3]:
            labels = [tick.get_text() for tick in axis.get_yticklabels()]
            assert "1x" in labels and all(label.endswith("x") for label in labels), labels
            assert axis is axes[2] or {"0.5x", "2x"} <= set(labels), labels
            assert 1.0 in [line.get_ydata()[0] for line in axis.get_lines()]  # the 1x line
            assert all(tick.get_rotation() == 0 for tick in axis.get_xticklabels())
        assert [t.get_text() for t in axes[0].get_xticklabels()][:2] == ["64\u2192128\n@147", "128\u2192128\n@147"]
        roofline_labels = [tick.get_text() for tick in axes[3].get_yticklabels()]
        assert not any("^" in label for label in roofline_labels), roofline_labels
        # Every bar of a provider, in every panel, has that provider's colour; NCHW is hatched.
        from matplotlib.colors import to_hex

        seen = {}
        for axis in axes[:3]:
            for patch in axis.patches:
                seen.setdefault(to_hex(patch.get_facecolor()), set()).add(patch.get_hatch())
        assert to_hex(provider_color("cpp")) in seen and seen[to_hex(provider_color("eager"))] == {"//"}
        assert len({provider_color(p) for p in ("eager", "cpp", "compile", "cpp-fused", "cpp-unfused")}) == 5
        legend = [text.get_text() for text in figure.legends[0].get_texts()]
        assert legend[0].startswith("eager CL (baseline") and legend.count("cpp CL") == 1
    finally:
        plt.close(figure)
    predicted = [dict(row, run=dict(row["run"], predicted=True)) for row in _plot_rows()]
    figure = build_figure(predicted)
    try:
        assert figure._suptitle.get_text().startswith("PREDICTED by a model, not measured")
    finally:
        plt.close(figure)
    assert [format_ratio(v) for v in (0.5, 1.0, 2.0, 20.0)] == ["0.5x", "1x", "2x", "20x"]
    assert provider_color("some-new-provider") == provider_color("some-new-provider")


def test_plot_whiskers_span_the_speedup_intervals():
    """A bar whose row has a 95% interval gets a whisker from its lower to its upper end; rows without one
    (the GPU's, older files) get none."""
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    from benchmarks.plot import build_figure

    rows = [dict(row, speedup_ci95=[2.25, 2.75]) if row["provider"] == "cpp" and row["mode"] == "fwd" else row
            for row in _plot_rows()]
    rows = [dict(row, speedup_ci95=[1.3, 1.6]) if row["provider"] == "cpp-fused" else row for row in rows]
    figure = build_figure(rows)
    try:
        axes = [axis for axis in figure.axes if axis.axison]
        spans = [sorted(segment[:, 1]) for collection in axes[0].collections if isinstance(collection, LineCollection)
                 for segment in collection.get_segments()]
        assert len(spans) == len(XCEPTION_LAYERS) and all(span == [2.25, 2.75] for span in spans)
        assert not [c for c in axes[1].collections if isinstance(c, LineCollection)]
        # The whole-model panel writes each value above its bar, or above its whisker: 1.4x over the whisker's top.
        labels = {text.get_text(): text.xy[1] for text in axes[2].texts}
        assert labels == {"1.4x": 1.6, "1.2x": 1.2}, labels
    finally:
        plt.close(figure)


@pytest.mark.parametrize("batches", [(8,), (1, 8, 16)])
def test_plot_title_legend_and_panels_do_not_overlap(batches):
    """The title's two lines, the legend and the top panels' titles lie one below the other, in a short
    chart (two layer panels) and a tall one (six layer panels, as a run with more batch sizes draws)."""
    import matplotlib.pyplot as plt

    from benchmarks.plot import build_figure

    base = _plot_rows()
    rows = [dict(row, batch=batch) for batch in batches for row in base if row["suite"] == "layers"]
    rows += [row for row in base if row["suite"] == "model"]
    figure = build_figure(rows, source="benchmarks/results/cpu-a-long-machine-name-family-26-model-2.jsonl")
    try:
        figure.canvas.draw()
        renderer = figure.canvas.get_renderer()
        title = figure._suptitle.get_window_extent(renderer)
        legend = figure.legends[0].get_window_extent(renderer)
        panel_titles = [axis.title.get_window_extent(renderer) for axis in figure.axes if axis.axison]
        height = figure.get_size_inches()[1] * figure.dpi
        assert len(panel_titles) == 2 * len(batches) + 2
        assert title.y1 <= height and title.y0 > legend.y1, (title, legend)  # display y grows upwards
        assert all(legend.y0 > box.y1 for box in panel_titles), (legend, panel_titles)
    finally:
        plt.close(figure)


@pytest.mark.parametrize("name, slug", [
    ("Intel(R) Xeon(R) Processor", "intel-xeon"),
    ("Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz", "intel-xeon-e5-2680-v4"),
    ("AMD EPYC 7763 64-Core Processor", "amd-epyc-7763"),
    ("AMD EPYC", "amd-epyc"),
    ("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3"),
    ("13th Gen Intel(R) Core(TM) i7-1365U", "13th-gen-intel-core-i7-1365u"),
])
def test_results_files_are_named_readably(name, slug):
    from benchmarks.machine import slugify

    assert slugify(name) == slug


@pytest.mark.parametrize("fields, name", [
    ({"model name": "AMD EPYC", "cpu family": "25", "model": "1"}, "AMD EPYC (family 25 model 1)"),
    ({"model name": "AMD EPYC", "cpu family": "26", "model": "2"}, "AMD EPYC (family 26 model 2)"),
    ({"model name": "AMD EPYC 7763 64-Core Processor", "cpu family": "25", "model": "1"},
     "AMD EPYC 7763 64-Core Processor"),
    ({"model name": "Intel(R) Xeon(R) Processor", "cpu family": "6", "model": "143"},
     "Intel(R) Xeon(R) Processor (family 6 model 143)"),
    ({"model name": "AMD EPYC"}, "AMD EPYC"),  # no family/model to add
])
def test_generic_cpu_names_get_family_and_model(fields, name):
    """Two CPU generations under one bare name (a Zen 3 without AVX-512 and a Zen 5 with it, both "AMD EPYC"
    in a VM) must not append their rows to one results file."""
    from benchmarks.machine import cpu_device_name, slugify

    assert cpu_device_name(fields) == name
    if name != fields["model name"]:  # the numbers added reach the results file's name
        assert slugify(name).endswith(f"family-{fields['cpu family']}-model-{fields['model']}")


def test_committed_results_rows_record_machine_versions_and_commit():
    """The suite's, benchmarks.rss's and benchmarks.host_time's committed logs: every row says where and with
    what it was measured."""
    from pathlib import Path

    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    logs = [log for log in sorted(results.glob("*.jsonl"))
            if log.name.startswith(("cpu-", "cuda-", "rss-", "host-time-"))]
    assert logs
    for log in logs:
        for row in read_rows(log):
            run = row.get("run") or {}
            missing = [key for key in ("device_name", "torch_version", "git_commit", "utc_time") if not run.get(key)]
            assert not missing, f"{log.name}: a row without {missing}"


def test_markdown_header_states_the_gpu_and_its_tf32_flags():
    from benchmarks.results import render_markdown

    run = {"run_id": "r", "device": "cuda", "device_name": "NVIDIA H200", "gpu_capability": "sm_90",
           "cudnn_allow_tf32": True, "matmul_allow_tf32": False}
    text = render_markdown([], run, {}, None)
    assert "GPU sm_90; TF32: cuDNN convolutions on, matmuls off" in text
    assert "TF32" not in render_markdown([], {"run_id": "r", "device": "cpu"}, {}, None)
    assert "GPU timing: plain calls" in text and "Triton tile configs not recorded" in text
    graphs = render_markdown([], {**run, "cuda_graphs": True, "triton_autotune": False}, {}, None)
    assert "GPU timing: CUDA graph replays" in graphs and "Triton tile configs fixed" in graphs
    pins = ["depthwise 16bit: BLOCK_P=8,BLOCK_C=64,ROWS=2,COLS=4,warps=4,stages=1"]
    pinned = render_markdown([], {**run, "triton_autotune": False, "triton_configs": pins}, {}, None)
    assert f"fixed (SEPCONV_TRITON_AUTOTUNE=0: each kernel's first config), but pinned from " \
           f"SEPCONV_TRITON_CONFIGS: {pins[0]}" in pinned
    assert "GPU timing" not in render_markdown([], {"run_id": "r", "device": "cpu"}, {}, None)


def test_tune_flag_tunes_the_auto_rows_and_says_so(tmp_path, monkeypatch):
    from kernels import dispatch, gpu_dispatch

    require_backend("cpp")
    monkeypatch.setattr(dispatch.BACKENDS["cpp"], "auto_check", lambda: None)  # auto takes cpp here
    monkeypatch.setattr(dispatch, "_resolved", {})
    for name, value in (("_tune_setting", None), ("_timer", None), ("_tuned", {}), ("_tuned_times", {})):
        monkeypatch.setattr(gpu_dispatch, name, value)  # restored after the test
    monkeypatch.delenv(gpu_dispatch.TUNE_ENV, raising=False)
    assert _run(tmp_path, "--providers", "eager,auto", "--layout", "channels_last", "--tune") == 0
    rows = [r for r in _rows(tmp_path) if r["status"] == "ok"]
    assert {r["provider"] for r in rows} == {"eager", "auto"} and all(r["run"]["auto_tuning"] for r in rows)
    tuned = gpu_dispatch.tuned_choices()
    # Each smoke shape in each mode (forward; forward+backward) was timed once, as a layer of its own.
    assert len(tuned) == len({(r["shape"], r["mode"]) for r in rows if r["provider"] == "auto"})
    assert all(set(v["times_ms"]) == {"torch", "cpp"} and v["choice"] in ("torch", "cpp") for v in tuned.values())
    summary = (tmp_path / f"{device_slug('cpu')}.md").read_text()
    assert "backend='auto': tuned per layer" in summary
    # Each auto row names what ran: the tuner's choice for that layer.
    choices = {(layer.grad, layer.in_channels, layer.out_channels, layer.height): v["choice"]
               for (_, _, _, layer, _), v in tuned.items()}
    for row in (r for r in rows if r["provider"] == "auto"):
        assert row["ran"] == choices[(row["mode"] == "full", row["cin"], row["cout"], row["h"])], row
        assert f"| auto → {row['ran']} |" in summary
    assert all(r["ran"] is None for r in rows if r["provider"] == "eager")
    monkeypatch.setattr(gpu_dispatch, "_tune_setting", None)
    assert _run(tmp_path / "untuned", "--providers", "eager", "--layout", "channels_last") == 0
    assert "backend='auto': untuned" in (tmp_path / "untuned" / f"{device_slug('cpu')}.md").read_text()
