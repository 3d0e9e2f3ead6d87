"""Ahead-of-time compile every Triton kernel for every tile config; report registers and spills.

No GPU is needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``
builds PTX and a cubin with Triton's bundled ``ptxas``, whose ``-v`` log gives
registers, spill stores/loads per kernel. Kernels with a launch builder (the split
path's) are compiled as the runtime launches them at Xception layer shapes (batch 32,
channels_last): their launcher builds the arguments from CPU tensors of that shape and
Triton's own runtime binder specializes them (ints equal to 1 become constants, multiples
of 16 and aligned pointers get divisibility hints); the bundled ``nvdisasm`` then gives
the width of every global load. Run::

    TRITON_INTERPRET=0 python -m kernels.triton.aot_report [--targets 90,80] [--dtypes bf16,fp32] [--json PATH]

It prints one row per (kernel, config, dtype, target[, layer]) and exits non-zero
when any compile fails or spills, or when a shaped compile loads 16-bit values one
at a time (``LDG.E.U16``: a channel count that is a multiple of 8 must give vectors;
a kernel that reads some 16-bit weights once a program, outside its loops, says so in
its spec and must still show vector loads).
``tests/test_triton.py`` runs it in a subprocess (the kernels must be imported with
``TRITON_INTERPRET`` unset).
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

from . import environ

# One representative geometry: Xception's 3x3 kernels, both biases, relu_input on.
KERNEL_SIZE = (3, 3)
# Layers (C_in, C_out, H = W) that launch builders compile at, batch 32, channels_last, stride 1.
LAYERS = ((728, 728, 19), (128, 256, 74))
NARROW_LAYERS = ((128, 256, 74), (64, 128, 147))  # the narrow-layer forward runs only where C <= 256
# The tiled narrow forward (16-bit only), at the layer of each hidden width its configs are for.
TILED_LAYERS = {64: ((64, 128, 147),), 128: ((128, 128, 147),)}
BATCH = 32
_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}


@dataclass
class Row:
    kernel: str
    config: str
    dtype: str
    target: str
    layer: str = ""
    registers: Optional[int] = None
    spill_stores: Optional[int] = None
    spill_loads: Optional[int] = None
    shared_bytes: Optional[int] = None
    compile_s: float = 0.0
    global_loads: str = ""  # SASS global-load opcodes and counts (shaped compiles)
    scalar_16bit_loads: int = 0
    error: str = ""


def layer_tensors(dtype: str, layer) -> dict:
    """Unfilled CPU tensors of one Xception layer (batch 32, channels_last, 3x3, both biases)."""
    import torch

    c_in, c_out, size = layer
    kind = getattr(torch, _DTYPES[dtype])
    kh, kw = KERNEL_SIZE
    return dict(
        input=torch.empty((BATCH, c_in, size, size), dtype=kind).contiguous(memory_format=torch.channels_last),
        grad_output=torch.empty((BATCH, c_out, size, size), dtype=kind).contiguous(memory_format=torch.channels_last),
        depthwise_weight=torch.empty((c_in, 1, kh, kw), dtype=kind), depthwise_bias=torch.empty(c_in, dtype=kind),
        pointwise_weight=torch.empty((c_out, c_in, 1, 1), dtype=kind), pointwise_bias=torch.empty(c_out, dtype=kind),
        geometry=dict(stride=(1, 1), padding=(kh // 2,) * 4, dilation=(1, 1)), out_hw=(size, size),
    )


def _depthwise_launch(dtype: str, layer):
    from . import split

    t = layer_tensors(dtype, layer)
    g = t["geometry"]
    _, _, args, constexprs = split.depthwise_launch(t["input"], t["depthwise_weight"], t["depthwise_bias"],
                                                    t["out_hw"], g["stride"], g["padding"], g["dilation"], True)
    return args, constexprs


def _transposed_launch(dtype: str, layer):
    import torch

    from . import split

    t = layer_tensors(dtype, layer)
    g = t["geometry"]
    x = t["input"]
    pixels = x.shape[0] * t["out_hw"][0] * t["out_hw"][1]
    grad_hidden = torch.empty((pixels, x.shape[1]), dtype=x.dtype)
    grad_input = torch.empty_like(x)
    _, _, args, constexprs = split.transposed_depthwise_launch(
        grad_hidden, x, t["depthwise_weight"], grad_input, t["out_hw"], g["stride"], g["padding"], g["dilation"],
        True, True, True, True)
    return args, constexprs


def _fused_narrow_launch(builder, dtype: str, layer):
    """(args, constexprs) of a fused narrow-layer forward launch built by ``builder`` (narrow_launch's signature,
    its launch description ending in args, constexprs) at ``layer``."""
    import torch

    from ..ops import empty_output

    t = layer_tensors(dtype, layer)
    g = t["geometry"]
    x = t["input"]
    out = empty_output(x, [x.shape[0], t["pointwise_weight"].shape[0], *t["out_hw"]])
    *_, args, constexprs = builder(x, t["depthwise_weight"], t["pointwise_weight"], t["depthwise_bias"],
                                   t["pointwise_bias"], out, g["stride"], g["padding"], g["dilation"], True)
    # On a GPU an fp32 launch takes TF32 from PyTorch's cuDNN setting (on by default); these are CPU tensors.
    constexprs["TF32"] = dtype == "fp32" and bool(torch.backends.cudnn.allow_tf32)
    return args, constexprs


def _narrow_launch(dtype: str, layer):
    from . import forward

    return _fused_narrow_launch(forward.narrow_launch, dtype, layer)


def _tiled_launch(dtype: str, layer):
    from . import narrow

    return _fused_narrow_launch(narrow.tiled_launch, dtype, layer)


def kernel_specs() -> Dict[str, dict]:
    """name -> the JIT function, its GPU configs, and either a launch builder ``launch(dtype, layer) -> (args,
    constexprs)`` (compiled per layer with the runtime's specialization; ``layers`` and ``targets``, where
    given, restrict where) or its pointer args (fp32 ones) and non-tile constexprs (compiled once, generic).
    ``prologue_16bit_loads``: the kernel loads some 16-bit values one at a time once a program, outside its loops
    (reported, not a failure; its rows must still show vector loads)."""
    from . import backward, forward, narrow, split

    kh, kw = KERNEL_SIZE
    # The tiled narrow forward and split mode's two depthwise kernels read the depthwise weight in the module's
    # (C, KH*KW) layout, once a program: rows of KH*KW 16-bit values, loaded one at a time before the loops (no
    # transposed copy, no extra launch). Their loops' loads are checked by ``python -m benchmarks.gpu_model --check``.
    tiled = {f"narrow_tiled_{width}": dict(fn=narrow.narrow_tiled_kernel, configs={"16bit": configs, "fp32": []},
                                           launch=_tiled_launch, layers=TILED_LAYERS[width], targets=(90,),
                                           prologue_16bit_loads=True)
             for width, configs in narrow.TILED_CONFIGS.items()}
    return {
        "forward": dict(fn=forward.forward_kernel, fp32_ptrs=(), configs=forward.GPU_CONFIGS,
                        consts=dict(KH=kh, KW=kw, HAS_DW_BIAS=True, HAS_PW_BIAS=True, RELU=True)),
        "grad_hidden": dict(fn=backward.grad_hidden_kernel, fp32_ptrs=("gh_ptr", "part_ptr"),
                            configs=backward.GRAD_HIDDEN_CONFIGS_GPU,
                            consts=dict(KH=kh, KW=kw, RELU=True, STORE_GH=True, NEED_DW=True)),
        "grad_input": dict(fn=backward.grad_input_kernel, fp32_ptrs=("gh_ptr",),
                           configs=backward.GRAD_INPUT_CONFIGS_GPU, consts=dict(KH=kh, KW=kw, RELU=True)),
        "depthwise": dict(fn=split.depthwise_kernel, configs=split.GPU_CONFIGS, launch=_depthwise_launch,
                          prologue_16bit_loads=True),
        "narrow_forward": dict(fn=forward.narrow_forward_kernel, configs=forward.NARROW_CONFIGS,
                               launch=_narrow_launch, layers=NARROW_LAYERS, targets=(90,)),
        **tiled,
        "transposed_depthwise": dict(fn=split.transposed_depthwise_kernel, configs=split.TRANSPOSED_CONFIGS,
                                     launch=_transposed_launch, prologue_16bit_loads=True),
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


def _generic_signature(fn, spec: dict, dtype: str, constexprs: dict):
    """Signature and attributes without a launch: i32 sizes, no hints but aligned pointers."""
    signature, attrs = {}, {}
    for index, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = "*fp32" if arg in spec["fp32_ptrs"] else f"*{dtype}"
            attrs[(index,)] = [["tt.divisibility", 16]]  # what the runtime specializes for aligned tensors
        else:
            signature[arg] = "i32"
    return signature, attrs


def runtime_specialization(fn, args: Sequence, kwargs: dict, capability: int):
    """(signature, constexprs, attrs, options) exactly as Triton's runtime binds ``fn[grid](*args, **kwargs)``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", capability, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options


