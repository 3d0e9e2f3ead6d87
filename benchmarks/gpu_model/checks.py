"""Structural checks of the Triton kernels at the Xception layer shapes, from their SASS (no GPU).

For every kernel the backend launches for a layer (forward and backward, fused
and split mode, bf16 and fp32, batch 32, channels_last), in every tile config
its autotuner may pick, compiled for sm_90 as the runtime would:

* no register spills (no ``LDL``/``STL`` in the SASS, no stack frame);
* no 16-bit scalar global loads (``LDG.E.U16``) inside a loop when the layer's
  channel counts are multiples of 8, where 128-bit loads are possible;
* at least ``MIN_CTAS_PER_SM`` programs resident per SM.

A failure names the kernel, config, layer, dtype, mode and what regressed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence

from ..cases import XCEPTION_LAYERS, Shape
from . import layers, model

MIN_CTAS_PER_SM = 1


@dataclass
class Finding:
    kernel: str
    config: str
    layer: str
    dtype: str
    mode: str
    direction: str
    problem: str

    def __str__(self) -> str:
        return (f"{self.kernel} [{self.config}] at {self.layer} {self.dtype} {self.mode} {self.direction}: "
                f"{self.problem}")


def check_report(report: layers.KernelReport, shape: Shape) -> List[str]:
    """What is wrong with one compiled kernel (an empty list when nothing is)."""
    problems = []
    if report.error and report.prediction is None and not report.sass.instructions:
        return [f"does not compile: {report.error}"]
    spills = [i for i in report.sass.instructions if i.klass == "local"]
    if spills:
        problems.append(f"{len(spills)} spill instructions (LDL/STL)")
    if shape.cin % 8 == 0 and shape.cout % 8 == 0:
        scalar = [i for loop in report.sass.all_loops() for i in loop.instructions
                  if i.klass == "ldg" and i.access_bytes() == 2]
        if scalar:
            problems.append(f"{len(scalar)} scalar 16-bit global loads in loops (channels are multiples of 8; "
                            f"e.g. {scalar[0].text})")
    if report.prediction is not None:
        occ = report.prediction.ctas_per_sm
        limited = report.prediction.limited_by
    else:
        occ = model.occupancy(0, 0, 1).ctas_per_sm
        limited = ""
    if occ < MIN_CTAS_PER_SM:
        problems.append(f"{occ} programs per SM (limited by {limited}); at least {MIN_CTAS_PER_SM} wanted")
    return problems


def _check_layer(shape: Shape, dtype: str, modes: tuple, directions: tuple, batch: int,
                 capability: int) -> tuple:
    findings, lines = [], []
    for mode in modes:
        for direction in directions:
            op = layers.op_report(shape, batch, dtype, mode, direction, capability)
            for configs in op.kernels:
                for report in configs:
                    for problem in check_report(report, shape):
                        findings.append(Finding(report.kernel, report.config, shape.name, dtype, mode,
                                                direction, problem))
            lines.append(f"{shape.name} {dtype} {mode} {direction}: "
                         f"{sum(len(c) for c in op.kernels)} kernel configs checked")
    return findings, lines


def run_checks(shapes: Sequence[Shape] = XCEPTION_LAYERS, dtypes: Iterable[str] = ("bf16", "fp32"),
               modes: Iterable[str] = layers.MODES, directions: Iterable[str] = ("fwd", "bwd"),
               batch: int = 32, capability: int = 90, progress: Optional[callable] = None,
               jobs: int = 1) -> List[Finding]:
    """Check every layer and dtype, ``jobs`` processes at a time (compiling is CPU-bound)."""
    work = [(shape, dtype, tuple(modes), tuple(directions), batch, capability) for shape in shapes
            for dtype in dtypes]
    findings: List[Finding] = []
    if jobs <= 1:
        results = (_check_layer(*item) for item in work)
        for found, lines in results:
            findings += found
            for line in lines:
                if progress:
                    progress(line)
        return findings
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=jobs) as pool:
        for found, lines in pool.map(_check_layer, *zip(*work)):
            findings += found
            for line in lines:
                if progress:
                    progress(line)
    return findings
