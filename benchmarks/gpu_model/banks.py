"""Shared-memory bank conflicts of a kernel, from the register and shared layouts in its TTGIR.

An FMA-unit ``tt.dot`` (fp32 without TF32) reads its operands from shared
memory element by element, laid out by the compiler; whether the 32 lanes of a
warp hit 32 different banks or one depends on the operand's register layout
(``#ttg.blocked`` parent of a ``#ttg.dot_op``) and the buffer's
``#ttg.swizzled_shared`` layout. This module lays the lanes of warp 0 on the
tensor for every such ``ttg.local_load`` (reads) and every ``ttg.local_alloc``
/ ``ttg.local_store`` from a blocked layout (writes), applies the buffer's
swizzle, and counts the distinct 4-byte words that land in the busiest bank:
1 is conflict-free, 32 is fully serialised. Buffers in the ``nvmma_shared``
layout (tensor-core operands) are taken as conflict-free.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Tuple

_BLOCKED = re.compile(r"^(#blocked\d*) = #ttg\.blocked<\{sizePerThread = \[([\d, ]+)\], "
                      r"threadsPerWarp = \[([\d, ]+)\], warpsPerCTA = \[([\d, ]+)\], order = \[([\d, ]+)\]")
_SHARED = re.compile(r"^(#shared\d*) = #ttg\.swizzled_shared<\{vec = (\d+), perPhase = (\d+), maxPhase = (\d+), "
                     r"order = \[([\d, ]+)\]")
# A read of a shared buffer into registers: into a dot operand (FMA dots) or a blocked layout.
_LOAD = re.compile(r"ttg\.local_load [^:]*: !ttg\.memdesc<([\dx]+)x(\w+), (#shared\d*),.*?-> tensor<[\dx]+x\w+, "
                   r"(?:#ttg\.dot_op<\{opIdx = (\d), parent = (#blocked\d*)|(#blocked\d*)>)")
# A write of registers in a blocked layout into a shared buffer (including cp.async copies).
_STORE = re.compile(r"ttg\.(?:local_alloc|local_store|async_copy_global_to_local) [^:]*: "
                    r"\(?tensor<([\dx]+)x(?:!tt\.ptr<)?(\w+?)>?, (#blocked\d*)>\)?"
                    r"(?: -> |, )(?:!ttg\.memdesc)?<[\dx]+x\w+, (#shared\d*)")

_BYTES = {"f32": 4, "i32": 4, "f16": 2, "bf16": 2, "f64": 8, "i64": 8, "i8": 1, "i1": 1, "i16": 2}


@dataclass(frozen=True)
class Blocked:
    size_per_thread: Tuple[int, ...]
    threads_per_warp: Tuple[int, ...]
    order: Tuple[int, ...]

    def lane_coordinates(self, lane: int) -> Tuple[int, ...]:
        """The lane's thread index along each dimension (``order[0]`` varies fastest)."""
        coords = [0] * len(self.threads_per_warp)
        for dim in self.order:
            coords[dim] = lane % self.threads_per_warp[dim]
            lane //= self.threads_per_warp[dim]
        return tuple(coords)


