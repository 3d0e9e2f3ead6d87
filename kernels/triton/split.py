"""The split mode of the Triton backend (``SEPCONV_TRITON_MODE=split``): depthwise in Triton, pointwise as a GEMM.

The fused kernels recompute the depthwise tile inside the pointwise GEMM's
reduction loop, once per output-channel block. On an H200 that left them
latency-bound at a few per cent of peak (README, "GPU results"). Here the
depthwise result is computed once per pixel and written to memory in the
input's dtype, ``(pixels, C_hid)`` row-major, and the pointwise convolution is
a plain matrix product over it (``torch.mm``: cuBLAS on CUDA), so the tensor
cores see an ordinary GEMM. The price is one write and one read of the
intermediate, which fused mode avoids.

Forward: ``depthwise_kernel`` -> ``hidden @ W_pw^T (+ bias)``.
Backward: ``g_h = grad_out @ W_pw`` (GEMM); one pass of
``transposed_depthwise_kernel`` over the input gives the input gradient and the
depthwise weight and bias gradients; ``grad_W_pw = grad_out^T @ hidden`` with the
depthwise result recomputed by ``depthwise_kernel`` (never saved).
Deterministic: no atomics, weight sums over a split fixed by the shape.

Both kernels take the channel count and the pixel strides divided by ``ALIGN``
(8 where they allow it) and multiply back, so that Triton knows a run of 8
channels is aligned and loads it as one 128-bit vector (``common.vector_width``).

16-bit inputs round the depthwise result and ``g_h`` to the input dtype
before the GEMMs (as a cuDNN pair rounds its intermediate), where fused mode
keeps them in fp32 registers.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ..ops import check_output_mask, check_window, empty_output, output_shape
from . import fast_launch, pinned
from .backward import empty_backward, launch_grad_input
from .common import (INTERPRET, accumulator, cast, cdiv, load_channels, matmul_like_conv, next_power_of_2,
                     row_offsets, split_pixels, vector_width, window_tap)
from .forward import check_pixels, configs_for, device_guard, family, geometry_args, launch

# Untimed guesses (no GPU run of this kernel yet), ranked by the static model
# (``python -m benchmarks.gpu_model``). Each compiles without spills for sm_90 and, with ALIGN = 8,
# loads and stores only 128-bit vectors. A program slot covers ROWS x COLS output pixels where the
# vertical stride and dilation are 1 (COLS reuses input columns where the horizontal ones are 1 too).
# Slots 5 columns wide tile 10 and 19 columns with little waste (8-column slots leave 6 of 16 columns of a 10x10
# image empty): the model ranks them first at the 10x10 and 19x19 layers.
GPU_CONFIGS = {
    "16bit": [
        # 4 channels a thread (64-bit loads): fewer registers for the taps' weights, so 8 columns fit.
        triton.Config({"BLOCK_P": 16, "BLOCK_C": 32, "ROWS": 10, "COLS": 8}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_P": 16, "BLOCK_C": 32, "ROWS": 5, "COLS": 8}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_P": 16, "BLOCK_C": 64, "ROWS": 5, "COLS": 4}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_P": 16, "BLOCK_C": 32, "ROWS": 10, "COLS": 5}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_P": 16, "BLOCK_C": 32, "ROWS": 5, "COLS": 5}, num_warps=4, num_stages=1),
    ],
    "fp32": [
        triton.Config({"BLOCK_P": 16, "BLOCK_C": 32, "ROWS": 10, "COLS": 8}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_P": 16, "BLOCK_C": 32, "ROWS": 5, "COLS": 8}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_P": 16, "BLOCK_C": 32, "ROWS": 5, "COLS": 4}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_P": 16, "BLOCK_C": 32, "ROWS": 10, "COLS": 5}, num_warps=4, num_stages=1),
    ],
}
INTERPRET_CONFIGS = [triton.Config({"BLOCK_P": 32, "BLOCK_C": 16, "ROWS": 3, "COLS": 2}, num_warps=4, num_stages=1)]


@triton.jit
def tap_weights(dw_ptr, j, j_mask, KH: tl.constexpr, KW: tl.constexpr, ACC: tl.constexpr):
    """The KH*KW taps' weights of hidden channels ``j``, a tuple of ACC vectors, read once a program.

    dw: the module's own (C_HID, KH*KW) layout, one load a weight (16-bit weights too: KH*KW scalar loads per
    channel a thread holds, before the loops). A tap-major copy would make them vector loads but is a launch
    of its own each call (about 5 us in the static model, a third of a wide layer's depthwise kernel)."""
    weights = ()
    for tap in tl.static_range(KH * KW):
        weights = weights + (tl.load(dw_ptr + j * (KH * KW) + tap, mask=j_mask, other=0.0).to(ACC),)
    return weights


@triton.jit
def slot_columns(iw_left, W, x_sw, stride_w, dil_w, KW: tl.constexpr, COLS: tl.constexpr, COL_REUSE: tl.constexpr):
    """The input columns a slot of COLS output columns reads, left edge ``iw_left``: COLS + KW - 1 shared ones
    under COL_REUSE (horizontal stride and dilation 1), else COLS * KW. Two tuples: whether each column lies
    inside the input, and its offset from the slot's corner (int64, elements)."""
    col_ok = ()
    col_at = ()
    for c in tl.static_range(COLS + KW - 1 if COL_REUSE else COLS * KW):
        if COL_REUSE:
            dx = c
        else:
            dx = (c // KW) * stride_w + (c % KW) * dil_w
        iw = iw_left + dx
        col_ok = col_ok + ((iw >= 0) & (iw < W),)
        col_at = col_at + (tl.cast(dx, tl.int64) * x_sw,)
    return col_ok, col_at


@triton.jit
def _depthwise_tiles(x_ptr, dw_ptr, dwb_ptr, h_ptr, N, C_HID, H, W, OH, OW, M, x_sn, x_sc, x_sh, x_sw,
                     stride_w, pad_top, pad_left, dil_w, KH: tl.constexpr, KW: tl.constexpr,
                     HAS_DW_BIAS: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr,
                     COL_REUSE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr,
                     COLS: tl.constexpr):
    """``depthwise_kernel`` for a vertical stride and dilation of 1: a pixel slot is ROWS x COLS output pixels.

    Each input row a slot reads is loaded once for the up to KH output rows that use it; under COL_REUSE
    (horizontal stride and dilation 1) each of its COLS + KW - 1 input columns is loaded once for the up to
    KW output columns that use it: (ROWS + KH - 1) * (COLS + KW - 1) vector loads for ROWS * COLS * KH * KW
    taps. An output row is stored as soon as its last input row is in, so only KH rows of sums are live.
    """
    row_groups = tl.cdiv(OH, ROWS)
    col_groups = tl.cdiv(OW, COLS)
    slots = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    slot_mask = slots < N * row_groups * col_groups
    n, row_group, col_group = split_pixels(slots, row_groups, col_groups)
    j = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    j_mask = j < C_HID
    col = (j // M).to(tl.int64) * x_sc
    oh_top = row_group * ROWS
    ow_left = col_group * COLS
    ih_top = oh_top - pad_top
    iw_left = ow_left * stride_w - pad_left
    corner = row_offsets(n, ih_top, iw_left, x_sn, x_sh, x_sw)
    # The slot's top-left output pixel, as an offset into h (P, C_HID).
    h_corner = ((n * OH + oh_top) * OW + ow_left).to(tl.int64) * C_HID
    weights = tap_weights(dw_ptr, j, j_mask, KH, KW, ACC)
    if HAS_DW_BIAS:
        bias = tl.load(dwb_ptr + j, mask=j_mask, other=0.0).to(ACC)[None, :]
    col_ok, col_at = slot_columns(iw_left, W, x_sw, stride_w, dil_w, KW, COLS, COL_REUSE)
    accs = ()
    for i in tl.static_range(ROWS * COLS):
        accs = accs + (tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC),)
    for t in tl.static_range(ROWS + KH - 1):
        ih = ih_top + t
        row_ok = slot_mask & (ih >= 0) & (ih < H)
        row_at = corner + tl.cast(t, tl.int64) * x_sh
        xs = ()
        for c in tl.static_range(COLS + KW - 1 if COL_REUSE else COLS * KW):
            xs = xs + (load_channels(x_ptr, row_at + col_at[c], col, row_ok & col_ok[c], j_mask, ACC, RELU),)
        updated = ()
        for r in tl.static_range(ROWS):
            for q in tl.static_range(COLS):
                acc = accs[r * COLS + q]
                if t - r >= 0 and t - r < KH:
                    for tw in tl.static_range(KW):
                        acc = acc + xs[q * (1 if COL_REUSE else KW) + tw] * weights[(t - r) * KW + tw][None, :]
                updated = updated + (acc,)
        accs = updated
        if t >= KH - 1:  # output row t - (KH - 1) is complete (names assigned here are not constexpr)
            row_mask = slot_mask & (oh_top + (t - (KH - 1)) < OH)
            for q in tl.static_range(COLS):
                acc = accs[(t - (KH - 1)) * COLS + q]
                if HAS_DW_BIAS:
                    acc += bias
                at = h_corner + tl.cast((t - (KH - 1)) * OW + q, tl.int64) * C_HID
                tl.store(h_ptr + at[:, None] + j[None, :], cast(acc, h_ptr.dtype.element_ty),
                         mask=(row_mask & (ow_left + q < OW))[:, None] & j_mask[None, :])


@triton.jit
def depthwise_kernel(
    # pointers
    x_ptr, dw_ptr, dwb_ptr, h_ptr,
    # sizes (C_HID_A = C_HID // ALIGN)
    N, C_HID_A, H, W, OH, OW, M,
    # input strides (elements; the ``_a`` ones divided by ALIGN)
    x_sn_a, x_sc, x_sh_a, x_sw_a,
    # geometry
    stride_h, stride_w, pad_top, pad_left, dil_h, dil_w,
    # meta-parameters
    KH: tl.constexpr, KW: tl.constexpr, HAS_DW_BIAS: tl.constexpr, RELU: tl.constexpr,
    ALIGN: tl.constexpr, ACC: tl.constexpr, ROW_REUSE: tl.constexpr, COL_REUSE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr = 1,
):
    """h[p, j] = depthwise(x)[p, j] in h's dtype; h: (P, C_HID) contiguous, p = (n * OH + oh) * OW + ow.

    Sums in ACC (fp32; fp64 for fp64 tensors). dw: (C_HID, KH*KW) contiguous (``tap_weights``). ROW_REUSE
    (vertical stride and dilation 1): a program covers BLOCK_P pixel slots of ROWS x COLS output pixels each
    (``_depthwise_tiles``); otherwise BLOCK_P pixels.
    Grid: (cdiv(N * cdiv(OH, ROWS) * cdiv(OW, COLS), BLOCK_P), cdiv(C_HID, BLOCK_C)) under ROW_REUSE,
    else (cdiv(N * OH * OW, BLOCK_P), cdiv(C_HID, BLOCK_C)).
    """
    C_HID = C_HID_A * ALIGN
    x_sn = x_sn_a * ALIGN
    x_sh = x_sh_a * ALIGN
    x_sw = x_sw_a * ALIGN
    if ROW_REUSE:
        _depthwise_tiles(x_ptr, dw_ptr, dwb_ptr, h_ptr, N, C_HID, H, W, OH, OW, M, x_sn, x_sc, x_sh, x_sw,
                         stride_w, pad_top, pad_left, dil_w, KH, KW, HAS_DW_BIAS, RELU, ACC, COL_REUSE,
                         BLOCK_P, BLOCK_C, ROWS, COLS)
    else:
        offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = offs_p < N * OH * OW
        n, oh, ow = split_pixels(offs_p, OH, OW)
        j = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        j_mask = j < C_HID
        col = (j // M).to(tl.int64) * x_sc
        ih0 = oh * stride_h - pad_top
        iw0 = ow * stride_w - pad_left
        # One int64 offset per pixel (the window's top-left corner); each tap adds a scalar to it.
        corner = row_offsets(n, ih0, iw0, x_sn, x_sh, x_sw)
        weights = tap_weights(dw_ptr, j, j_mask, KH, KW, ACC)
        acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
        for tap in tl.static_range(KH * KW):
            xv = window_tap(x_ptr, corner, ih0, iw0, p_mask, col, j_mask, H, W, x_sh, x_sw, dil_h, dil_w, tap, KW,
                            ACC, RELU)
            acc += xv * weights[tap][None, :]
        if HAS_DW_BIAS:
            acc += tl.load(dwb_ptr + j, mask=j_mask, other=0.0).to(ACC)[None, :]
        offs = offs_p.to(tl.int64)[:, None] * C_HID + j[None, :]
        tl.store(h_ptr + offs, cast(acc, h_ptr.dtype.element_ty), mask=p_mask[:, None] & j_mask[None, :])


depthwise_autotuned = {name: triton.autotune(configs=configs_for(GPU_CONFIGS, INTERPRET_CONFIGS, name),
                                             key=["N", "C_HID_A", "OH", "OW", "KH", "KW", "M", "ALIGN",
                                                  "ROW_REUSE", "COL_REUSE"])(depthwise_kernel)
                       for name in GPU_CONFIGS}


def weights_for(depthwise_weight: torch.Tensor) -> torch.Tensor:
    """The depthwise weight as the split kernels read it, (C_hid, kh*kw) contiguous: a view of a contiguous module
    weight (no copy, no launch)."""
    c_hid, _, kh, kw = depthwise_weight.shape
    return depthwise_weight.reshape(c_hid, kh * kw).contiguous()


def depthwise_launch(input: torch.Tensor, depthwise_weight: torch.Tensor, depthwise_bias: Optional[torch.Tensor],
                     out_hw: Sequence[int], stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                     relu_input: bool, kernel_weights: Optional[torch.Tensor] = None):
    """One ``depthwise_kernel`` launch: (hidden, grid, args, constexprs); ``aot_report`` compiles the same.

    ``kernel_weights``: ``weights_for(depthwise_weight)`` when the caller already has it (made here otherwise)."""
    batch, channels, height, width = input.shape
    c_hid, _, kh, kw = depthwise_weight.shape
    pixels = batch * out_hw[0] * out_hw[1]
    hidden = torch.empty((pixels, c_hid), dtype=input.dtype, device=input.device)
    dw = weights_for(depthwise_weight) if kernel_weights is None else kernel_weights
    dwb = depthwise_bias.contiguous() if depthwise_bias is not None else dw
    x_sn, x_sc, x_sh, x_sw = input.stride()
    align = vector_width(c_hid, x_sn, x_sh, x_sw)

    row_reuse = stride[0] == 1 and dilation[0] == 1

    def grid(meta):
        rows, cols = (meta["ROWS"], meta.get("COLS", 1)) if row_reuse else (1, 1)
        slots = batch * cdiv(out_hw[0], rows) * cdiv(out_hw[1], cols)
        return (cdiv(slots, meta["BLOCK_P"]), cdiv(c_hid, meta["BLOCK_C"]))

    args = (input, dw, dwb, hidden, batch, c_hid // align, height, width, out_hw[0], out_hw[1], c_hid // channels,
            x_sn // align, x_sc, x_sh // align, x_sw // align, *geometry_args(stride, padding, dilation))
    constexprs = dict(KH=kh, KW=kw, HAS_DW_BIAS=depthwise_bias is not None, RELU=bool(relu_input), ALIGN=align,
                      ACC=accumulator(input.dtype), ROW_REUSE=row_reuse,
                      COL_REUSE=stride[1] == 1 and dilation[1] == 1)
    return hidden, grid, args, constexprs


def depthwise(input: torch.Tensor, depthwise_weight: torch.Tensor, depthwise_bias: Optional[torch.Tensor],
              out_hw: Sequence[int], stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
              relu_input: bool, kernel_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The depthwise result (pixels, C_hid) in input's dtype (ReLU on the input first under ``relu_input``)."""
    hidden, grid, args, constexprs = depthwise_launch(input, depthwise_weight, depthwise_bias, out_hw, stride,
                                                      padding, dilation, relu_input, kernel_weights)
    launch(depthwise_autotuned[family(input.dtype)], grid, *args, **constexprs)
    return hidden


# The transposed depthwise kernel (backward). Where stride and dilation are 1 (every Xception layer), a
# program slot is a block of TRANSPOSED_TILES[family] = (rows, columns) input pixels, and each g_h
# vector of the block's window is loaded once for all the taps that read it. The configs keep 4
# channels a thread, so the KH*KW weight-sum tiles, the weights and a few rows of sums fit in registers.
TRANSPOSED_CONFIGS = {
    "16bit": [
        triton.Config({"BLOCK_Q": 16, "BLOCK_C": 32}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_Q": 8, "BLOCK_C": 32}, num_warps=2, num_stages=1),
        triton.Config({"BLOCK_Q": 16, "BLOCK_C": 64}, num_warps=8, num_stages=1),
    ],
    "fp32": [
        triton.Config({"BLOCK_Q": 16, "BLOCK_C": 32}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_Q": 8, "BLOCK_C": 32}, num_warps=2, num_stages=1),
        triton.Config({"BLOCK_Q": 16, "BLOCK_C": 64}, num_warps=8, num_stages=1),
    ],
}
TRANSPOSED_CONFIGS_INTERPRET = [triton.Config({"BLOCK_Q": 16, "BLOCK_C": 16}, num_warps=4, num_stages=1)]
# Tile shapes per dtype family: the largest that compile without spills for sm_90 at the Xception layers.
TRANSPOSED_TILES = {"16bit": (4, 3), "fp32": (3, 3)}
INTERPRET_TILE = (3, 2)
# Pixels (or tiles) per program are a multiple of PIXEL_QUANTUM, which the BLOCK_Q of every config above divides
# (a larger BLOCK_Q, as the tile sweep tries, masks its last block at the end of the program's range), and about
# this many programs share them (times the channel blocks of 64): enough to fill a GPU, few enough partial sums.
PIXEL_QUANTUM = 16
TARGET_PROGRAMS = 1024


@triton.jit
def _transposed_tiles(gh_ptr, x_ptr, gx_ptr, weights, dw_acc, bias_acc, pid_g, j, j_mask, col, gx_col,
                      N, C_HID, H, W, OH, OW, Q_PER_PROGRAM, x_sn, x_sh, x_sw, gx_sn, gx_sh, gx_sw, pad_top, pad_left,
                      KH: tl.constexpr, KW: tl.constexpr, RELU: tl.constexpr, WANT_GX: tl.constexpr,
                      WANT_DW: tl.constexpr, WANT_DB: tl.constexpr, BIAS_TAP: tl.constexpr, ACC: tl.constexpr,
                      BLOCK_Q: tl.constexpr,
                      BLOCK_C: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """``transposed_depthwise_kernel`` for stride and dilation 1: program ``pid_g`` walks tiles of ROWS x COLS
    input pixels (Q_PER_PROGRAM tiles, BLOCK_Q at a time). A tile's gradients read the g_h window of
    (ROWS + KH - 1) x (COLS + KW - 1) output pixels, each vector loaded once for all the taps that use it.
    Returns ``dw_acc`` and ``bias_acc`` with the program's sums added (the bias only under WANT_DB, where
    BIAS_TAP >= 0)."""
    row_groups = tl.cdiv(H, ROWS)
    col_groups = tl.cdiv(W, COLS)
    for s0 in range(pid_g * Q_PER_PROGRAM, (pid_g + 1) * Q_PER_PROGRAM, BLOCK_Q):
        slots = s0 + tl.arange(0, BLOCK_Q)
        # Within the program's range too: a BLOCK_Q that does not divide Q_PER_PROGRAM would otherwise add the
        # next program's tiles to this program's weight sums as well.
        slot_mask = (slots < N * row_groups * col_groups) & (slots < (pid_g + 1) * Q_PER_PROGRAM)
        n, row_group, col_group = split_pixels(slots, row_groups, col_groups)
        ih_top = row_group * ROWS
        iw_left = col_group * COLS
        # The window's top-left output pixel: input pixel (ih, iw) reads g_h at (ih + pad_top - kr, iw + pad_left - kc).
        oh_top = ih_top + pad_top - (KH - 1)
        ow_left = iw_left + pad_left - (KW - 1)
        g_corner = ((n * OH + oh_top) * OW + ow_left).to(tl.int64) * C_HID
        x_corner = row_offsets(n, ih_top, iw_left, x_sn, x_sh, x_sw)
        gx_corner = row_offsets(n, ih_top, iw_left, gx_sn, gx_sh, gx_sw)
        g_col_ok = ()
        for c in tl.static_range(COLS + KW - 1):
            g_col_ok = g_col_ok + ((ow_left + c >= 0) & (ow_left + c < OW),)
        xs = ()
        gxs = ()
        for i in tl.static_range(ROWS * COLS):
            xs = xs + (tl.zeros((BLOCK_Q, BLOCK_C), dtype=ACC),)
            gxs = gxs + (tl.zeros((BLOCK_Q, BLOCK_C), dtype=ACC),)
        for t in tl.static_range(ROWS + KH - 1):
            # Input row t (ReLU'd under RELU; its sign is ReLU's backward mask) joins at its first window row.
            loaded = ()
            for i in tl.static_range(ROWS * COLS):
                v = xs[i]
                if i // COLS == t:
                    ok = slot_mask & (ih_top + t < H) & (iw_left + i % COLS < W)
                    at = x_corner + (tl.cast(t, tl.int64) * x_sh + tl.cast(i % COLS, tl.int64) * x_sw)
                    v = load_channels(x_ptr, at, col, ok, j_mask, ACC, RELU)
                loaded = loaded + (v,)
            xs = loaded
            g_row_ok = slot_mask & (oh_top + t >= 0) & (oh_top + t < OH)
            gs = ()
            for c in tl.static_range(COLS + KW - 1):
                at = g_corner + tl.cast(t * OW + c, tl.int64) * C_HID
                ok = g_row_ok & g_col_ok[c]
                gs = gs + (tl.load(gh_ptr + at[:, None] + j[None, :], mask=ok[:, None] & j_mask[None, :],
                                   other=0.0).to(ACC),)
            if WANT_DW:
                # Tap (kr, kc) pairs window row t with input row t - (KH - 1) + kr, column c with q = c - (KW - 1) + kc.
                updated = ()
                for tap in tl.static_range(KH * KW):
                    acc = dw_acc[tap]
                    if t - (KH - 1) + tap // KW >= 0 and t - (KH - 1) + tap // KW < ROWS:
                        for q in tl.static_range(COLS):
                            acc = acc + gs[q + KW - 1 - tap % KW] * xs[(t - (KH - 1) + tap // KW) * COLS + q]
                    updated = updated + (acc,)
                dw_acc = updated
                if WANT_DB and BIAS_TAP >= 0:
                    # The bias tap maps input pixels one to one onto output pixels: each g_h vector counted once.
                    if t - (KH - 1) + BIAS_TAP // KW >= 0 and t - (KH - 1) + BIAS_TAP // KW < ROWS:
                        for q in tl.static_range(COLS):
                            bias_acc += gs[q + KW - 1 - BIAS_TAP % KW]
            if WANT_GX:
                updated = ()
                for i in tl.static_range(ROWS * COLS):
                    acc = gxs[i]
                    if i // COLS + KH - 1 - t >= 0 and i // COLS + KH - 1 - t < KH:
                        for kc in tl.static_range(KW):
                            acc = acc + gs[i % COLS + KW - 1 - kc] * weights[(i // COLS + KH - 1 - t) * KW + kc]
                    updated = updated + (acc,)
                gxs = updated
                if t >= KH - 1:  # input row t - (KH - 1) has all its window rows
                    for q in tl.static_range(COLS):
                        v = gxs[(t - (KH - 1)) * COLS + q]
                        if RELU:
                            v = tl.where(xs[(t - (KH - 1)) * COLS + q] > 0, v, 0.0)
                        ok = slot_mask & (ih_top + (t - (KH - 1)) < H) & (iw_left + q < W)
                        at = gx_corner + (tl.cast(t - (KH - 1), tl.int64) * gx_sh + tl.cast(q, tl.int64) * gx_sw)
                        tl.store(gx_ptr + at[:, None] + gx_col[None, :], cast(v, gx_ptr.dtype.element_ty),
                                 mask=ok[:, None] & j_mask[None, :])
    return dw_acc, bias_acc


@triton.jit
def transposed_depthwise_kernel(
    # pointers
    gh_ptr, dw_ptr, x_ptr, gx_ptr, part_ptr,
    # sizes (C_HID_A = C_HID // ALIGN)
    N, Q, P, C_HID_A, H, W, OH, OW, M, Q_PER_PROGRAM, P_PER_PROGRAM,
    # strides (elements; the ``_a`` ones divided by ALIGN)
    x_sn_a, x_sc, x_sh_a, x_sw_a,
    gx_sn_a, gx_sc, gx_sh_a, gx_sw_a,
    # geometry
    stride_h, stride_w, pad_top, pad_left, dil_h, dil_w,
    # meta-parameters
    KH: tl.constexpr, KW: tl.constexpr, RELU: tl.constexpr, WANT_GX: tl.constexpr, WANT_DW: tl.constexpr,
    WANT_DB: tl.constexpr, BIAS_TAP: tl.constexpr, ALIGN: tl.constexpr, ACC: tl.constexpr,
    TILED: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The depthwise convolution's backward from g_h (the gradient of its output), in one pass over the input.

    For input pixels q = (n * H + ih) * W + iw and hidden channels j (input channel j // M), each tap
    reads g_h at the output pixel that the tap connects to q (the gather form):
      gx[q, j] = sum_taps g_h[p(q, tap), j] * dw[j, tap]          (WANT_GX; needs M == 1)
      part[g, tap, j] = sum_{q of program g} g_h[p(q, tap), j] * x[q, j // M]   (WANT_DW)
      part[g, KH*KW, j] = sum_{p of program g} g_h[p, j]                  (WANT_DW and WANT_DB; the bias)
    both masked as ReLU's backward under RELU. The bias sum rides on tap BIAS_TAP when that tap
    maps input pixels one to one onto output pixels (stride 1, "same" padding); otherwise
    (BIAS_TAP < 0) a second loop reads the program's share of output pixels.

    gh: (P, C_HID) contiguous; dw as in ``tap_weights``; x, gx: (N, C, H, W) any strides;
    part: (G, KH*KW + 1, C_HID) in ACC (fp32; fp64 for fp64 tensors), as every sum here.
    TILED (stride and dilation 1): program g takes tiles [g * Q_PER_PROGRAM, (g + 1) * Q_PER_PROGRAM) of
    ROWS x COLS input pixels (``_transposed_tiles``); otherwise input pixels in that range.
    Grid: (G, cdiv(C_HID, BLOCK_C)); program g also takes output pixels [g * P_PER_PROGRAM, ...) for the
    bias (multiples of BLOCK_Q): a split fixed by the shape, summed in a fixed order, so the gradients
    are deterministic.
    """
    C_HID = C_HID_A * ALIGN
    x_sh = x_sh_a * ALIGN
    x_sw = x_sw_a * ALIGN
    gx_sh = gx_sh_a * ALIGN
    gx_sw = gx_sw_a * ALIGN
    pid_g = tl.program_id(0)
    j = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    j_mask = j < C_HID
    col = (j // M).to(tl.int64) * x_sc
    gx_col = j.to(tl.int64) * gx_sc

    weights = tap_weights(dw_ptr, j, j_mask, KH, KW, ACC)  # unused (and dropped) without WANT_GX
    dw_acc = ()
    for tap in tl.static_range(KH * KW):
        dw_acc = dw_acc + (tl.zeros((BLOCK_Q, BLOCK_C), dtype=ACC),)
    bias_acc = tl.zeros((BLOCK_Q, BLOCK_C), dtype=ACC)
    if TILED:
        dw_acc, bias_acc = _transposed_tiles(
            gh_ptr, x_ptr, gx_ptr, weights, dw_acc, bias_acc, pid_g, j, j_mask, col, gx_col, N, C_HID, H, W, OH,
            OW, Q_PER_PROGRAM, x_sn_a * ALIGN, x_sh, x_sw, gx_sn_a * ALIGN, gx_sh, gx_sw, pad_top, pad_left,
            KH, KW, RELU, WANT_GX, WANT_DW, WANT_DB, BIAS_TAP, ACC, BLOCK_Q, BLOCK_C, ROWS, COLS)
    else:
        for q0 in range(pid_g * Q_PER_PROGRAM, (pid_g + 1) * Q_PER_PROGRAM, BLOCK_Q):
            offs_q = q0 + tl.arange(0, BLOCK_Q)
            q_mask = (offs_q < Q) & (offs_q < (pid_g + 1) * Q_PER_PROGRAM)
            n, ih, iw = split_pixels(offs_q, H, W)
            mask = q_mask[:, None] & j_mask[None, :]
            xv = load_channels(x_ptr, row_offsets(n, ih, iw, x_sn_a * ALIGN, x_sh, x_sw), col, q_mask, j_mask, ACC,
                               RELU)
            gx = tl.zeros((BLOCK_Q, BLOCK_C), dtype=ACC)
            new_acc = ()
            for tap in tl.static_range(KH * KW):
                th = ih + pad_top - (tap // KW) * dil_h
                tw = iw + pad_left - (tap % KW) * dil_w
                oh = th // stride_h
                ow = tw // stride_w
                ok = (q_mask & (th >= 0) & (oh * stride_h == th) & (oh < OH) & (tw >= 0) & (ow * stride_w == tw)
                      & (ow < OW))
                p = (n * OH + oh) * OW + ow
                g = tl.load(gh_ptr + p.to(tl.int64)[:, None] * C_HID + j[None, :], mask=ok[:, None] & j_mask[None, :],
                            other=0.0).to(ACC)
                if WANT_GX:
                    gx += g * weights[tap][None, :]
                if WANT_DW:
                    new_acc = new_acc + (dw_acc[tap] + g * xv,)
                    if WANT_DB and tap == BIAS_TAP:
                        bias_acc += g
            if WANT_DW:
                dw_acc = new_acc
            if WANT_GX:
                if RELU:  # ReLU's backward: relu(x) > 0 exactly where x > 0
                    gx = tl.where(xv > 0, gx, 0.0)
                gx_offs = row_offsets(n, ih, iw, gx_sn_a * ALIGN, gx_sh, gx_sw)[:, None] + gx_col[None, :]
                tl.store(gx_ptr + gx_offs, cast(gx, gx_ptr.dtype.element_ty), mask=mask)

    if WANT_DW:
        if WANT_DB and BIAS_TAP < 0:
            for p0 in range(pid_g * P_PER_PROGRAM, (pid_g + 1) * P_PER_PROGRAM, BLOCK_Q):
                offs_p = p0 + tl.arange(0, BLOCK_Q)
                bias_acc += tl.load(gh_ptr + offs_p.to(tl.int64)[:, None] * C_HID + j[None, :],
                                    mask=((offs_p < P) & (offs_p < (pid_g + 1) * P_PER_PROGRAM))[:, None]
                                    & j_mask[None, :], other=0.0).to(ACC)
        part = part_ptr + pid_g.to(tl.int64) * ((KH * KW + 1) * C_HID)
        for tap in tl.static_range(KH * KW):
            tl.store(part + tap * C_HID + j, tl.sum(dw_acc[tap], axis=0), mask=j_mask)
        if WANT_DB:
            tl.store(part + (KH * KW) * C_HID + j, tl.sum(bias_acc, axis=0), mask=j_mask)


@triton.jit
def partial_sums_kernel(
    # pointers
    part_ptr, dw_grad_ptr, db_grad_ptr,
    # sizes (C_HID_A = C_HID // ALIGN)
    G, C_HID_A,
    # meta-parameters
    TAPS: tl.constexpr, FIRST_ROW: tl.constexpr, ALIGN: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The second stage of the depthwise weight and bias gradients, written in their own dtypes and layouts:
    dw_grad[j, tap] = sum_g part[g, tap, j] (tap < TAPS), db_grad[j] = sum_g part[g, TAPS, j], in an order
    fixed by the shape (deterministic). part: (G, TAPS + 1, C_HID) contiguous; dw_grad: (C_HID, TAPS)
    contiguous; db_grad: (C_HID,). Grid: (rows, cdiv(C_HID, BLOCK_C)), program r summing row FIRST_ROW + r:
    rows TAPS + 1 from 0 for both gradients, TAPS from 0 for the weight's alone, 1 from TAPS for the bias's
    alone. BLOCK_G partial sums are read at once, so their loads overlap."""
    C_HID = C_HID_A * ALIGN
    tap = tl.program_id(0) + FIRST_ROW
    j = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    j_mask = j < C_HID
    acc = tl.zeros((BLOCK_G, BLOCK_C), dtype=part_ptr.dtype.element_ty)
    for g0 in range(0, G, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        rows = (g * (TAPS + 1) + tap).to(tl.int64) * C_HID
        acc += tl.load(part_ptr + rows[:, None] + j[None, :], mask=(g < G)[:, None] & j_mask[None, :], other=0.0)
    total = tl.sum(acc, axis=0)
    if tap < TAPS:
        tl.store(dw_grad_ptr + j * TAPS + tap, cast(total, dw_grad_ptr.dtype.element_ty), mask=j_mask)
    else:
        tl.store(db_grad_ptr + j, cast(total, db_grad_ptr.dtype.element_ty), mask=j_mask)


def partial_sums_launch(partials: torch.Tensor, grad_depthwise: torch.Tensor, grad_depthwise_bias: torch.Tensor,
                        want_weight: bool, want_bias: bool):
    """One ``partial_sums_kernel`` launch: (grid, args, constexprs incl. num_warps). grad_depthwise: (C_hid, 1, kh,
    kw) contiguous (written under ``want_weight``); grad_depthwise_bias: (C_hid,) (written under ``want_bias``).

    A program's loop waits for each block of partial sums before the next, so the block is sized for about four
    trips whatever the number of partial sums (32 at a time took 60 trips at 128->256@74, batch 32: 17 us
    predicted, latency-bound, for 2.4 MB), and no larger (masked rows still cost their loads)."""
    programs, taps_and_bias, c_hid = partials.shape
    taps = taps_and_bias - 1
    align = vector_width(c_hid)
    block_c = 32
    block_g = max(32, min(1024, next_power_of_2(cdiv(programs, 4))))
    rows = (taps if want_weight else 0) + (1 if want_bias else 0)
    grid = (rows, cdiv(c_hid, block_c))
    args = (partials, grad_depthwise, grad_depthwise_bias, programs, c_hid // align)
    return grid, args, dict(TAPS=taps, FIRST_ROW=0 if want_weight else taps, ALIGN=align, BLOCK_G=block_g,
                            BLOCK_C=block_c, num_warps=4 if block_g <= 128 else 8 if block_g <= 512 else 16)


transposed_autotuned = {
    name: triton.autotune(configs=configs_for(TRANSPOSED_CONFIGS, TRANSPOSED_CONFIGS_INTERPRET, name),
                          key=["Q", "C_HID_A", "M", "KH", "KW", "WANT_GX", "WANT_DW", "WANT_DB", "ALIGN", "TILED"],
                          )(transposed_depthwise_kernel)
    for name in TRANSPOSED_CONFIGS}


def transposed_tile(dtype_family: str) -> Tuple[int, int]:
    """The transposed kernel's tile of input pixels (rows, columns) for ``dtype_family``: a pinned one
    (``SEPCONV_TRITON_CONFIGS``), else ``TRANSPOSED_TILES`` (``INTERPRET_TILE`` in the interpreter)."""
    pin = pinned.transposed_tile(dtype_family)
    if pin is not None:
        return pin
    return INTERPRET_TILE if INTERPRET else TRANSPOSED_TILES[dtype_family]


def _bias_tap(kernel_hw, stride, padding, dilation, in_hw, out_hw) -> int:
    """The tap that maps every input pixel to the output pixel at the same place (stride 1, "same"
    padding), so that its g_h reads sum to the bias gradient; -1 when there is none."""
    kh, kw = kernel_hw
    if tuple(stride) != (1, 1) or tuple(in_hw) != tuple(out_hw):
        return -1
    (top, left), (dil_h, dil_w) = (padding[0], padding[2]), dilation
    if top % dil_h or left % dil_w or top // dil_h >= kh or left // dil_w >= kw:
        return -1
    return (top // dil_h) * kw + left // dil_w


def transposed_depthwise_launch(grad_hidden: torch.Tensor, input: torch.Tensor, depthwise_weight: torch.Tensor,
                                grad_input: torch.Tensor, out_hw: Sequence[int], stride: Sequence[int],
                                padding: Sequence[int], dilation: Sequence[int], relu_input: bool,
                                want_input: bool, want_depthwise: bool, want_depthwise_bias: bool,
                                kernel_weights: Optional[torch.Tensor] = None):
    """One ``transposed_depthwise_kernel`` launch: (partials, grid, args, constexprs).

    grad_hidden: (pixels, C_hid) contiguous; grad_input: like input (written only with ``want_input``,
    which needs a depth multiplier of 1). ``want_depthwise``: the weight's partial sums (and, under
    ``want_depthwise_bias``, the bias's) into ``partials``. ``kernel_weights``: as in ``depthwise_launch``."""
    batch, channels, height, width = input.shape
    c_hid, _, kh, kw = depthwise_weight.shape
    q = batch * height * width
    pixels = batch * out_hw[0] * out_hw[1]
    tiled = tuple(stride) == (1, 1) and tuple(dilation) == (1, 1)
    rows, cols = transposed_tile(family(input.dtype)) if tiled else (1, 1)
    # What programs split: tiles of rows x cols input pixels (tiled), else input pixels.
    units = batch * cdiv(height, rows) * cdiv(width, cols) if tiled else q
    c_blocks = cdiv(c_hid, 64)
    per_program = cdiv(cdiv(units, max(1, TARGET_PROGRAMS // c_blocks)), PIXEL_QUANTUM) * PIXEL_QUANTUM
    programs = cdiv(units, per_program)
    p_per_program = cdiv(cdiv(pixels, programs), PIXEL_QUANTUM) * PIXEL_QUANTUM
    partials = torch.empty((programs if want_depthwise else 1, kh * kw + 1, c_hid),
                           dtype=torch.float64 if input.dtype == torch.float64 else torch.float32, device=input.device)
    x_sn, x_sc, x_sh, x_sw = input.stride()
    gx_sn, gx_sc, gx_sh, gx_sw = grad_input.stride() if want_input else input.stride()
    align = vector_width(c_hid, x_sn, x_sh, x_sw, gx_sn, gx_sh, gx_sw)

    def grid(meta):
        return (programs, cdiv(c_hid, meta["BLOCK_C"]))

    dw = weights_for(depthwise_weight) if kernel_weights is None else kernel_weights
    args = (grad_hidden, dw, input, grad_input if want_input else input, partials,
            batch, q, pixels, c_hid // align, height, width, out_hw[0], out_hw[1], c_hid // channels, per_program,
            p_per_program, x_sn // align, x_sc, x_sh // align, x_sw // align,
            gx_sn // align, gx_sc, gx_sh // align, gx_sw // align, *geometry_args(stride, padding, dilation))
    constexprs = dict(KH=kh, KW=kw, RELU=bool(relu_input), WANT_GX=bool(want_input), WANT_DW=bool(want_depthwise),
                      WANT_DB=bool(want_depthwise and want_depthwise_bias),
                      BIAS_TAP=_bias_tap((kh, kw), stride, padding, dilation, (height, width), out_hw), ALIGN=align,
                      ACC=accumulator(input.dtype), TILED=tiled, ROWS=rows,
                      COLS=cols)
    return partials, grid, args, constexprs


def _pixel_rows(tensor: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N*H*W, C), a view when ``tensor`` is channels_last-contiguous, else a copy."""
    return tensor.permute(0, 2, 3, 1).reshape(-1, tensor.shape[1])


def forward(input: torch.Tensor, depthwise_weight: torch.Tensor, pointwise_weight: torch.Tensor,
            depthwise_bias: Optional[torch.Tensor], pointwise_bias: Optional[torch.Tensor],
            stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], relu_input: bool) -> torch.Tensor:
    """``sepconv_triton::forward`` in split mode (same contract as ``forward.forward``)."""
    return forward_keeping_hidden(input, depthwise_weight, pointwise_weight, depthwise_bias, pointwise_bias, stride,
                                  padding, dilation, relu_input)[0]


def forward_keeping_hidden(input: torch.Tensor, depthwise_weight: torch.Tensor, pointwise_weight: torch.Tensor,
                           depthwise_bias: Optional[torch.Tensor], pointwise_bias: Optional[torch.Tensor],
                           stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], relu_input: bool):
    """``sepconv_triton::forward_keeping_hidden`` in split mode: (output, hidden), hidden the depthwise result
    (pixels, C_hid) in input's dtype that the forward computes anyway, for ``backward(..., hidden=hidden)``."""
    shape = output_shape(input, depthwise_weight, pointwise_weight, stride, padding, dilation)
    out = empty_output(input, shape)
    batch, c_out, oh, ow = shape
    if batch * oh * ow == 0:
        return out, input.new_empty((0, depthwise_weight.shape[0]))
    check_pixels(batch * oh * ow, input)
    pw = pointwise_weight.reshape(c_out, -1)
    with device_guard(input), matmul_like_conv(input):
        hidden = depthwise(input, depthwise_weight, depthwise_bias, (oh, ow), stride, padding, dilation, relu_input)
        rows = out.permute(0, 2, 3, 1)
        # A channels_last output takes the GEMM's result in place; any other layout gets a copy of it.
        in_place = rows.is_contiguous()
        target = rows.view(-1, c_out) if in_place else hidden.new_empty((hidden.shape[0], c_out))
        if pointwise_bias is None:
            torch.mm(hidden, pw.t(), out=target)
        else:
            torch.addmm(pointwise_bias, hidden, pw.t(), out=target)
        if not in_place:
            out.copy_(target.view(batch, oh, ow, c_out).permute(0, 3, 1, 2))
    return out, hidden


def backward(grad_output: torch.Tensor, input: torch.Tensor, depthwise_weight: torch.Tensor,
             pointwise_weight: torch.Tensor, depthwise_bias: Optional[torch.Tensor],
             stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], relu_input: bool,
             output_mask: Sequence[bool], hidden: Optional[torch.Tensor] = None):
    """``sepconv_triton::backward`` in split mode (same contract as ``backward.backward``).

    ``g_h = grad_out @ W_pw`` (GEMM, input dtype), then one ``transposed_depthwise_kernel`` pass gives the
    input gradient and the depthwise weight and bias gradients (a depth multiplier above 1 takes the input
    gradient from ``grad_input_kernel`` instead); ``grad_W_pw = grad_out^T @ h`` (GEMM) with the depthwise
    result ``h``: the forward's own (``hidden``, from ``forward_keeping_hidden``) where it is given, else
    recomputed by ``depthwise_kernel``. Transient memory: ``g_h``, and ``h`` when it is recomputed, each
    (pixels, C_hid) in the input dtype.
    """
    check_window(depthwise_weight.shape[2], depthwise_weight.shape[3], stride, padding, dilation)
    out, work = empty_backward(grad_output, input, depthwise_weight, pointwise_weight, depthwise_bias, output_mask)
    if not work:
        return out
    want_input, want_dw_weight, want_pw_weight, want_dw_bias, want_pw_bias = check_output_mask(output_mask)
    want_depthwise = want_dw_weight or want_dw_bias
    channels = input.shape[1]
    c_hid, _, kh, kw = depthwise_weight.shape
    c_out = pointwise_weight.shape[0]
    out_hw = (grad_output.shape[2], grad_output.shape[3])
    pw = pointwise_weight.reshape(c_out, c_hid).to(grad_output.dtype)
    relu = bool(relu_input)
    go = _pixel_rows(grad_output)  # (P, C_out)
    # The depthwise weight as the depthwise kernels and grad_input_kernel read it (a view of a contiguous weight).
    kernel_weights = weights_for(depthwise_weight)

    with device_guard(input), matmul_like_conv(input):
        if want_input or want_depthwise:
            grad_hidden = go @ pw  # (P, C_hid), input dtype
            # The kernel writes grad_input when each input channel has one hidden channel.
            input_here = want_input and c_hid == channels
            if input_here or want_depthwise:
                partials, grid, args, constexprs = transposed_depthwise_launch(
                    grad_hidden, input, depthwise_weight, out[0], out_hw, stride, padding, dilation, relu,
                    input_here, want_depthwise, want_dw_bias, kernel_weights)
                launch(transposed_autotuned[family(input.dtype)], grid, *args, **constexprs)
                if want_depthwise:  # fixed-order second stage of the reduction
                    grid, args, constexprs = partial_sums_launch(partials, out[1], out[3], want_dw_weight,
                                                                 want_dw_bias)
                    fast_launch.launch(partial_sums_kernel, None, grid, args, {**constexprs, "num_stages": 1})
            if want_input and not input_here:
                launch_grad_input(grad_hidden, kernel_weights, input, out[0], out_hw,
                                  geometry_args(stride, padding, dilation), kh, kw, relu)
        if want_pw_weight:
            if hidden is not None and hidden.numel() and tuple(hidden.shape) != (go.shape[0], c_hid):
                raise ValueError(f"hidden must be the forward's depthwise result of shape {(go.shape[0], c_hid)}, "
                                 f"got {tuple(hidden.shape)}")
            if hidden is None or hidden.numel() == 0:
                hidden = depthwise(input, depthwise_weight, depthwise_bias, out_hw, stride, padding, dilation, relu,
                                   kernel_weights)
            if out[2].dtype == hidden.dtype:
                torch.mm(go.t(), hidden, out=out[2].view(c_out, c_hid))
            else:
                out[2].copy_((go.t() @ hidden).reshape(out[2].shape))
        if want_pw_bias:
            # Reduced-precision sums accumulate in fp32 and round once (CPU and CUDA alike).
            torch.sum(go, 0, out=out[4])
    return out
