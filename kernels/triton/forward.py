"""Fused separable convolution forward: kernels and launcher (no autograd here).

Each kernel is a GEMM over (output pixels x C_out). Its A tile (pixels x a
block of hidden channels) is the depthwise result, computed on the fly from
the input, multiplied by the pointwise weight tile with ``tl.dot`` into an
fp32 accumulator; the pointwise bias is added in the epilogue. The depthwise
intermediate never reaches global memory.

Narrow layers (C_hid and C_out <= 256, Xception's entry flow) run
``narrow_forward_kernel``: one program holds all output channels of its pixel
tile, so each depthwise value is computed once; the channel counts are
compile-time constants and the pixel strides come divided by ``ALIGN``, so
channel runs load and store as 128-bit vectors; a persistent grid walks the
tiles. Wider layers run ``forward_kernel``, which recomputes the depthwise
tile (``common.depthwise_tile``) once per block of BLOCK_CO output channels;
split mode (``split.py``) is the other path for them.
"""

from __future__ import annotations

import contextlib
import os
from typing import Dict, List, Optional, Sequence

import torch
import triton
import triton.language as tl

from ..ops import empty_output, output_shape
from . import AUTOTUNE_ENV, fast_launch, pinned
from .common import (INTERPRET, cast, cdiv, conv_tf32, depthwise_tile, mma, next_power_of_2, row_offsets,
                     split_pixels, vector_width, window_tap)

# Tile configurations per dtype family ("fp32": ieee dot on FMA units, heavier in registers;
# "16bit": fp16/bf16 on tensor cores). The interpreter runs one cheap config; on GPU a short
# list is autotuned per shape. Each GPU config compiles without register spills for sm_80 and
# sm_90 (tests/test_triton.py::test_aot_compiles_without_spills, kernels/triton/aot_report.py).
GPU_CONFIGS = {
    "16bit": [
        triton.Config({"BLOCK_P": 64, "BLOCK_CO": 64, "BLOCK_K": 32}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_P": 128, "BLOCK_CO": 64, "BLOCK_K": 32}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_P": 64, "BLOCK_CO": 128, "BLOCK_K": 32}, num_warps=8, num_stages=2),
    ],
    "fp32": [
        triton.Config({"BLOCK_P": 64, "BLOCK_CO": 64, "BLOCK_K": 16}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_P": 128, "BLOCK_CO": 64, "BLOCK_K": 16}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_P": 64, "BLOCK_CO": 128, "BLOCK_K": 16}, num_warps=8, num_stages=2),
    ],
}
INTERPRET_CONFIGS = [triton.Config({"BLOCK_P": 32, "BLOCK_CO": 32, "BLOCK_K": 16}, num_warps=4, num_stages=1)]


def family(dtype: torch.dtype) -> str:
    """The config family of a dtype: "fp32" (fp32 and fp64) or "16bit"."""
    return "fp32" if dtype in (torch.float32, torch.float64) else "16bit"


def configs_for(gpu_configs: dict, interpret_configs: list, dtype_family: str) -> list:
    return interpret_configs if INTERPRET else gpu_configs[dtype_family]


AUTOTUNE_KEY = ["P", "C_HID", "C_OUT", "KH", "KW", "M"]


