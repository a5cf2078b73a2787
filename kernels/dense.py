"""Fused dequantize + matmul for the dense packed format (int2/3/4/8, sym/asym, any group), plus the sparse
outliers of the no-clipping SSQR format, in Triton.

``y[M, N] = x[M, K] @ W[N, K]ᵀ`` with ``W[n, k] = scales[k // g, n] · (code[k, n] − zero[k // g, n])`` (+ the
CSR outliers for SSQR), read straight from the canonical buffers of :mod:`hf_babai.formats.packing`
(``qweight [ceil(K/P), N]`` int32, K packed LSB-first, N contiguous; 3-bit as a 2-bit plane + a 1-bit plane;
``scales [G, N]``; asymmetric zeros packed along N) and of :class:`hf_babai.formats.SSQRLinear`
(``rowptr [N+1]``, ``cols [nnz]``, ``values [nnz]``). Nothing is repacked: the checkpoint layout is the kernel
layout, so loading costs no transform and the torch fallback and these kernels read the same bytes.

One program of :func:`dense_matmul_kernel` computes a ``BLOCK_M × BLOCK_N`` output tile over a ``1/SPLIT_K``
share of K: it loads the activation tile, unpacks the code tile with shifts and masks, applies the per-group
scale (and zero), and accumulates ``tl.dot`` in fp32. ``SPLIT_K > 1`` (small M: more programs so every SM
works at M = 1) adds partial tiles into a zeroed fp32 workspace with ``atomic_add``. ``DOT_FP32`` upcasts both
operands to fp32 (IEEE): required under ``TRITON_INTERPRET=1``, where bf16 arithmetic is broken, and the exact
mode the tests compare against a float64 reference; on a GPU the weight tile is cast to the activation dtype
and the dot runs on tensor cores.

Outliers (``HAS_OUTLIERS``): the rows of an output tile own one contiguous CSR segment. The program walks
its share of that segment ``BLOCK_S`` entries at a time, gathers ``x[:, col]·value`` into a
``[BLOCK_M, BLOCK_S]`` tile and adds it to the accumulator through a one-hot ``[BLOCK_S, BLOCK_N]`` matrix
(entry ``s`` belongs to tile row ``j`` iff ``rowptr[j] ≤ s < rowptr[j+1]``). The one-hot product is exact and
needs no row-index array, no atomics inside the tile and no repacking of the CSR buffers.
:func:`outlier_matmul_kernel` is the same walk as a separate launch that adds into an fp32 accumulator (the
first, unfused design; kept for large M and as the benchmark's comparison point).

:func:`dequantize_kernel` writes the dense ``[N, K]`` weight in the activation dtype, for large M where a
dense GEMM (cuBLAS) on a dequantized buffer can beat the fused kernel.

This file is the Triton source only (DFloat11-style: kernels and their launchers). The torch custom ops,
the fake (meta) implementations and the backend choice live in :mod:`hf_babai.formats.kernel_ops`.
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
def _weight_tile(q_ptr, qhi_ptr, s_ptr, z_ptr, zhi_ptr, offs_k, offs_n, kn_ok, N, G, group, BITS, ASYM):
    """Dequantized ``[BLOCK_K, BLOCK_N]`` tile of ``Wᵀ`` in fp32; masked entries are 0."""
    codes = _codes(q_ptr, qhi_ptr, offs_k, offs_n, kn_ok, N, BITS)
    g = offs_k // group
    scale = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=kn_ok, other=0).to(tl.float32)
    if ASYM:  # noqa: SIM108  (a constexpr branch: Triton compiles only the taken side)
        zero = _zeros(z_ptr, zhi_ptr, g, offs_n, kn_ok, G, BITS)
    else:
        zero = 1 << (BITS - 1)
    return (codes - zero).to(tl.float32) * scale


@triton.jit
def _add_outliers(
    acc, x_ptr, rowptr_ptr, col_ptr, val_ptr, offs_m, m_ok, offs_n, N, stride_xm, part, parts, BLOCK_S: tl.constexpr
):
    """``acc + x[offs_m] @ O[offs_n]ᵀ`` over the ``part``-th of ``parts`` shares of the tile's CSR segment."""
    n_ok = offs_n < N
    lo = tl.load(rowptr_ptr + offs_n, mask=n_ok, other=0)
    hi = tl.load(rowptr_ptr + offs_n + 1, mask=n_ok, other=0)  # rows past N: empty range [0, 0)
    n0 = tl.min(tl.where(n_ok, offs_n, N), axis=0)
    start = tl.load(rowptr_ptr + n0)
    end = tl.load(rowptr_ptr + tl.minimum(tl.max(tl.where(n_ok, offs_n, 0), axis=0) + 1, N))
    for s0 in range(start + part * BLOCK_S, end, BLOCK_S * parts):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_ok = offs_s < end
        cols = tl.load(col_ptr + offs_s, mask=s_ok, other=0).to(tl.int32)
        vals = tl.load(val_ptr + offs_s, mask=s_ok, other=0).to(tl.float32)
        xs = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :], mask=m_ok[:, None] & s_ok[None, :], other=0)
        onehot = (offs_s[:, None] >= lo[None, :]) & (offs_s[:, None] < hi[None, :])
        acc += tl.dot(xs.to(tl.float32) * vals[None, :], onehot.to(tl.float32), input_precision="ieee")
    return acc


