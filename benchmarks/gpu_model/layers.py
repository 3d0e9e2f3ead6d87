"""Predicted times of the Triton backend's ops for Xception layers: record, compile, model, sum.

Every time here is a prediction for an H200 (``model.py``), not a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from ..cases import DTYPES, Shape
from ..providers import triton_mode
from . import banks, launches, model, sass, ttir

DIRECTIONS = ("fwd", "bwd", "full")
MODES = ("fused", "split")


@dataclass
class KernelReport:
    """One kernel launch compiled in one config, with its census and predicted time."""

    kernel: str
    config: str
    capability: int
    ctas: int
    sass: sass.Sass
    executions: Optional[Dict[int, float]]
    prediction: Optional[model.Prediction]
    error: str = ""

    def dynamic_census(self) -> Dict[str, float]:
        """Warp-instructions per program by class, loops weighted by their executions."""
        totals = {klass: 0.0 for klass in sass.CLASSES}
        for klass, count in sass.census(self.sass.straight).items():
            totals[klass] += count
        for loop in self.sass.all_loops():
            weight = (self.executions or {}).get(loop.start, 1.0)
            for klass, count in sass.census(loop.instructions).items():
                totals[klass] += weight * count
        return totals


@dataclass
class OpReport:
    """A whole op (forward or backward) of one layer: its kernels (best config each) and library calls."""

    shape: Shape
    batch: int
    dtype: str
    mode: str
    direction: str
    kernels: List[List[KernelReport]] = field(default_factory=list)   # per launch, every config tried
    library: List[launches.LibraryCall] = field(default_factory=list)
    library_seconds: float = 0.0

    def best(self) -> List[KernelReport]:
        chosen = []
        for configs in self.kernels:
            ok = [r for r in configs if r.prediction is not None]
            if ok:
                chosen.append(min(ok, key=lambda r: r.prediction.seconds))
        return chosen

    @property
    def seconds(self) -> Optional[float]:
        if any(all(r.prediction is None for r in configs) for configs in self.kernels):
            return None
        return sum(r.prediction.seconds for r in self.best()) + self.library_seconds


def make_inputs(shape: Shape, batch: int, dtype: torch.dtype, layout: str = "channels_last"):
    """CPU tensors with the layer's shapes, dtype and layout (values do not matter to a compile)."""
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.empty(batch, shape.cin, shape.h, shape.w, dtype=dtype).contiguous(memory_format=memory_format)
    dw = torch.empty(shape.cin, 1, shape.k, shape.k, dtype=dtype)
    pw = torch.empty(shape.cout, shape.cin, 1, 1, dtype=dtype)
    oh, ow = shape.out_hw
    grad = torch.empty(batch, shape.cout, oh, ow, dtype=dtype).contiguous(memory_format=memory_format)
    return x, dw, pw, grad


def _launchers(mode: str):
    import importlib

    if mode == "split":
        split = importlib.import_module("kernels.triton.split")
        return split.forward, split.backward
    forward = importlib.import_module("kernels.triton.forward")
    backward = importlib.import_module("kernels.triton.backward")
    return forward.forward, backward.backward


def _backward_mask(biases: bool) -> List[bool]:
    """The ``output_mask`` the imported kernels' backward op takes: one flag per gradient (the input, both
    weights, both biases), or three (input, depthwise, pointwise) in the kernels of a commit from before the
    bias flags, which ``--validate`` imports to model the kernels a recorded GPU run timed."""
    from kernels import ops

    if "bool[3] output_mask" in ops.BACKWARD_SCHEMA:
        return [True] * 3
    return [True] * 3 + [biases] * 2


def record(shape: Shape, batch: int, dtype_name: str, mode: str, direction: str, capability: int = 90,
           biases: bool = False, layout: str = "channels_last") -> launches.Recording:
    """What the backend launches for the layer's forward (``fwd``) or backward (``bwd``).

    Without ``biases`` by default: Xception's separable convolutions have none, nor have the benchmark
    suite's layers (eager pair and ``kernels.SeparableConv2d`` alike), so the backward is asked for the
    three weight and input gradients only, as autograd asks for them. Split mode's backward is given the
    depthwise result as a recorded graph keeps it from the forward (``kernels.autograd``), so it runs no
    depthwise kernel of its own."""
    dtype = DTYPES[dtype_name]
    x, dw, pw, grad = make_inputs(shape, batch, dtype, layout)
    dwb = torch.empty(shape.cin, dtype=dtype) if biases else None
    pwb = torch.empty(shape.cout, dtype=dtype) if biases else None
    geometry = ([shape.stride] * 2, [shape.padding] * 4, [1, 1])
    forward_fn, backward_fn = _launchers(mode)
    with triton_mode(mode):
        if direction == "fwd":
            return launches.record_call(lambda: forward_fn(x, dw, pw, dwb, pwb, *geometry, False), capability)
        kept = {}
        if mode == "split":
            kept["hidden"] = torch.empty((grad.shape[0] * grad.shape[2] * grad.shape[3], dw.shape[0]), dtype=dtype)
        return launches.record_call(
            lambda: backward_fn(grad, x, dw, pw, dwb, *geometry, False, _backward_mask(biases), **kept),
            capability)


