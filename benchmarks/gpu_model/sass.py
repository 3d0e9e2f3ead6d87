"""SASS of a compiled kernel: instructions with their control bits, loops, and a census by class.

The cubin is disassembled with the ``nvdisasm`` bundled in Triton's NVIDIA
backend (``-hex`` prints each 128-bit instruction as two 64-bit words; the
scheduling control bits sit in the top bits of the second word). Loops are the
address ranges closed by backward branches. Each instruction gets one class,
named in ``CLASSES``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional

# Instruction classes, in report order.
CLASSES = (
    "tensor",        # HGMMA (wgmma), HMMA (mma.sync), DMMA
    "ffma",          # FFMA/FADD/FMUL/FMNMX and friends (fp32 pipe)
    "dfma",          # fp64 math
    "imad",          # IMAD family (runs on the FMA pipe)
    "int",           # integer/logic ALU: IADD3, LOP3, SHF, LEA, SEL, ISETP, PRMT, VIADD...
    "predicate",     # PLOP3, P2R, R2P, predicate moves
    "convert",       # F2F, I2F, F2I, F2FP (pack), HADD2.F32 widening
    "move",          # MOV, uniform-datapath ops, S2R/S2UR, CS2R
    "ldg",           # global loads
    "stg",           # global stores (and reductions/atomics)
    "lds",           # shared loads (LDS, LDSM)
    "sts",           # shared stores
    "async_copy",    # LDGSTS, UTMALDG/UBLKCP (global -> shared copies)
    "local",         # LDL/STL: register spills
    "barrier",       # BAR, SYNCS, DEPBAR, WARPGROUP fences
    "branch",        # BRA, EXIT, BSSY/BSYNC, NOP, ...
    "other",
)

_PREFIX_CLASSES = [
    (("HGMMA", "HMMA", "DMMA", "IMMA", "QGMMA"), "tensor"),
    (("LDGSTS", "UTMALDG", "UBLKCP", "UTMAPF", "UTMACCTL"), "async_copy"),
    (("LDG", "LD"), "ldg"),
    (("STG", "RED", "REDG", "ATOMG", "ATOM", "ST"), "stg"),
    (("LDSM", "LDS"), "lds"),
    (("STS",), "sts"),
    (("LDL", "STL"), "local"),
    (("BAR", "SYNCS", "DEPBAR", "LDGDEPBAR", "WARPGROUP", "MEMBAR", "FENCE", "ARRIVES", "WARPSYNC"), "barrier"),
    (("BRA", "EXIT", "BSSY", "BSYNC", "NOP", "RET", "CALL", "JMP", "BREAK", "YIELD", "ELECT"), "branch"),
    (("F2FP", "F2F", "I2F", "F2I", "I2I", "FRND"), "convert"),
    (("DFMA", "DADD", "DMUL", "DSETP", "DMNMX"), "dfma"),
    (("FFMA", "FADD", "FMUL", "FMNMX", "FSETP", "FSEL", "FCHK", "MUFU", "FSWZADD", "HFMA2", "HADD2", "HMUL2",
      "HMNMX2", "HSETP2"), "ffma"),
    (("IMAD",), "imad"),
    (("PLOP3", "P2R", "R2P", "VOTE", "PSETP"), "predicate"),
    (("IADD3", "IADD", "LOP3", "LOP", "SHF", "SHL", "SHR", "LEA", "SEL", "ISETP", "PRMT", "VIADD", "VIMNMX",
      "IMNMX", "IABS", "FLO", "POPC", "BREV", "BMSK", "SGXT", "ICMP", "VIADDMNMX", "IDP", "IMUL"), "int"),
    (("MOV", "S2R", "S2UR", "CS2R", "SHFL", "R2UR", "LDC"), "move"),
]

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;\s*/\*\s*(0x[0-9a-f]{16})\s*\*/")
_HI = re.compile(r"^\s*/\*\s*(0x[0-9a-f]{16})\s*\*/\s*$")
_BRANCH_TARGET = re.compile(r"`\(\.L_x_(\d+)\)")
_LABEL = re.compile(r"^\.L_x_(\d+):")


@dataclass
class Instruction:
    address: int
    text: str                       # predicate, opcode and operands
    opcode: str                     # e.g. LDG.E.128
    klass: str
    stall: int = 0                  # cycles before the next instruction may issue
    write_barrier: Optional[int] = None   # scoreboard this instruction sets when done (variable latency)
    read_barrier: Optional[int] = None
    wait_mask: int = 0              # scoreboards waited on before issue
    target_label: Optional[int] = None

    @property
    def mnemonic(self) -> str:
        return self.opcode.split(".")[0]

    def access_bytes(self) -> int:
        """Bytes per thread of a memory instruction (4 when the width is not spelled out)."""
        for width, size in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".16", 2), (".U8", 1),
                            (".S8", 1), (".8", 1)):
            if width in self.opcode:
                return size
        if self.klass == "lds" and self.mnemonic == "LDSM":  # ldmatrix: .x4 = four 8x8 tiles
            count = re.search(r"\.x(\d)", self.opcode.lower())
            return 4 * int(count.group(1)) if count else 4
        return 4


@dataclass
class Loop:
    start: int                      # address of the first instruction
    end: int                        # address of the backward branch
    children: List["Loop"] = field(default_factory=list)
    instructions: List[Instruction] = field(default_factory=list)   # its own, not its children's

    def walk(self):
        yield self
        for child in self.children:
            yield from child.walk()


@dataclass
class Sass:
    instructions: List[Instruction]
    loops: List[Loop]               # top-level loops, in address order
    straight: List[Instruction]     # instructions outside every loop

    def all_loops(self) -> List[Loop]:
        return [loop for top in self.loops for loop in top.walk()]


def classify(opcode: str) -> str:
    mnemonic = opcode.split(".")[0]
    for names, klass in _PREFIX_CLASSES:
        if mnemonic in names:
            return klass
    if mnemonic.startswith("U"):  # the uniform datapath (UIADD3, UMOV, ULDC, ...): per warp, off the vector pipes
        return "move"
    return "other"


@lru_cache(maxsize=None)
def tool(name: str) -> Optional[str]:
    """Path of a tool bundled with Triton (``nvdisasm``, ``ptxas``, ``cuobjdump``), else one on PATH."""
    try:
        import triton

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    return shutil.which(name)


def disassemble(cubin: bytes) -> str:
    nvdisasm = tool("nvdisasm")
    if nvdisasm is None:
        raise FileNotFoundError("nvdisasm was not found (Triton's NVIDIA backend bundles it in backends/nvidia/bin)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        done = subprocess.run([nvdisasm, "-c", "-hex", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"nvdisasm failed: {done.stderr.strip()[:300]}")
    return done.stdout


def _control(hi: int, instruction: Instruction) -> None:
    """Volta-and-later control bits, in the second 64-bit word: stall, yield, barriers, wait mask."""
    instruction.stall = (hi >> 41) & 0xF
    write = (hi >> 46) & 0x7
    read = (hi >> 49) & 0x7
    instruction.write_barrier = None if write == 7 else write
    instruction.read_barrier = None if read == 7 else read
    instruction.wait_mask = (hi >> 52) & 0x3F


def parse(text: str) -> Sass:
    instructions: List[Instruction] = []
    labels: Dict[int, int] = {}
    pending: Optional[Instruction] = None
    for line in text.splitlines():
        label = _LABEL.match(line.strip())
        if label:
            labels[int(label.group(1))] = None  # resolved to the next instruction's address
            continue
        match = _LINE.search(line)
        if match:
            body = match.group(2).strip()
            words = body.split()
            opcode = words[1] if words[0].startswith("@") and len(words) > 1 else words[0]
            target = _BRANCH_TARGET.search(body)
            instruction = Instruction(int(match.group(1), 16), body, opcode, classify(opcode),
                                      target_label=int(target.group(1)) if target else None)
            for key, value in labels.items():
                if value is None:
                    labels[key] = instruction.address
            instructions.append(instruction)
            pending = instruction
            continue
        hi = _HI.match(line)
        if hi and pending is not None:
            _control(int(hi.group(1), 16), pending)
            pending = None
    loops = _loops(instructions, labels)
    inside = {id(i) for top in loops for loop in top.walk() for i in loop.instructions}
    straight = [i for i in instructions if id(i) not in inside]
    return Sass(instructions, loops, straight)


def _loops(instructions: List[Instruction], labels: Dict[int, int]) -> List[Loop]:
    ranges = []
    for instruction in instructions:
        if instruction.mnemonic == "BRA" and instruction.target_label is not None:
            target = labels.get(instruction.target_label)
            if target is not None and target < instruction.address:  # a branch to itself is the exit trap
                ranges.append((target, instruction.address))
    # Merge branches that close the same loop head (continue-style back edges): keep the outermost end.
    by_start: Dict[int, int] = {}
    for start, end in ranges:
        by_start[start] = max(end, by_start.get(start, end))
    spans = sorted(by_start.items(), key=lambda r: (r[0], -r[1]))
    roots: List[Loop] = []
    stack: List[Loop] = []
    for start, end in spans:
        loop = Loop(start, end)
        while stack and not (stack[-1].start <= start and end <= stack[-1].end):
            stack.pop()
        (stack[-1].children if stack else roots).append(loop)
        stack.append(loop)
    for instruction in instructions:
        owner = None
        for root in roots:
            for loop in root.walk():
                if loop.start <= instruction.address <= loop.end:
                    owner = loop  # walk goes outer to inner: the last match is the innermost
        if owner is not None:
            owner.instructions.append(instruction)
    return roots


def census(instructions: List[Instruction]) -> Dict[str, int]:
    counts = {klass: 0 for klass in CLASSES}
    for instruction in instructions:
        counts[instruction.klass] += 1
    return counts


def global_loads_by_width(instructions: List[Instruction]) -> Dict[int, int]:
    """Bytes per thread -> number of global load instructions."""
    widths: Dict[int, int] = {}
    for instruction in instructions:
        if instruction.klass == "ldg":
            size = instruction.access_bytes()
            widths[size] = widths.get(size, 0) + 1
    return dict(sorted(widths.items()))
