"""Loop trip counts from a kernel's Triton IR, evaluated with the launch's arguments.

Each ``scf.for`` in the TTIR has bounds that are constants, kernel arguments or
scalar integer arithmetic on them. Evaluating those with the launch's values
gives every loop's trip count (per execution of the loop around it), so the
model needs no per-kernel knowledge of the loops; a kernel edit changes the
counts by itself. Bounds that depend on the program id (a persistent grid's
loop) are evaluated per program and averaged over the grid.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional

_ARG = re.compile(r"%([A-Za-z_][\w]*)\s*:\s*(i32|i64|i1)\b")
_CONST = re.compile(r"^%([\w]+) = arith\.constant (-?\d+) : (i32|i64)\b")
_BINARY = re.compile(r"^%([\w]+) = arith\.(addi|subi|muli|divsi|divui|ceildivsi|remsi|remui|maxsi|minsi|maxui|minui)"
                     r" %([\w]+), %([\w]+) : (i32|i64)\b")
_CAST = re.compile(r"^%([\w]+) = arith\.(extsi|extui|trunci|index_cast) %([\w]+) : (i32|i64)\b")
_PID = re.compile(r"^%([\w]+) = tt\.get_program_id (x|y|z) : i32")
_NPROG = re.compile(r"^%([\w]+) = tt\.get_num_programs (x|y|z) : i32")
_FOR = re.compile(r"scf\.for %[\w]+ = %([\w]+) to %([\w]+) step %([\w]+)")


@dataclass
class IrLoop:
    bounds: tuple                    # names of (lower, upper, step)
    children: List["IrLoop"] = field(default_factory=list)
    static: bool = False             # all bounds are constants: the compiler may unroll it
    trips: float = 0.0               # per execution of the enclosing loop (mean over programs)

    def walk(self):
        yield self
        for child in self.children:
            yield from child.walk()


def _ops(expression: str, a: int, b: int) -> int:
    if expression in ("divsi", "divui"):
        return int(a / b) if b else 0
    if expression == "ceildivsi":
        return -(-a // b) if b else 0
    if expression in ("remsi", "remui"):
        return a - b * int(a / b) if b else 0
    return {"addi": a + b, "subi": a - b, "muli": a * b, "maxsi": max(a, b), "minsi": min(a, b),
            "maxui": max(a, b), "minui": min(a, b)}[expression]


def loop_tree(ttir: str) -> tuple:
    """Parse the loops and the scalar integer definitions; returns (roots, definitions, argument names)."""
    lines = ttir.splitlines()
    arguments: List[str] = []
    definitions: List[tuple] = []
    roots: List[IrLoop] = []
    stack: List[tuple] = []          # (indent, loop)
    for line in lines:
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if stripped.startswith("tt.func"):
            arguments = [name for name, _ in _ARG.findall(stripped.split(")", 1)[0] + ")" + stripped)]
            continue
        if stripped.startswith("}") and stack and stack[-1][0] == indent:
            stack.pop()
            continue
        for pattern, kind in ((_CONST, "const"), (_BINARY, "binary"), (_CAST, "cast"), (_PID, "pid"),
                              (_NPROG, "nprog")):
            match = pattern.match(stripped)
            if match:
                definitions.append((kind, match.groups()))
                break
        loop = _FOR.search(stripped)
        if loop:
            node = IrLoop(loop.groups())
            (stack[-1][1].children if stack else roots).append(node)
            stack.append((indent, node))
    return roots, definitions, arguments


def evaluate(definitions: List[tuple], arguments: Dict[str, int], program: tuple,
             grid: tuple) -> Dict[str, Optional[int]]:
    """Values of the scalar integer definitions for one program of the grid."""
    values: Dict[str, Optional[int]] = dict(arguments)
    for kind, groups in definitions:
        if kind == "const":
            values[groups[0]] = int(groups[1])
        elif kind == "binary":
            name, op, a, b, _ = groups
            left, right = values.get(a), values.get(b)
            values[name] = None if left is None or right is None else _ops(op, left, right)
        elif kind == "cast":
            values[groups[0]] = values.get(groups[2])
        elif kind == "pid":
            values[groups[0]] = program["xyz".index(groups[1])]
        elif kind == "nprog":
            values[groups[0]] = grid["xyz".index(groups[1])]
    return values


def trip_counts(ttir: str, arguments: Dict[str, object], grid: tuple, samples: int = 64) -> List[IrLoop]:
    """The loop tree with ``trips`` filled in, from the launch's integer arguments and grid.

    Loops whose bounds depend on the program id are evaluated on up to ``samples``
    programs spread over the grid, and the mean is taken.
    """
    roots, definitions, names = loop_tree(ttir)
    ints = {name: int(value) for name, value in arguments.items()
            if name in names and isinstance(value, (int, bool)) and not isinstance(value, float)}
    grid = tuple(grid) + (1,) * (3 - len(grid))
    constant_names = {groups[0] for kind, groups in definitions if kind == "const"}
    total = grid[0] * grid[1] * grid[2]
    step = max(1, total // samples)
    programs = []
    for flat in range(0, total, step):
        programs.append((flat % grid[0], (flat // grid[0]) % grid[1], flat // (grid[0] * grid[1])))
    tables = [evaluate(definitions, ints, program, grid) for program in programs[:samples]]
    for root in roots:
        for loop in root.walk():
            loop.static = all(name in constant_names for name in loop.bounds)
            counts = []
            for values in tables:
                lower, upper, stride = (values.get(name) for name in loop.bounds)
                if lower is None or upper is None or not stride:
                    raise ValueError(f"loop bounds {loop.bounds} are not scalar integer arithmetic on the "
                                     "kernel's arguments; the model cannot count its trips")
                counts.append(max(0, -(-(upper - lower) // stride)))
            loop.trips = sum(counts) / len(counts)
    return roots