_LDG_RE = re.compile(r"\b((?:LDG|LDGSTS)\.E[.\w]*)")


def global_loads(cubin: bytes) -> Dict[str, int]:
    """Opcode -> count of the global loads (``LDG``, and ``LDGSTS``: global to shared) in a cubin's SASS."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run([str(tool), "-c", str(path)], capture_output=True, text=True, check=True).stdout
    counts: Dict[str, int] = {}
    for opcode in _LDG_RE.findall(sass):
        counts[opcode] = counts.get(opcode, 0) + 1
    return counts


def vector_loads(global_loads: str) -> bool:
    """Whether a row's SASS global loads (``Row.global_loads``) include 64- or 128-bit ones."""
    return any(op.split(":")[0].endswith((".64", ".128")) for op in global_loads.split())


def compile_one(name: str, config_index, dtype: str, capability: int, layer=None) -> Row:
    """Compile one kernel/config/dtype for ``sm_<capability>`` (at ``layer`` for launch-built kernels)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = kernel_specs()[name]
    fn = spec["fn"]
    kind = "fp32" if dtype in ("fp32", "fp64") else "16bit"
    config = spec["configs"][kind][config_index] if isinstance(config_index, int) else config_index
    row = Row(name, config_name(config), dtype, f"sm_{capability}",
              layer="{}->{}@{}".format(*layer) if layer else "")
    launch_options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    try:
        if "launch" in spec:
            args, constexprs = spec["launch"](dtype, layer)
            signature, constexprs, attrs, options = runtime_specialization(
                fn, args, {**constexprs, **config.kwargs, **launch_options}, capability)
            options = {k: v for k, v in options.__dict__.items() if k in ("num_warps", "num_stages", "num_ctas")}
        else:
            # Meta-parameters with defaults (e.g. UNROLL_TAPS) take them, as a launch that omits them does.
            defaults = {param.name: param.default for param in fn.params if param.is_constexpr and param.has_default}
            constexprs = {**defaults, **spec["consts"], **config.kwargs}
            signature, attrs = _generic_signature(fn, spec, dtype, constexprs)
            options = launch_options
    except Exception as error:  # noqa: BLE001 - reported per row
        row.error = f"{type(error).__name__}: {str(error)[:500]}"
        return row
    start = time.perf_counter()
    log = io.StringIO()
    try:
        with environ("TRITON_DUMP_PTXAS_LOG", "1"), contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                      target=GPUTarget("cuda", capability, 32), options=options)
    except Exception as error:  # noqa: BLE001 - reported per row
        row.error = f"{type(error).__name__}: {str(error)[:500]}"
        return row
    row.compile_s = round(time.perf_counter() - start, 2)
    row.shared_bytes = int(compiled.metadata.shared)
    _parse_ptxas(log.getvalue(), row)
    if row.registers is None:  # older Triton without the log knob: run the bundled ptxas ourselves
        _parse_ptxas(_run_ptxas(compiled.asm["ptx"], capability), row)
    if row.registers is None:
        row.error = "no ptxas -v output"
    if layer is not None:
        loads = global_loads(compiled.asm["cubin"])
        row.global_loads = " ".join(f"{op}:{count}" for op, count in sorted(loads.items()))
        row.scalar_16bit_loads = sum(count for op, count in loads.items() if op.endswith(("U16", "S16", ".16")))
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


def layers_of(spec: dict) -> tuple:
    """The layers a spec compiles at: (None,) for a generic compile."""
    return spec.get("layers", LAYERS) if "launch" in spec else (None,)


def report(names: Sequence[str], dtypes: Sequence[str], capabilities: Sequence[int], jobs: int = 2) -> List[Row]:
    """Compile every (kernel, config, dtype, target); rows in a fixed order."""
    specs = kernel_specs()
    work = [(name, index, dtype, cc, layer) for name in names for dtype in dtypes
            for index in range(len(specs[name]["configs"]["fp32" if dtype in ("fp32", "fp64") else "16bit"]))
            for cc in capabilities if cc in specs[name].get("targets", capabilities)
            for layer in layers_of(specs[name])]
    if jobs <= 1:
        return [compile_one(*w) for w in work]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_job, work))


def format_rows(rows: Sequence[Row]) -> str:
    header = (f"{'kernel':<17} {'config':<48} {'dtype':<5} {'target':<6} {'layer':<13} {'regs':>4} "
              f"{'spill st/ld':>12} {'smem':>7} {'s':>5}  global loads")
    lines = [header, "-" * len(header)]
    for r in rows:
        spills = f"{r.spill_stores}/{r.spill_loads}" if r.registers is not None else "-"
        lines.append(f"{r.kernel:<17} {r.config:<48} {r.dtype:<5} {r.target:<6} {r.layer:<13} {r.registers or '-':>4} "
                     f"{spills:>12} {r.shared_bytes if r.shared_bytes is not None else '-':>7} {r.compile_s:>5}  "
                     f"{r.global_loads}" + (f"  ERROR {r.error}" if r.error else ""))
    return "\n".join(lines)


@contextlib.contextmanager
def _fresh_triton_cache(fresh: bool):
    """A Triton cache of its own for the compiles (so each runs Triton's ptxas), removed afterwards with the
    caller's TRITON_CACHE_DIR restored: every kernel x config x dtype x target left ~120 MB behind in /tmp."""
    if not fresh:
        yield
        return
    with tempfile.TemporaryDirectory(prefix="sepconv-aot-") as cache, environ("TRITON_CACHE_DIR", cache):
        yield


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
    names = [n for n in args.kernels.split(",") if n]
    unknown = set(names) - set(kernel_specs())
    if unknown:
        parser.error(f"--kernels: unknown {sorted(unknown)}; choose from {list(kernel_specs())}")
    with _fresh_triton_cache(not args.use_cache):
        rows = report(names, args.dtypes.split(","), [int(t) for t in args.targets.split(",")], args.jobs)
    print(format_rows(rows))
    if args.json:
        target = Path(args.json)
        tmp = target.with_suffix(target.suffix + ".tmp")
        tmp.write_text(json.dumps([asdict(r) for r in rows], indent=1))
        tmp.replace(target)
    specs = kernel_specs()

    def scalar_loads_bad(row: Row) -> bool:
        if specs[row.kernel].get("prologue_16bit_loads"):
            return bool(row.layer) and not vector_loads(row.global_loads)
        return bool(row.scalar_16bit_loads)

    bad = [r for r in rows if r.error or r.spill_stores or r.spill_loads or scalar_loads_bad(r)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
