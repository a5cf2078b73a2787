"""Canonical packed storage of quantized ``nn.Linear`` weights (what checkpoints hold).

The solver hands over, for a linear layer with ``out_features = N`` and ``in_features = K``:
unsigned ``codes`` ``[N, K]`` in ``[0, 2^bits - 1]``, ``scales`` ``[N, G]`` and, for asymmetric
grids, integer ``zeros`` ``[N, G]`` (symmetric grids imply ``zero = 2^(bits-1)``). Groups are
static: column ``k`` belongs to group ``k // group_size``; ``G = ceil(K / group_size)`` (the last
group may be partial) and ``group_size = -1`` means one group per output row. The weight is::

    W[n, k] = scales[n, k // g] * (codes[n, k] - zero[n, k // g])

This module turns that into the buffers below and back. The layout follows GPTQ / GemLite
(docs/kernels.md): K is packed into int32 words LSB-first with N contiguous, so a GPU
thread block reading one word-row loads consecutive addresses (coalesced), and kernels derive
any tiled layout from this canonical one at load time.

With ``p`` the bits of a plane and ``P = 32 // p`` codes per int32 word:

=============  =======  =====================  ====================================================
buffer         dtype    shape                  packing order and meaning
=============  =======  =====================  ====================================================
``qweight``    int32    ``[ceil(K/P), N]``     codes (bits 2/4/8: all bits, ``p = bits``; bits 3:
                                               the low 2 bits, ``p = 2``). Code of (row k,
                                               output n) sits in word ``k // P`` of column n at
                                               bit offset ``(k % P) * p``; padding codes are 0.
``qweight_hi`` int32    ``[ceil(K/32), N]``    bits 3 only: the high bit of each code as a 1-bit
                                               plane (``p = 1``), same order. Two power-of-two
                                               planes mean no code straddles a word.
``scales``     float16  ``[G, N]``             group scales, transposed w.r.t. the solver.
``qzeros``     int32    ``[ceil(N/P), G]``     asymmetric only: zeros ``[G, N]`` packed along N
                                               with the same packer (low plane for bits 3).
``qzeros_hi``  int32    ``[ceil(N/32), G]``    asymmetric 3-bit only: high bit plane of zeros.
=============  =======  =====================  ====================================================

Symmetric layers carry no zeros buffer. Which planes a bit width uses is decided only by
:func:`bit_planes`; everything else loops over its answer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ..solver.grid import SUPPORTED_BITS, effective_group_size, num_groups

__all__ = [
    "SUPPORTED_BITS",
    "Plane",
    "bit_planes",
    "bits_per_weight",
    "dequantize_packed",
    "format_bits_per_weight",
    "num_groups",
    "pack_codes",
    "pack_weight",
    "packed_buffer_specs",
    "unpack_codes",
    "unpack_weight",
]

_WORD_BITS = 32


@dataclass(frozen=True)
class Plane:
    """One int32-packed bit plane of a code: bits ``[shift, shift + bits)`` of every code."""

    suffix: str
    bits: int
    shift: int

    @property
    def per_word(self) -> int:
        """Codes stored per int32 word."""
        return _WORD_BITS // self.bits

    def words(self, length: int) -> int:
        """Number of int32 words needed to hold ``length`` codes (padding included)."""
        return -(-length // self.per_word)


def bit_planes(bits: int) -> tuple[Plane, ...]:
    """The bit planes used for ``bits``-bit codes: the single source of the bit-plane rule.

    Power-of-two widths are one plane. 3 bits split into a 2-bit plane (low bits, suffix "")
    and a 1-bit plane (high bit, suffix "_hi") so that kernels only ever do aligned shifts.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    if bits == 3:
        return (Plane("", 2, 0), Plane("_hi", 1, 2))
    return (Plane("", bits, 0),)


def _check_integer(t: Tensor, name: str) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {t.dtype}")


def _check_range(t: Tensor, bits: int, name: str) -> None:
    """Reject values outside ``[0, 2^bits - 1]``: they would be silently truncated by packing."""
    if t.numel() == 0:
        return
    lo, hi = int(t.min()), int(t.max())
    top = (1 << bits) - 1
    if hi > top:
        raise ValueError(f"{name} max value {hi} does not fit in {bits} bits (allowed 0..{top})")
    if lo < 0:
        raise ValueError(f"{name} min value {lo} is negative; {bits}-bit codes are unsigned (0..{top})")