@triton.jit
def dense_matmul_kernel(
    x_ptr,
    q_ptr,
    qhi_ptr,
    s_ptr,
    z_ptr,
    zhi_ptr,
    rowptr_ptr,
    col_ptr,
    val_ptr,
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
    HAS_OUTLIERS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr,
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
        w = _weight_tile(q_ptr, qhi_ptr, s_ptr, z_ptr, zhi_ptr, offs_k, offs_n, kn_ok, N, G, group, BITS, ASYM)
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    if HAS_OUTLIERS:
        acc = _add_outliers(
            acc, x_ptr, rowptr_ptr, col_ptr, val_ptr, offs_m, m_ok, offs_n, N, stride_xm, pid_k, SPLIT_K, BLOCK_S
        )
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out, acc, mask=mask)


@triton.jit
def outlier_matmul_kernel(
    x_ptr,
    rowptr_ptr,
    col_ptr,
    val_ptr,
    acc_ptr,
    M,
    N,
    stride_xm,
    stride_am,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Adds ``x @ Oᵀ`` (the CSR outliers) into the fp32 accumulator ``acc [M, N]`` (one program per tile)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    out = acc_ptr + offs_m[:, None] * stride_am + offs_n[None, :]
    mask = m_ok[:, None] & (offs_n[None, :] < N)
    acc = tl.load(out, mask=mask, other=0)
    acc = _add_outliers(acc, x_ptr, rowptr_ptr, col_ptr, val_ptr, offs_m, m_ok, offs_n, N, stride_xm, 0, 1, BLOCK_S)
    tl.store(out, acc, mask=mask)


@triton.jit
def dequantize_kernel(
    q_ptr,
    qhi_ptr,
    s_ptr,
    z_ptr,
    zhi_ptr,
    out_ptr,
    N,
    K,
    G,
    group,
    BITS: tl.constexpr,
    ASYM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Writes the dense weight ``W [N, K]`` (row-major, in ``out``'s dtype)."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    kn_ok = (offs_k < K)[:, None] & (offs_n < N)[None, :]
    w = _weight_tile(q_ptr, qhi_ptr, s_ptr, z_ptr, zhi_ptr, offs_k, offs_n, kn_ok, N, G, group, BITS, ASYM)
    tl.store(out_ptr + offs_n[None, :] * K + offs_k[:, None], w.to(out_ptr.dtype.element_ty), mask=kn_ok)


def _plane_pointers(planes):
    """``(qweight, qweight_hi, scales, qzeros, qzeros_hi)`` with absent planes replaced by ``qweight`` (a valid
    pointer the kernel never reads: the constexpr ``BITS`` / ``ASYM`` branches that would are not compiled)."""
    q, qhi, scales, qz, qzhi = planes
    return q, q if qhi is None else qhi, scales, q if qz is None else qz, q if qzhi is None else qzhi


def launch(x, planes, outliers, out, *, bits, group, config, dot_fp32):
    """Fused kernel on 2-D contiguous ``x [M, K]`` into ``out [M, N]`` (fp32 and zeroed if split-K).

    ``planes`` = ``(qweight, qweight_hi, scales, qzeros, qzeros_hi)`` (absent ones ``None``); ``outliers`` =
    ``(rowptr, cols, values)`` or ``None``; ``config`` = ``(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K)``.
    """
    pointers = _plane_pointers(planes)
    m, k = x.shape
    n = out.shape[1]
    bm, bn, bk, split_k = config
    rowptr, cols, vals = (pointers[0],) * 3 if outliers is None else outliers
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), split_k)
    dense_matmul_kernel[grid](
        x,
        *pointers,
        rowptr,
        cols,
        vals,
        out,
        m,
        n,
        k,
        planes[2].shape[0],
        group,
        x.stride(0),
        out.stride(0),
        BITS=bits,
        ASYM=planes[3] is not None,
        HAS_OUTLIERS=outliers is not None,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        BLOCK_S=32,
        SPLIT_K=split_k,
        DOT_FP32=dot_fp32,
    )


def launch_outliers(x, outliers, acc, *, block_m, block_n):
    """Separate outlier kernel: ``acc [M, N]`` (fp32) ``+= x @ Oᵀ``."""
    rowptr, cols, vals = outliers
    m, n = acc.shape
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    outlier_matmul_kernel[grid](
        x, rowptr, cols, vals, acc, m, n, x.stride(0), acc.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_S=32
    )


def launch_dequantize(planes, out, *, bits, group, block_n=64, block_k=64):
    """Dense ``out [N, K]`` from the packed planes."""
    n, k = out.shape
    grid = (triton.cdiv(k, block_k), triton.cdiv(n, block_n))
    dequantize_kernel[grid](
        *_plane_pointers(planes),
        out,
        n,
        k,
        planes[2].shape[0],
        group,
        BITS=bits,
        ASYM=planes[3] is not None,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
