"""The machine a run measures: its description (run metadata) and its measured peaks.

The peaks are measured, not looked up: compute is the best of a large matmul
and a large 1x1 convolution (oneDNN on CPU, cuBLAS/cuDNN on GPU) in each
dtype and, on CPU in float32, of register-resident FMAs (``cpu_peak``), which
is what the hardware does with no memory in the way; bandwidth is a large
tensor copy (bytes read + bytes written).
"""

from __future__ import annotations

import datetime
import functools
import os
import platform
import re
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

from kernels.triton import CONFIGS_ENV

from .cpu_peak import fma_gflops
from .timing import TimingPolicy, measure

REPO_ROOT = Path(__file__).resolve().parent.parent

# Datasheet numbers shown next to the measured ones on GPU (dense, no sparsity).
DATASHEET_TFLOPS = {
    "H100": {"bf16": 989.0, "fp16": 989.0, "tf32": 495.0, "fp32": 67.0},
    "H200": {"bf16": 989.0, "fp16": 989.0, "tf32": 495.0, "fp32": 67.0},
}
DATASHEET_TBPS = {"H100": 3.35, "H200": 4.8}


def _cpuinfo_fields() -> Dict[str, str]:
    """The first processor's fields of /proc/cpuinfo, keys lower-case ({} off Linux)."""
    fields: Dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            break
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    return fields


def cpu_model(fields: Optional[Dict[str, str]] = None) -> str:
    """The CPU's model name as the system gives it (``fields``: /proc/cpuinfo's, read when not given)."""
    fields = _cpuinfo_fields() if fields is None else fields
    return fields.get("model name") or platform.processor() or platform.machine() or "unknown CPU"


def cpu_device_name(fields: Optional[Dict[str, str]] = None) -> str:
    """The CPU's model name; where it names no model number (virtual machines often show a bare "AMD EPYC"
    or "Intel(R) Xeon(R) Processor"), with the family and model numbers added, so that two generations
    (an AVX2-only Zen 3 and an AVX-512 Zen 5 both show "AMD EPYC") get results files of their own."""
    fields = _cpuinfo_fields() if fields is None else fields
    name = cpu_model(fields)
    if re.search(r"\d", _NAME_NOISE.sub(" ", name)) or "cpu family" not in fields or "model" not in fields:
        return name
    return f"{name} (family {fields['cpu family']} model {fields['model']})"


def transparent_hugepage_mode() -> Optional[str]:
    """The selected mode in /sys/kernel/mm/transparent_hugepage/enabled (None off Linux)."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    match = re.search(r"\[(\w+)\]", text)
    return match.group(1) if match else text.strip()


def gpu_model() -> Optional[str]:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return None


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def triton_version() -> Optional[str]:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


# Trademark marks and filler words in CPU names: they make file names long (cpu-intel-r-xeon-r-
# processor) without telling two machines apart. The clock speed after "@" goes too.
_NAME_NOISE = re.compile(r"\((?:r|tm|c)\)|\b(?:cpu|processor|\d+-core|with radeon graphics)\b|@.*$", re.IGNORECASE)


def slugify(text: str) -> str:
    """A file-name stem for a machine name: 'Intel(R) Xeon(R) Processor' -> 'intel-xeon'."""
    return re.sub(r"[^a-z0-9]+", "-", _NAME_NOISE.sub(" ", text).lower()).strip("-") or "unknown"


def device_name(device: str) -> str:
    return (gpu_model() or "cuda") if device == "cuda" else cpu_device_name()


def device_slug(device: str) -> str:
    """File-name stem for this machine's results, e.g. ``cpu-amd-epyc`` or ``cuda-nvidia-h100-80gb-hbm3``."""
    return f"{device}-{slugify(device_name(device))}"