@triton.jit
def forward_kernel(
    # pointers
    x_ptr, dw_ptr, dwb_ptr, pw_ptr, pwb_ptr, out_ptr,
    # sizes
    P, C_HID, C_OUT, H, W, OH, OW, M,
    # strides (elements)
    x_sn, x_sc, x_sh, x_sw,
    o_sn, o_sc, o_sh, o_sw,
    # geometry
    stride_h, stride_w, pad_top, pad_left, dil_h, dil_w,
    # meta-parameters
    KH: tl.constexpr, KW: tl.constexpr, HAS_DW_BIAS: tl.constexpr, HAS_PW_BIAS: tl.constexpr,
    RELU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr,
    UNROLL_TAPS: tl.constexpr = False, TF32: tl.constexpr = False,
):
    """out[p, co] = sum_j depthwise(x)[p, j] * pw[co, j] + pw_bias[co].

    x: (N, C, H, W) any strides; dw: (C*M, KH*KW) contiguous; pw: (C_OUT, C_HID) contiguous;
    out: (N, C_OUT, OH, OW) any strides. Grid: (cdiv(P, BLOCK_P), cdiv(C_OUT, BLOCK_CO)).
    """
    pid_p = tl.program_id(0)
    pid_co = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < P
    n, oh, ow = split_pixels(offs_p, OH, OW)
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_mask = offs_co < C_OUT

    acc = tl.zeros((BLOCK_P, BLOCK_CO), dtype=tl.float32)
    for k0 in range(0, C_HID, BLOCK_K):
        j = k0 + tl.arange(0, BLOCK_K)
        j_mask = j < C_HID
        a = depthwise_tile(x_ptr, dw_ptr, dwb_ptr, n, oh, ow, p_mask, j, j_mask, H, W, M,
                           x_sn, x_sc, x_sh, x_sw, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w,
                           KH, KW, HAS_DW_BIAS, RELU, BLOCK_P, BLOCK_K, UNROLL_TAPS)
        wt = tl.load(pw_ptr + offs_co[None, :] * C_HID + j[:, None],
                     mask=j_mask[:, None] & co_mask[None, :], other=0.0)  # (BLOCK_K, BLOCK_CO)
        acc = mma(cast(a, wt.dtype), wt, acc, TF32)

    if HAS_PW_BIAS:
        acc += tl.load(pwb_ptr + offs_co, mask=co_mask, other=0.0).to(tl.float32)[None, :]
    out_offs = row_offsets(n, oh, ow, o_sn, o_sh, o_sw)[:, None] + offs_co[None, :].to(tl.int64) * o_sc
    tl.store(out_ptr + out_offs, cast(acc, out_ptr.dtype.element_ty), mask=p_mask[:, None] & co_mask[None, :])


forward_autotuned = {name: triton.autotune(configs=configs_for(GPU_CONFIGS, INTERPRET_CONFIGS, name),
                                           key=AUTOTUNE_KEY)(forward_kernel) for name in GPU_CONFIGS}


