"""The narrow-layer fused forward with input reuse: ``narrow_tiled_kernel`` and its launcher (no autograd).

``forward.narrow_forward_kernel`` computes the depthwise result of a pixel tile tap by tap (nine
gathers a pixel for 3x3) inside the pointwise GEMM's K loop. For 16-bit inputs with a vertical
stride and dilation of 1 and all hidden channels in one tile (C_hid <= 64, or C_hid <= 128 with
C_out <= 128: Xception's 64->128@147 and 128->128@147), this kernel walks columns of output
pixels instead. A program slot is ROWS x COLS output pixels; BLOCK_P slots side by side walk down
their input rows in a runtime loop, each input row loaded once (as in ``split._depthwise_tiles``)
for the KH output rows that use it, and with a horizontal stride and dilation of 1 each input
column once for the KW output columns that use it. The loop carries KH rows of partial depthwise
sums, all hidden channels wide. When an output row of the slots has all its taps, each of its
(BLOCK_P, C_hid) depthwise tiles goes through one ``tl.dot`` with the whole pointwise weight and
the (BLOCK_P, C_out) result is stored: nothing intermediate reaches memory, no accumulator
outlives its row, and the registers do not grow with ROWS. The weights are read once a program
(the pointwise one stays in shared memory as the dot's operand); a persistent grid walks the
slot tiles.

Two register budgets (the static model's census for sm_90): at C_hid <= 64, 64-pixel tiles (wgmma's
M for a warpgroup) fit with the next input row's loads issued before the current row's arithmetic
(PREFETCH). At C_hid = 128 they spill at every setting tried; 16-pixel tiles (mma.sync) fit with
the taps' weights kept 16-bit and widened where they are used (PACKED). fp32, C_out = 256 with
more than 64 hidden channels, and other geometries keep ``forward.narrow_forward_kernel``
(``applies``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from .common import (DOT_IN_FP32, INTERPRET, cast, cdiv, load_channels, mma, next_power_of_2, row_offsets,
                     split_pixels, vector_width)
from .forward import _programs, conv_tf32, geometry_args
from .split import slot_columns, tap_weights

# The widest hidden layer the kernel takes (all its channels are one (BLOCK_P, C_hid) tile), and with more than 64
# hidden channels the widest output (at C_out = 256 the 16-pixel tiles spill too).
TILED_MAX_HIDDEN = 128
TILED_MAX_OUTPUT_WIDE = 128
# Per hidden width (C_hid <= 64, <= 128), 16-bit inputs: untimed, ranked by the static model (``python -m
# benchmarks.gpu_model``); each compiles without spills for sm_90 at 64->128@147 and 128->128@147 (fp16 and
# bf16). ROWS sets only the runtime row loop's length (a slot reads KH - 1 halo rows); 21 and 49 divide 147.
TILED_CONFIGS = {
    64: [
        triton.Config({"BLOCK_P": 64, "ROWS": 49, "COLS": 1, "PREFETCH": True, "PACKED": False}, num_warps=8,
                      num_stages=1),
        triton.Config({"BLOCK_P": 64, "ROWS": 21, "COLS": 1, "PREFETCH": True, "PACKED": False}, num_warps=8,
                      num_stages=1),
    ],
    128: [
        triton.Config({"BLOCK_P": 16, "ROWS": 49, "COLS": 1, "PREFETCH": False, "PACKED": True}, num_warps=4,
                      num_stages=1),
        triton.Config({"BLOCK_P": 16, "ROWS": 21, "COLS": 1, "PREFETCH": False, "PACKED": True}, num_warps=4,
                      num_stages=1),
    ],
}
TILED_CONFIGS_INTERPRET = [triton.Config({"BLOCK_P": 16, "ROWS": 3, "COLS": 2, "PREFETCH": True, "PACKED": True},
                                         num_warps=4, num_stages=1)]


@triton.jit
def _program_weights(dw_ptr, pw_ptr, j, j_mask, co, co_mask, C_HID: tl.constexpr, KH: tl.constexpr,
                     KW: tl.constexpr, PACKED: tl.constexpr):
    """The weights of hidden channels ``j``, read from the module's own layouts (dw: (C_HID, KH*KW), pw: (C_OUT,
    C_HID)) once a program, so no transposed copy is made: the taps' (a tuple of vectors: fp32, or the weight's
    16-bit dtype under PACKED) and the pointwise block (BLOCK_K, BLOCK_CO) in its dtype."""
    weights = tap_weights(dw_ptr, j, j_mask, KH, KW, dw_ptr.dtype.element_ty if PACKED else tl.float32)
    wt = tl.load(pw_ptr + co[None, :] * C_HID + j[:, None], mask=j_mask[:, None] & co_mask[None, :], other=0.0)
    return weights, wt


@triton.jit
def _widen(w):
    """``w`` (a 16-bit vector) as fp32, converted where it is used: the conversion is opaque to the compiler, which
    would otherwise hoist it out of the row loop and keep the fp32 copies live (twice the registers)."""
    if DOT_IN_FP32:
        return w.to(tl.float32)
    elif w.dtype == tl.bfloat16:
        return tl.inline_asm_elementwise("cvt.f32.bf16 $0, $1;", "=r,h", [w], dtype=tl.float32, is_pure=False,
                                         pack=1)
    else:
        return tl.inline_asm_elementwise("cvt.f32.f16 $0, $1;", "=r,h", [w], dtype=tl.float32, is_pure=False,
                                         pack=1)


@triton.jit
def _input_row(x_ptr, corner, col_at, col_ok, col, j_mask, slot_mask, ih_top, H, x_sh, t, RELU: tl.constexpr,
               INPUT_COLS: tl.constexpr):
    """Input row ``t`` of the slots' windows (offset ``t`` from ``ih_top``): a tuple of INPUT_COLS fp32 tiles."""
    ih = ih_top + t
    row_ok = slot_mask & (ih >= 0) & (ih < H)
    row_at = corner + tl.cast(t, tl.int64) * x_sh
    xs = ()
    for c in tl.static_range(INPUT_COLS):
        xs = xs + (load_channels(x_ptr, row_at + col_at[c], col, row_ok & col_ok[c], j_mask, tl.float32, RELU),)
    return xs


