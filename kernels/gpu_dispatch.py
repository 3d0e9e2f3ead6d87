"""How ``backend="auto"`` chooses an implementation for a separable convolution on CUDA.

Three implementations can run a call on a CUDA tensor: ``"torch"`` (the cuDNN
depthwise + 1x1 pair), ``"triton"`` (the fused Triton kernels) and
``"triton_split"`` (a Triton depthwise kernel, then the pointwise convolution
as a GEMM). ``auto`` picks one per layer:

1. With tuning on (``SEPCONV_TUNE=1`` or ``kernels.tune(True)``), the first
   call of each new layer times every candidate on this GPU and keeps the
   fastest for the rest of the process (as ``torch.backends.cudnn.benchmark``).
2. Otherwise the recorded table (``gpu_dispatch_table.json``, regenerated from
   benchmark results by ``python -m benchmarks.dispatch_table``) gives the
   choice measured for this device class, dtype and layer shape.
3. A layer, dtype or device class the table has no measurement for runs cuDNN.

A call that needs gradients is chosen by the forward + backward time, any other
call by the forward time. The layer key and the device lookups are small
functions here, so tests can stand in for a GPU.

The tuner serves CPU calls too: with tuning on, ``auto`` on a CPU whose build of
the cpp backend has a vector path (where ``auto`` takes cpp) times cpp against
torch (the oneDNN pair) for each new layer and keeps the faster. Tuning off, a
CPU call runs cpp there, with no per-layer choice (``kernels.dispatch``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import statistics
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import torch

from ._args import Geometry, memory_format_of

logger = logging.getLogger(__name__)

TABLE_PATH = Path(__file__).with_name("gpu_dispatch_table.json")
TABLE_FORMAT = 1
TUNE_ENV = "SEPCONV_TUNE"
# What auto can choose between on CUDA, cuDNN first: it wins ties and every unmeasured case.
CANDIDATES = ("torch", "triton", "triton_split")
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# The tuner's default clock: untimed calls first (compiles, Triton's autotuning, cuDNN's search),
# then the median of timed calls.
TUNE_WARMUP_CALLS = 3
TUNE_TIMED_CALLS = 10
# On CPU a call of a large layer takes up to ~0.2 s: the candidates are timed in rounds (one call of
# each in turn) after an untimed round, at least TUNE_MIN_CPU_CALLS rounds, more (up to
# TUNE_TIMED_CALLS) while under TUNE_CPU_SECONDS in all (cpu_round_times).
TUNE_MIN_CPU_CALLS = 3
TUNE_CPU_SECONDS = 1.0

# (candidate name, a call of it) -> milliseconds per call.
Timer = Callable[[str, Callable[[], object]], float]


class Layer(NamedTuple):
    """Everything about a call that its speed depends on (``layer_of`` builds its fields as a plain tuple)."""

    batch: int
    in_channels: int
    out_channels: int
    multiplier: int
    height: int
    width: int
    kernel: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int, int, int]  # top, bottom, left, right
    dilation: Tuple[int, int]
    depthwise_bias: bool
    pointwise_bias: bool
    relu_input: bool
    channels_last: bool
    grad: bool  # the call records a graph: chosen by forward + backward time


def shape_dispatch_applies(device: torch.device) -> bool:
    """Whether ``auto`` chooses per layer on this device from the table or the tuner (CUDA; on CPU
    only the tuner chooses per layer: ``cpu_tuning_applies``)."""
    return device.type == "cuda"


def cpu_tuning_applies(device: torch.device) -> bool:
    """Whether ``auto`` times cpp against torch per layer on this device (a CPU, with tuning on)."""
    return device.type == "cpu" and tuning_enabled()


def layer_of(input: torch.Tensor, pointwise_weight: torch.Tensor, depthwise_bias: Optional[torch.Tensor],
             pointwise_bias: Optional[torch.Tensor], geometry: Geometry, relu_input: bool, grad: bool) -> tuple:
    """The fields of the ``Layer`` of a checked call, as a plain tuple (built on every CUDA call, so
    kept cheap; ``torch.compile`` passes a plain tuple on as a constant, a NamedTuple it rebuilds
    wrongly). ``input``: ``(N, C, H, W)``; ``geometry`` from ``kernels._args.normalize``."""
    batch, channels, height, width = input.shape
    stride, padding, dilation = geometry.stride, geometry.padding, geometry.dilation
    return (int(batch), int(channels), int(pointwise_weight.shape[0]), int(geometry.depth_multiplier),
            int(height), int(width), tuple(geometry.kernel_size), (int(stride[0]), int(stride[1])),
            (int(padding[0]), int(padding[1]), int(padding[2]), int(padding[3])),
            (int(dilation[0]), int(dilation[1])), depthwise_bias is not None, pointwise_bias is not None,
            bool(relu_input), memory_format_of(input) is torch.channels_last, bool(grad))


# --- the device class: what a table row was measured on ---------------------------------------

def device_capability(device: torch.device) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


_VENDOR_WORDS = re.compile(r"\b(NVIDIA|GeForce|Tesla|Quadro)\b\s*")
_MODEL = re.compile(r"\b((?:RTX|GTX)\s?[A-Z]?\d{3,4}|[A-Z]{1,3}\d{2,4}[A-Z]?)\b")


def name_family(name: str) -> str:
    """The model in a GPU name: ``"NVIDIA H100 80GB HBM3"`` -> ``"H100"``, ``"NVIDIA GeForce RTX 4090"`` ->
    ``"RTX 4090"``; the whole name, stripped, when no model number is found."""
    stripped = _VENDOR_WORDS.sub("", name).strip()
    match = _MODEL.search(stripped)
    return match.group(1) if match else stripped


def device_class_of(capability: Tuple[int, int], name: str) -> str:
    """``"sm_90 H200"``: the compute capability and the model (same-architecture GPUs differ in bandwidth)."""
    return f"sm_{capability[0]}{capability[1]} {name_family(name)}"


def device_class(device: torch.device) -> str:
    return device_class_of(device_capability(device), device_name(device))


# --- the recorded table ----------------------------------------------------------------------

def batch_bucket(batch: int) -> int:
    """The power of two nearest ``batch`` on a log scale (a row measured at 32 serves batches 23-45)."""
    return 2 ** round(math.log2(batch)) if batch > 0 else 0


def table_key(device_class: str, dtype: str, mode: str, layout: str, in_channels: int, out_channels: int,
              multiplier: int, height: int, width: int, kernel: int, stride: int, padding: int, dilation: int,
              batch_bucket: int, cudnn_allow_tf32: Optional[bool]) -> tuple:
    """The key a table row is stored and looked up under (``cudnn_allow_tf32`` only for fp32, else None)."""
    return (device_class, dtype, mode, layout, in_channels, out_channels, multiplier, height, width, kernel,
            stride, padding, dilation, batch_bucket, cudnn_allow_tf32 if dtype == "fp32" else None)


def entry_key(entry: dict) -> tuple:
    return table_key(*(entry[name] for name in ("device_class", "dtype", "mode", "layout", "in_channels",
                                                "out_channels", "multiplier", "height", "width", "kernel",
                                                "stride", "padding", "dilation", "batch_bucket",
                                                "cudnn_allow_tf32")))


def layer_table_key(device_class: str, dtype: torch.dtype, layer: Layer, cudnn_allow_tf32: bool) -> Optional[tuple]:
    """The table key of a call, or None when the table cannot hold it (the benchmark measures square
    kernels with one stride, padding ``k // 2`` on every side and dilation 1)."""
    kernel, stride = layer.kernel[0], layer.stride[0]
    if (dtype not in DTYPE_NAMES or layer.kernel != (kernel, kernel) or layer.stride != (stride, stride)
            or layer.padding != (kernel // 2,) * 4 or layer.dilation != (1, 1)):
        return None
    return table_key(device_class, DTYPE_NAMES[dtype], "full" if layer.grad else "fwd",
                     "channels_last" if layer.channels_last else "nchw", layer.in_channels, layer.out_channels,
                     layer.multiplier, layer.height, layer.width, kernel, stride, kernel // 2, 1,
                     batch_bucket(layer.batch), cudnn_allow_tf32)


class TableError(ValueError):
    """The dispatch table file is not one ``python -m benchmarks.dispatch_table`` writes."""


def read_table(path: Path) -> Dict[tuple, dict]:
    """The table's entries by key; TableError naming the file when it is malformed."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise TableError(f"dispatch table {path}: {error}") from error
    if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT or not isinstance(data.get("entries"), list):
        raise TableError(f"dispatch table {path}: expected an object with format {TABLE_FORMAT} and a list of "
                         f"entries, got format {data.get('format') if isinstance(data, dict) else None!r}")
    entries = {}
    for index, entry in enumerate(data["entries"]):
        try:
            key = entry_key(entry)
        except (KeyError, TypeError) as error:
            raise TableError(f"dispatch table {path}: entry {index} lacks {error}") from error
        if entry.get("choice") not in CANDIDATES:
            raise TableError(f"dispatch table {path}: entry {index} has choice {entry.get('choice')!r}; "
                             f"expected one of {list(CANDIDATES)}")
        entries[key] = entry
    return entries


_table: Dict[Path, Dict[tuple, dict]] = {}
_table_lock = threading.Lock()


def table(path: Optional[Path] = None) -> Dict[tuple, dict]:
    """The committed table (``TABLE_PATH``), read once; an unreadable file warns once and counts as empty
    (cuDNN everywhere)."""
    path = Path(path or TABLE_PATH)
    with _table_lock:
        if path not in _table:
            try:
                _table[path] = read_table(path)
            except TableError as error:
                warnings.warn(f"{error}; backend='auto' runs cuDNN on every CUDA layer", RuntimeWarning,
                              stacklevel=2)
                _table[path] = {}
        return _table[path]


def table_entry(device: torch.device, dtype: torch.dtype, layer: Layer) -> Optional[dict]:
    """The recorded measurement for this call on this device, or None."""
    entries = table()
    if not entries:
        return None
    key = layer_table_key(device_class(device), dtype, layer, torch.backends.cudnn.allow_tf32)
    return None if key is None else entries.get(key)


# --- the tuner -------------------------------------------------------------------------------

_tune_setting: Optional[bool] = None
_timer: Optional[Timer] = None
_tuned: Dict[tuple, str] = {}
_tuned_times: Dict[tuple, Dict[str, object]] = {}


def tune(enabled: bool = True, *, timer: Optional[Timer] = None) -> None:
    """Time the candidates of every new layer once and keep the fastest (``backend="auto"`` only).

    Like ``torch.backends.cudnn.benchmark``: the first call of each new layer (shape, dtype,
    layout, with or without gradients) runs the candidates on random tensors of that layer, and
    that and later calls use the fastest for the rest of the process. On CUDA the candidates are
    torch (cuDNN), triton and triton split mode; on a CPU where ``auto`` takes the cpp backend,
    cpp and torch (oneDNN), timed at the current ``torch.get_num_threads()``. Overrides
    ``SEPCONV_TUNE``. ``timer(name, call)`` returns milliseconds per call, for tests or another
    clock (default: CUDA events after warm-up calls; on CPU the host clock, all candidates timed
    in alternating rounds: ``cpu_round_times``).
    """
    global _tune_setting, _timer
    if not isinstance(enabled, bool):
        raise TypeError(f"tune(enabled=...) must be a bool, got {enabled!r}")
    _tune_setting = enabled
    _timer = timer


def tuning_enabled() -> bool:
    """``kernels.tune``'s setting, else ``SEPCONV_TUNE`` (unset or "0": off, "1": on)."""
    if _tune_setting is not None:
        return _tune_setting
    value = os.environ.get(TUNE_ENV, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{TUNE_ENV}={value!r} is not valid; set it to 1 (time the candidates of each new "
                         "layer once) or 0 (the default: the recorded table on CUDA, cpp on CPU)")
    return value == "1"


def tuned_choices() -> Dict[tuple, Dict[str, object]]:
    """What the tuner measured so far: per (device type, device index, dtype, layer), on CPU with the
    thread count last, the milliseconds of each candidate (or why it could not run) and the choice."""
    return {key: dict(value) for key, value in _tuned_times.items()}


def cuda_event_timer(name: str, call: Callable[[], object]) -> float:
    """Milliseconds per call: the median of ``TUNE_TIMED_CALLS`` calls, each between two CUDA events."""
    for _ in range(TUNE_WARMUP_CALLS):
        call()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(TUNE_TIMED_CALLS)]
    for start, end in events:
        start.record()
        call()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def cpu_round_times(calls: Dict[str, Callable[[], object]],
                    on_error: Callable[[str, Exception], None]) -> Dict[str, float]:
    """Milliseconds per call of each candidate on the host clock, timed in rounds: one call of each
    in turn (the order reversed every other round), so a slow spell of a shared machine falls on all
    of them. One untimed round, then at least ``TUNE_MIN_CPU_CALLS`` rounds, more (up to
    ``TUNE_TIMED_CALLS``) while under ``TUNE_CPU_SECONDS`` in all; the median of each. A candidate
    that raises is dropped and handed to ``on_error``."""
    live = dict(calls)
    samples: Dict[str, list] = {name: [] for name in calls}

    def run(name: str, timed: bool) -> None:
        try:
            start = time.perf_counter()
            live[name]()
            if timed:
                samples[name].append((time.perf_counter() - start) * 1e3)
        except Exception as error:  # noqa: BLE001 - handed on: a candidate that fails is not chosen
            del live[name]
            on_error(name, error)

    for name in list(live):
        run(name, False)
    started, rounds = time.perf_counter(), 0
    while live and rounds < TUNE_TIMED_CALLS and (rounds < TUNE_MIN_CPU_CALLS
                                                 or time.perf_counter() - started < TUNE_CPU_SECONDS):
        for name in list(live)[::-1 if rounds % 2 else 1]:
            run(name, True)
        rounds += 1
    return {name: statistics.median(samples[name]) for name in live}


def candidate_call(implementation: str, device: torch.device, dtype: torch.dtype, layer: Layer) -> Callable[[], object]:
    """One call of ``implementation`` on random tensors shaped as ``layer`` (forward, or forward +
    backward when ``layer.grad``). Its own generator: the caller's random state is left alone."""
    from .autograd import SeparableConv2dFunction, forward_op

    generator = torch.Generator(device=device).manual_seed(0)

    def random(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)

    hidden = layer.in_channels * layer.multiplier
    input = random(layer.batch, layer.in_channels, layer.height, layer.width)
    if layer.channels_last:
        input = input.contiguous(memory_format=torch.channels_last)
    tensors = [input, random(hidden, 1, *layer.kernel), random(layer.out_channels, hidden, 1, 1),
               random(hidden) if layer.depthwise_bias else None,
               random(layer.out_channels) if layer.pointwise_bias else None]
    geometry = (list(layer.stride), list(layer.padding), list(layer.dilation), layer.relu_input)
    if not layer.grad:
        op = forward_op(implementation)

        def forward() -> torch.Tensor:
            with torch.no_grad(), torch.autocast(device.type, enabled=False):
                return op(*tensors, *geometry)
        return forward

    leaves = [t.requires_grad_() for t in tensors if t is not None]
    with torch.no_grad():
        grad_output = torch.ones_like(forward_op(implementation)(*tensors, *geometry))

    def forward_backward():
        with torch.enable_grad(), torch.autocast(device.type, enabled=False):
            output = SeparableConv2dFunction.apply(*tensors, *geometry, implementation)
            return torch.autograd.grad(output, leaves, grad_output)
    return forward_backward


def tuned(device: torch.device, dtype: torch.dtype, layer: Layer, candidates: Sequence[str]) -> str:
    """The fastest of ``candidates`` for this layer, timed on the first call and cached for the process."""
    # CPU speeds depend on the thread count; TF32 changes CUDA float32 math.
    key = (device.type, device.index, dtype, layer, torch.backends.cudnn.allow_tf32,
           torch.backends.cuda.matmul.allow_tf32, tuple(candidates),
           torch.get_num_threads() if device.type == "cpu" else None)
    choice = _tuned.get(key)
    if choice is not None:
        return choice
    times: Dict[str, object] = {}

    def failed(name: str, error: Exception) -> None:
        if name == "torch":
            raise error
        times[name] = f"{type(error).__name__}: {error}"[:300]
        warnings.warn(f"separable_conv2d tuner: {name} could not run {describe(layer, dtype)}: {times[name]}",
                      RuntimeWarning, stacklevel=3)

    # The CUDA events and synchronisations of the timer act on the current device: make it the layer's.
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        if _timer is None and device.type != "cuda":  # the host clock, the candidates in alternating rounds
            calls = {}
            for name in candidates:
                try:
                    calls[name] = candidate_call(name, device, dtype, layer)
                except Exception as error:  # noqa: BLE001 - a candidate that fails here is not chosen
                    failed(name, error)
            times.update(cpu_round_times(calls, failed))
        else:
            for name in candidates:
                try:
                    times[name] = float((_timer or cuda_event_timer)(name, candidate_call(name, device, dtype, layer)))
                except Exception as error:  # noqa: BLE001 - a candidate that fails here is not chosen
                    failed(name, error)
    times = {name: times[name] for name in candidates if name in times}
    measured = {name: ms for name, ms in times.items() if isinstance(ms, float)}
    choice = min(measured, key=lambda name: (measured[name], candidates.index(name)))
    _tuned[key] = choice
    _tuned_times[key[:4] if device.type != "cpu" else (*key[:4], key[-1])] = {"times_ms": times, "choice": choice}
    logger.info("separable_conv2d auto: %s for %s on %s (tuned: %s)", choice, describe(layer, dtype), device,
                ", ".join(f"{name} {ms:.3f} ms" if isinstance(ms, float) else f"{name} failed"
                          for name, ms in times.items()))
    return choice


def describe(layer: Layer, dtype: torch.dtype) -> str:
    mode = "forward+backward" if layer.grad else "forward"
    return (f"{layer.in_channels}->{layer.out_channels}@{layer.height}x{layer.width} k{layer.kernel[0]}x"
            f"{layer.kernel[1]} s{layer.stride[0]} M{layer.multiplier} N{layer.batch} "
            f"{DTYPE_NAMES.get(dtype, dtype)} {'channels_last' if layer.channels_last else 'nchw'} {mode}")


# --- the choice ------------------------------------------------------------------------------

_warned: set = set()


def choose(device: torch.device, dtype: torch.dtype, layer: Layer, candidates: Sequence[str]) -> str:
    """The implementation an ``auto`` call on ``device`` runs; ``candidates`` are those that can run
    here, ``"torch"`` first."""
    if tuning_enabled():
        return tuned(device, dtype, layer, candidates)
    entry = table_entry(device, dtype, layer)
    if entry is None:
        return "torch"
    choice = entry["choice"]
    if choice not in candidates:
        message = (f"separable_conv2d: the dispatch table chose {choice} for {describe(layer, dtype)}, "
                   f"which cannot run here (candidates {list(candidates)}); running torch")
        if message not in _warned:
            _warned.add(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
        return "torch"
    return choice


def clear_caches() -> None:
    """Forget the tuned choices and the loaded table (a changed table file; tests)."""
    _tuned.clear()
    _tuned_times.clear()
    _table.clear()
