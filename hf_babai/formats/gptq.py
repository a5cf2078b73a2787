"""GPTQ v1 tensors from the canonical babai layout, for serving engines (vLLM, transformers' GPTQ loader).

GPTQ v1 (the ``checkpoint_format: "gptq"`` of AutoGPTQ/GPTQModel/optimum), per Linear ``W [N, K]``:

=========== ======== ====================== ===========================================================
tensor      dtype    shape                  content
=========== ======== ====================== ===========================================================
``qweight`` int32    ``[K·b/32, N]``        codes as one LSB-first bit stream along K per output column
                                            (b = 2/4/8: 32/b whole codes per word; b = 3: 32 codes per
                                            3 words, codes 10 and 21 straddle word boundaries)
``qzeros``  int32    ``[G, N·b/32]``        zero points minus one (the v1 convention), same bit stream
                                            along N per group
``scales``  float16  ``[G, N]``             group scales
``g_idx``   int32    ``[K]``                group of each input column: ``k // group_size`` (no act-order
                                            permutation: babai codes are stored in natural column order)
=========== ======== ====================== ===========================================================

Dequantization: ``W[n, k] = scales[g, n] · (code[k, n] − (qzeros[g, n] + 1))`` with ``g = g_idx[k]``. A
symmetric babai grid maps to GPTQ ``sym=True`` (zero ``2^(b−1)``, stored as ``2^(b−1) − 1``); per-channel
(``group_size = −1``) is ``G = 1``. The bit streams need ``K·b`` and ``N·b`` to be multiples of 32.
Only clipped formats export: every babai code already lies in ``[0, 2^b − 1]``, so the conversion is exact.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .packing import unpack_weight

__all__ = ["gptq_tensors", "pack_stream", "unpack_stream"]


def pack_stream(values: Tensor, bits: int) -> Tensor:
    """``values [L, M]`` (ints in ``[0, 2^bits)``) → int32 ``[L·bits/32, M]``: per column an LSB-first bit
    stream along the first dimension."""
    length, cols = values.shape
    if (length * bits) % 32:
        raise ValueError(f"GPTQ packing needs length·bits to be a multiple of 32; got {length}·{bits}")
    v = values.to(torch.int64)
    bit_pos = torch.arange(length, dtype=torch.int64) * bits
    words = torch.zeros(length * bits // 32, cols, dtype=torch.int64)
    for b in range(bits):  # scatter bit b of every value to its absolute position in the stream
        pos = bit_pos + b
        bit = (v >> b) & 1
        words.index_add_(0, pos // 32, bit << (pos % 32)[:, None])
    return (words - ((words >> 31) << 32)).to(torch.int32)  # two's complement into int32


def unpack_stream(words: Tensor, bits: int, length: int) -> Tensor:
    """Inverse of :func:`pack_stream`: int32 ``[L·bits/32, M]`` → int64 ``[L, M]``."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.zeros(length, words.shape[1], dtype=torch.int64)
    pos0 = torch.arange(length, dtype=torch.int64) * bits
    for b in range(bits):
        pos = pos0 + b
        out |= ((w[pos // 32] >> (pos % 32)[:, None]) & 1) << b
    return out


def gptq_tensors(
    buffers: dict[str, Tensor], bits: int, group_size: int, sym: bool, in_features: int, out_features: int
) -> dict[str, Tensor]:
    """The four GPTQ v1 tensors of one babai Linear (its canonical ``packed_buffers()``)."""
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"GPTQ v1 has no {bits}-bit format")
    codes, scales, zeros = unpack_weight(buffers, bits, group_size, in_features)  # [N,K], [N,G], [N,G]
    groups = scales.shape[1]
    if zeros is None:
        zeros = torch.full((out_features, groups), 2 ** (bits - 1), dtype=torch.int64)
    if (zeros < 1).any():
        # v1 stores zero−1 unsigned; a zero point of 0 (possible on asymmetric grids) would wrap to 2^b − 1.
        raise ValueError(
            "an asymmetric group has zero point 0, which GPTQ v1 (zero − 1 storage) cannot represent; export a "
            "symmetric model or use the native babai checkpoint"
        )
    g = in_features if group_size == -1 else group_size
    return {
        "qweight": pack_stream(codes.t().to(torch.int64), bits),
        "qzeros": pack_stream(zeros.to(torch.int64) - 1, bits).t().contiguous(),  # [N, G] → [G, N·b/32]
        "scales": scales.t().contiguous().to(torch.float16),
        "g_idx": torch.arange(in_features, dtype=torch.int32) // g,
    }