@triton.jit
def narrow_tiled_kernel(
    # pointers
    x_ptr, dw_ptr, pw_ptr, pwb_ptr, out_ptr,
    # sizes
    N, H, W, OH, OW, M,
    # strides (elements; the ``_a`` ones divided by ALIGN)
    x_sn_a, x_sc, x_sh_a, x_sw_a,
    o_sn_a, o_sc, o_sh_a, o_sw_a,
    # geometry (the vertical stride and dilation are 1)
    stride_w, pad_top, pad_left, dil_w,
    # meta-parameters
    C_HID: tl.constexpr, C_OUT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_PW_BIAS: tl.constexpr,
    RELU: tl.constexpr, ALIGN: tl.constexpr, TF32: tl.constexpr,
    COL_REUSE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr,
    ROWS: tl.constexpr, COLS: tl.constexpr, PREFETCH: tl.constexpr, PACKED: tl.constexpr,
):
    """out[p, co] = sum_j depthwise(x)[p, j] * pw[co, j] + pw_bias[co], all C_OUT channels per program.

    x: (N, C, H, W) any strides; dw: (C_HID, KH*KW) and pw: (C_OUT, C_HID) contiguous; pw_bias: (C_OUT,) fp32, with
    the depthwise bias folded in (``tiled_launch``: the loop carries no bias); out: (N, C_OUT, OH, OW)
    any strides. BLOCK_K >= C_HID, BLOCK_CO >= C_OUT. A tile is BLOCK_P slots of ROWS x COLS output pixels;
    grid: (programs,), persistent: program g takes tiles g, g + programs, ...
    """
    x_sn = x_sn_a * ALIGN
    x_sh = x_sh_a * ALIGN
    x_sw = x_sw_a * ALIGN
    o_sn = o_sn_a * ALIGN
    o_sh = o_sh_a * ALIGN
    o_sw = o_sw_a * ALIGN
    co = tl.arange(0, BLOCK_CO)
    co_mask = co < C_OUT
    kk = tl.arange(0, BLOCK_K)
    o_col = co.to(tl.int64) * o_sc
    row_groups = tl.cdiv(OH, ROWS)
    col_groups = tl.cdiv(OW, COLS)
    slot_count = N * row_groups * col_groups
    # Every weight is loaded once a program: the taps' in registers, the pointwise block wherever the compiler puts
    # a dot operand (the output bias is read where it is added).
    weights, wt = _program_weights(dw_ptr, pw_ptr, kk, kk < C_HID, co, co_mask, C_HID, KH, KW, PACKED)
    col = (kk // M).to(tl.int64) * x_sc
    j_mask = kk < C_HID
    for tile in range(tl.program_id(0), tl.cdiv(slot_count, BLOCK_P), tl.num_programs(0)):
        slots = tile * BLOCK_P + tl.arange(0, BLOCK_P)
        slot_mask = slots < slot_count
        n, row_group, col_group = split_pixels(slots, row_groups, col_groups)
        oh_top = row_group * ROWS
        ow_left = col_group * COLS
        ih_top = oh_top - pad_top
        iw_left = ow_left * stride_w - pad_left
        corner = row_offsets(n, ih_top, iw_left, x_sn, x_sh, x_sw)
        o_corner = row_offsets(n, oh_top, ow_left, o_sn, o_sh, o_sw)
        col_ok, col_at = slot_columns(iw_left, W, x_sw, stride_w, dil_w, KW, COLS, COL_REUSE)
        # sums[i * COLS + q]: output row t - (KH - 1) + i of the slots, column q, while input row t comes in.
        sums = ()
        for i in tl.static_range(KH * COLS):
            sums = sums + (tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float32),)
        if PREFETCH:
            xs = _input_row(x_ptr, corner, col_at, col_ok, col, j_mask, slot_mask, ih_top, H, x_sh, 0, RELU,
                            COLS + KW - 1 if COL_REUSE else COLS * KW)
        for t in tl.range(0, ROWS + KH - 1, num_stages=1):
            if PREFETCH:
                # The next input row's loads go out before this row's arithmetic (the last one loads nothing).
                ahead = _input_row(x_ptr, corner, col_at, col_ok, col, j_mask, slot_mask & (t + 1 < ROWS + KH - 1),
                                   ih_top, H, x_sh, t + 1, RELU, COLS + KW - 1 if COL_REUSE else COLS * KW)
            else:
                xs = _input_row(x_ptr, corner, col_at, col_ok, col, j_mask, slot_mask, ih_top, H, x_sh, t, RELU,
                                COLS + KW - 1 if COL_REUSE else COLS * KW)
            # Column by column, so that one input tile at a time is live.
            updated = sums
            for c in tl.static_range(COLS + KW - 1 if COL_REUSE else COLS * KW):
                x = xs[c]
                step = ()
                for i in tl.static_range(KH):
                    for q in tl.static_range(COLS):
                        acc = updated[i * COLS + q]
                        for tw in tl.static_range(KW):
                            if q * (1 if COL_REUSE else KW) + tw == c:
                                w = weights[(KH - 1 - i) * KW + tw]
                                if PACKED:
                                    w = _widen(w)
                                acc = acc + x * w[None, :]
                        step = step + (acc,)
                updated = step
            if t >= KH - 1:  # output row t - (KH - 1) has all its taps: its products, then its store
                row_mask = slot_mask & (oh_top + (t - (KH - 1)) < OH)
                for q in tl.static_range(COLS):
                    a = updated[q]
                    out = mma(cast(a, wt.dtype), wt, tl.zeros((BLOCK_P, BLOCK_CO), dtype=tl.float32), TF32)
                    if HAS_PW_BIAS:
                        # Read where it is added (an L1 hit), not held in registers through the loop.
                        out += tl.load(pwb_ptr + co, mask=co_mask, other=0.0)[None, :]
                    at = o_corner + (tl.cast(t - (KH - 1), tl.int64) * o_sh + tl.cast(q, tl.int64) * o_sw)
                    ok = row_mask & (ow_left + q < OW)
                    tl.store(out_ptr + at[:, None] + o_col[None, :], cast(out, out_ptr.dtype.element_ty),
                             mask=ok[:, None] & co_mask[None, :])
            # The window moves down a row: the finished row leaves, a fresh one joins at the bottom.
            sums = ()
            for i in tl.static_range(1, KH):
                for q in tl.static_range(COLS):
                    sums = sums + (updated[i * COLS + q],)
            for q in tl.static_range(COLS):
                sums = sums + (tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float32),)
            if PREFETCH:
                xs = ahead


