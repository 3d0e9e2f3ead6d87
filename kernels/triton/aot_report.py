"""Ahead-of-time compile every Triton kernel for every tile config; report registers and spills.

No GPU is needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``
builds PTX and a cubin with Triton's bundled ``ptxas``, whose ``-v`` log gives
registers, spill stores/loads per kernel. Run::

    TRITON_INTERPRET=0 python -m kernels.triton.aot_report [--targets 90,80] [--dtypes bf16,fp32] [--json PATH]

It prints one row per (kernel, config, dtype, target) and exits non-zero when
any compile fails or spills. ``tests/test_triton.py`` runs it in a subprocess
(the kernels must be imported with ``TRITON_INTERPRET`` unset).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

# One representative geometry: Xception's 3x3 kernels, both biases, relu_input on.
KERNEL_SIZE = (3, 3)


@dataclass
class Row:
    kernel: str
    config: str
    dtype: str
    target: str
    registers: Optional[int] = None
    spill_stores: Optional[int] = None
    spill_loads: Optional[int] = None
    shared_bytes: Optional[int] = None
    compile_s: float = 0.0
    error: str = ""


def kernel_specs() -> Dict[str, dict]:
    """name -> the JIT function, its pointer args (fp32 ones), the non-tile constexprs and its GPU configs."""
    from . import backward, forward, split

    kh, kw = KERNEL_SIZE
    return {
        "forward": dict(fn=forward.forward_kernel, fp32_ptrs=(), configs=forward.GPU_CONFIGS,
                        consts=dict(KH=kh, KW=kw, HAS_DW_BIAS=True, HAS_PW_BIAS=True, RELU=True)),
        "grad_hidden": dict(fn=backward.grad_hidden_kernel, fp32_ptrs=("gh_ptr", "part_ptr"),
                            configs=backward.GRAD_HIDDEN_CONFIGS_GPU,
                            consts=dict(KH=kh, KW=kw, RELU=True, STORE_GH=True, NEED_DW=True)),
        "grad_input": dict(fn=backward.grad_input_kernel, fp32_ptrs=("gh_ptr",),
                           configs=backward.GRAD_INPUT_CONFIGS_GPU, consts=dict(KH=kh, KW=kw, RELU=True)),
        "depthwise": dict(fn=split.depthwise_kernel, fp32_ptrs=(), configs=split.GPU_CONFIGS,
                          consts=dict(KH=kh, KW=kw, HAS_DW_BIAS=True, RELU=True)),
        "grad_hidden_load": dict(fn=backward.grad_hidden_kernel, fp32_ptrs=("part_ptr",),
                                 configs=backward.GRAD_HIDDEN_CONFIGS_GPU,
                                 consts=dict(KH=kh, KW=kw, RELU=True, STORE_GH=False, NEED_DW=True, LOAD_GH=True)),
        "grad_pointwise": dict(fn=backward.grad_pointwise_kernel, fp32_ptrs=("part_w_ptr", "part_b_ptr"),
                               configs=backward.GRAD_POINTWISE_CONFIGS_GPU,
                               consts=dict(KH=kh, KW=kw, HAS_DW_BIAS=True, RELU=True)),
    }


def config_name(config) -> str:
    tiles = ",".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{tiles},warps={config.num_warps},stages={config.num_stages}"


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def _bundled_ptxas() -> Optional[str]:
    import triton

    root = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for name in ("ptxas-blackwell", "ptxas"):
        if (root / name).exists():
            return str(root / name)
    return None


def _parse_ptxas(log: str, row: Row) -> None:
    for field, pattern in _PTXAS_RE.items():
        found = pattern.findall(log)
        if found:
            setattr(row, field, max(int(v) for v in found))


def compile_one(name: str, config_index, dtype: str, capability: int) -> Row:
    """Compile one kernel/config/dtype for ``sm_<capability>``; fill registers/spills from ptxas -v."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = kernel_specs()[name]
    fn = spec["fn"]
    kind = "fp32" if dtype == "fp32" else "16bit"
    config = spec["configs"][kind][config_index] if isinstance(config_index, int) else config_index
    row = Row(name, config_name(config), dtype, f"sm_{capability}")
    # Meta-parameters with defaults (e.g. UNROLL_TAPS) take them, as a launch that omits them does.
    defaults = {param.name: param.default for param in fn.params if param.is_constexpr and param.has_default}
    constexprs = {**defaults, **spec["consts"], **config.kwargs}
    signature, attrs = {}, {}
    for index, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = "*fp32" if arg in spec["fp32_ptrs"] else f"*{dtype}"
            attrs[(index,)] = [["tt.divisibility", 16]]  # what the runtime specializes for aligned tensors
        else:
            signature[arg] = "i32"
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    start = time.perf_counter()
    log = io.StringIO()
    previous = os.environ.get("TRITON_DUMP_PTXAS_LOG")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                      target=GPUTarget("cuda", capability, 32), options=options)
    except Exception as error:  # noqa: BLE001 - reported per row
        row.error = f"{type(error).__name__}: {str(error)[:500]}"
        return row
    finally:
        if previous is None:
            os.environ.pop("TRITON_DUMP_PTXAS_LOG", None)
        else:
            os.environ["TRITON_DUMP_PTXAS_LOG"] = previous
    row.compile_s = round(time.perf_counter() - start, 2)
    row.shared_bytes = int(compiled.metadata.shared)
    _parse_ptxas(log.getvalue(), row)
    if row.registers is None:  # older Triton without the log knob: run the bundled ptxas ourselves
        _parse_ptxas(_run_ptxas(compiled.asm["ptx"], capability), row)
    if row.registers is None:
        row.error = "no ptxas -v output"
    return row