@dataclass
class RunInfo:
    run_id: str
    utc_time: str
    device: str
    device_name: str
    cpu_model: str
    gpu_model: Optional[str]
    threads: int
    torch_version: str
    triton_version: Optional[str]
    git_commit: str
    python: str
    argv: str
    # 1-minute load average when the run started: other work on the machine makes CPU timings noisy.
    load_average: Optional[float] = None
    # Linux transparent huge pages mode ("always", "madvise", "never"): first-touch page faults
    # of large fresh tensors cost as much as the convolutions at 147x147 without them.
    transparent_hugepage: Optional[str] = None
    peak_gflops: Dict[str, float] = field(default_factory=dict)
    peak_gbps: Optional[float] = None
    peak_detail: Dict[str, object] = field(default_factory=dict)
    # CUDA runs: the GPU's compute capability ("sm_90"; the dispatch table's device class) and the
    # TF32 flags in force (fp32 convolutions and matmuls use TF32 tensor cores where they allow it).
    gpu_capability: Optional[str] = None
    cudnn_allow_tf32: Optional[bool] = None
    matmul_allow_tf32: Optional[bool] = None
    # CPU runs: the vector path the cpp backend's library runs ("avx512", "avx2", "neon", "scalar") and
    # the blocking it chose from the caches (kernels.cpp_build_info), and the ISA the eager baseline
    # runs: oneDNN's (its convolutions) and ATen's own kernels'. --isa avx2 holds all three to AVX2.
    cpp_isa: Optional[str] = None
    cpp_build: Dict[str, object] = field(default_factory=dict)
    onednn_isa: Optional[str] = None
    aten_cpu_capability: Optional[str] = None
    # Whether backend="auto" tuned per layer in this run (SEPCONV_TUNE=1 or --tune): the `auto` rows then
    # ran the candidate that measured faster on each layer (on CPU: cpp or the oneDNN pair).
    auto_tuning: Optional[bool] = None
    # CPU runs: whether the whole-model cases ran each in a worker process of its own (--isolate).
    isolated_models: Optional[bool] = None
    # CUDA runs: whether each case was timed by replaying a CUDA graph (--cuda-graphs: the GPU's time
    # without the host's launch overhead), and whether the Triton kernels autotuned their tile configs
    # (False under SEPCONV_TRITON_AUTOTUNE=0: each kernel's first config).
    cuda_graphs: Optional[bool] = None
    triton_autotune: Optional[bool] = None
    # CUDA runs: the tile configs pinned from SEPCONV_TRITON_CONFIGS (kernels/triton/pinned.py), one line
    # each; None without that file.
    triton_configs: Optional[List[str]] = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def pinned_configs() -> Optional[List[str]]:
    """The Triton tile configs pinned by ``SEPCONV_TRITON_CONFIGS``, one line each, or None where it is unset."""
    if not os.environ.get(CONFIGS_ENV):
        return None
    try:
        from kernels.triton import pinned
    except ImportError as error:  # no Triton: nothing is launched that a pin could apply to
        return [f"not applied: {error}"]
    return pinned.describe()


def pinned_note(pins: Optional[List[str]]) -> str:
    """What a report adds after how the tile configs were chosen: the pinned ones, or nothing."""
    return f", but pinned from {CONFIGS_ENV}: {'; '.join(pins)}" if pins else ""


def run_info(device: str, argv: str = "") -> RunInfo:
    now = datetime.datetime.now(datetime.timezone.utc)
    return RunInfo(
        run_id=now.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6],
        utc_time=now.isoformat(timespec="seconds"),
        device=device,
        device_name=device_name(device),
        cpu_model=cpu_model(),
        gpu_model=gpu_model(),
        threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        triton_version=triton_version(),
        git_commit=git_commit(),
        python=platform.python_version(),
        argv=argv,
        load_average=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        transparent_hugepage=transparent_hugepage_mode(),
        auto_tuning=auto_tuning(),
        **(cuda_settings() if device == "cuda" else cpu_settings()),
    )


def auto_tuning() -> bool:
    from kernels import gpu_dispatch

    return gpu_dispatch.tuning_enabled()


def cpu_settings() -> Dict[str, object]:
    """The ISAs a CPU run measures (``RunInfo`` fields): the cpp library's path and blocking (loading
    it, which may build it), oneDNN's and ATen's."""
    import kernels

    build = kernels.cpp_build_info() or {}
    return dict(cpp_isa=build.get("isa"), cpp_build=dict(build), onednn_isa=onednn_isa(),
                aten_cpu_capability=torch.backends.cpu.get_cpu_capability())


@functools.lru_cache(maxsize=1)
def onednn_isa() -> Optional[str]:
    """The ISA oneDNN runs in this environment (it honours ONEDNN_MAX_CPU_ISA), from its verbose
    header in a fresh interpreter (oneDNN prints it once per process; ATen sends a convolution this
    size to it); None when it says nothing."""
    probe = ("import torch\n"
             "x = torch.randn(2, 64, 32, 32).contiguous(memory_format=torch.channels_last)\n"
             "w = torch.randn(64, 64, 3, 3).contiguous(memory_format=torch.channels_last)\n"
             "with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):\n"
             "    torch.nn.functional.conv2d(x, w)\n")
    try:
        output = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"cpu,isa:(.+)", output)
    return match.group(1).strip() if match else None