# The narrow-layer forward (C_hid <= 256 and C_out <= 256): one program per pixel tile holds all its
# output channels, so each depthwise value is computed once. Untimed guesses; each compiles without
# spills at the entry-flow layers (kernels/triton/aot_report.py). One pipeline stage: a second one
# stages the loads through shared memory and spills at C_out = 256.
NARROW_MAX_CHANNELS = 256
NARROW_CONFIGS = {
    "16bit": [
        triton.Config({"BLOCK_P": 64, "BLOCK_K": 32}, num_warps=8, num_stages=1),
        triton.Config({"BLOCK_P": 64, "BLOCK_K": 16}, num_warps=8, num_stages=1),
    ],
    # K = 16: Triton 3.6 refuses a tl.dot with K < 16 (the K = 8 tiles used before failed to compile there).
    # This is the one tile found that compiles without spills under both Triton 3.6 and 3.9 at 64->128@147
    # and 128->256@74 (with 64 or 32 pixels, on 4 or 8 warps, one version or the other spilled).
    "fp32": [
        triton.Config({"BLOCK_P": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1),
    ],
}
NARROW_CONFIGS_INTERPRET = [triton.Config({"BLOCK_P": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1)]


@triton.jit
def narrow_forward_kernel(
    # pointers
    x_ptr, dw_ptr, dwb_ptr, pw_ptr, pwb_ptr, out_ptr,
    # sizes
    P, H, W, OH, OW, M,
    # strides (elements; the ``_a`` ones divided by ALIGN)
    x_sn_a, x_sc, x_sh_a, x_sw_a,
    o_sn_a, o_sc, o_sh_a, o_sw_a,
    # geometry
    stride_h, stride_w, pad_top, pad_left, dil_h, dil_w,
    # meta-parameters
    C_HID: tl.constexpr, C_OUT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_DW_BIAS: tl.constexpr,
    HAS_PW_BIAS: tl.constexpr, RELU: tl.constexpr, ALIGN: tl.constexpr, TF32: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_CO: tl.constexpr,
):
    """out[p, co] = sum_j depthwise(x)[p, j] * pw[j, co] + pw_bias[co], all C_OUT channels per program.

    x: (N, C, H, W) any strides; dw: (KH*KW, C_HID) and pw: (C_HID, C_OUT) contiguous (transposed, so
    that channel runs are vectors); out: (N, C_OUT, OH, OW) any strides. BLOCK_CO >= C_OUT.
    Grid: (programs,), persistent: program g takes pixel tiles g, g + programs, ...
    """
    x_sh = x_sh_a * ALIGN
    x_sw = x_sw_a * ALIGN
    o_sh = o_sh_a * ALIGN
    o_sw = o_sw_a * ALIGN
    co = tl.arange(0, BLOCK_CO)
    co_mask = co < C_OUT
    kk = tl.arange(0, BLOCK_K)
    if HAS_PW_BIAS:
        pw_bias = tl.load(pwb_ptr + co, mask=co_mask, other=0.0).to(tl.float32)
    o_col = co.to(tl.int64) * o_sc
    for tile in range(tl.program_id(0), tl.cdiv(P, BLOCK_P), tl.num_programs(0)):
        offs_p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = offs_p < P
        n, oh, ow = split_pixels(offs_p, OH, OW)
        ih0 = oh * stride_h - pad_top
        iw0 = ow * stride_w - pad_left
        corner = row_offsets(n, ih0, iw0, x_sn_a * ALIGN, x_sh, x_sw)
        acc = tl.zeros((BLOCK_P, BLOCK_CO), dtype=tl.float32)
        for k0 in tl.range(0, C_HID, BLOCK_K):
            j = k0 + kk
            j_mask = j < C_HID
            col = (j // M).to(tl.int64) * x_sc
            a = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float32)
            for tap in tl.static_range(KH * KW):
                xv = window_tap(x_ptr, corner, ih0, iw0, p_mask, col, j_mask, H, W, x_sh, x_sw, dil_h, dil_w, tap,
                                KW, tl.float32, RELU)
                a += xv * tl.load(dw_ptr + tap * C_HID + j, mask=j_mask, other=0.0).to(tl.float32)[None, :]
            if HAS_DW_BIAS:
                a += tl.load(dwb_ptr + j, mask=j_mask, other=0.0).to(tl.float32)[None, :]
            wt = tl.load(pw_ptr + j[:, None] * C_OUT + co[None, :], mask=j_mask[:, None] & co_mask[None, :],
                         other=0.0)  # (BLOCK_K, BLOCK_CO)
            acc = mma(cast(a, wt.dtype), wt, acc, TF32)
        if HAS_PW_BIAS:
            acc += pw_bias[None, :]
        out_offs = row_offsets(n, oh, ow, o_sn_a * ALIGN, o_sh, o_sw)[:, None] + o_col[None, :]
        tl.store(out_ptr + out_offs, cast(acc, out_ptr.dtype.element_ty), mask=p_mask[:, None] & co_mask[None, :])


narrow_autotuned = {name: triton.autotune(configs=configs_for(NARROW_CONFIGS, NARROW_CONFIGS_INTERPRET, name),
                                          key=["P", "C_HID", "C_OUT", "KH", "KW", "M", "ALIGN"])(narrow_forward_kernel)
                    for name in NARROW_CONFIGS}


def is_narrow(c_hid: int, c_out: int, device: torch.device) -> bool:
    """Whether the narrow-layer forward runs: every hidden and output channel of a pixel tile in one program.

    Only on Hopper and later (its tile configs are sized for wgmma; with mma.sync on sm_80 the 16-bit ones
    spill at C_out = 256) and in the interpreter."""
    if c_hid > NARROW_MAX_CHANNELS or c_out > NARROW_MAX_CHANNELS:
        return False
    return device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 9


# The SM count CPU tensors stand for. None in the interpreter (its grid stays small, so the persistent
# loop runs several times); benchmarks.gpu_model sets it to the modelled GPU's count (132 on an H200)
# while it records launches, so the grid it compiles and models is the GPU's.
STAND_IN_MULTIPROCESSORS: Optional[int] = None


def _programs(input: torch.Tensor, tiles_for_smallest_block: int) -> int:
    """Persistent grid size: a few programs per SM (a fixed small count in the interpreter, so its loop runs)."""
    if input.device.type == "cuda":
        per_device = 4 * torch.cuda.get_device_properties(input.device).multi_processor_count
    elif STAND_IN_MULTIPROCESSORS:
        per_device = 4 * STAND_IN_MULTIPROCESSORS
    else:
        per_device = 3
    return max(1, min(per_device, tiles_for_smallest_block))


def narrow_launch(input: torch.Tensor, depthwise_weight: torch.Tensor, pointwise_weight: torch.Tensor,
                  depthwise_bias: Optional[torch.Tensor], pointwise_bias: Optional[torch.Tensor], out: torch.Tensor,
                  stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], relu_input: bool):
    """One ``narrow_forward_kernel`` launch into ``out``: (grid, args, constexprs); ``aot_report`` compiles the same."""
    batch, channels, height, width = input.shape
    c_hid, _, kh, kw = depthwise_weight.shape
    _, c_out, oh, ow = out.shape
    pixels = batch * oh * ow
    dw = depthwise_weight.reshape(c_hid, kh * kw).t().contiguous()
    pw = pointwise_weight.reshape(c_out, c_hid).t().contiguous()
    dwb = depthwise_bias.contiguous() if depthwise_bias is not None else dw
    # fp32: loaded once per program as one value a thread, where a 16-bit one would be a scalar 16-bit load.
    pwb = pointwise_bias.float().contiguous() if pointwise_bias is not None else pw
    x_sn, x_sc, x_sh, x_sw = input.stride()
    o_sn, o_sc, o_sh, o_sw = out.stride()
    align = vector_width(x_sn, x_sh, x_sw, o_sn, o_sh, o_sw)
    programs = _programs(input, cdiv(pixels, 16))

    def grid(meta):
        return (min(programs, cdiv(pixels, meta["BLOCK_P"])),)

    args = (input, dw, dwb, pw, pwb, out, pixels, height, width, oh, ow, c_hid // channels,
            x_sn // align, x_sc, x_sh // align, x_sw // align, o_sn // align, o_sc, o_sh // align, o_sw // align,
            *geometry_args(stride, padding, dilation))
    constexprs = dict(C_HID=c_hid, C_OUT=c_out, KH=kh, KW=kw, HAS_DW_BIAS=depthwise_bias is not None,
                      HAS_PW_BIAS=pointwise_bias is not None, RELU=bool(relu_input), ALIGN=align,
                      TF32=conv_tf32(input), BLOCK_CO=max(16, next_power_of_2(c_out)))
    return grid, args, constexprs


# Tests pin a kernel (its JITFunction) to one config here, to check every GPU config's arithmetic.
forced_configs: Dict[object, triton.Config] = {}


def autotune_enabled() -> bool:
    """False under deterministic algorithms or ``SEPCONV_TRITON_AUTOTUNE=0``: then each kernel runs its first config.

    Autotuned, the winning tile config (and with it the fp32 summation order) can differ
    between processes; a fixed config gives the same bits every run and skips the timing
    runs (and the compiles) of the other configs.
    """
    value = os.environ.get(AUTOTUNE_ENV, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{AUTOTUNE_ENV}={value!r} is not valid; set it to 1 (autotune, the default) or 0 "
                         "(the first tile config of each kernel)")
    return value == "1" and not torch.are_deterministic_algorithms_enabled()


def launch_config(autotuned) -> Optional[triton.Config]:
    """The config a launch of ``autotuned`` runs with, or None to let the autotuner choose: a test's
    ``forced_configs``, else a pin from ``SEPCONV_TRITON_CONFIGS`` (``pinned.py``), else the first config when
    autotuning is off."""
    forced = forced_configs.get(autotuned.fn)
    if forced is not None:
        return forced
    pin = pinned.config_for(autotuned)
    if pin is not None:
        return pin
    if len(autotuned.configs) == 1 or autotune_enabled():
        return None
    return autotuned.configs[0]


def launch(autotuned, grid, *args, **kwargs) -> None:
    """Launch ``autotuned`` over ``grid`` (a function of the launch's named arguments, the config's
    meta-parameters among them), directly where the same signature ran before (``fast_launch.py``)."""
    fast_launch.launch(autotuned, launch_config(autotuned), grid, args, kwargs)


def geometry_args(stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]):
    """The kernels' geometry arguments: stride_h, stride_w, pad_top, pad_left, dil_h, dil_w."""
    return (stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1])


