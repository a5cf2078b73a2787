"""Fused dequantize + matmul for the dense packed format (int2/3/4/8, sym/asym, any group), in Triton.

``y[M, N] = x[M, K] @ W[N, K]ᵀ`` with ``W[n, k] = scales[k // g, n] · (code[k, n] − zero[k // g, n])``, read
straight from the canonical buffers of :mod:`hf_babai.formats.packing` (``qweight [ceil(K/P), N]`` int32,
K packed LSB-first, N contiguous; 3-bit as a 2-bit plane + a 1-bit plane; ``scales [G, N]``; asymmetric
zeros packed along N). Nothing is repacked: the checkpoint layout is the kernel layout, so loading a
checkpoint costs no transform and the torch fallback and this kernel read the same bytes.

One program computes a ``BLOCK_M × BLOCK_N`` output tile over a ``1/SPLIT_K`` share of K: it loads the
activation tile, unpacks the code tile with shifts and masks, applies the per-group scale (and zero), and
accumulates ``tl.dot`` in fp32. ``SPLIT_K > 1`` (small M: more programs so every SM works at M = 1) adds
partial tiles into a zeroed fp32 workspace with ``atomic_add``. ``DOT_FP32`` upcasts both operands to fp32
(IEEE): required under ``TRITON_INTERPRET=1``, where bf16 arithmetic is broken, and the exact mode the
tests compare against a float64 reference; on a GPU the weight tile is cast to the activation dtype and
the dot runs on tensor cores.

This file is the Triton source only (DFloat11-style: one kernel, one launcher). The torch custom op, the
fake (meta) implementation and the backend choice live in :mod:`hf_babai.formats.kernel_ops`.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _codes(q_ptr, qhi_ptr, offs_k, offs_n, mask, N, BITS: tl.constexpr):
    """Codes of rows ``offs_k`` × columns ``offs_n`` from the packed planes (int32)."""
    if BITS == 3:
        lo = tl.load(q_ptr + (offs_k[:, None] // 16) * N + offs_n[None, :], mask=mask, other=0)
        hi = tl.load(qhi_ptr + (offs_k[:, None] // 32) * N + offs_n[None, :], mask=mask, other=0)
        lo = (lo >> ((offs_k[:, None] % 16) * 2)) & 3
        hi = (hi >> (offs_k[:, None] % 32)) & 1
        return lo | (hi << 2)
    else:
        PER: tl.constexpr = 32 // BITS
        w = tl.load(q_ptr + (offs_k[:, None] // PER) * N + offs_n[None, :], mask=mask, other=0)
        return (w >> ((offs_k[:, None] % PER) * BITS)) & ((1 << BITS) - 1)


@triton.jit
def _zeros(z_ptr, zhi_ptr, g, offs_n, mask, G, BITS: tl.constexpr):
    """Asymmetric zero points of groups ``g`` × columns ``offs_n`` (zeros are packed along N)."""
    if BITS == 3:
        lo = tl.load(z_ptr + (offs_n[None, :] // 16) * G + g[:, None], mask=mask, other=0)
        hi = tl.load(zhi_ptr + (offs_n[None, :] // 32) * G + g[:, None], mask=mask, other=0)
        lo = (lo >> ((offs_n[None, :] % 16) * 2)) & 3
        hi = (hi >> (offs_n[None, :] % 32)) & 1
        return lo | (hi << 2)
    else:
        PER: tl.constexpr = 32 // BITS
        w = tl.load(z_ptr + (offs_n[None, :] // PER) * G + g[:, None], mask=mask, other=0)
        return (w >> ((offs_n[None, :] % PER) * BITS)) & ((1 << BITS) - 1)


@triton.jit
def dense_matmul_kernel(
    x_ptr,
    q_ptr,
    qhi_ptr,
    s_ptr,
    z_ptr,
    zhi_ptr,
    out_ptr,
    M,
    N,
    K,
    G,
    group,
    stride_xm,
    stride_om,
    BITS: tl.constexpr,
    ASYM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0)
        kn_ok = k_ok[:, None] & n_ok[None, :]
        codes = _codes(q_ptr, qhi_ptr, offs_k, offs_n, kn_ok, N, BITS)
        g = offs_k // group
        scale = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=kn_ok, other=0).to(tl.float32)
        if ASYM:  # noqa: SIM108  (a constexpr branch: Triton compiles only the taken side)
            zero = _zeros(z_ptr, zhi_ptr, g, offs_n, kn_ok, G, BITS)
        else:
            zero = 1 << (BITS - 1)
        w = (codes - zero).to(tl.float32) * scale  # [BLOCK_K, BLOCK_N]; masked entries are 0
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out, acc, mask=mask)


def launch(x, qweight, qweight_hi, scales, qzeros, qzeros_hi, out, *, bits, group, config, dot_fp32):
    """Launches the kernel on 2-D contiguous ``x [M, K]`` into ``out [M, N]`` (fp32 and zeroed if split-K)."""
    m, k = x.shape
    n = out.shape[1]
    bm, bn, bk, split_k = config
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), split_k)
    dense_matmul_kernel[grid](
        x,
        qweight,
        qweight if qweight_hi is None else qweight_hi,
        scales,
        qweight if qzeros is None else qzeros,
        qweight if qzeros_hi is None else qzeros_hi,
        out,
        m,
        n,
        k,
        scales.shape[0],
        group,
        x.stride(0),
        out.stride(0),
        BITS=bits,
        ASYM=qzeros is not None,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        SPLIT_K=split_k,
        DOT_FP32=dot_fp32,
    )
