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
Backward: ``g_h = grad_out @ W_pw`` (GEMM); the depthwise weight and bias
gradients from ``g_h`` and the input (``grad_hidden_kernel`` with ``LOAD_GH``:
its epilogue without its GEMM); ``grad_input_kernel`` as in fused mode;
``grad_W_pw = grad_out^T @ hidden`` with the depthwise result recomputed by
``depthwise_kernel`` (never saved). Deterministic: no atomics.

16-bit inputs round the depthwise result and ``g_h`` to the input dtype
before the GEMMs (as a cuDNN pair rounds its intermediate), where fused mode
keeps them in fp32 registers.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ..ops import empty_output, output_shape
from .backward import empty_backward, launch_grad_hidden, launch_grad_input
from .common import cast, row_offsets, split_pixels, vector_width
from .forward import check_pixels, configs_for, device_guard, family, geometry_args, launch

# Untimed guesses (no GPU run of this kernel yet). Each compiles without spills for sm_80 and
# sm_90 and, with ALIGN = 8, loads and stores only 128-bit vectors (kernels/triton/aot_report.py).
GPU_CONFIGS = {
    "16bit": [
        triton.Config({"BLOCK_P": 32, "BLOCK_C": 64}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_P": 64, "BLOCK_C": 64}, num_warps=8, num_stages=1),
        triton.Config({"BLOCK_P": 64, "BLOCK_C": 32}, num_warps=4, num_stages=1),
    ],
    "fp32": [
        triton.Config({"BLOCK_P": 32, "BLOCK_C": 64}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_P": 64, "BLOCK_C": 32}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_P": 64, "BLOCK_C": 64}, num_warps=8, num_stages=1),
    ],
}
INTERPRET_CONFIGS = [triton.Config({"BLOCK_P": 32, "BLOCK_C": 16}, num_warps=4, num_stages=1)]


