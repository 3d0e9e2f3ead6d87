"""Predicted H200 time of one compiled kernel launch, from its SASS and its loop trip counts.

Every figure this module returns is a prediction, not a measurement.

For each piece of code that runs the same number of times per program (the
straight-line code, each loop body), one execution by all the programs an SM
holds at once takes the longest of:

* **issue and pipes**: the warps per sub-partition times one warp's busiest of
  issue slots, the integer ALU, the FMA pipe (``max(2*IMAD, IMAD + FFMA)``) and
  the conversion unit;
* **LSU**: the SM's 128-byte wavefronts of global, local and shared accesses;
* **tensor cores**: the SM's matrix FLOPs at its tensor rate;
* **latency**: one warp's dependency chain, replayed from the control bits:
  stall counts, plus the fixed latency of each load, matrix product or barrier
  the warp waits on (a loop body is replayed twice and the second pass counted,
  so loads issued for the next iteration overlap as on the GPU).

Programs run in waves of ``SMs x programs per SM`` (registers, shared memory
and warps limit the latter). The kernel time is the sum over waves, never
below the compulsory DRAM traffic at the HBM rate or the requested sectors at
the L2 rate, plus the launch overhead. Library calls (cuBLAS GEMMs, copies,
sums) are priced from the rates measured on the H200 itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from .banks import Conflicts
from .sass import Instruction, Loop, Sass

# Every constant of the model, with where it comes from. Nothing here was fitted to the recorded
# H200 timings; where a choice was made between published figures, the note says so.
CONSTANTS: Dict[str, tuple] = {
    "clock_hz": (1.98e9, "H100/H200 SXM maximum boost clock (NVIDIA datasheet)"),
    "sms": (132, "H100/H200 SXM multiprocessor count (datasheet)"),
    "smsp_per_sm": (4, "Hopper SM: four sub-partitions, one warp-instruction issued per clock each"),
    "int_cycles": (2, "integer/logic ALU: 64 lanes per clock per SM, so 2 clocks per warp-instruction per SMSP"),
    "imad_cycles": (2, "IMAD runs on the FMA-heavy pipe only: 2 clocks per warp-instruction"),
    "ffma_cycles": (1, "fp32 FFMA/FADD/FMUL: 128 lanes per clock per SM (two FMA pipes)"),
    "dfma_cycles": (2, "fp64: 64 lanes per clock per SM on the SXM part"),
    "xu_cycles": (8, "conversions F2F/I2F/F2I and MUFU: 16 lanes per clock per SM"),
    "lsu_bytes_per_clock": (128, "L1/shared: one 128-byte wavefront per clock per SM"),
    "tensor_flop_per_clock_wgmma": (4096, "dense bf16 wgmma: 989 TFLOP/s / (132 SMs x 1.83 GHz)"),
    "tensor_flop_per_clock_mma": (2048, "mma.sync (HMMA) on Hopper: about half the wgmma rate"),
    "tensor_flop_per_clock_dmma": (256, "fp64 DMMA: 67 TFLOP/s / (132 x 1.98 GHz)"),
    "global_latency": (500, "global/local load round trip in clocks (L2 hit ~260, HBM ~600: a mix)"),
    "shared_latency": (30, "shared-memory load latency in clocks"),
    "constant_latency": (20, "LDC, S2R and other short variable-latency results, clocks"),
    "xu_latency": (20, "conversion / MUFU result latency, clocks"),
    "barrier_latency": (20, "BAR.SYNC among a program's warps, clocks"),
    "wgmma_wait": (40, "WARPGROUP.DEPBAR wait beyond the wgmma's own tensor time, clocks"),
    "hbm_bytes_per_s": (4.25e12, "copy bandwidth measured on the H200 (peak_gbps in cuda-nvidia-h200.jsonl)"),
    "l2_bytes_per_s": (5.5e12, "L2-to-SM bandwidth on the requested 32-byte sectors (published H100 figure)"),
    "launch_s": (3e-6, "kernel launch and tail overhead"),
    "registers_per_smsp": (16384, "64K 32-bit registers per SM, split over four SMSPs"),
    "register_granule": (256, "registers are allocated per warp in steps of 256"),
    "shared_per_sm": (233472, "228 KB of shared memory per SM"),
    "shared_reserved_per_cta": (1024, "1 KB reserved per program"),
    "max_warps_per_sm": (64, "Hopper limit"),
    "max_ctas_per_sm": (32, "Hopper limit"),
    "gemm_bf16_flop_per_s": (672.9e12, "bf16 matmul measured on the H200 (matmul_bf16_gflops in the results)"),
    "gemm_fp32_flop_per_s": (51.1e12, "fp32 matmul, TF32 off, measured on the H200 (matmul_fp32_gflops)"),
    "gemm_tf32_flop_per_s": (335.7e12, "fp32 1x1 convolution with TF32, measured (conv1x1_fp32_gflops)"),
    "gemm_efficiency": (0.7, "fraction of the measured GEMM rate the op's GEMMs reach where no rate was measured "
                             "at their shape (GEMM_EFFICIENCY_MEASURED)"),
    "library_launch_s": (5e-6, "per library call (cuBLAS or an ATen kernel)"),
}

# The fraction of gemm_bf16_flop_per_s that cuBLAS's 16-bit GEMMs reached on the H200 at the shapes where they were
# timed: split mode's training step (forward, input gradient, weight gradient: three GEMMs with the same three
# dimensions), batch 32, bf16, torch.profiler's device time in benchmarks/results/gpu-probe-cuda-nvidia-h200.txt.
# Keyed by the GEMM's dimensions (M, N, K) sorted. Like the GEMM rates above these are the library's measured
# speed, not the project's kernels'; a GEMM at any other shape, or in fp32, gets gemm_efficiency.
GEMM_EFFICIENCY_MEASURED: Dict[tuple, tuple] = {
    (728, 728, 11552): (0.657, "728->728@19: 26.8 + 26.2 + 26.0 us and a 4.1 us split-K reduction for 3 x 12.24 GFLOP"),
    (256, 728, 43808): (0.705, "256->728@37: 36.6 + 34.9 + 31.8 us for 3 x 16.33 GFLOP"),
    (1536, 2048, 3200): (1.011, "1536->2048@10: 30.7 + 29.6 + 28.5 us for 3 x 20.13 GFLOP"),
}


def const(name: str):
    return CONSTANTS[name][0]


@dataclass
class Occupancy:
    ctas_per_sm: int
    limited_by: str


def occupancy(registers: int, shared_bytes: int, warps: int) -> Occupancy:
    granule = const("register_granule")
    per_warp = max(granule, math.ceil(registers * 32 / granule) * granule)
    warps_per_smsp = const("registers_per_smsp") // per_warp
    limits = {
        "registers": (warps_per_smsp * const("smsp_per_sm")) // warps,
        "shared memory": const("shared_per_sm") // (shared_bytes + const("shared_reserved_per_cta")),
        "warps": const("max_warps_per_sm") // warps,
        "programs": const("max_ctas_per_sm"),
    }
    name = min(limits, key=limits.get)
    return Occupancy(max(0, limits[name]), name)


def _tensor_flops(instruction: Instruction) -> tuple:
    """(FLOPs done for one warp's issue of a matrix instruction, the tensor rate key)."""
    op = instruction.opcode
    dims = [int(v) for v in _shape_numbers(op)]
    if op.startswith("HGMMA") or op.startswith("QGMMA"):
        m, n, k = dims[:3] if len(dims) >= 3 else (64, 64, 16)
        return 2.0 * m * n * k / 4, "tensor_flop_per_clock_wgmma"  # a warpgroup's op, issued by 4 warps
    if op.startswith("DMMA"):
        m, n, k = (8, 8, 4)
        return 2.0 * m * n * k, "tensor_flop_per_clock_dmma"
    if op.startswith("HMMA") or op.startswith("IMMA"):
        text = str(dims[0]) if dims else ""
        if len(text) in (4, 5):  # HMMA.1688 / HMMA.16816: m is two digits, n one, k the rest
            m, n, k = int(text[:2]), int(text[2]), int(text[3:])
        else:
            m, n, k = 16, 8, 16
        return 2.0 * m * n * k, "tensor_flop_per_clock_mma"
    return 0.0, "tensor_flop_per_clock_mma"


def _shape_numbers(opcode: str) -> List[str]:
    for part in opcode.split(".")[1:]:
        if "x" in part and all(p.isdigit() for p in part.split("x")):
            return part.split("x")
        if part.isdigit():
            return [part]
    return []


@dataclass
class BodyCost:
    """Per-warp costs of one execution of a body (cycles unless noted)."""

    issue: float = 0.0
    alu: float = 0.0
    fma_imad: float = 0.0
    fma_ffma: float = 0.0
    dfma: float = 0.0
    xu: float = 0.0
    wavefronts: float = 0.0          # LSU wavefronts of this warp
    sectors_bytes: float = 0.0       # bytes requested from L2 by this warp
    tensor: Dict[str, float] = field(default_factory=dict)   # rate key -> FLOPs
    chain: float = 0.0               # latency chain of one warp

    def busy(self) -> float:
        fma = max(self.fma_imad * const("imad_cycles"), self.fma_imad * const("imad_cycles") / 2 + self.fma_ffma)
        return max(self.issue, self.alu * const("int_cycles"), fma, self.dfma * const("dfma_cycles"),
                   self.xu * const("xu_cycles"))


_XU = ("F2F", "I2F", "F2I", "I2I", "MUFU", "FRND")


def body_cost(instructions: List[Instruction], repeat: bool, banks: Optional[Conflicts] = None) -> BodyCost:
    cost = BodyCost()
    banks = banks or Conflicts()
    factor = {"lds": banks.read, "sts": banks.write}
    for instruction in instructions:
        klass = instruction.klass
        cost.issue += 1
        if klass in ("int", "predicate") or instruction.mnemonic == "F2FP":
            cost.alu += 1
        elif klass == "convert" or instruction.mnemonic in _XU:
            cost.xu += 1
        elif klass == "imad":
            cost.fma_imad += 1
        elif klass == "ffma" and instruction.mnemonic not in _XU:
            cost.fma_ffma += 1
        elif klass == "dfma":
            cost.dfma += 1
        elif klass == "tensor":
            flops, key = _tensor_flops(instruction)
            cost.tensor[key] = cost.tensor.get(key, 0.0) + flops
        if klass in ("ldg", "stg", "local", "lds", "sts", "async_copy"):
            size = 32 * instruction.access_bytes()
            cost.wavefronts += max(1, math.ceil(size / const("lsu_bytes_per_clock"))) * factor.get(klass, 1.0)
            if klass in ("ldg", "stg", "local", "async_copy"):
                cost.sectors_bytes += max(32, size)
    cost.chain = latency_chain(instructions, repeat)
    return cost


def _latency(instruction: Instruction) -> float:
    klass = instruction.klass
    if klass in ("ldg", "local", "async_copy"):
        return const("global_latency")
    if klass == "lds":
        return const("shared_latency")
    if klass == "convert" or instruction.mnemonic in _XU:
        return const("xu_latency")
    return const("constant_latency")


def latency_chain(instructions: List[Instruction], repeat: bool) -> float:
    """One warp's cycles through ``instructions`` (twice for a loop body, the second pass counted)."""
    ready = [0.0] * 6
    wgmma_done = 0.0
    now = 0.0
    passes = 2 if repeat else 1
    start = 0.0
    for index in range(passes):
        start = now
        for instruction in instructions:
            for barrier in range(6):
                if instruction.wait_mask >> barrier & 1:
                    now = max(now, ready[barrier])
            if instruction.opcode.startswith("WARPGROUP.DEPBAR"):
                now = max(now, wgmma_done)
            if instruction.mnemonic == "BAR":
                now += const("barrier_latency")
            if instruction.klass == "tensor" and instruction.opcode.startswith(("HGMMA", "QGMMA")):
                flops, key = _tensor_flops(instruction)
                wgmma_done = max(wgmma_done, now) + 4 * flops / const(key) + const("wgmma_wait")
            now += max(1, instruction.stall)
            if instruction.write_barrier is not None:
                ready[instruction.write_barrier] = now + _latency(instruction)
    if repeat:
        return now - start
    return now


@dataclass
class Prediction:
    """A kernel launch's predicted time and what bounds it. Predicted, not measured."""

    seconds: float
    waves: int
    ctas: int
    ctas_per_sm: int
    limited_by: str
    bound: str                       # the term that dominates the largest body
    registers: int
    spills: int                      # LDL/STL instructions in the SASS
    shared_bytes: int
    terms: Dict[str, float] = field(default_factory=dict)   # seconds per term, summed over bodies


def predict(sass: Sass, executions: Dict[int, float], registers: int, shared_bytes: int, warps: int,
            ctas: int, dram_bytes: float, banks: Optional[Conflicts] = None) -> Prediction:
    """``executions``: per loop (by start address), how often its body runs per program."""
    occ = occupancy(registers, shared_bytes, warps)
    per_sm = max(1, occ.ctas_per_sm)
    bodies = [(sass.straight, 1.0, False)]
    for loop in sass.all_loops():
        bodies.append((loop.instructions, executions.get(loop.start, 1.0), True))
    costs = [(body_cost(instructions, repeat, banks), count) for instructions, count, repeat in bodies]

    def wave_cycles(programs_per_sm: int) -> tuple:
        warps_sm = programs_per_sm * warps
        warps_smsp = warps_sm / const("smsp_per_sm")
        total, terms = 0.0, {"issue/pipes": 0.0, "lsu": 0.0, "tensor": 0.0, "latency": 0.0}
        for cost, count in costs:
            candidates = {
                "issue/pipes": warps_smsp * cost.busy(),
                "lsu": warps_sm * cost.wavefronts,
                "tensor": warps_sm * sum(f / const(k) for k, f in cost.tensor.items()),
                "latency": cost.chain,
            }
            name = max(candidates, key=candidates.get)
            total += count * candidates[name]
            terms[name] += count * candidates[name]
        return total, terms

    machine = const("sms") * per_sm
    full_waves, remainder = divmod(ctas, machine)
    cycles, terms = 0.0, {}
    if full_waves:
        wave, wave_terms = wave_cycles(per_sm)
        cycles += full_waves * wave
        terms = {k: v * full_waves for k, v in wave_terms.items()}
    if remainder:
        wave, wave_terms = wave_cycles(math.ceil(remainder / const("sms")))
        cycles += wave
        for key, value in wave_terms.items():
            terms[key] = terms.get(key, 0.0) + value
    compute_s = cycles / const("clock_hz")
    l2_bytes = sum(cost.sectors_bytes * count for cost, count in costs) * warps * ctas
    floors = {"hbm": dram_bytes / const("hbm_bytes_per_s"), "l2": l2_bytes / const("l2_bytes_per_s")}
    seconds = max(compute_s, *floors.values())
    seconds_terms = {k: v / const("clock_hz") for k, v in terms.items()}
    seconds_terms.update(floors)
    if seconds == compute_s:
        bound = max(terms, key=terms.get) if terms else "latency"
    else:
        bound = max(floors, key=floors.get)
    spills = sum(1 for i in sass.instructions if i.klass == "local")
    return Prediction(seconds + const("launch_s"), full_waves + (1 if remainder else 0), ctas, occ.ctas_per_sm,
                      occ.limited_by, bound, registers, spills, shared_bytes, seconds_terms)


def measured_gemm(dtype_name: str, shapes: Sequence[tuple]) -> Optional[tuple]:
    """The GEMM_EFFICIENCY_MEASURED entry of a GEMM of operands ``shapes`` ((M, K), (K, N)), or None."""
    if dtype_name in ("bf16", "fp16") and len(shapes) == 2 and len(shapes[0]) == 2 and len(shapes[1]) == 2:
        (m, k), (_, n) = shapes
        return GEMM_EFFICIENCY_MEASURED.get(tuple(sorted((m, n, k))))
    return None


def gemm_efficiency(dtype_name: str, shapes: Sequence[tuple] = ()) -> float:
    """The fraction of the measured GEMM rate a GEMM of operands ``shapes`` is priced at."""
    measured = measured_gemm(dtype_name, shapes)
    return const("gemm_efficiency") if measured is None else measured[0]


def library_seconds(op: str, flops: float, moved_bytes: float, dtype_name: str, tf32: bool,
                    shapes: Sequence[tuple] = ()) -> float:
    """Predicted time of a library call: GEMMs (operands ``shapes``) at a fraction of the measured GEMM rate, others
    at the copy rate."""
    if flops:
        rate = {"bf16": "gemm_bf16_flop_per_s", "fp16": "gemm_bf16_flop_per_s"}.get(dtype_name)
        if rate is None:
            rate = "gemm_tf32_flop_per_s" if tf32 else "gemm_fp32_flop_per_s"
        compute = flops / (const(rate) * gemm_efficiency(dtype_name, shapes))
        return max(compute, moved_bytes / const("hbm_bytes_per_s")) + const("library_launch_s")
    return moved_bytes / const("hbm_bytes_per_s") + const("library_launch_s")


def executions_by_loop(sass: Sass, ir_roots: list) -> Optional[Dict[int, float]]:
    """Match the SASS loop nest with the IR loop nest; per SASS loop, executions per program.

    Loops whose bounds are constants may have been unrolled away; they are dropped
    from the IR side when the two nests differ. Returns None when no match is found.
    """

    def flatten(nodes):
        out = []
        for node in nodes:
            if node.static:
                # Unrolled: its children stand in its parent, once per trip.
                for _ in range(int(node.trips)):
                    out += flatten(node.children)
            else:
                out.append(node)
        return out

    result: Dict[int, float] = {}

    def assign(sass_loops: List[Loop], ir_nodes, outer: float) -> bool:
        if len(sass_loops) != len(ir_nodes):
            flat = flatten(ir_nodes)
            if len(sass_loops) != len(flat):
                return False
            ir_nodes = flat
        for loop, node in zip(sass_loops, ir_nodes):
            count = outer * node.trips
            result[loop.start] = count
            if not assign(loop.children, node.children, count):
                return False
        return True

    return result if assign(sass.loops, ir_roots, 1.0) else None
