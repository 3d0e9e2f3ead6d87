"""Pieces shared by the forward and backward Triton kernels.

``depthwise_tile`` computes a ``(BLOCK_P, BLOCK_K)`` tile of the depthwise
result (pixels x hidden channels) straight from the input, in registers, so
the fused kernels never write the intermediate to global memory.

Pixels are flattened ``p = (n * OH + oh) * OW + ow``; offsets built from
``p`` are 64-bit so tensors past ``2**31`` elements index correctly.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def split_pixels(offs_p, OH, OW):
    """Flattened output pixels ``offs_p`` (int64) -> ``(n, oh, ow)``."""
    per_image = OH * OW
    n = offs_p // per_image
    rem = offs_p % per_image
    return n, rem // OW, rem % OW


@triton.jit
def depthwise_tile(
    # pointers
    x_ptr, dw_ptr, dwb_ptr,
    # the tile: images/rows/columns of its pixels (BLOCK_P,), its hidden channels (BLOCK_K,)
    n, oh, ow, p_mask, j, j_mask,
    # sizes
    H, W, M,
    # input strides (elements)
    x_sn, x_sc, x_sh, x_sw,
    # geometry
    stride_h, stride_w, pad_top, pad_left, dil_h, dil_w,
    # meta-parameters
    KH: tl.constexpr, KW: tl.constexpr, HAS_DW_BIAS: tl.constexpr, RELU: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Depthwise output for pixels x hidden channels ``j`` (channel ``j`` reads input ``j // M``); fp32."""
    c = j // M
    base = n[:, None] * x_sn + c[None, :].to(tl.int64) * x_sc
    acc = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float32)
    for i in tl.static_range(KH):
        ih = oh * stride_h - pad_top + i * dil_h
        row_ok = p_mask & (ih >= 0) & (ih < H)
        for jj in tl.static_range(KW):
            iw = ow * stride_w - pad_left + jj * dil_w
            ok = row_ok & (iw >= 0) & (iw < W)
            mask = ok[:, None] & j_mask[None, :]
            xv = tl.load(x_ptr + base + (ih * x_sh + iw * x_sw)[:, None], mask=mask, other=0.0).to(tl.float32)
            if RELU:
                xv = tl.maximum(xv, 0.0)
            wv = tl.load(dw_ptr + j * (KH * KW) + (i * KW + jj), mask=j_mask, other=0.0).to(tl.float32)
            acc += xv * wv[None, :]
    if HAS_DW_BIAS:
        acc += tl.load(dwb_ptr + j, mask=j_mask, other=0.0).to(tl.float32)[None, :]
    return acc