@triton.jit
def depthwise_kernel(
    # pointers
    x_ptr, dw_ptr, dwb_ptr, h_ptr,
    # sizes (C_HID_A = C_HID // ALIGN)
    P, C_HID_A, H, W, OH, OW, M,
    # input strides (elements; the ``_a`` ones divided by ALIGN)
    x_sn_a, x_sc, x_sh_a, x_sw_a,
    # geometry
    stride_h, stride_w, pad_top, pad_left, dil_h, dil_w,
    # meta-parameters
    KH: tl.constexpr, KW: tl.constexpr, HAS_DW_BIAS: tl.constexpr, RELU: tl.constexpr,
    ALIGN: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """h[p, j] = depthwise(x)[p, j] in h's dtype; h: (P, C_HID) contiguous, p = (n * OH + oh) * OW + ow.

    dw: (KH*KW, C_HID) contiguous (tap-major, so a tap's weights are one vector).
    Grid: (cdiv(P, BLOCK_P), cdiv(C_HID, BLOCK_C)).
    """
    C_HID = C_HID_A * ALIGN
    x_sh = x_sh_a * ALIGN
    x_sw = x_sw_a * ALIGN
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < P
    n, oh, ow = split_pixels(offs_p, OH, OW)
    j = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    j_mask = j < C_HID
    col = (j // M).to(tl.int64) * x_sc
    ih0 = oh * stride_h - pad_top
    iw0 = ow * stride_w - pad_left
    # One int64 offset per pixel (the window's top-left corner); each tap adds a scalar to it.
    corner = row_offsets(n, ih0, iw0, x_sn_a * ALIGN, x_sh, x_sw)
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for tap in tl.static_range(KH * KW):
        dy = (tap // KW) * dil_h
        dx = (tap % KW) * dil_w
        ih = ih0 + dy
        iw = iw0 + dx
        ok = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        at = corner + (dy.to(tl.int64) * x_sh + dx.to(tl.int64) * x_sw)
        xv = tl.load(x_ptr + at[:, None] + col[None, :], mask=ok[:, None] & j_mask[None, :], other=0.0)
        xv = xv.to(tl.float32)
        if RELU:
            xv = tl.maximum(xv, 0.0)
        wv = tl.load(dw_ptr + tap * C_HID + j, mask=j_mask, other=0.0).to(tl.float32)
        acc += xv * wv[None, :]
    if HAS_DW_BIAS:
        acc += tl.load(dwb_ptr + j, mask=j_mask, other=0.0).to(tl.float32)[None, :]
    offs = offs_p.to(tl.int64)[:, None] * C_HID + j[None, :]
    tl.store(h_ptr + offs, cast(acc, h_ptr.dtype.element_ty), mask=p_mask[:, None] & j_mask[None, :])


depthwise_autotuned = {name: triton.autotune(configs=configs_for(GPU_CONFIGS, INTERPRET_CONFIGS, name),
                                             key=["P", "C_HID_A", "KH", "KW", "M", "ALIGN"])(depthwise_kernel)
                       for name in GPU_CONFIGS}


def tap_major(depthwise_weight: torch.Tensor) -> torch.Tensor:
    """(C_hid, 1, kh, kw) -> (kh*kw, C_hid) contiguous: a tap's weights over channels are one vector."""
    c_hid, _, kh, kw = depthwise_weight.shape
    return depthwise_weight.reshape(c_hid, kh * kw).t().contiguous()


def depthwise_launch(input: torch.Tensor, depthwise_weight: torch.Tensor, depthwise_bias: Optional[torch.Tensor],
                     out_hw: Sequence[int], stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                     relu_input: bool):
    """One ``depthwise_kernel`` launch: (hidden, grid, args, constexprs); ``aot_report`` compiles the same."""
    batch, channels, height, width = input.shape
    c_hid, _, kh, kw = depthwise_weight.shape
    pixels = batch * out_hw[0] * out_hw[1]
    hidden = torch.empty((pixels, c_hid), dtype=input.dtype, device=input.device)
    dw = tap_major(depthwise_weight)
    dwb = depthwise_bias.contiguous() if depthwise_bias is not None else dw
    x_sn, x_sc, x_sh, x_sw = input.stride()
    align = vector_width(c_hid, x_sn, x_sh, x_sw)

    def grid(meta):
        return (triton.cdiv(pixels, meta["BLOCK_P"]), triton.cdiv(c_hid, meta["BLOCK_C"]))

    args = (input, dw, dwb, hidden, pixels, c_hid // align, height, width, out_hw[0], out_hw[1], c_hid // channels,
            x_sn // align, x_sc, x_sh // align, x_sw // align, *geometry_args(stride, padding, dilation))
    constexprs = dict(KH=kh, KW=kw, HAS_DW_BIAS=depthwise_bias is not None, RELU=bool(relu_input), ALIGN=align)
    return hidden, grid, args, constexprs


def depthwise(input: torch.Tensor, depthwise_weight: torch.Tensor, depthwise_bias: Optional[torch.Tensor],
              out_hw: Sequence[int], stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
              relu_input: bool) -> torch.Tensor:
    """The depthwise result (pixels, C_hid) in input's dtype (ReLU on the input first under ``relu_input``)."""
    hidden, grid, args, constexprs = depthwise_launch(input, depthwise_weight, depthwise_bias, out_hw, stride,
                                                      padding, dilation, relu_input)
    launch(depthwise_autotuned[family(input.dtype)], grid, *args, **constexprs)
    return hidden


def _pixel_rows(tensor: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N*H*W, C), a view when ``tensor`` is channels_last-contiguous, else a copy."""
    return tensor.permute(0, 2, 3, 1).reshape(-1, tensor.shape[1])


def forward(input: torch.Tensor, depthwise_weight: torch.Tensor, pointwise_weight: torch.Tensor,
            depthwise_bias: Optional[torch.Tensor], pointwise_bias: Optional[torch.Tensor],
            stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], relu_input: bool) -> torch.Tensor:
    """``sepconv_triton::forward`` in split mode (same contract as ``forward.forward``)."""
    shape = output_shape(input, depthwise_weight, pointwise_weight, stride, padding, dilation)
    out = empty_output(input, shape)
    batch, c_out, oh, ow = shape
    if batch * oh * ow == 0:
        return out
    check_pixels(batch * oh * ow, input)
    pw = pointwise_weight.reshape(c_out, -1)
    with device_guard(input):
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
    return out


def backward(grad_output: torch.Tensor, input: torch.Tensor, depthwise_weight: torch.Tensor,
             pointwise_weight: torch.Tensor, depthwise_bias: Optional[torch.Tensor],
             stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], relu_input: bool,
             output_mask: Sequence[bool]):
    """``sepconv_triton::backward`` in split mode (same contract as ``backward.backward``)."""
    out, work = empty_backward(grad_output, input, depthwise_weight, pointwise_weight, depthwise_bias, output_mask)
    if not work:
        return out
    want_input, want_depthwise, want_pointwise = (bool(v) for v in output_mask)
    c_hid, _, kh, kw = depthwise_weight.shape
    c_out = pointwise_weight.shape[0]
    out_hw = (grad_output.shape[2], grad_output.shape[3])
    dw = depthwise_weight.reshape(c_hid, kh * kw).contiguous()
    pw = pointwise_weight.reshape(c_out, c_hid).to(grad_output.dtype)
    geometry = geometry_args(stride, padding, dilation)
    relu = bool(relu_input)
    go = _pixel_rows(grad_output)  # (P, C_out)

    with device_guard(input):
        if want_input or want_depthwise:
            grad_hidden = go @ pw  # (P, C_hid), input dtype
            if want_depthwise:  # the grad_hidden kernel's epilogue alone: g_h is read, not computed
                launch_grad_hidden(grad_output, pw, input, grad_hidden, out, geometry, kh, kw, relu,
                                   store_gh=False, need_dw=True, load_gh=True)
            if want_input:
                launch_grad_input(grad_hidden, dw, input, out[0], out_hw, geometry, kh, kw, relu)
        if want_pointwise:
            hidden = depthwise(input, depthwise_weight, depthwise_bias, out_hw, stride, padding, dilation, relu)
            out[2].copy_((go.t() @ hidden).reshape(out[2].shape))
            out[4].copy_(go.sum(0, dtype=torch.float32))
    return out
