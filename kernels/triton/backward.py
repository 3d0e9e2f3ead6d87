"""Separable convolution backward: three kernels and their launcher (no autograd here).

With ``g_h = grad_out @ W_pw`` the gradient of the depthwise output
(pixels x hidden channels):

1. ``grad_hidden_kernel``: the GEMM ``g_h`` tile by tile; its epilogue reduces
   the tile against the (recomputed-on-load) input taps into per-block partial
   sums of the depthwise weight and bias gradients, and stores ``g_h`` (fp32)
   only when the input gradient is wanted.
2. ``grad_input_kernel``: the transposed depthwise convolution of ``g_h``
   (gather form: each input pixel collects its KHxKW taps), masked by
   ``input > 0`` under ``relu_input``.
3. ``grad_pointwise_kernel``: ``grad_W_pw = grad_out^T @ h`` with the depthwise
   output ``h`` recomputed on the fly (never saved), split over pixel ranges into
   per-split partials; the pointwise bias gradient rides along.

Why ``g_h`` goes through global memory once (kernels 1 -> 2) rather than being
recomputed inside kernel 2: the gather needs ``g_h`` at KH*KW shifted pixels,
so a fused kernel would redo the C_out-long GEMM KH*KW times (9x the backward
GEMM FLOPs for 3x3), while the round trip costs one fp32 write + read of a
tensor the size of the input.

Every weight-gradient reduction is two-stage and deterministic: per-block
partials in a buffer, then ``sum(0)`` over that buffer in a fixed order; no
atomics. When ``torch.are_deterministic_algorithms_enabled()`` (or with
``SEPCONV_TRITON_AUTOTUNE=0``) the launchers use fixed tile configs instead of
autotuned ones, so the result does not depend on which config won the timing race.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ..ops import check_output_mask, check_window, empty_gradients
from .common import accumulator, cast, cdiv, conv_tf32, depthwise_tile, mma, row_offsets, split_pixels
from .forward import check_pixels, configs_for, device_guard, family, geometry_args, launch, launch_config

# Tile configs per dtype family (see forward.py); every GPU config compiles without spills.
GRAD_HIDDEN_CONFIGS_GPU = {
    "16bit": [
        triton.Config({"BLOCK_P": 64, "BLOCK_K": 64, "BLOCK_CO": 32}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_P": 32, "BLOCK_K": 128, "BLOCK_CO": 32}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_P": 64, "BLOCK_K": 32, "BLOCK_CO": 32}, num_warps=4, num_stages=2),
    ],
    "fp32": [
        triton.Config({"BLOCK_P": 64, "BLOCK_K": 64, "BLOCK_CO": 16}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_P": 32, "BLOCK_K": 128, "BLOCK_CO": 16}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_P": 64, "BLOCK_K": 32, "BLOCK_CO": 16}, num_warps=4, num_stages=2),
    ],
}
_GRAD_INPUT = [
    triton.Config({"BLOCK_Q": 32, "BLOCK_C": 64}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_Q": 64, "BLOCK_C": 64}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_Q": 32, "BLOCK_C": 128}, num_warps=8, num_stages=1),
]
GRAD_INPUT_CONFIGS_GPU = {"16bit": _GRAD_INPUT, "fp32": _GRAD_INPUT}
GRAD_POINTWISE_CONFIGS_GPU = {
    "16bit": [
        triton.Config({"BLOCK_P": 32, "BLOCK_CO": 64, "BLOCK_K": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_P": 32, "BLOCK_CO": 128, "BLOCK_K": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_P": 64, "BLOCK_CO": 64, "BLOCK_K": 32}, num_warps=8, num_stages=2),
    ],
    "fp32": [
        triton.Config({"BLOCK_P": 32, "BLOCK_CO": 64, "BLOCK_K": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_P": 32, "BLOCK_CO": 64, "BLOCK_K": 32}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_P": 16, "BLOCK_CO": 128, "BLOCK_K": 64}, num_warps=8, num_stages=2),
    ],
}
GRAD_HIDDEN_CONFIGS_INTERPRET = [triton.Config({"BLOCK_P": 32, "BLOCK_K": 16, "BLOCK_CO": 16}, num_warps=4)]
GRAD_INPUT_CONFIGS_INTERPRET = [triton.Config({"BLOCK_Q": 32, "BLOCK_C": 16}, num_warps=4)]
GRAD_POINTWISE_CONFIGS_INTERPRET = [triton.Config({"BLOCK_P": 32, "BLOCK_CO": 16, "BLOCK_K": 16}, num_warps=4)]

# Pointwise-weight partials buffer budget (fp32 elements): bounds the pixel splits.
PARTIAL_BUDGET = 1 << 22
# Pixels per split of the pointwise-weight reduction (before the budget cap).
PIXELS_PER_SPLIT = 1024


@triton.jit
def grad_hidden_kernel(
    # pointers
    go_ptr, pw_ptr, x_ptr, gh_ptr, part_ptr,
    # sizes
    P, C_HID, C_OUT, H, W, OH, OW, M,
    # strides (elements)
    go_sn, go_sc, go_sh, go_sw,
    x_sn, x_sc, x_sh, x_sw,
    # geometry
    stride_h, stride_w, pad_top, pad_left, dil_h, dil_w,
    # meta-parameters
    KH: tl.constexpr, KW: tl.constexpr, RELU: tl.constexpr, STORE_GH: tl.constexpr, NEED_DW: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_CO: tl.constexpr, TF32: tl.constexpr = False,
):
    """g_h[p, j] = sum_co go[p, co] * pw[co, j]; partial dw grads per pixel block.

    go: (N, C_OUT, OH, OW) any strides; pw: (C_OUT, C_HID); gh: (P, C_HID) fp32;
    part: (cdiv(P, BLOCK_P), KH*KW + 1, C_HID) fp32 (last row: bias).
    Grid: (cdiv(P, BLOCK_P), cdiv(C_HID, BLOCK_K)).
    """
    pid_p = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < P
    n, oh, ow = split_pixels(offs_p, OH, OW)
    j = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    j_mask = j < C_HID
    go_base = row_offsets(n, oh, ow, go_sn, go_sh, go_sw)

    acc = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float32)
    for co0 in range(0, C_OUT, BLOCK_CO):
        co = co0 + tl.arange(0, BLOCK_CO)
        co_mask = co < C_OUT
        g = tl.load(go_ptr + go_base[:, None] + co[None, :].to(tl.int64) * go_sc,
                    mask=p_mask[:, None] & co_mask[None, :], other=0.0)  # (BLOCK_P, BLOCK_CO)
        w = tl.load(pw_ptr + co[:, None] * C_HID + j[None, :],
                    mask=co_mask[:, None] & j_mask[None, :], other=0.0)  # (BLOCK_CO, BLOCK_K)
        acc = mma(g, w.to(g.dtype), acc, TF32)

    if STORE_GH:
        tl.store(gh_ptr + offs_p.to(tl.int64)[:, None] * C_HID + j[None, :], acc,
                 mask=p_mask[:, None] & j_mask[None, :])
    if NEED_DW:
        # Rows of acc outside the image are zero (go loaded as 0 there).
        part = part_ptr + pid_p.to(tl.int64) * ((KH * KW + 1) * C_HID)
        col = (j // M).to(tl.int64) * x_sc
        for tap in tl.range(0, KH * KW, num_stages=1):
            ih = oh * stride_h - pad_top + (tap // KW) * dil_h
            iw = ow * stride_w - pad_left + (tap % KW) * dil_w
            ok = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            row = row_offsets(n, ih, iw, x_sn, x_sh, x_sw)
            xv = tl.load(x_ptr + row[:, None] + col[None, :], mask=ok[:, None] & j_mask[None, :], other=0.0)
            xv = xv.to(tl.float32)
            if RELU:
                xv = tl.maximum(xv, 0.0)
            tl.store(part + tap * C_HID + j, tl.sum(acc * xv, axis=0), mask=j_mask)
        tl.store(part + (KH * KW) * C_HID + j, tl.sum(acc, axis=0), mask=j_mask)


@triton.jit
def grad_input_kernel(
    # pointers
    gh_ptr, dw_ptr, x_ptr, gx_ptr,
    # sizes
    Q, C, H, W, OH, OW, M, C_HID,
    # strides (elements)
    x_sn, x_sc, x_sh, x_sw,
    gx_sn, gx_sc, gx_sh, gx_sw,
    # geometry
    stride_h, stride_w, pad_top, pad_left, dil_h, dil_w,
    # meta-parameters
    KH: tl.constexpr, KW: tl.constexpr, RELU: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr = tl.float32,
):
    """gx[n, c, ih, iw] = sum_{m, taps} g_h[(n, oh, ow), c*M + m] * dw[c*M + m, tap], summed in ACC.

    gh: (N*OH*OW, C_HID) any float dtype; dw: (C_HID, KH*KW); x, gx: (N, C, H, W) any strides.
    Grid: (cdiv(N*H*W, BLOCK_Q), cdiv(C, BLOCK_C)).
    """
    pid_q = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = offs_q < Q
    n, ih, iw = split_pixels(offs_q, H, W)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C

    acc = tl.zeros((BLOCK_Q, BLOCK_C), dtype=ACC)
    for m in range(0, M):
        j = c * M + m
        # A runtime loop over the taps keeps one tap's gather live at a time (no spills).
        for tap in tl.range(0, KH * KW, num_stages=1):
            i = tap // KW
            jj = tap % KW
            th = ih + pad_top - i * dil_h
            oh = th // stride_h
            tw = iw + pad_left - jj * dil_w
            ow = tw // stride_w
            ok = q_mask & (th >= 0) & (th % stride_h == 0) & (oh < OH) & (tw >= 0) & (tw % stride_w == 0) & (ow < OW)
            p = ((n * OH + oh) * OW + ow).to(tl.int64)
            g = tl.load(gh_ptr + p[:, None] * C_HID + j[None, :], mask=ok[:, None] & c_mask[None, :],
                        other=0.0).to(ACC)
            w = tl.load(dw_ptr + j * (KH * KW) + tap, mask=c_mask, other=0.0).to(ACC)
            acc += g * w[None, :]

    x_offs = row_offsets(n, ih, iw, x_sn, x_sh, x_sw)[:, None] + c[None, :].to(tl.int64) * x_sc
    mask = q_mask[:, None] & c_mask[None, :]
    if RELU:
        # Compared in fp32: the interpreter (3.9) compares bfloat16 values wrongly.
        xv = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(ACC)
        acc = tl.where(xv > 0, acc, 0.0)
    gx_offs = row_offsets(n, ih, iw, gx_sn, gx_sh, gx_sw)[:, None] + c[None, :].to(tl.int64) * gx_sc
    tl.store(gx_ptr + gx_offs, cast(acc, gx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def grad_pointwise_kernel(
    # pointers
    x_ptr, dw_ptr, dwb_ptr, go_ptr, part_w_ptr, part_b_ptr,
    # sizes
    P, C_HID, C_OUT, H, W, OH, OW, M, SPLITS,
    # strides (elements)
    x_sn, x_sc, x_sh, x_sw,
    go_sn, go_sc, go_sh, go_sw,
    # geometry
    stride_h, stride_w, pad_top, pad_left, dil_h, dil_w,
    # meta-parameters
    KH: tl.constexpr, KW: tl.constexpr, HAS_DW_BIAS: tl.constexpr, RELU: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr, UNROLL_TAPS: tl.constexpr = False,
    TF32: tl.constexpr = False,
):
    """part_w[s, co, j] = sum_{p in split s} go[p, co] * h[p, j], h recomputed; part_b[s, co] = sum go.

    part_w: (SPLITS, C_OUT, C_HID) fp32; part_b: (SPLITS, C_OUT) fp32.
    Grid: (cdiv(C_OUT, BLOCK_CO), cdiv(C_HID, BLOCK_K), SPLITS).
    """
    pid_co = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_mask = co < C_OUT
    j = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    j_mask = j < C_HID
    per_split = tl.cdiv(tl.cdiv(P, SPLITS), BLOCK_P) * BLOCK_P
    start = pid_s * per_split

    acc = tl.zeros((BLOCK_CO, BLOCK_K), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_CO,), dtype=tl.float32)
    for p0 in range(0, per_split, BLOCK_P):
        offs_p = start + p0 + tl.arange(0, BLOCK_P)
        p_mask = offs_p < P
        n, oh, ow = split_pixels(offs_p, OH, OW)
        h = depthwise_tile(x_ptr, dw_ptr, dwb_ptr, n, oh, ow, p_mask, j, j_mask, H, W, M,
                           x_sn, x_sc, x_sh, x_sw, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w,
                           KH, KW, HAS_DW_BIAS, RELU, BLOCK_P, BLOCK_K, UNROLL_TAPS)
        go_offs = row_offsets(n, oh, ow, go_sn, go_sh, go_sw)[:, None] + co[None, :].to(tl.int64) * go_sc
        g = tl.load(go_ptr + go_offs, mask=p_mask[:, None] & co_mask[None, :], other=0.0)  # (BLOCK_P, BLOCK_CO)
        acc = mma(tl.trans(g), cast(h, g.dtype), acc, TF32)
        acc_b += tl.sum(g.to(tl.float32), axis=0)

    part_w = part_w_ptr + pid_s.to(tl.int64) * C_OUT * C_HID
    tl.store(part_w + co[:, None] * C_HID + j[None, :], acc, mask=co_mask[:, None] & j_mask[None, :])
    if pid_k == 0:
        tl.store(part_b_ptr + pid_s.to(tl.int64) * C_OUT + co, acc_b, mask=co_mask)


def _autotuned(kernel, gpu_configs, interpret_configs, key, **options):
    return {name: triton.autotune(configs=configs_for(gpu_configs, interpret_configs, name), key=key, **options)(kernel)
            for name in gpu_configs}


# The partials buffer is sized for the smallest BLOCK_P; rows a larger block leaves unwritten must be
# zero, so the autotuner re-zeroes it between its timing runs.
grad_hidden_autotuned = _autotuned(grad_hidden_kernel, GRAD_HIDDEN_CONFIGS_GPU, GRAD_HIDDEN_CONFIGS_INTERPRET,
                                   ["P", "C_HID", "C_OUT", "KH", "KW"], reset_to_zero=["part_ptr"])
grad_input_autotuned = _autotuned(grad_input_kernel, GRAD_INPUT_CONFIGS_GPU, GRAD_INPUT_CONFIGS_INTERPRET,
                                  ["Q", "C", "M", "KH", "KW"])
grad_pointwise_autotuned = _autotuned(grad_pointwise_kernel, GRAD_POINTWISE_CONFIGS_GPU,
                                      GRAD_POINTWISE_CONFIGS_INTERPRET, ["P", "C_HID", "C_OUT", "SPLITS", "KH", "KW"])


def empty_backward(grad_output, input, depthwise_weight, pointwise_weight, depthwise_bias, output_mask):
    """The gradient buffers, and whether there is work: with no output pixels they are zeroed here."""
    out = empty_gradients(grad_output, input, depthwise_weight, pointwise_weight, depthwise_bias, output_mask)
    pixels = input.shape[0] * grad_output.shape[2] * grad_output.shape[3]
    if pixels == 0:
        for grad, wanted in zip(out, check_output_mask(output_mask)):
            if wanted:
                grad.zero_()
        return out, False
    check_pixels(pixels, input)
    return out, True


def launch_grad_hidden(grad_output, pw, input, grad_hidden, out, geometry, kh, kw, relu,
                       store_gh: bool, need_dw: bool) -> None:
    """grad_hidden_kernel: g_h into ``grad_hidden`` (``store_gh``) and the
    depthwise weight and bias gradients into ``out[1]``, ``out[3]`` (``need_dw``). ``pw``: (C_out, C_hid)."""
    batch, channels, height, width = input.shape
    oh, ow = grad_output.shape[2], grad_output.shape[3]
    pixels = batch * oh * ow
    c_out, c_hid = pw.shape
    tuner = grad_hidden_autotuned[family(input.dtype)]
    # Sized for the smallest BLOCK_P among the configs this launch may run.
    pinned = launch_config(tuner)
    block_p_min = min(c.kwargs["BLOCK_P"] for c in (tuner.configs if pinned is None else [pinned]))
    # Never a user tensor: the autotuner zeroes this argument between timing runs.
    partials = torch.zeros((cdiv(pixels, block_p_min) if need_dw else 1, kh * kw + 1, c_hid),
                           dtype=torch.float32, device=input.device)

    def grid(meta):
        return (cdiv(pixels, meta["BLOCK_P"]), cdiv(c_hid, meta["BLOCK_K"]))

    launch(tuner, grid, grad_output, pw, input, grad_hidden, partials,
           pixels, c_hid, c_out, height, width, oh, ow, c_hid // channels,
           *grad_output.stride(), *input.stride(), *geometry,
           KH=kh, KW=kw, RELU=relu, STORE_GH=store_gh, NEED_DW=need_dw, TF32=conv_tf32(input))
    if need_dw:
        # Fixed-order second stage; rows past this config's block count stay zero. The bias sum rides
        # along in the kernel; it is copied out only where the output mask asked for it (out[3] non-empty).
        sums = partials.sum(0)
        if out[1].numel():
            out[1].copy_(sums[:kh * kw].t().reshape(out[1].shape))
        if out[3].numel():
            out[3].copy_(sums[kh * kw])


def launch_grad_input(grad_hidden, dw, input, grad_input, out_hw, geometry, kh, kw, relu) -> None:
    """grad_input_kernel: the transposed depthwise convolution of g_h ((pixels, C_hid)) into ``grad_input``."""
    batch, channels, height, width = input.shape
    c_hid = dw.shape[0]
    q = batch * height * width

    def grid(meta):
        return (cdiv(q, meta["BLOCK_Q"]), cdiv(channels, meta["BLOCK_C"]))

    launch(grad_input_autotuned[family(input.dtype)], grid, grad_hidden, dw, input, grad_input,
           q, channels, height, width, out_hw[0], out_hw[1], c_hid // channels, c_hid,
           *input.stride(), *grad_input.stride(), *geometry, KH=kh, KW=kw, RELU=relu, ACC=accumulator(input.dtype))


def backward(grad_output: torch.Tensor, input: torch.Tensor, depthwise_weight: torch.Tensor,
             pointwise_weight: torch.Tensor, depthwise_bias: Optional[torch.Tensor],
             stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], relu_input: bool,
             output_mask: Sequence[bool]):
    """The backward of ``sepconv_triton::backward``.

    grad_output: (N, C_out, OH, OW) any strides; input: (N, C, H, W); weights as in ``forward``.
    Returns (grad_input, grad_dw_weight, grad_pw_weight, grad_dw_bias, grad_pw_bias), ``(0,)``
    for gradients not in ``output_mask``.
    """
    if input.dtype == torch.float64:  # fp64 sums: split mode's kernels (these sum in fp32)
        from . import split

        return split.backward(grad_output, input, depthwise_weight, pointwise_weight, depthwise_bias, stride,
                              padding, dilation, relu_input, output_mask)
    check_window(depthwise_weight.shape[2], depthwise_weight.shape[3], stride, padding, dilation)
    out, work = empty_backward(grad_output, input, depthwise_weight, pointwise_weight, depthwise_bias, output_mask)
    if not work:
        return out
    want_input, want_dw_weight, want_pw_weight, want_dw_bias, want_pw_bias = check_output_mask(output_mask)
    # The bias sums ride along with their weight's reduction (same kernel, same reads).
    want_depthwise, want_pointwise = want_dw_weight or want_dw_bias, want_pw_weight or want_pw_bias
    batch, channels, height, width = input.shape
    c_hid, _, kh, kw = depthwise_weight.shape
    c_out = pointwise_weight.shape[0]
    oh, ow = grad_output.shape[2], grad_output.shape[3]
    pixels = batch * oh * ow
    dw = depthwise_weight.reshape(c_hid, kh * kw).contiguous()
    pw = pointwise_weight.reshape(c_out, c_hid).contiguous()
    dwb = depthwise_bias.contiguous() if depthwise_bias is not None else dw
    geometry = geometry_args(stride, padding, dilation)
    relu = bool(relu_input)
    f32 = dict(dtype=torch.float32, device=input.device)

    with device_guard(input):
        if want_input or want_depthwise:
            grad_hidden = torch.empty((pixels, c_hid), **f32) if want_input else dw
            launch_grad_hidden(grad_output, pw, input, grad_hidden, out, geometry, kh, kw, relu,
                               store_gh=want_input, need_dw=want_depthwise)
            if want_input:
                launch_grad_input(grad_hidden, dw, input, out[0], (oh, ow), geometry, kh, kw, relu)

        if want_pointwise:
            splits = max(1, min(cdiv(pixels, PIXELS_PER_SPLIT), PARTIAL_BUDGET // (c_out * c_hid)))
            part_w = torch.empty((splits, c_out, c_hid), **f32)
            part_b = torch.empty((splits, c_out), **f32)

            def grid_pointwise(meta):
                return (cdiv(c_out, meta["BLOCK_CO"]), cdiv(c_hid, meta["BLOCK_K"]), splits)

            launch(grad_pointwise_autotuned[family(input.dtype)], grid_pointwise,
                   input, dw, dwb, grad_output, part_w, part_b,
                   pixels, c_hid, c_out, height, width, oh, ow, c_hid // channels, splits,
                   *input.stride(), *grad_output.stride(), *geometry,
                   KH=kh, KW=kw, HAS_DW_BIAS=depthwise_bias is not None, RELU=relu, TF32=conv_tf32(input))
            if want_pw_weight:
                out[2].copy_(part_w.sum(0).reshape(out[2].shape))
            if want_pw_bias:
                out[4].copy_(part_b.sum(0))
    return out