def _pack_plane(values: Tensor, plane_bits: int) -> Tensor:
    """Pack ``values [R, L]`` (already < 2^plane_bits) along L into int32 ``[ceil(L/P), R]``."""
    per = _WORD_BITS // plane_bits
    rows, length = values.shape
    words = -(-length // per)
    padded = torch.zeros(rows, words * per, dtype=torch.int64, device=values.device)
    padded[:, :length] = values
    shifts = torch.arange(per, device=values.device, dtype=torch.int64) * plane_bits
    # Bit fields are disjoint, so the sum is the bitwise OR; int64 avoids signed overflow.
    packed = (padded.view(rows, words, per) << shifts).sum(dim=-1)
    # Reinterpret the unsigned 32-bit pattern as int32 explicitly (no reliance on cast wrapping).
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return packed.t().contiguous()


def _unpack_plane(words: Tensor, plane_bits: int, length: int) -> Tensor:
    """Inverse of :func:`_pack_plane`: int32 ``[W, R]`` -> int32 ``[R, length]``."""
    per = _WORD_BITS // plane_bits
    shifts = torch.arange(per, device=words.device, dtype=torch.int32) * plane_bits
    # Arithmetic right shift smears the sign bit upward, but the mask keeps only our field.
    fields = (words.t().unsqueeze(-1) >> shifts) & ((1 << plane_bits) - 1)
    return fields.reshape(words.shape[1], -1)[:, :length]


def pack_codes(codes: Tensor, bits: int) -> dict[str, Tensor]:
    """Pack unsigned ``codes [R, L]`` along L into int32 planes ``{suffix: [ceil(L/P), R]}``.

    Keys are the plane suffixes of :func:`bit_planes` ("" and, for 3 bits, "_hi"), so callers
    build buffer names as ``prefix + suffix``.
    """
    planes = bit_planes(bits)
    _check_integer(codes, "codes")
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [rows, length], got shape {tuple(codes.shape)}")
    _check_range(codes, bits, "codes")
    values = codes.to(torch.int64)
    return {p.suffix: _pack_plane((values >> p.shift) & ((1 << p.bits) - 1), p.bits) for p in planes}


def unpack_codes(planes: Mapping[str, Tensor], bits: int, length: int) -> Tensor:
    """Inverse of :func:`pack_codes`: returns uint8 ``[R, length]``."""
    out: Tensor | None = None
    for p in bit_planes(bits):
        if p.suffix not in planes:
            raise ValueError(f"{bits}-bit codes need plane {p.suffix!r}; got planes {sorted(planes)}")
        words = planes[p.suffix]
        if words.dtype != torch.int32 or words.dim() != 2 or words.shape[0] != p.words(length):
            raise ValueError(
                f"plane {p.suffix!r} must be int32 [{p.words(length)}, R] for length {length}, "
                f"got {words.dtype} {tuple(words.shape)}"
            )
        field = _unpack_plane(words, p.bits, length) << p.shift
        if out is not None and out.shape[0] != field.shape[0]:
            raise ValueError(f"planes disagree on the row count: {out.shape[0]} vs {field.shape[0]}")
        out = field if out is None else out | field
    assert out is not None  # bit_planes never returns an empty tuple
    return out.to(torch.uint8)


def packed_buffer_specs(
    in_features: int, out_features: int, bits: int, group_size: int, sym: bool
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every quantization buffer, derived from shapes alone.

    Used to pre-register buffers (so a model can be built on the meta device and then loaded)
    and to compute :func:`format_bits_per_weight` without any tensors.
    """
    if out_features < 1:
        raise ValueError(f"out_features must be >= 1, got {out_features!r}")
    groups = num_groups(in_features, group_size)
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for p in bit_planes(bits):
        specs["qweight" + p.suffix] = ((p.words(in_features), out_features), torch.int32)
    specs["scales"] = ((groups, out_features), torch.float16)
    if not sym:
        for p in bit_planes(bits):
            specs["qzeros" + p.suffix] = ((p.words(out_features), groups), torch.int32)
    return specs


def pack_weight(codes: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, group_size: int) -> dict[str, Tensor]:
    """Pack the solver's ``(codes [N,K], scales [N,G], zeros [N,G] | None)`` into canonical buffers.

    ``zeros is None`` means a symmetric grid. Raises ValueError for out-of-range codes or zeros
    and for scales that float16 cannot hold exactly: storing them would silently change the
    dequantized weights the solver optimised.
    """
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [N, K], got shape {tuple(codes.shape)}")
    n, k = codes.shape
    groups = num_groups(k, group_size)
    if not scales.dtype.is_floating_point:
        raise ValueError(f"scales must be floating point, got {scales.dtype}")
    if tuple(scales.shape) != (n, groups):
        raise ValueError(f"scales must have shape [N, G] = {[n, groups]}, got {list(scales.shape)}")
    if not torch.isfinite(scales).all():
        raise ValueError("scales must be finite")
    as_fp16 = scales.to(torch.float16)
    inexact = as_fp16.to(scales.dtype) != scales
    if inexact.any():
        bad = scales[inexact][0].item()
        raise ValueError(
            f"{int(inexact.sum())} scales are not exactly representable in float16 (e.g. {bad!r}); "
            "the solver must round scales to float16 before choosing codes"
        )
    buffers = {"qweight" + s: t for s, t in pack_codes(codes, bits).items()}
    buffers["scales"] = as_fp16.t().contiguous()
    if zeros is not None:
        _check_integer(zeros, "zeros")
        if tuple(zeros.shape) != (n, groups):
            raise ValueError(f"zeros must have shape [N, G] = {[n, groups]}, got {list(zeros.shape)}")
        _check_range(zeros, bits, "zeros")
        buffers.update({"qzeros" + s: t for s, t in pack_codes(zeros.t(), bits).items()})
    return buffers


def _planes(buffers: Mapping[str, Tensor], prefix: str, bits: int) -> dict[str, Tensor]:
    return {p.suffix: buffers[prefix + p.suffix] for p in bit_planes(bits) if prefix + p.suffix in buffers}


def _unpack_zeros(buffers: Mapping[str, Tensor], bits: int, out_features: int) -> Tensor | None:
    """Zeros as uint8 ``[N, G]``, or None when the buffers are symmetric (no ``qzeros``)."""
    if "qzeros" not in buffers:
        return None
    return unpack_codes(_planes(buffers, "qzeros", bits), bits, out_features).t()


def _checked_scales(buffers: Mapping[str, Tensor], in_features: int, group_size: int) -> Tensor:
    scales = buffers["scales"]
    groups = num_groups(in_features, group_size)
    if scales.dim() != 2 or scales.shape[0] != groups:
        raise ValueError(
            f"scales must be [G, N] with G = {groups} for in_features={in_features}, "
            f"group_size={group_size}; got {tuple(scales.shape)}"
        )
    return scales


def unpack_weight(
    buffers: Mapping[str, Tensor], bits: int, group_size: int, in_features: int
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Inverse of :func:`pack_weight`.

    Returns ``(codes uint8 [N,K], scales float32 [N,G], zeros uint8 [N,G] | None)``.
    """
    scales = _checked_scales(buffers, in_features, group_size)
    codes = unpack_codes(_planes(buffers, "qweight", bits), bits, in_features)
    if codes.shape[0] != scales.shape[1]:
        raise ValueError(f"qweight has {codes.shape[0]} output columns but scales has {scales.shape[1]}")
    return codes, scales.t().float(), _unpack_zeros(buffers, bits, scales.shape[1])


def dequantize_packed(
    buffers: Mapping[str, Tensor],
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype,
    rows: slice | None = None,
) -> Tensor:
    """Dense ``W[rows, :]`` (all rows by default) in ``dtype`` from canonical buffers.

    Only the requested output rows are unpacked, so callers can bound peak memory by chunking.
    Arithmetic is fp32: ``code - zero`` is an integer below 2^9 and the scale has an 11-bit
    mantissa, so every product is exact in fp32 and the result equals the real-number formula
    rounded once to ``dtype``, identically on every backend.
    """
    rows = slice(None) if rows is None else rows
    scales = _checked_scales(buffers, in_features, group_size)[:, rows].t().float()  # [n, G]
    planes = {s: t[:, rows] for s, t in _planes(buffers, "qweight", bits).items()}
    codes = unpack_codes(planes, bits, in_features).float()  # [n, K]
    zeros = _unpack_zeros(buffers, bits, buffers["scales"].shape[1])
    zero = float(1 << (bits - 1)) if zeros is None else zeros[rows].float().unsqueeze(-1)
    n, groups = scales.shape
    g = effective_group_size(in_features, group_size)
    padded = torch.zeros(n, groups * g, dtype=torch.float32, device=codes.device)
    padded[:, :in_features] = codes
    weight = (padded.view(n, groups, g) - zero) * scales.unsqueeze(-1)
    return weight.view(n, groups * g)[:, :in_features].to(dtype)


def _total_bits(shapes_and_dtypes: list[tuple[tuple[int, ...], torch.dtype]]) -> int:
    return sum(math.prod(shape) * dtype.itemsize * 8 for shape, dtype in shapes_and_dtypes)


def bits_per_weight(buffers: Mapping[str, Tensor], in_features: int, out_features: int) -> float:
    """True storage cost: bits of every quantization buffer (padding included) per weight.

    Every tensor counts except those named ``bias`` (or ``*.bias``), so metadata added later
    is charged automatically; a layer's ``state_dict()`` can be passed directly.
    """
    kept = [(tuple(t.shape), t.dtype) for name, t in buffers.items() if name != "bias" and not name.endswith(".bias")]
    return _total_bits(kept) / (in_features * out_features)


def format_bits_per_weight(in_features: int, out_features: int, bits: int, group_size: int, sym: bool) -> float:
    """Same number as :func:`bits_per_weight`, from shapes alone (for planning and reports)."""
    specs = packed_buffer_specs(in_features, out_features, bits, group_size, sym)
    return _total_bits(list(specs.values())) / (in_features * out_features)