@dataclass(frozen=True)
class Swizzled:
    vec: int
    per_phase: int
    max_phase: int
    order: Tuple[int, ...]

    def offset(self, index: Tuple[int, int], shape: Tuple[int, int]) -> int:
        """Element offset of ``index`` in a 2-D buffer of ``shape`` (``order[0]`` contiguous)."""
        inner, outer = self.order[0], self.order[1]
        column, row = index[inner], index[outer]
        phase = (row // self.per_phase) % self.max_phase
        column = ((column // self.vec) ^ phase) * self.vec + column % self.vec
        return row * shape[inner] + column


def _ints(text: str) -> Tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


@dataclass
class Conflicts:
    """Mean conflict degree of the kernel's shared reads and writes (1.0 = none), weighted by accesses."""

    read: float = 1.0
    write: float = 1.0


def conflicts(ttgir: str) -> Conflicts:
    blocked: Dict[str, Blocked] = {}
    shared: Dict[str, Swizzled] = {}
    for line in ttgir.splitlines():
        match = _BLOCKED.match(line)
        if match:
            blocked[match.group(1)] = Blocked(_ints(match.group(2)), _ints(match.group(3)), _ints(match.group(5)))
            continue
        match = _SHARED.match(line)
        if match:
            shared[match.group(1)] = Swizzled(int(match.group(2)), int(match.group(3)), int(match.group(4)),
                                              _ints(match.group(5)))
    reads: List[Tuple[float, int]] = []
    writes: List[Tuple[float, int]] = []
    for line in ttgir.splitlines():
        match = _LOAD.search(line)
        if match:
            shape, element, buffer, operand, parent, plain = match.groups()
            dims = _ints(shape.replace("x", ","))
            size = _BYTES.get(element, 4)
            if buffer not in shared or len(dims) != 2:
                continue
            if parent in blocked:
                reads.append(_operand_read(dims, size, shared[buffer], blocked[parent], int(operand)))
            elif plain in blocked:
                reads.append(_blocked_access(dims, size, shared[buffer], blocked[plain]))
            continue
        match = _STORE.search(line)
        if match:
            shape, element, layout, buffer = match.groups()
            dims = _ints(shape.replace("x", ","))
            if buffer in shared and layout in blocked and len(dims) == 2:
                writes.append(_blocked_access(dims, _BYTES.get(element, 4), shared[buffer], blocked[layout]))
    return Conflicts(_mean(reads), _mean(writes))


def _mean(items: List[Tuple[float, int]]) -> float:
    total = sum(weight for _, weight in items)
    return sum(degree * weight for degree, weight in items) / total if total else 1.0


def _phase_degree(starts: List[int], vector: int, element_bytes: int) -> float:
    """Wavefronts of one warp-wide access of ``vector`` consecutive elements per lane, over the ideal count.

    Accesses of 8 or 16 bytes per lane are served in 2 or 4 phases of 16 or 8 lanes; in each
    phase, the busiest bank's distinct 4-byte words are its wavefronts.
    """
    width = vector * element_bytes
    phases = 4 if width >= 16 else 2 if width >= 8 else 1
    lanes = 32 // phases
    total = 0
    for phase in range(phases):
        words: Dict[int, set] = {}
        for start in starts[phase * lanes:(phase + 1) * lanes]:
            first = start * element_bytes // 4
            for word in range(first, first + max(1, width // 4)):
                words.setdefault(word % 32, set()).add(word)
        total += max(len(v) for v in words.values())
    return total / phases


def _vector(contiguous_run: int, element_bytes: int) -> int:
    """Elements per lane access: the run of consecutive elements a thread holds, up to 16 bytes."""
    run = max(1, contiguous_run)
    limit = max(1, 16 // element_bytes)
    vector = 1
    while vector * 2 <= min(run, limit) and run % (vector * 2) == 0:
        vector *= 2
    return vector


def _operand_read(shape: Tuple[int, int], element_bytes: int, buffer: Swizzled, parent: Blocked,
                  operand: int) -> Tuple[float, int]:
    """A dot operand read for FMA: A (M x K) rows follow the parent's dim 0, B (K x N) columns its dim 1."""
    spread = 0 if operand == 0 else 1          # the dimension the lanes are spread over
    reduced = 1 - spread                       # K: every lane walks all of it
    per_thread = parent.size_per_thread[spread]
    contiguous = buffer.order[0]
    vector = _vector(shape[reduced] if contiguous == reduced else per_thread, element_bytes)
    vector = min(vector, buffer.vec) if buffer.max_phase > 1 else vector
    k_step, r_step = (vector, 1) if contiguous == reduced else (1, vector)
    degrees = []
    for k in range(0, shape[reduced], k_step):
        for register in range(0, per_thread, r_step):
            starts = []
            for lane in range(32):
                index = [0, 0]
                index[spread] = (parent.lane_coordinates(lane)[spread] * per_thread + register) % shape[spread]
                index[reduced] = k
                starts.append(buffer.offset(tuple(index), shape))
            degrees.append(_phase_degree(starts, vector, element_bytes))
    return sum(degrees) / len(degrees), len(degrees)


def _blocked_access(shape: Tuple[int, int], element_bytes: int, buffer: Swizzled,
                    layout: Blocked) -> Tuple[float, int]:
    """Each lane reads or writes the elements a blocked layout gives it, vectorised along the buffer's rows."""
    contiguous = buffer.order[0]
    vector = _vector(layout.size_per_thread[contiguous], element_bytes)
    vector = min(vector, buffer.vec) if buffer.max_phase > 1 else vector
    steps = [1, 1]
    steps[contiguous] = vector
    degrees = []
    for register0 in range(0, layout.size_per_thread[0], steps[0]):
        for register1 in range(0, layout.size_per_thread[1], steps[1]):
            starts = []
            for lane in range(32):
                coords = layout.lane_coordinates(lane)
                index = ((coords[0] * layout.size_per_thread[0] + register0) % shape[0],
                         (coords[1] * layout.size_per_thread[1] + register1) % shape[1])
                starts.append(buffer.offset(index, shape))
            degrees.append(_phase_degree(starts, vector, element_bytes))
    return sum(degrees) / len(degrees), len(degrees)