tiled_autotuned = {
    width: triton.autotune(configs=TILED_CONFIGS_INTERPRET if INTERPRET else configs,
                           key=["N", "OH", "OW", "C_HID", "C_OUT", "KH", "KW", "M", "ALIGN", "COL_REUSE"])(
        narrow_tiled_kernel)
    for width, configs in TILED_CONFIGS.items()
}


def applies(input: torch.Tensor, c_hid: int, c_out: int, stride: Sequence[int], dilation: Sequence[int]) -> bool:
    """Whether ``narrow_tiled_kernel`` takes a narrow layer: a 16-bit input, C_hid <= 64 (or C_hid <=
    TILED_MAX_HIDDEN and C_out <= TILED_MAX_OUTPUT_WIDE), and a vertical stride and dilation of 1 (the rows a
    slot reads overlap).

    fp32 keeps ``forward.narrow_forward_kernel``: with fp32 tiles the kernel spills (TF32 products) or, with
    IEEE products on the FMA units, compiles to a stack-frame loop (the static model's census for sm_90)."""
    fits = c_hid <= min(TILED_MAX_HIDDEN, 64) or (c_hid <= TILED_MAX_HIDDEN and c_out <= TILED_MAX_OUTPUT_WIDE)
    return input.element_size() == 2 and fits and stride[0] == 1 and dilation[0] == 1


