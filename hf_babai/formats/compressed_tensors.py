"""compressed-tensors ``pack-quantized`` tensors from the canonical babai layout (what vLLM and SGLang load).

compressed-tensors (the checkpoint format of llm-compressor, read by transformers, vLLM and SGLang) stores a
weight-only int Linear ``W [N, K]`` as:

===================== ======== ======================== ===================================================
tensor                dtype    shape                    content
===================== ======== ======================== ===================================================
``weight_packed``     int32    ``[N, ceil(K·b/32)]``    codes ``q + 2^(b-1)`` (unsigned) as one dense LSB-first
                                                        bit stream along K per row (3-bit: codes straddle
                                                        words)
``weight_scale``      model's  ``[N, G]``               group scales (per-channel: ``G = 1``)
``weight_zero_point`` int32    ``[ceil(N·b/32), G]``    asymmetric only: zero points ``zp + 2^(b-1)``, packed
                                                        the same way along N
``weight_shape``      int64    ``[2]``                  ``(N, K)``
===================== ======== ======================== ===================================================

and dequantizes ``W = scale * (q - zp)`` with signed ``q, zp``. A babai code ``c`` with zero ``z`` is
``q = c - 2^(b-1)``, ``zp = z - 2^(b-1)`` (symmetric: ``zp = 0``), so the stored unsigned values *are* the babai
codes and zeros: the conversion is exact.

Bit widths that do not divide 32 (3, 5, 6, 7) are packed densely, as compressed-tensors does since 0.18.0 and as
vLLM 0.34 and SGLang 0.5.23 allocate them; compressed-tensors 0.17.0 padded each word instead (10 3-bit codes per
word), so it cannot read the 3-bit checkpoints that 0.18+ and hf_babai write. 2/4/8-bit are the same in both.

Groups: compressed-tensors and vLLM need every group whole (``K`` a multiple of the group size). A babai layer
whose last group is partial (e.g. ``K = 576`` at group 128: four groups of 128 and one of 64) is written at the
group size ``gcd(g, K mod g)`` (64 there) with each scale repeated over the sub-groups it covers: the same weights
exactly, at a few more scale bytes. :func:`stored_group_size` gives that size per layer; a checkpoint has one
group size for all its layers (a single ``Linear`` config group, the form every loader reads), the gcd of them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .packing import unpack_weight

__all__ = ["ct_tensors", "pack_int32", "stored_group_size", "unpack_int32"]


def stored_group_size(in_features: int, group_size: int) -> int:
    """Group size written for a ``K = in_features`` layer quantized at ``group_size`` (``-1``: per channel).

    Whole groups stay; a partial last group of ``r = K mod g`` columns makes it ``gcd(g, r)``, the largest size
    that tiles both the full groups and the last one.
    """
    if group_size == -1:
        return -1
    g = min(group_size, in_features)
    return math.gcd(g, in_features % g) if in_features % g else g


def pack_int32(values: Tensor, bits: int) -> Tensor:
    """Unsigned ``values [R, C]`` (ints in ``[0, 2^bits)``) → int32 ``[R, ceil(C·bits / 32)]``: per row one dense
    LSB-first bit stream, value ``i`` at bit ``i·bits`` (3/5/6/7-bit values straddle words), zero padding at the end.
    This is compressed-tensors' ``pack_to_int32`` (after its offset) since 0.18, and what vLLM allocates."""
    rows, cols = values.shape
    v = values.to(torch.int64)
    start = torch.arange(cols, dtype=torch.int64) * bits
    words = torch.zeros(rows, -(-cols * bits // 32), dtype=torch.int64)
    for b in range(bits):  # bit b of every value to its absolute position in the row's stream
        pos = start + b
        words.index_add_(1, pos // 32, ((v >> b) & 1) << (pos % 32))
    return (words - ((words >> 31) << 32)).to(torch.int32)  # two's complement into int32


def unpack_int32(words: Tensor, bits: int, cols: int) -> Tensor:
    """Inverse of :func:`pack_int32`: int32 ``[R, W]`` → int64 ``[R, cols]``."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    start = torch.arange(cols, dtype=torch.int64) * bits
    out = torch.zeros(words.shape[0], cols, dtype=torch.int64)
    for b in range(bits):
        pos = start + b
        out |= ((w[:, pos // 32] >> (pos % 32)) & 1) << b
    return out


def ct_tensors(
    buffers: dict[str, Tensor],
    bits: int,
    group_size: int,
    in_features: int,
    out_features: int,
    scale_dtype: torch.dtype,
    stored_group: int | None = None,
) -> dict[str, Tensor]:
    """The compressed-tensors tensors of one babai Linear (its canonical ``packed_buffers()``).

    ``stored_group`` is the group size written (default :func:`stored_group_size`; a checkpoint has one for all
    layers, so the writer passes the gcd over its layers); it must tile this layer's groups. ``scale_dtype`` is
    the dtype the scales are written in; a scale it cannot hold exactly is an error."""
    codes, scales, zeros = unpack_weight(buffers, bits, group_size, in_features)  # [N,K], [N,G] fp32, [N,G]
    stored = stored_group_size(in_features, group_size) if stored_group is None else stored_group
    if stored != -1:
        if group_size == -1 or in_features % stored or min(group_size, in_features) % stored:
            raise ValueError(
                f"group size {stored} does not tile a layer with in_features={in_features}, group_size={group_size}"
            )
        expand = (torch.arange(in_features // stored) * stored) // group_size  # stored group -> babai group
        scales = scales[:, expand]
        zeros = None if zeros is None else zeros[:, expand]
    elif group_size != -1:
        raise ValueError("a grouped layer cannot be written per channel")
    as_dtype = scales.to(scale_dtype)
    if (as_dtype.float() != scales).any():
        raise ValueError(f"scales are not exactly representable in {scale_dtype}; write them as torch.float16")
    out = {
        "weight_packed": pack_int32(codes, bits),
        "weight_scale": as_dtype.contiguous(),
        "weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64),
    }
    if zeros is not None:
        out["weight_zero_point"] = pack_int32(zeros.t(), bits).t().contiguous()  # packed along N
    return out
