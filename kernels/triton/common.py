"""Pieces shared by the forward and backward Triton kernels.

``depthwise_tile`` computes a ``(BLOCK_P, BLOCK_K)`` tile of the depthwise
result (pixels x hidden channels) straight from the input, in registers, so
the fused kernels never write the intermediate to global memory.

Pixels are flattened ``p = (n * OH + oh) * OW + ow`` and indexed in int32
(the launchers check ``N * OH * OW < 2**31``: 64-bit division is a slow
subroutine on GPUs); every memory offset is then built in int64 from the
per-pixel row terms, so tensors past ``2**31`` elements index correctly.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Triton's interpreter (3.9) returns garbage from tl.dot on bfloat16 operands and truncates
# fp32 -> bfloat16 casts, so there the
# operands (already rounded to the input dtype) are widened to fp32 first: the products of
# two 16-bit values are exact in fp32, so the result matches the tensor-core path up to the
# order of the fp32 accumulation.
DOT_IN_FP32 = tl.constexpr(INTERPRET)


@triton.jit
def cast(x, dtype: tl.constexpr):
    """``x.to(dtype)`` rounding to nearest even (the interpreter truncates fp32 -> bfloat16)."""
    if DOT_IN_FP32 and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(dtype)
    else:
        return x.to(dtype)


# Whether CPU tensors stand for CUDA ones in the choices a launcher makes for the device (TF32).
# benchmarks.gpu_model sets it while it records launches for a GPU; the interpreter leaves it off.
STAND_IN_CUDA = False


def conv_tf32(tensor: torch.Tensor) -> bool:
    """Whether PyTorch would run a float32 convolution on ``tensor``'s device with TF32 tensor cores:
    CUDA and ``torch.backends.cudnn.allow_tf32`` (on by default). The kernels' fp32 products follow it."""
    on_cuda = tensor.is_cuda or STAND_IN_CUDA
    return on_cuda and tensor.dtype == torch.float32 and bool(torch.backends.cudnn.allow_tf32)


@contextlib.contextmanager
def matmul_like_conv(tensor: torch.Tensor):
    """Run cuBLAS GEMMs that stand for the pointwise convolution at that convolution's precision: for fp32
    CUDA tensors, TF32 exactly when ``conv_tf32`` (cuBLAS's own default, ``torch.backends.cuda.matmul``, is
    IEEE). The matmul setting is restored afterwards."""
    if not (tensor.is_cuda and tensor.dtype == torch.float32):
        yield
        return
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32" if conv_tf32(tensor) else "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = before


@triton.jit
def mma(a, b, acc, TF32: tl.constexpr = False):
    """``acc + a @ b`` with fp32 accumulation; fp32 operands in TF32 under ``TF32``, else exactly (ieee)."""
    if DOT_IN_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif TF32:
        return tl.dot(a, b, acc, input_precision="tf32")
    else:
        return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def split_pixels(offs_p, OH, OW):
    """Flattened pixels ``offs_p`` (int32) -> ``(n, oh, ow)`` (int32)."""
    per_image = OH * OW
    n = offs_p // per_image
    rem = offs_p % per_image
    return n, rem // OW, rem % OW


@triton.jit
def load_channels(x_ptr, at, col, ok, j_mask, ACC: tl.constexpr, RELU: tl.constexpr):
    """Input values at pixel offsets ``at`` (BLOCK_P,) and channel offsets ``col`` (BLOCK_C,) as an ACC tile,
    ReLU'd under RELU; zeros where ``ok`` (pixels) or ``j_mask`` (channels) is false."""
    xv = tl.load(x_ptr + at[:, None] + col[None, :], mask=ok[:, None] & j_mask[None, :], other=0.0).to(ACC)
    if RELU:
        xv = tl.maximum(xv, 0.0)
    return xv