def _dram_bytes(launch: launches.KernelLaunch) -> float:
    """Each distinct tensor argument read or written once."""
    seen, total = set(), 0
    for value in launch.args:
        if isinstance(value, torch.Tensor) and value.data_ptr() not in seen:
            seen.add(value.data_ptr())
            total += value.numel() * value.element_size()
    return float(total)


def analyse(launch: launches.KernelLaunch, config, capability: int = 90) -> KernelReport:
    """Compile one launch in one config and predict its time."""
    name = launches.config_name(config)
    ctas = launch.grid_size(config)
    try:
        compiled = launches.compile_launch(launch, config, capability)
        code = sass.parse(sass.disassemble(compiled.asm["cubin"]))
    except Exception as error:  # noqa: BLE001 - a config that does not compile is reported, not fatal
        empty = sass.Sass([], [], [])
        return KernelReport(launch.name, name, capability, ctas, empty, None, None,
                            f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}")
    values = launch.arg_values(config)
    grid = launch.grid(values) if callable(launch.grid) else launch.grid
    try:
        loops = ttir.trip_counts(compiled.asm["ttir"], values, tuple(grid))
        executions = model.executions_by_loop(code, loops)
        error = "" if executions is not None else "the SASS loop nest does not match the IR's loops"
    except ValueError as exc:
        executions, error = None, str(exc)
    registers = registers_of(compiled)
    prediction = None
    if executions is not None:
        prediction = model.predict(code, executions, registers, int(compiled.metadata.shared), config.num_warps,
                                   ctas, _dram_bytes(launch), banks.conflicts(compiled.asm["ttgir"]))
    return KernelReport(launch.name, name, capability, ctas, code, executions, prediction, error)


def registers_of(compiled) -> int:
    """Registers per thread, from the cubin's resource usage (``cuobjdump``) or the compiled metadata."""
    import subprocess
    import tempfile
    from pathlib import Path

    count = getattr(compiled, "n_regs", None)
    if count:
        return int(count)
    cuobjdump = sass.tool("cuobjdump")
    if cuobjdump is None:
        raise FileNotFoundError("cuobjdump was not found (Triton's NVIDIA backend bundles it)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(compiled.asm["cubin"])
        done = subprocess.run([cuobjdump, "--dump-resource-usage", str(path)], capture_output=True, text=True)
    for token in done.stdout.split():
        if token.startswith("REG:"):
            return int(token[4:])
    raise RuntimeError(f"no register count in cuobjdump's output: {done.stdout.strip()[:200]}")


def op_report(shape: Shape, batch: int, dtype_name: str, mode: str, direction: str, capability: int = 90,
              configs: Optional[Dict[str, Sequence]] = None, tf32: bool = False, biases: bool = False) -> OpReport:
    """Predict one op. ``configs`` pins kernels (by function name) to the given configs instead of their own."""
    rec = record(shape, batch, dtype_name, mode, direction, capability, biases)
    report = OpReport(shape, batch, dtype_name, mode, direction)
    for launch in rec.kernels:
        candidates = (configs or {}).get(launch.name) or launch.configs
        report.kernels.append([analyse(launch, config, capability) for config in candidates])
    report.library = rec.library
    report.library_seconds = sum(model.library_seconds(call.op, call.flops, call.bytes, dtype_name, tf32, call.shapes)
                                 for call in rec.library)
    return report


def layer_seconds(shape: Shape, batch: int, dtype_name: str, mode: str, direction: str,
                  capability: int = 90, tf32: bool = False) -> Dict[str, Optional[float]]:
    """Predicted seconds of ``fwd``, ``bwd`` or both (``full``)."""
    parts = ("fwd", "bwd") if direction == "full" else (direction,)
    out = {part: op_report(shape, batch, dtype_name, mode, part, capability, tf32=tf32).seconds for part in parts}
    if direction == "full":
        out["full"] = None if None in out.values() else sum(out.values())
    return out