def _run_ptxas(ptx: str, capability: int) -> str:
    ptxas = _bundled_ptxas()
    if ptxas is None:
        return ""
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(ptx)
        result = subprocess.run([ptxas, "-v", f"-arch={arch}", str(path), "-o", os.devnull],
                                capture_output=True, text=True)
    return result.stdout + result.stderr


def _job(args) -> Row:
    return compile_one(*args)


def report(names: Sequence[str], dtypes: Sequence[str], capabilities: Sequence[int], jobs: int = 2) -> List[Row]:
    """Compile every (kernel, config, dtype, target); rows in a fixed order."""
    specs = kernel_specs()
    work = [(name, index, dtype, cc) for name in names for dtype in dtypes
            for index in range(len(specs[name]["configs"]["fp32" if dtype == "fp32" else "16bit"]))
            for cc in capabilities]
    if jobs <= 1:
        return [compile_one(*w) for w in work]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_job, work))


def format_rows(rows: Sequence[Row]) -> str:
    header = f"{'kernel':<15} {'config':<48} {'dtype':<5} {'target':<6} {'regs':>4} {'spill st/ld':>12} {'smem':>7} {'s':>5}"
    lines = [header, "-" * len(header)]
    for r in rows:
        spills = f"{r.spill_stores}/{r.spill_loads}" if r.registers is not None else "-"
        lines.append(f"{r.kernel:<15} {r.config:<48} {r.dtype:<5} {r.target:<6} {r.registers or '-':>4} "
                     f"{spills:>12} {r.shared_bytes if r.shared_bytes is not None else '-':>7} {r.compile_s:>5}"
                     + (f"  ERROR {r.error}" if r.error else ""))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter cannot compile kernels", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", default=",".join(kernel_specs()))
    parser.add_argument("--dtypes", default="bf16,fp32", help="pointer element types, e.g. bf16,fp16,fp32")
    parser.add_argument("--targets", default="90,80", help="compute capabilities, e.g. 90,80")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--use-cache", action="store_true",
                        help="reuse Triton's cache (cache hits skip Triton's own ptxas run; the bundled ptxas "
                             "is then run on the PTX, without Triton's extra ptxas flags)")
    args = parser.parse_args(argv)
    if not args.use_cache:
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="sepconv-aot-")
    names = [n for n in args.kernels.split(",") if n]
    unknown = set(names) - set(kernel_specs())
    if unknown:
        parser.error(f"--kernels: unknown {sorted(unknown)}; choose from {list(kernel_specs())}")
    rows = report(names, args.dtypes.split(","), [int(t) for t in args.targets.split(",")], args.jobs)
    print(format_rows(rows))
    if args.json:
        target = Path(args.json)
        tmp = target.with_suffix(target.suffix + ".tmp")
        tmp.write_text(json.dumps([asdict(r) for r in rows], indent=1))
        tmp.replace(target)
    bad = [r for r in rows if r.error or r.spill_stores or r.spill_loads]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
