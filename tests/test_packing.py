"""Tests for hf_babai.formats.packing: bit-exact round trips, pinned bit order, validation, dequant, cost."""

from __future__ import annotations

import pytest
import torch

from hf_babai.formats import (
    bit_planes,
    bits_per_weight,
    dequantize_packed,
    format_bits_per_weight,
    num_groups,
    pack_codes,
    pack_weight,
    packed_buffer_specs,
    unpack_weight,
)

BITS = (2, 3, 4, 8)
GROUPS = (32, 64, 128, -1, 48)
KS = (576, 100, 33, 1536)
NS = (1, 7, 192)


def _i32(pattern: int) -> int:
    """A 32-bit pattern written in hex, as the signed int32 value torch stores."""
    return pattern - (1 << 32) if pattern >= 1 << 31 else pattern


def make_quant(
    n: int, k: int, bits: int, group_size: int, sym: bool, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Random solver output over the full code range; both extremes are always present."""
    gen = torch.Generator().manual_seed(seed)
    top = (1 << bits) - 1
    groups = num_groups(k, group_size)
    codes = torch.randint(0, top + 1, (n, k), generator=gen)
    codes[0, 0], codes[-1, -1] = 0, top
    scales = (torch.rand(n, groups, generator=gen) * 0.05 + 1e-4).half().float()
    zeros = None
    if not sym:
        zeros = torch.randint(0, top + 1, (n, groups), generator=gen)
        zeros[0, 0], zeros[-1, -1] = top, 0
    return codes, scales, zeros


def reference_weight(codes, scales, zeros, bits: int, group_size: int) -> torch.Tensor:
    """The documented formula in float64, written independently of the packer."""
    k = codes.shape[1]
    g = k if group_size == -1 else group_size
    gidx = torch.arange(k) // g
    zero = torch.full_like(scales, 2 ** (bits - 1), dtype=torch.float64) if zeros is None else zeros.double()
    return scales.double()[:, gidx] * (codes.double() - zero[:, gidx])


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_round_trip_is_bit_exact(bits: int, group_size: int, sym: bool) -> None:
    for seed, (k, n) in enumerate((k, n) for k in KS for n in NS):
        codes, scales, zeros = make_quant(n, k, bits, group_size, sym, seed)
        buffers = pack_weight(codes, scales, zeros, bits, group_size)
        specs = packed_buffer_specs(k, n, bits, group_size, sym)
        assert {name: (tuple(t.shape), t.dtype) for name, t in buffers.items()} == specs
        assert all(t.is_contiguous() for t in buffers.values())

        got_codes, got_scales, got_zeros = unpack_weight(buffers, bits, group_size, k)
        assert got_codes.dtype == torch.uint8
        assert torch.equal(got_codes, codes.to(torch.uint8))
        assert got_scales.dtype == torch.float32
        assert torch.equal(got_scales, scales)
        if sym:
            assert got_zeros is None
        else:
            assert got_zeros is not None and torch.equal(got_zeros, zeros.to(torch.uint8))


@pytest.mark.parametrize("bits", BITS)
def test_padding_codes_are_zero(bits: int) -> None:
    codes = torch.full((3, 33), (1 << bits) - 1)  # 33 is never a multiple of codes-per-word
    planes = pack_codes(codes, bits)
    for plane in bit_planes(bits):
        words = planes[plane.suffix]
        assert words.shape == (plane.words(33), 3)
        used = 33 - (words.shape[0] - 1) * plane.per_word  # codes held by the last word
        last = words[-1].to(torch.int64) & 0xFFFFFFFF
        assert torch.equal(last >> (used * plane.bits), torch.zeros(3, dtype=torch.int64))
        assert torch.equal(last, torch.full((3,), (1 << (used * plane.bits)) - 1))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_pack_accepts_any_integer_dtype(dtype: torch.dtype) -> None:
    codes, _, _ = make_quant(5, 70, 4, 32, True)
    assert torch.equal(pack_codes(codes.to(dtype), 4)[""], pack_codes(codes, 4)[""])


def test_known_answer_4bit() -> None:
    """Pins the documented order: k LSB-first within a word, words along dim 0, N along dim 1."""
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 15], [0, 0, 0, 0, 0, 0, 0, 0, 1]])  # N=2, K=9
    scales = torch.tensor([[0.5], [0.25]])
    zeros = torch.tensor([[3], [10]])
    buf = pack_weight(codes, scales, zeros, bits=4, group_size=-1)
    assert torch.equal(buf["qweight"], torch.tensor([[_i32(0x87654321), 0], [15, 1]], dtype=torch.int32))
    assert torch.equal(buf["scales"], torch.tensor([[0.5, 0.25]], dtype=torch.float16))
    assert torch.equal(buf["qzeros"], torch.tensor([[0xA3]], dtype=torch.int32))  # zeros packed along N
    assert set(buf) == {"qweight", "scales", "qzeros"}


def test_known_answer_3bit_planes() -> None:
    """3 bits = low 2 bits in a 2-bit plane (16 codes/word) + high bit in a 1-bit plane (32/word)."""
    col0 = [0] * 32
    col0[0], col0[1], col0[2], col0[15], col0[16], col0[31] = 5, 3, 7, 6, 1, 7
    codes = torch.tensor([col0, [1] * 32])  # N=2, K=32
    buf = pack_weight(codes, torch.ones(2, 1), None, bits=3, group_size=-1)
    # low plane, col 0: word0 = 1 | 3<<2 | 3<<4 | 2<<30 ; word1 = 1 | 3<<30 ; col 1: all codes 1.
    expected_lo = [[_i32(0x8000003D), 0x55555555], [_i32(0xC0000001), 0x55555555]]
    # high plane, col 0: bits 0, 2, 15, 31 (codes 5, 7, 6, 7); col 1 has no high bits.
    expected_hi = [[_i32(0x80008005), 0]]
    assert torch.equal(buf["qweight"], torch.tensor(expected_lo, dtype=torch.int32))
    assert torch.equal(buf["qweight_hi"], torch.tensor(expected_hi, dtype=torch.int32))
    assert set(buf) == {"qweight", "qweight_hi", "scales"}


@pytest.mark.parametrize("bits", BITS)
def test_pack_rejects_out_of_range_codes(bits: int) -> None:
    codes, scales, zeros = make_quant(4, 64, bits, 32, False)
    too_big = codes.clone()
    too_big[2, 5] = 1 << bits
    with pytest.raises(ValueError, match=rf"max value {1 << bits}.*{bits} bits"):
        pack_weight(too_big, scales, zeros, bits, 32)
    negative = codes.clone()
    negative[1, 1] = -1
    with pytest.raises(ValueError, match="negative"):
        pack_weight(negative, scales, zeros, bits, 32)
    bad_zeros = zeros.clone()
    bad_zeros[0, 1] = 1 << bits
    with pytest.raises(ValueError, match=rf"zeros max value {1 << bits}"):
        pack_weight(codes, scales, bad_zeros, bits, 32)


def test_pack_rejects_bad_inputs() -> None:
    codes, scales, zeros = make_quant(4, 64, 4, 32, False)
    inexact = scales.clone()
    inexact[3, 1] = 0.1  # not a float16 value
    with pytest.raises(ValueError, match="float16"):
        pack_weight(codes, inexact, zeros, 4, 32)
    with pytest.raises(ValueError, match="float16"):
        pack_weight(codes, torch.full_like(scales, 1e6), zeros, 4, 32)  # overflows float16
    with pytest.raises(ValueError, match="finite"):
        pack_weight(codes, torch.full_like(scales, float("nan")), zeros, 4, 32)
    with pytest.raises(ValueError, match="scales must have shape"):
        pack_weight(codes, scales[:, :1], zeros, 4, 32)
    with pytest.raises(ValueError, match="zeros must have shape"):
        pack_weight(codes, scales, zeros[:, :1], 4, 32)
    with pytest.raises(ValueError, match="integer"):
        pack_weight(codes.float(), scales, zeros, 4, 32)
    with pytest.raises(ValueError, match="bits must be one of"):
        pack_weight(codes, scales, zeros, 5, 32)
    with pytest.raises(ValueError, match="group_size"):
        pack_weight(codes, scales, zeros, 4, 0)


def test_unpack_rejects_inconsistent_buffers() -> None:
    codes, scales, zeros = make_quant(4, 64, 3, 32, False)
    buf = pack_weight(codes, scales, zeros, 3, 32)
    with pytest.raises(ValueError, match="length"):
        unpack_weight(buf, 3, 48, in_features=96)  # G=2 fits the scales, but 96 codes need 6 words
    with pytest.raises(ValueError, match="G = 3"):
        unpack_weight(buf, 3, 32, in_features=96)
    with pytest.raises(ValueError, match="plane '_hi'"):
        unpack_weight({k: v for k, v in buf.items() if k != "qweight_hi"}, 3, 32, 64)


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", BITS)
def test_dequantize_matches_float64_formula_exactly(bits: int, sym: bool) -> None:
    # fp32 arithmetic is exact for (code - zero) * fp16 scale, so equality (not closeness) must hold.
    for group_size, k, n in ((48, 100, 7), (-1, 33, 5), (128, 576, 12)):
        codes, scales, zeros = make_quant(n, k, bits, group_size, sym, seed=k)
        ref = reference_weight(codes, scales, zeros, bits, group_size)
        buf = pack_weight(codes, scales, zeros, bits, group_size)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            full = dequantize_packed(buf, bits, group_size, k, dtype)
            assert full.dtype == dtype and full.shape == (n, k)
            assert torch.equal(full, ref.to(dtype))
        full = dequantize_packed(buf, bits, group_size, k, torch.float32)
        for rows in (slice(0, 1), slice(2, 5), slice(3, None), slice(0, n, 2), slice(n - 1, n)):
            part = dequantize_packed(buf, bits, group_size, k, torch.float32, rows=rows)
            assert torch.equal(part, full[rows])


def test_bits_per_weight_sanity_numbers() -> None:
    assert format_bits_per_weight(4096, 4096, 4, 128, sym=True) == 4 + 16 / 128
    assert format_bits_per_weight(4096, 4096, 4, 128, sym=False) == 4 + 16 / 128 + 4 / 128
    assert format_bits_per_weight(4096, 4096, 3, 128, sym=True) == 3 + 16 / 128
    assert format_bits_per_weight(4096, 4096, 2, 64, sym=False) == 2 + 16 / 64 + 2 / 64
    # Padding is charged: K=33 at 4 bits needs 5 words (160 bits) per column, plus one fp16 scale.
    assert format_bits_per_weight(33, 1, 4, -1, sym=True) == (160 + 16) / 33
    # 3-bit K=33: 3 low-plane words + 2 high-plane words per column.
    assert format_bits_per_weight(33, 1, 3, -1, sym=True) == (5 * 32 + 16) / 33


def test_bits_per_weight_of_packed_tensors_matches_shape_formula() -> None:
    cases = [
        (k, n, b, g, s) for k in (33, 100, 576) for n in (1, 7, 50) for b in BITS for g in (48, -1) for s in (0, 1)
    ]
    for k, n, bits, group_size, sym in cases:
        codes, scales, zeros = make_quant(n, k, bits, group_size, bool(sym))
        buf = pack_weight(codes, scales, zeros, bits, group_size)
        expected = format_bits_per_weight(k, n, bits, group_size, bool(sym))
        assert bits_per_weight(buf, k, n) == expected
        assert bits_per_weight({**buf, "bias": torch.zeros(n, dtype=torch.float32)}, k, n) == expected
    # Any extra metadata buffer is charged (the measure must not under-report future formats).
    assert bits_per_weight({**buf, "perm": torch.zeros(k, dtype=torch.int32)}, k, n) == pytest.approx(expected + 32 / n)
