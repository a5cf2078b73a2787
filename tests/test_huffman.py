"""Length-limited canonical Huffman coder (HPTQ storage): optimality, limits, bit-exact round trips."""

from __future__ import annotations

import heapq
import math

import numpy as np
import pytest
import torch

from hf_babai.formats import huffman as hf


def huffman_cost(counts: np.ndarray) -> int:
    """Total bits of an unconstrained Huffman code (sum of merged weights), the optimum."""
    heap = [int(c) for c in counts]
    heapq.heapify(heap)
    total = 0
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        total += a + b
        heapq.heappush(heap, a + b)
    return total


@pytest.mark.parametrize("seed", range(5))
def test_lengths_are_optimal_when_the_limit_does_not_bind(seed):
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 1000, size=int(rng.integers(2, 60)))
    lengths = hf.code_lengths(counts, max_len=24)
    assert (2.0 ** -lengths.astype(float)).sum() == pytest.approx(1.0)  # complete prefix code
    assert int((counts * lengths).sum()) == huffman_cost(counts)


def test_length_limit_binds_and_costs_little():
    counts = np.array([1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377])  # Fibonacci: Huffman depth 13
    free = hf.code_lengths(counts, max_len=24)
    assert free.max() == 13
    limited = hf.code_lengths(counts, max_len=5)
    assert limited.max() == 5 and (2.0 ** -limited.astype(float)).sum() <= 1.0
    assert int((counts * limited).sum()) >= int((counts * free).sum())
    # never worse than the flat 4-bit code, which also meets the limit
    assert int((counts * limited).sum()) <= int((counts * np.full_like(counts, 4)).sum())


def test_alphabet_limits_and_bad_counts():
    assert hf.code_lengths(np.array([7]), 12).tolist() == [1]
    assert hf.code_lengths(np.ones(16, dtype=np.int64), 4).tolist() == [4] * 16
    with pytest.raises(ValueError, match="raise max_len"):
        hf.code_lengths(np.ones(17, dtype=np.int64), 4)
    with pytest.raises(ValueError, match="positive"):
        hf.code_lengths(np.array([3, 0]), 4)
    with pytest.raises(ValueError, match="empty"):
        hf.code_lengths(np.array([], dtype=np.int64), 4)


def laplace_codes(shape: tuple[int, ...], scale: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(shape, generator=g) - 0.5
    return torch.round(-scale * torch.sign(u) * torch.log1p(-2 * u.abs())).to(torch.int32)


@pytest.mark.parametrize(
    ("shape", "chunk"),
    [((37, 53), 64), ((8, 128), 256), ((8, 128), 1024), ((5, 200), 999), ((1, 1), 16), ((3, 7, 11), 5)],
)
def test_round_trip_is_bit_exact_across_chunk_boundaries(shape, chunk):
    codes = laplace_codes(shape, 2.5, seed=sum(shape))
    enc = hf.encode(codes, max_len=12, chunk=chunk)
    assert enc.offsets.numel() == math.ceil(codes.numel() / chunk)
    out = hf.decode(enc)
    assert out.dtype == torch.int32 and torch.equal(out, codes)
    assert hf.encoded_bits(enc) == hf.estimate_bits(codes, 12, chunk)


def test_round_trip_with_max_length_codes_single_symbol_and_extremes():
    fib = [1, 1, 2, 3, 5, 8, 13, 21, 34, 55]
    vals = torch.cat([torch.full((c,), i - 4, dtype=torch.int32) for i, c in enumerate(fib)])
    vals = vals[torch.randperm(vals.numel(), generator=torch.Generator().manual_seed(0))]
    enc = hf.encode(vals, max_len=6, chunk=7)
    assert int(enc.lengths.max()) == 6  # the limit is reached and still decodes
    assert torch.equal(hf.decode(enc), vals)

    single = torch.full((4, 9), -3, dtype=torch.int32)
    enc = hf.encode(single, chunk=8)
    assert enc.lengths.tolist() == [1] and torch.equal(hf.decode(enc), single)

    extremes = torch.tensor([[-(2**31), 2**31 - 1, 0, 5]], dtype=torch.int64)
    assert torch.equal(hf.decode(hf.encode(extremes)), extremes.to(torch.int32))

    full = torch.arange(2**8, dtype=torch.int32) - 100  # alphabet exactly 2^max_len: all codes max_len bits
    enc = hf.encode(full, max_len=8, chunk=32)
    assert enc.lengths.tolist() == [8] * 256 and torch.equal(hf.decode(enc), full)


def test_stream_cost_is_close_to_the_entropy():
    codes = laplace_codes((256, 1024), 3.0, seed=3)
    enc = hf.encode(codes)
    p = torch.bincount((codes - codes.min()).reshape(-1)).double()
    p = p[p > 0] / codes.numel()
    entropy = float(-(p * p.log2()).sum())
    payload = 8 * (enc.stream.numel() - 4)
    assert entropy * codes.numel() <= payload <= (entropy + 0.05) * codes.numel() + 8
    overhead = hf.encoded_bits(enc) - payload
    assert overhead / codes.numel() < 0.05  # offsets (32/1024) + codebook


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="integer tensor"):
        hf.encode(torch.randn(3, 3))
    with pytest.raises(ValueError, match="raise max_len"):
        hf.encode(torch.arange(100), max_len=6)
    enc = hf.encode(torch.arange(10), chunk=4)
    with pytest.raises(ValueError, match="chunk offsets"):
        hf.decode_buffers(enc.stream, enc.offsets[:1], enc.symbols, enc.lengths, enc.shape, enc.chunk, enc.max_len)
    with pytest.raises(ValueError, match="Kraft"):
        hf.decode_table(torch.tensor([1, 2, 3], dtype=torch.int32), torch.tensor([1, 1, 1], dtype=torch.uint8), 4)


@pytest.mark.parametrize("spread", [3, 70_000, 1 << 23])
def test_linear_time_histogram_equals_numpy_unique(spread):
    """The bincount histogram behind encode() is np.unique exactly, on narrow ranges and on the sort fallback."""
    from hf_babai.formats.huffman import _histogram

    rng = np.random.default_rng(spread)
    flat = np.concatenate([rng.integers(-spread, spread, 5000), [-spread, spread - 1]]).astype(np.int64)
    for got, want in zip(_histogram(flat), np.unique(flat, return_inverse=True, return_counts=True), strict=True):
        assert got.dtype.kind == want.dtype.kind and np.array_equal(got, want.reshape(got.shape))