def device_guard(tensor: torch.Tensor):
    """Launch on ``tensor``'s device (a no-op context for CPU tensors in the interpreter)."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


MAX_PIXELS = 2**31 - 2**16


def check_pixels(pixels: int, input: torch.Tensor) -> None:
    """The kernels index pixels in int32 (offsets are int64): N*OH*OW (and N*H*W) must stay below 2**31."""
    if pixels >= MAX_PIXELS or input.shape[0] * input.shape[2] * input.shape[3] >= MAX_PIXELS:
        raise ValueError(f"input of shape {tuple(input.shape)} has too many pixels for the triton backend "
                         f"(N*H*W and N*OH*OW must be < {MAX_PIXELS}); split the batch")


def forward(input: torch.Tensor, depthwise_weight: torch.Tensor, pointwise_weight: torch.Tensor,
            depthwise_bias: Optional[torch.Tensor], pointwise_bias: Optional[torch.Tensor],
            stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], relu_input: bool) -> torch.Tensor:
    """The fused forward of ``sepconv_triton::forward``.

    input: (N, C, H, W) (any strides; channels_last is the fast layout);
    depthwise_weight: (C*M, 1, kh, kw); pointwise_weight: (C_out, C*M, 1, 1);
    biases: (C*M,), (C_out,) or None. Returns (N, C_out, OH, OW) in input's memory format.
    """
    if input.dtype == torch.float64:  # fp64 sums: split mode's kernels (the fused ones sum in fp32)
        from . import split

        return split.forward(input, depthwise_weight, pointwise_weight, depthwise_bias, pointwise_bias, stride,
                             padding, dilation, relu_input)
    shape: List[int] = output_shape(input, depthwise_weight, pointwise_weight, stride, padding, dilation)
    out = empty_output(input, shape)
    batch, c_out, oh, ow = shape
    pixels = batch * oh * ow
    if pixels == 0:
        return out
    check_pixels(pixels, input)
    c_hid, _, kh, kw = depthwise_weight.shape
    if is_narrow(c_hid, c_out, input.device):
        from . import narrow  # imports split, which imports this module

        if narrow.applies(input, c_hid, c_out, stride, dilation):
            with device_guard(input):
                autotuned, grid, args, constexprs = narrow.tiled_launch(
                    input, depthwise_weight, pointwise_weight, depthwise_bias, pointwise_bias, out, stride, padding,
                    dilation, relu_input)
                launch(autotuned, grid, *args, **constexprs)
            return out
        with device_guard(input):
            grid, args, constexprs = narrow_launch(input, depthwise_weight, pointwise_weight, depthwise_bias,
                                                   pointwise_bias, out, stride, padding, dilation, relu_input)
            launch(narrow_autotuned[family(input.dtype)], grid, *args, **constexprs)
        return out
    dw = depthwise_weight.reshape(c_hid, kh * kw).contiguous()
    pw = pointwise_weight.reshape(c_out, c_hid).contiguous()
    dwb = depthwise_bias.contiguous() if depthwise_bias is not None else dw
    pwb = pointwise_bias.contiguous() if pointwise_bias is not None else pw

    def grid(meta):
        return (cdiv(pixels, meta["BLOCK_P"]), cdiv(c_out, meta["BLOCK_CO"]))

    with device_guard(input):
        launch(
            forward_autotuned[family(input.dtype)], grid,
            input, dw, dwb, pw, pwb, out,
            pixels, c_hid, c_out, input.shape[2], input.shape[3], oh, ow, c_hid // input.shape[1],
            *input.stride(), *out.stride(),
            *geometry_args(stride, padding, dilation),
            KH=kh, KW=kw, HAS_DW_BIAS=depthwise_bias is not None, HAS_PW_BIAS=pointwise_bias is not None,
            RELU=bool(relu_input), TF32=conv_tf32(input),
        )
    return out
