"""Entropy-coded (HPTQ/HRTN) weights in Triton: decode to a dense buffer, and a fused decode + GEMV.

The buffers are those of :mod:`hf_babai.formats.huffman`: a MSB-first bit ``stream`` (uint8, 4 bytes of
padding), the bit ``offsets`` where each chunk of ``CHUNK`` symbols starts, and the codebook. The codebook is
turned once at load into one int32 lookup table of ``2^MAX_LEN`` entries, ``symbol << 8 | length``, so decoding
a symbol is: read the 4 bytes around the bit position, peek ``MAX_LEN`` bits, one table load, advance by the
length (docs/kernels.md). The code is length-limited, so there is no tree walk and no second table.

Parallelism: one lane per chunk, all lanes stepping through their ``CHUNK`` symbols in lock-step; output
positions are implicit (symbol ``t`` of chunk ``c`` is flat index ``c · CHUNK + t`` of the row-major
``[N, K]`` codes), so no prefix sum is needed.

- :func:`decode_kernel` writes ``scale · Z`` in the output dtype (large M: decode once, then a dense GEMM).
- :func:`gemv_kernel` (M ≤ 4) never materialises the weight: each lane multiplies its symbols with the
  gathered activations into a per-lane ``[BLOCK_M]`` partial sum and adds it to ``y[:, row]`` with one
  ``atomic_add`` whenever its chunk leaves a row (chunks may straddle rows) or ends. HPTQ has a single scale
  per matrix, applied once per flush.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _next_symbol(stream_ptr, lut_ptr, pos, last, MAX_LEN: tl.constexpr):
    """(symbol, length) of the codeword starting at bit ``pos`` of each lane."""
    byte = tl.minimum(pos >> 3, last)  # lanes past their chunk read padding; their symbols are discarded
    word = (
        (tl.load(stream_ptr + byte).to(tl.int64) << 24)
        | (tl.load(stream_ptr + byte + 1).to(tl.int64) << 16)
        | (tl.load(stream_ptr + byte + 2).to(tl.int64) << 8)
        | tl.load(stream_ptr + byte + 3).to(tl.int64)
    )
    peek = (word >> (32 - MAX_LEN - (pos & 7))) & ((1 << MAX_LEN) - 1)
    entry = tl.load(lut_ptr + peek)
    return entry >> 8, (entry & 255).to(tl.int64)


@triton.jit
def decode_kernel(
    stream_ptr,
    offsets_ptr,
    lut_ptr,
    scale_ptr,
    out_ptr,
    numel,
    n_chunks,
    last_byte,
    CHUNK,
    MAX_LEN: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``out.flat[i] = scale · Z.flat[i]`` for the ``BLOCK_C`` chunks of this program."""
    chunk = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = chunk < n_chunks
    pos = tl.load(offsets_ptr + chunk, mask=c_ok, other=0).to(tl.int64)
    scale = tl.load(scale_ptr).to(tl.float32)
    base = chunk.to(tl.int64) * CHUNK
    for t in range(0, CHUNK):
        sym, length = _next_symbol(stream_ptr, lut_ptr, pos, last_byte, MAX_LEN)
        idx = base + t
        tl.store(out_ptr + idx, (sym.to(tl.float32) * scale).to(out_ptr.dtype.element_ty), mask=c_ok & (idx < numel))
        pos += length


@triton.jit
def gemv_kernel(
    x_ptr,
    stream_ptr,
    offsets_ptr,
    lut_ptr,
    scale_ptr,
    y_ptr,
    M,
    K,
    numel,
    n_chunks,
    last_byte,
    stride_xm,
    stride_ym,
    CHUNK,
    MAX_LEN: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """``y [M, N] += x [M, K] @ (scale · Z)ᵀ`` decoding ``BLOCK_C`` chunks; ``y`` fp32 and zeroed."""
    chunk = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = chunk < n_chunks
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    pos = tl.load(offsets_ptr + chunk, mask=c_ok, other=0).to(tl.int64)
    scale = tl.load(scale_ptr).to(tl.float32)
    base = chunk.to(tl.int64) * CHUNK
    acc = tl.zeros((BLOCK_C, BLOCK_M), dtype=tl.float32)
    for t in range(0, CHUNK):
        sym, length = _next_symbol(stream_ptr, lut_ptr, pos, last_byte, MAX_LEN)
        pos += length
        idx = base + t
        ok = c_ok & (idx < numel)
        row = idx // K
        col = idx - row * K
        xv = tl.load(x_ptr + offs_m[None, :] * stride_xm + col[:, None], mask=ok[:, None] & m_ok[None, :], other=0)
        acc += xv.to(tl.float32) * sym.to(tl.float32)[:, None]
        flush = ok & ((col == K - 1) | (idx == base + CHUNK - 1) | (idx == numel - 1))
        tl.atomic_add(
            y_ptr + offs_m[None, :] * stride_ym + row[:, None], acc * scale, mask=flush[:, None] & m_ok[None, :]
        )
        acc = tl.where(flush[:, None], 0.0, acc)


def launch_decode(stream, offsets, lut, scale, out, *, chunk, max_len, block_c=64):
    """Decodes every chunk into ``out`` (contiguous, ``numel`` = number of codes)."""
    n_chunks = offsets.numel()
    decode_kernel[(triton.cdiv(n_chunks, block_c),)](
        stream,
        offsets,
        lut,
        scale,
        out,
        out.numel(),
        n_chunks,
        stream.numel() - 4,
        chunk,
        MAX_LEN=max_len,
        BLOCK_C=block_c,
    )


def launch_gemv(x, stream, offsets, lut, scale, y, *, chunk, max_len, block_c=64):
    """``y [M, N]`` (fp32, zeroed) ``+= x [M, K] @ (scale · Z)ᵀ`` for ``M ≤ 4``."""
    m, k = x.shape
    n_chunks = offsets.numel()
    gemv_kernel[(triton.cdiv(n_chunks, block_c),)](
        x,
        stream,
        offsets,
        lut,
        scale,
        y,
        m,
        k,
        y.shape[1] * k,
        n_chunks,
        stream.numel() - 4,
        x.stride(0),
        y.stride(0),
        chunk,
        MAX_LEN=max_len,
        BLOCK_C=block_c,
        BLOCK_M=4,
    )