@triton.jit
def window_tap(x_ptr, corner, ih0, iw0, p_mask, col, j_mask, H, W, x_sh, x_sw, dil_h, dil_w, tap: tl.constexpr,
               KW: tl.constexpr, ACC: tl.constexpr, RELU: tl.constexpr):
    """The input under tap ``tap`` of windows whose top-left pixels are ``(ih0, iw0)`` (at offsets ``corner``,
    int64), as an ACC tile (``load_channels``); zeros outside the image."""
    dy = (tap // KW) * dil_h
    dx = (tap % KW) * dil_w
    ih = ih0 + dy
    iw = iw0 + dx
    ok = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    at = corner + (dy.to(tl.int64) * x_sh + dx.to(tl.int64) * x_sw)
    return load_channels(x_ptr, at, col, ok, j_mask, ACC, RELU)


@triton.jit
def _tap(x_ptr, dw_ptr, n_off, oh, ow, p_mask, j, j_mask, col, H, W, x_sh, x_sw,
         stride_h, stride_w, pad_top, pad_left, dil_h, dil_w, tap, KH: tl.constexpr, KW: tl.constexpr,
         RELU: tl.constexpr):
    """One tap's contribution to the depthwise tile: input (gathered) times the tap's weights, fp32."""
    ih = oh * stride_h - pad_top + (tap // KW) * dil_h
    iw = ow * stride_w - pad_left + (tap % KW) * dil_w
    ok = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    row = n_off + ih.to(tl.int64) * x_sh + iw.to(tl.int64) * x_sw
    xv = load_channels(x_ptr, row, col, ok, j_mask, tl.float32, RELU)
    wv = tl.load(dw_ptr + j * (KH * KW) + tap, mask=j_mask, other=0.0).to(tl.float32)
    return xv * wv[None, :]


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
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, UNROLL_TAPS: tl.constexpr,
):
    """Depthwise output for pixels x hidden channels ``j`` (channel ``j`` reads input ``j // M``); fp32."""
    c = j // M
    col = c.to(tl.int64) * x_sc
    n_off = n.to(tl.int64) * x_sn
    acc = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float32)
    if UNROLL_TAPS:
        # Unrolled: every tap's gather can be in flight at once (more registers).
        for tap in tl.static_range(KH * KW):
            acc += _tap(x_ptr, dw_ptr, n_off, oh, ow, p_mask, j, j_mask, col, H, W, x_sh, x_sw,
                        stride_h, stride_w, pad_top, pad_left, dil_h, dil_w, tap, KH, KW, RELU)
    else:
        # A runtime loop over the taps keeps one tap's gather live at a time (fewer registers).
        for tap in tl.range(0, KH * KW, num_stages=1):
            acc += _tap(x_ptr, dw_ptr, n_off, oh, ow, p_mask, j, j_mask, col, H, W, x_sh, x_sw,
                        stride_h, stride_w, pad_top, pad_left, dil_h, dil_w, tap, KH, KW, RELU)
    if HAS_DW_BIAS:
        acc += tl.load(dwb_ptr + j, mask=j_mask, other=0.0).to(tl.float32)[None, :]
    return acc


def accumulator(dtype: torch.dtype):
    """The kernels' sum dtype for tensors of ``dtype`` (a constexpr ``ACC``): fp64 for fp64, else fp32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for host ints. (``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions
    since Triton 3.5: called from Python, each unwraps its arguments, ~3 us; a launch computes a dozen.)"""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= ``n`` for a host int ``n`` >= 1 (0 for 0, as ``triton.next_power_of_2``)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def vector_width(*values: int) -> int:
    """The largest of 8, 4, 2, 1 that divides every value (a channel count and pixel strides).

    The kernels take such sizes divided by it (``ALIGN``) and multiply back in the kernel:
    Triton's runtime marks only multiples of 16 as divisible, so without this a channel count
    like 728 (8 * 91) leaves every channel-vector access a scalar 16-bit load. With the
    product known to be a multiple of 8, a run of 8 channels is one 128-bit access.
    """
    for width in (8, 4, 2):
        if all(value % width == 0 for value in values):
            return width
    return 1


@triton.jit
def row_offsets(n, h, w, s_n, s_h, s_w):
    """int64 offsets of pixels ``(n, h, w)`` (int32 vectors) for strides ``s_n, s_h, s_w``."""
    return n.to(tl.int64) * s_n + h.to(tl.int64) * s_h + w.to(tl.int64) * s_w