def cuda_settings() -> Dict[str, object]:
    """The GPU's compute capability and the TF32 flags in force (``RunInfo`` fields of a CUDA run)."""
    major, minor = torch.cuda.get_device_capability(0)
    return dict(gpu_capability=f"sm_{major}{minor}", cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)


def measure_peaks(info: RunInfo, dtypes: Dict[str, torch.dtype], policy: TimingPolicy, small: bool = False) -> None:
    """Fill ``info.peak_gflops`` (per dtype), ``info.peak_gbps`` and ``info.peak_detail`` by measuring.

    ``small`` uses small problems (tests): the numbers are then only a rough floor.
    """
    device = info.device
    on_gpu = device == "cuda"
    if on_gpu:
        n_mm, conv_shape, copy_elems = ((1024, (4, 256, 16, 16), 1 << 22) if small
                                        else (8192, (64, 1024, 56, 56), 1 << 28))
    else:
        n_mm, conv_shape, copy_elems = (256, (2, 128, 16, 16), 1 << 20) if small else (2048, (8, 1024, 28, 28), 1 << 25)
    generator_device = torch.device(device)
    for dtype_name, dtype in dtypes.items():
        a = torch.randn(n_mm, n_mm, device=generator_device, dtype=dtype)
        b = torch.randn(n_mm, n_mm, device=generator_device, dtype=dtype)
        mm_ms = measure(lambda: torch.mm(a, b), device, policy).p50_ms
        mm_gflops = 2.0 * n_mm ** 3 / mm_ms / 1e6
        n, c, h, w = conv_shape
        x = torch.randn(n, c, h, w, device=generator_device, dtype=dtype).to(memory_format=torch.channels_last)
        weight = torch.randn(c, c, 1, 1, device=generator_device, dtype=dtype).to(memory_format=torch.channels_last)
        conv_ms = measure(lambda: torch.nn.functional.conv2d(x, weight), device, policy).p50_ms
        conv_gflops = 2.0 * n * h * w * c * c / conv_ms / 1e6
        info.peak_detail[f"matmul_{dtype_name}_gflops"] = round(mm_gflops, 1)
        info.peak_detail[f"conv1x1_{dtype_name}_gflops"] = round(conv_gflops, 1)
        info.peak_gflops[dtype_name] = round(max(mm_gflops, conv_gflops), 1)
        if not on_gpu and dtype == torch.float32:
            fma, reason = fma_gflops(torch.get_num_threads(), seconds=0.05 if small else 0.25)
            if fma is None:
                info.peak_detail["fma_probe_unavailable"] = reason
            else:
                info.peak_detail["fma_fp32_gflops"] = round(fma, 1)
                info.peak_gflops[dtype_name] = round(max(info.peak_gflops[dtype_name], fma), 1)
        del a, b, x, weight
    source = torch.empty(copy_elems, device=generator_device, dtype=torch.float32).fill_(1.0)
    target = torch.empty_like(source)
    copy_ms = measure(lambda: target.copy_(source), device, policy).p50_ms
    info.peak_gbps = round(2.0 * source.numel() * source.element_size() / copy_ms / 1e6, 1)
    info.peak_detail["copy_gbps"] = info.peak_gbps
    if on_gpu:
        # fp32 convs use TF32 tensor cores when cudnn.allow_tf32 (torch's default); fp32 matmuls only when asked.
        info.peak_detail["cudnn_allow_tf32"] = float(torch.backends.cudnn.allow_tf32)
        info.peak_detail["matmul_allow_tf32"] = float(torch.backends.cuda.matmul.allow_tf32)
    for key, table in (("H100", DATASHEET_TFLOPS), ("H200", DATASHEET_TFLOPS)):
        if on_gpu and key in info.device_name:
            info.peak_detail.update({f"datasheet_{k}_tflops": v for k, v in table[key].items()})
            info.peak_detail["datasheet_tbps"] = DATASHEET_TBPS[key]


def set_threads(threads: Optional[int]) -> None:
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