def _hidden_width(c_hid: int) -> int:
    return 64 if c_hid <= 64 else 128


def tiled_launch(input: torch.Tensor, depthwise_weight: torch.Tensor, pointwise_weight: torch.Tensor,
                 depthwise_bias: Optional[torch.Tensor], pointwise_bias: Optional[torch.Tensor], out: torch.Tensor,
                 stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], relu_input: bool):
    """One ``narrow_tiled_kernel`` launch into ``out``: (autotuned, grid, args, constexprs)."""
    batch, channels, height, width = input.shape
    c_hid, _, kh, kw = depthwise_weight.shape
    _, c_out, oh, ow = out.shape
    # The module's own layouts (contiguous, as nn.Conv2d keeps them): the kernel reads them once a program.
    dw = depthwise_weight.contiguous()
    pw = pointwise_weight.contiguous()
    # One fp32 output bias: pw_bias + pw @ dw_bias (exact in real arithmetic: the depthwise bias is added to every
    # hidden pixel, so its pointwise image is one vector), computed in fp32 here; None without either bias.
    bias = pointwise_bias.float() if pointwise_bias is not None else None
    if depthwise_bias is not None:
        folded = pw.reshape(c_out, c_hid).float() @ depthwise_bias.float()
        bias = folded if bias is None else bias + folded
    pwb = bias.contiguous() if bias is not None else pw
    x_sn, x_sc, x_sh, x_sw = input.stride()
    o_sn, o_sc, o_sh, o_sw = out.stride()
    align = vector_width(x_sn, x_sh, x_sw, o_sn, o_sh, o_sw)
    autotuned = tiled_autotuned[_hidden_width(c_hid)]
    smallest = min(c.kwargs["BLOCK_P"] * c.kwargs["ROWS"] * c.kwargs["COLS"] for c in autotuned.configs)
    programs = _programs(input, cdiv(batch * oh * ow, smallest))

    def grid(meta):
        slots = batch * cdiv(oh, meta["ROWS"]) * cdiv(ow, meta["COLS"])
        return (min(programs, cdiv(slots, meta["BLOCK_P"])),)

    _, stride_w, pad_top, pad_left, _, dil_w = geometry_args(stride, padding, dilation)
    args = (input, dw, pw, pwb, out, batch, height, width, oh, ow, c_hid // channels,
            x_sn // align, x_sc, x_sh // align, x_sw // align, o_sn // align, o_sc, o_sh // align, o_sw // align,
            stride_w, pad_top, pad_left, dil_w)
    constexprs = dict(C_HID=c_hid, C_OUT=c_out, KH=kh, KW=kw, HAS_PW_BIAS=bias is not None, RELU=bool(relu_input),
                      ALIGN=align,
                      TF32=conv_tf32(input), COL_REUSE=stride[1] == 1 and dilation[1] == 1,
                      BLOCK_K=max(16, next_power_of_2(c_hid)), BLOCK_CO=max(16, next_power_of_2(c_out)))
    return autotuned, grid, args, constexprs
