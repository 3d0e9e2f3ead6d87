"""The model against the recorded H200 timings: Spearman per tile sweep, predicted/measured per layer and per kernel.

The recorded runs timed the kernels as they were at a given commit, so each
record is checked against that commit's ``kernels/`` (extracted with
``git archive`` into a temporary folder and imported in a child process). The
kernels are compiled with the Triton installed here; the recorded runs used
Triton 3.6, the version on the GPU machine.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence
from unittest import mock

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"


@dataclass(frozen=True)
class Record:
    """A recorded H200 run: its file, the commit whose kernels it timed, and what it holds."""

    path: str
    commit: str
    kind: str          # "sweep" (tile-config sweep), "layers" (the benchmark suite's layer rows) or "kernels"
    runs: tuple = ()   # layers: the runs compared (a later run of other kernels, or other configs, is left out)


# The commits are those whose kernels ran on the GPU (benchmarks/results/README.md says how each run was made).
# A kernel profile (``benchmarks.kernel_profile``) names the commit of each of its runs in the run's header.
RECORDS = (
    Record("triton_sweep-cuda-nvidia-h200.jsonl", "b7c27d0", "sweep"),
    Record("cuda-nvidia-h200.jsonl", "d623454", "layers", runs=("20261130T183631Z-cfbfbf",)),
    Record("kernel-profile-cuda-nvidia-h200.txt", "", "kernels"),
)

# Targets of the validation: rank agreement on each forward sweep, and per-layer ratio bounds.
SPEARMAN_TARGET = 0.8
RATIO_BOUNDS = (0.67, 1.5)


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""

    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2.0
            i = j + 1
        return out

    rx, ry = ranks(list(xs)), ranks(list(ys))
    n = len(rx)
    mx, my = sum(rx) / n, sum(ry) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / var if var else 0.0


def extract_kernels(commit: str, into: Path) -> Path:
    """``kernels/`` as it was at ``commit``, under ``into``; the folder to put first on ``sys.path``."""
    archive = into / "kernels.tar"
    done = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", "-o", str(archive), commit, "kernels"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"cannot extract kernels/ at {commit} (needs the git history of the repository): "
                           f"{done.stderr.strip()[:200]}")
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data") if sys.version_info >= (3, 12) else tar.extractall(into)
    return into


def _read(path: Path) -> List[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


TRITON_PROVIDERS = {"triton": "fused", "triton-split": "split"}


def parse_kernel_profile(text: str) -> List[dict]:
    """The Triton sections of a ``kernel-profile-<machine>.txt`` (``benchmarks.kernel_profile``): one dict per
    layer, mode and provider, with the commit, dtype, batch, TF32 flag and tile-config setting of the run header
    above it, and ``kernels``: device microseconds a call by kernel name. Sections of runs whose header does not
    say which tile configs ran are left out (the model could not know which config to compile)."""
    rows: List[dict] = []
    header: dict = {}
    row = None
    for line in text.splitlines():
        if line.startswith("#"):
            commit = re.search(r", commit ([0-9a-f]{7,40}),", line)
            if commit:
                header = dict(commit=commit.group(1))
            sizes = re.match(r"# (\w+), batch (\d+), (\w+);", line)
            if sizes:
                header.update(dtype=sizes.group(1), batch=int(sizes.group(2)), layout=sizes.group(3),
                              tf32="allow_tf32 False" not in line)
            if line.startswith("# tile configs:"):
                header["autotuned"] = line.split(":", 1)[1].strip() == "autotuned"
            continue
        section = re.match(r"== (\S+) (fwd|full) (\S+): ", line)
        if section:
            row = dict(header, shape=section.group(1), mode=section.group(2), provider=section.group(3), kernels={})
            wanted = row["provider"] in TRITON_PROVIDERS and {"commit", "dtype", "autotuned"} <= row.keys()
            if wanted:
                rows.append(row)
            else:
                row = None
            continue
        kernel = re.match(r"\s*([0-9.]+)\s+\(([0-9.]+)\)\s+(\S.*)$", line)
        if row is not None and kernel:
            name = kernel.group(3).strip()
            row["kernels"][name] = row["kernels"].get(name, 0.0) + float(kernel.group(1))
    return rows


# ---- run inside the child process, with the recorded commit's kernels first on sys.path ----

def adapt_recorded_tree() -> None:
    """Let this checkout's ``benchmarks`` import a recorded commit's ``kernels``, which may predate names that
    ``benchmarks.providers`` imports from ``kernels.triton``: the mode variable's name (older trees had no split
    mode and ignore it) and ``environ`` (the same context manager: ``mock.patch.dict`` on ``os.environ``). Call
    it before importing ``benchmarks.providers`` (``layers`` does)."""
    import kernels.triton as backend

    if not hasattr(backend, "MODE_ENV"):
        backend.MODE_ENV = "SEPCONV_TRITON_MODE"
    if not hasattr(backend, "environ"):
        backend.environ = lambda name, value: mock.patch.dict(os.environ, {name: value})


def _sweep_predictions(rows: List[dict]) -> List[dict]:
    from ..cases import XCEPTION_LAYERS
    from . import launches, layers

    shapes = {s.name: s for s in XCEPTION_LAYERS}
    cache: Dict[tuple, layers.KernelReport] = {}
    out = []
    for row in rows:
        shape = shapes[row["shape"]]
        direction = "fwd" if row["kernel"] == "forward" else "bwd"
        rec = layers.record(shape, row["batch"], row["dtype"], "fused", direction)
        total, error = 0.0, ""
        for launch in rec.kernels:
            name = launch.name.removesuffix("_kernel")
            config = launches.parse_config(row["config"]) if name == row["kernel"] else launch.configs[0]
            key = (launch.name, launches.config_name(config), row["shape"], row["dtype"])
            if key not in cache:
                cache[key] = layers.analyse(launch, config)
            report = cache[key]
            if report.prediction is None:
                error = report.error or "no prediction"
                break
            total += report.prediction.seconds
        out.append(dict(row, predicted_ms=None if error else total * 1e3, model_error=error))
    return out


def _layer_predictions(rows: List[dict], with_backward: bool) -> List[dict]:
    from ..cases import XCEPTION_LAYERS
    from . import layers

    shapes = {s.name: s for s in XCEPTION_LAYERS}
    out = []
    for row in rows:
        if row["mode"] == "full" and not with_backward:
            continue
        shape = shapes[row["shape"]]
        tf32 = bool(row["run"].get("peak_detail", {}).get("matmul_allow_tf32"))
        parts = ("fwd",) if row["mode"] == "fwd" else ("fwd", "bwd")
        total, error = 0.0, ""
        for part in parts:
            report = layers.op_report(shape, row["batch"], row["dtype"], "fused", part, tf32=tf32)
            if report.seconds is None:
                error = "; ".join(r.error for configs in report.kernels for r in configs if r.error)[:200]
                break
            total += report.seconds
        out.append(dict(row, predicted_ms=None if error else total * 1e3, model_error=error))
    return out


def _kernel_predictions(rows: List[dict]) -> List[dict]:
    """Per profiled section, each Triton kernel's predicted microseconds a call (summed over its launches in the
    forward and, for ``full``, the backward), in the config the run used: the first of each kernel when
    autotuning was off, else the best the model finds among the autotuner's configs; and the library calls'."""
    from ..cases import XCEPTION_LAYERS
    from . import layers, model

    shapes = {s.name: s for s in XCEPTION_LAYERS}
    out = []
    for row in rows:
        shape = shapes.get(row["shape"])
        if shape is None:
            out.append(dict(row, predicted_us={}, predicted_library_us=None,
                            model_error=f"{row['shape']} is not an Xception layer"))
            continue
        predicted: Dict[str, float] = {}
        library, errors, measured_gemms = 0.0, [], False
        for direction in ("fwd",) if row["mode"] == "fwd" else ("fwd", "bwd"):
            recording = layers.record(shape, row["batch"], row["dtype"], TRITON_PROVIDERS[row["provider"]],
                                      direction)
            for launch in recording.kernels:
                configs = launch.configs if row["autotuned"] else launch.configs[:1]
                reports = [layers.analyse(launch, config) for config in configs]
                seconds = [r.prediction.seconds for r in reports if r.prediction is not None]
                if not seconds:
                    errors.append(f"{launch.name}: {reports[0].error[:120]}")
                    continue
                predicted[launch.name] = predicted.get(launch.name, 0.0) + min(seconds) * 1e6
            library += sum(model.library_seconds(call.op, call.flops, call.bytes, row["dtype"], row["tf32"],
                                                 call.shapes)
                           for call in recording.library) * 1e6
            measured_gemms |= any(call.flops and model.measured_gemm(row["dtype"], call.shapes)
                                  for call in recording.library)
        out.append(dict(row, predicted_us=predicted, predicted_library_us=library, model_error="; ".join(errors),
                        library_gemms_measured=measured_gemms))
    return out


def child(kind: str, rows_path: str, with_backward: bool) -> None:
    adapt_recorded_tree()
    rows = _read(Path(rows_path))
    if kind == "sweep":
        result = _sweep_predictions(rows)
    elif kind == "kernels":
        result = _kernel_predictions(rows)
    else:
        result = _layer_predictions(rows, with_backward)
    print("\n".join(json.dumps(r) for r in result))


# ---- the parent: one child per record, then the statistics ----

def predict_record(record: Record, rows: List[dict], with_backward: bool) -> List[dict]:
    with tempfile.TemporaryDirectory(prefix="gpu-model-") as tmp:
        tree = extract_kernels(record.commit, Path(tmp))
        rows_path = Path(tmp) / "rows.jsonl"
        rows_path.write_text("\n".join(json.dumps(r) for r in rows))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), str(ROOT)]))
        env.pop("TRITON_INTERPRET", None)
        code = ("import sys; from benchmarks.gpu_model import validate; "
                "validate.child(sys.argv[1], sys.argv[2], sys.argv[3] == '1')")
        done = subprocess.run([sys.executable, "-c", code, record.kind, str(rows_path), "1" if with_backward else "0"],
                              capture_output=True, text=True, env=env, cwd=tmp)
        if done.returncode != 0:
            raise RuntimeError(f"modelling {record.path} at {record.commit} failed:\n{done.stderr[-2000:]}")
        return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def validate(with_backward: bool = False, results: Path = RESULTS) -> int:
    """Print the figures; return 0 when the targets are met, 1 otherwise."""
    failures: List[str] = []
    for record in RECORDS:
        path = results / record.path
        if not path.exists():
            failures.append(f"{path} is missing")
            continue
        if record.kind == "kernels":
            _validate_kernels(record, path)
            continue
        recorded = [r for r in _read(path) if not record.runs or r["run"]["run_id"] in record.runs]
        if record.kind == "sweep":
            rows = [r for r in recorded if r.get("ms") is not None]
        else:
            rows = [r for r in recorded if r.get("suite") == "layers" and r.get("provider") == "triton"
                    and r.get("status") == "ok"]
        print(f"\n{record.path} (kernels at {record.commit}; {len(rows)} timed rows; all times in ms; "
              f"'predicted' columns come from the model, not a GPU)")
        predicted = predict_record(record, rows, with_backward)
        if record.kind == "sweep":
            failures += _print_sweeps(predicted)
        else:
            failures += _print_layers(predicted)
            _print_network(predicted, recorded)
    print()
    if failures:
        print("targets missed:")
        for failure in failures:
            print(f"  - {failure}")
        return 1
    print(f"targets met: Spearman >= {SPEARMAN_TARGET} on every forward sweep; every per-layer forward prediction "
          f"within {RATIO_BOUNDS[0]}-{RATIO_BOUNDS[1]}x of the measurement")
    return 0


def _validate_kernels(record: Record, path: Path) -> None:
    """Each profiled Triton kernel against its prediction, one child process per recorded commit. Shown for
    information (no target): the layer rows above time whole ops, this says which kernel the model misjudges."""
    rows = parse_kernel_profile(path.read_text())
    commits = list(dict.fromkeys(r["commit"] for r in rows))
    for commit in commits:
        group = [r for r in rows if r["commit"] == commit]
        print(f"\n{record.path} (kernels at {commit[:7]}; {len(group)} profiled sections; device time a call in us; "
              f"'predicted' columns come from the model, not a GPU)")
        _print_kernels(predict_record(Record(record.path, commit, "kernels"), group, with_backward=False))


def _print_kernels(rows: List[dict]) -> None:
    print(f"{'layer':<15} {'mode':<4} {'provider':<12} {'kernel':<30} {'measured':>9} {'predicted':>9} "
          f"{'pred/meas':>9}")
    ratios = []
    for row in rows:
        head = f"{row['shape']:<15} {row['mode']:<4} {row['provider']:<12}"
        if row["model_error"]:
            print(f"{head} not modelled: {row['model_error'][:100]}")
        others = 0.0
        for name, measured in sorted(row["kernels"].items(), key=lambda kv: -kv[1]):
            if name not in row["predicted_us"]:
                others += measured
                continue
            predicted = row["predicted_us"][name]
            ratios.append(predicted / measured)
            print(f"{head} {name[:30]:<30} {measured:>9.1f} {predicted:>9.1f} {predicted / measured:>9.2f}")
        missing = [name for name in row["predicted_us"] if name not in row["kernels"]]
        if missing:
            print(f"{head} predicted but not in the profile: {', '.join(missing)}")
        if row["predicted_library_us"] and others:
            library = row["predicted_library_us"]
            # Where the model prices the GEMMs at the rates measured in this same profile, the row is no test.
            note = "  (GEMMs priced at this profile's rates)" if row.get("library_gemms_measured") else ""
            print(f"{head} {'other kernels (cuBLAS, ATen)':<30} {others:>9.1f} {library:>9.1f} "
                  f"{library / others:>9.2f}{note}")
    if ratios:
        ratios.sort()
        print(f"Triton kernels: {len(ratios)}, predicted/measured {ratios[0]:.2f}-{ratios[-1]:.2f} "
              f"(median {ratios[len(ratios) // 2]:.2f}; shown for information)")


def _print_sweeps(rows: List[dict]) -> List[str]:
    failures = []
    groups: Dict[tuple, List[dict]] = {}
    for row in rows:
        groups.setdefault((row["kernel"], row["dtype"], row["shape"]), []).append(row)
    print(f"{'sweep':<34} {'rows':>4} {'Spearman':>8} {'pred/meas':>12} {'median':>6}  model's pick vs measured best")
    for (kernel, dtype, shape), group in sorted(groups.items()):
        ok = [r for r in group if r["predicted_ms"] is not None]
        if len(ok) < 3:
            print(f"{kernel} {dtype} {shape}: {len(ok)} of {len(group)} rows modelled "
                  f"({group[0].get('model_error', '')[:120]})")
            if kernel == "forward":
                failures.append(f"forward {dtype} sweep: too few rows modelled")
            continue
        rho = spearman([r["predicted_ms"] for r in ok], [r["ms"] for r in ok])
        ratios = sorted(r["predicted_ms"] / r["ms"] for r in ok)
        pick = min(ok, key=lambda r: r["predicted_ms"])
        best = min(ok, key=lambda r: r["ms"])
        verdict = "same config" if pick is best else f"{pick['ms']:.3f} vs {best['ms']:.3f}"
        print(f"{kernel + ' ' + dtype + ' ' + shape:<34} {len(ok):>4} {rho:>8.3f} "
              f"{ratios[0]:>5.2f}-{ratios[-1]:<5.2f} {ratios[len(ratios) // 2]:>6.2f}  {verdict}")
        if kernel == "forward" and rho < SPEARMAN_TARGET:
            failures.append(f"forward {dtype} sweep: Spearman {rho:.3f} < {SPEARMAN_TARGET}")
    return failures


def _print_layers(rows: List[dict]) -> List[str]:
    failures = []
    print(f"{'layer':<16} {'dtype':<5} {'mode':<5} {'measured':>9} {'predicted':>9} {'pred/meas':>9}")
    for row in rows:
        if row["predicted_ms"] is None:
            print(f"{row['shape']:<16} {row['dtype']:<5} {row['mode']:<5} {row['p50_ms']:>9.3f} {'-':>9}  "
                  f"{row['model_error'][:100]}")
            failures.append(f"{row['shape']} {row['dtype']} {row['mode']}: not modelled")
            continue
        ratio = row["predicted_ms"] / row["p50_ms"]
        inside = RATIO_BOUNDS[0] <= ratio <= RATIO_BOUNDS[1]
        flag = "" if inside else "  outside the bounds" + ("" if row["mode"] == "fwd" else " (not a target)")
        print(f"{row['shape']:<16} {row['dtype']:<5} {row['mode']:<5} {row['p50_ms']:>9.3f} "
              f"{row['predicted_ms']:>9.3f} {ratio:>9.2f}{flag}")
        if not inside and row["mode"] == "fwd":
            failures.append(f"{row['shape']} {row['dtype']} {row['mode']}: predicted/measured {ratio:.2f}")
    full = [r["predicted_ms"] / r["p50_ms"] for r in rows if r["mode"] == "full" and r["predicted_ms"]]
    if full:
        print(f"forward+backward rows (shown for information; the targets are on the forward): "
              f"{len(full)} rows, predicted/measured {min(full):.2f}-{max(full):.2f}")
    return failures


def _print_network(predicted: List[dict], recorded: List[dict]) -> None:
    """The whole-network estimate (``whole_model``) from the predicted layers against the timed network.

    The estimate keeps the eager BatchNorms, so it is compared with the run's ``triton-unfused`` network.
    Shown for information: the network mode needs every layer's row (``--with-backward`` for training).
    """
    from . import whole_model

    layer_rows = [dict(r, provider="triton-predicted", p50_ms=r["predicted_ms"]) for r in predicted
                  if r["predicted_ms"] is not None]
    measured = {(r["dtype"], r["mode"], r["batch"]): r["p50_ms"] for r in recorded
                if r.get("suite") == "model" and r.get("provider") == "triton-unfused" and r.get("status") == "ok"}
    estimates = [e for e in whole_model.predict(recorded, layer_rows, whole_model.layer_counts())
                 if e["provider"] == "triton-predicted" and (e["dtype"], e["mode"], e["batch"]) in measured]
    if not estimates:
        return
    print("whole network, triton-unfused (recorded eager network with each separable conv's predicted time "
          "substituted; for information):")
    print(f"{'network':<22} {'measured':>9} {'predicted':>9} {'pred/meas':>9}")
    for e in estimates:
        ms = measured[(e["dtype"], e["mode"], e["batch"])]
        print(f"{e['dtype'] + ' ' + e['mode'] + ' N=' + str(e['batch']):<22} {ms:>9.3f} {e['p50_ms']:>9.3f} "
              f"{e['p50_ms'] / ms:>9.2f}")

