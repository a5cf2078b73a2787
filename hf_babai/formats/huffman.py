"""Length-limited canonical Huffman coding of integer weight codes (the HPTQ storage format).

HPTQ (paper §5.2) stores unbounded integer codes ``Z`` from a no-clipping solve with one scale per matrix;
their distribution is peaked around 0 with long tails, so an entropy code stores them in far fewer bits than
a fixed width wide enough for the tails. Decisions (the paper leaves them open):

* **Code lengths** come from package-merge (optimal prefix code under a length limit ``max_len``), so every
  codeword fits one ``2^max_len``-entry lookup table: decoding a symbol is *peek max_len bits → table →
  (symbol, length)*, with no bit-by-bit tree walk. Default ``max_len = 12`` (4096-entry table, fits GPU
  shared memory); the alphabet must have at most ``2^max_len`` symbols, which is checked.
* **Canonical codes**: symbols sorted by (length, value) get consecutive codewords, so the stored codebook is
  just the symbol values and their lengths.
* **Chunks with bit offsets**: the row-major stream of codes is cut into chunks of ``chunk`` symbols and the
  bit position where each chunk starts is stored (int32), so chunks decode independently (one thread or one
  vectorised lane per chunk). ``chunk = 1024`` costs 32/1024 ≈ 0.03 bits per weight.

Buffers of one encoded tensor (all counted by :func:`encoded_bits`):

=============  =======  ===================  ==========================================================
buffer         dtype    shape                meaning
=============  =======  ===================  ==========================================================
``stream``     uint8    ``[ceil(B/8) + 4]``  the ``B`` codeword bits, MSB-first; 4 zero bytes of padding
                                             so a decoder may always read 4 bytes from any position
``offsets``    int32    ``[ceil(n/chunk)]``  bit position of the first codeword of each chunk
``symbols``    int32    ``[A]``              alphabet in canonical order (code length, then value)
``lengths``    uint8    ``[A]``              codeword length of each symbol, ``1 ≤ len ≤ max_len``
=============  =======  ===================  ==========================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

DEFAULT_MAX_LEN = 12
DEFAULT_CHUNK = 1024
_MAX_SUPPORTED_LEN = 24  # a 4-byte read covers max_len + 7 bits of in-byte offset


def code_lengths(counts: np.ndarray, max_len: int = DEFAULT_MAX_LEN) -> np.ndarray:
    """Optimal prefix-code lengths for symbol ``counts`` (all > 0) with no length above ``max_len``.

    Package-merge (Larmore & Hirschberg): the ``2A − 2`` lightest items after ``max_len − 1`` rounds of
    pairing and merging with the leaves; a symbol's length is how many of them contain it. A one-symbol
    alphabet gets length 1 (a decoder must consume at least one bit per symbol).
    """
    counts = np.asarray(counts, dtype=np.int64)
    a = counts.size
    if a == 0:
        raise ValueError("cannot build a code for an empty alphabet")
    if (counts <= 0).any():
        raise ValueError("symbol counts must be positive")
    if not 1 <= max_len <= _MAX_SUPPORTED_LEN:
        raise ValueError(f"max_len={max_len} must be in [1, {_MAX_SUPPORTED_LEN}]")
    if a > 2**max_len:
        raise ValueError(
            f"{a} distinct codes do not fit a prefix code of at most {max_len} bits; raise max_len to "
            f"{math.ceil(math.log2(a))} or more (or use a larger scale so fewer distinct codes occur)"
        )
    if a == 1:
        return np.ones(1, dtype=np.int64)
    order = np.argsort(counts, kind="stable")
    leaves = [(int(counts[i]), 0, int(i)) for i in order]  # (weight, kind 0 = leaf, symbol)
    items: list[tuple] = leaves
    for _ in range(max_len - 1):
        packages = [(items[k][0] + items[k + 1][0], 1, (items[k], items[k + 1])) for k in range(0, len(items) - 1, 2)]
        items = _merge(leaves, packages)
    lengths = np.zeros(a, dtype=np.int64)
    stack = list(items[: 2 * a - 2])
    while stack:
        _, kind, payload = stack.pop()
        if kind == 0:
            lengths[payload] += 1
        else:
            stack.extend(payload)
    return lengths


def _merge(xs: list[tuple], ys: list[tuple]) -> list[tuple]:
    """Stable merge of two weight-sorted lists (leaves first on ties, which keeps lengths short)."""
    out: list[tuple] = []
    i = j = 0
    while i < len(xs) and j < len(ys):
        if ys[j][0] < xs[i][0]:
            out.append(ys[j])
            j += 1
        else:
            out.append(xs[i])
            i += 1
    out.extend(xs[i:])
    out.extend(ys[j:])
    return out


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Codewords (as integers, read MSB-first over ``length`` bits) for lengths already in canonical order."""
    codes = np.zeros(lengths.size, dtype=np.int64)
    code = 0
    for k in range(1, lengths.size):
        code = (code + 1) << int(lengths[k] - lengths[k - 1])
        codes[k] = code
    return codes


@dataclass
class Encoded:
    """One entropy-coded integer tensor; ``numel``/``shape`` say how to rebuild it."""

    stream: Tensor
    offsets: Tensor
    symbols: Tensor
    lengths: Tensor
    shape: tuple[int, ...]
    chunk: int
    max_len: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


# Code ranges up to this wide are counted with one bincount (linear time) instead of a sort: the solver's codes
# span a few hundred integers, and np.unique's sort was most of the time of encoding a large matrix.
_BINCOUNT_RANGE = 1 << 22


def _histogram(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``np.unique(flat, return_inverse=True, return_counts=True)``, in linear time for a narrow code range."""
    lo, hi = int(flat.min()), int(flat.max())
    if hi - lo >= _BINCOUNT_RANGE:
        return np.unique(flat, return_inverse=True, return_counts=True)
    shifted = flat - lo
    counts = np.bincount(shifted, minlength=hi - lo + 1)
    present = np.flatnonzero(counts)
    index = np.zeros(counts.size, dtype=np.int64)
    index[present] = np.arange(present.size)
    return present + lo, index[shifted], counts[present]


def encode(codes: Tensor, max_len: int = DEFAULT_MAX_LEN, chunk: int = DEFAULT_CHUNK) -> Encoded:
    """Entropy-codes an integer tensor (row-major order) into the buffers of the module docstring."""
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"expected an integer tensor of codes, got {codes.dtype}")
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be ≥ 1")
    flat = codes.detach().cpu().reshape(-1).numpy().astype(np.int64)
    if flat.size == 0:
        raise ValueError("cannot encode an empty tensor")
    values, inverse, counts = _histogram(flat)
    if values.min() < np.iinfo(np.int32).min or values.max() > np.iinfo(np.int32).max:
        raise ValueError("codes must fit int32")
    lengths = code_lengths(counts, max_len)
    order = np.lexsort((values, lengths))  # canonical order: by length, then value
    canon_len = lengths[order]
    canon_code = canonical_codes(canon_len)
    code_of = np.empty_like(canon_code)
    code_of[order] = canon_code
    elem_len = lengths[inverse]
    elem_code = code_of[inverse]
    ends = np.cumsum(elem_len)
    starts = ends - elem_len
    total = int(ends[-1])
    if total >= 2**31:
        raise ValueError("stream longer than 2^31 bits: split the tensor before encoding")
    bits = np.zeros(total, dtype=np.uint8)
    for b in range(int(canon_len.max())):
        m = elem_len > b
        bits[starts[m] + b] = (elem_code[m] >> (elem_len[m] - 1 - b)) & 1
    stream = np.concatenate([np.packbits(bits), np.zeros(4, dtype=np.uint8)])
    return Encoded(
        stream=torch.from_numpy(stream),
        offsets=torch.from_numpy(starts[::chunk].astype(np.int32)),
        symbols=torch.from_numpy(values[order].astype(np.int32)),
        lengths=torch.from_numpy(canon_len.astype(np.uint8)),
        shape=tuple(codes.shape),
        chunk=chunk,
        max_len=max_len,
    )


def decode_table(symbols: Tensor, lengths: Tensor, max_len: int) -> tuple[Tensor, Tensor]:
    """The ``2^max_len`` lookup table: entry ``p`` (the next ``max_len`` bits) → (symbol, codeword length).

    Entries no codeword starts (possible only for a one-symbol alphabet) map to the first symbol; a valid
    stream never reaches them."""
    lens = lengths.to(torch.int64)
    if int(lens.max()) > max_len or int(lens.min()) < 1:
        raise ValueError(f"code lengths must be in [1, {max_len}]")
    # In canonical order codeword k starts at table entry Σ_{j<k} 2^(max_len − len_j): the entries of the
    # codewords are consecutive, so the table is each symbol repeated 2^(max_len − len) times.
    span = 1 << (max_len - lens)
    if int(span.sum()) > 1 << max_len:
        raise ValueError("code lengths violate the Kraft inequality: not a prefix code")
    idx = torch.repeat_interleave(torch.arange(lens.numel()), span)
    table_sym = torch.full((1 << max_len,), int(symbols[0]), dtype=torch.int32)
    table_len = torch.full((1 << max_len,), int(lens[0]), dtype=torch.int64)
    table_sym[: idx.numel()] = symbols.to(torch.int32)[idx]
    table_len[: idx.numel()] = lens[idx]
    return table_sym, table_len


def huffman_lut(symbols: Tensor, lengths: Tensor, max_len: int) -> Tensor:
    """:func:`decode_table` packed into one int32 table, ``symbol << 8 | length`` (the Triton kernels' layout).

    One load per decoded symbol instead of two; built once per module at load, not stored in checkpoints."""
    table_sym, table_len = decode_table(symbols.cpu(), lengths.cpu(), max_len)
    if int(table_sym.abs().max()) >= 1 << 23:
        raise ValueError("codes of magnitude ≥ 2^23 do not fit the kernel's lookup table (symbol << 8 | length)")
    return (table_sym << 8) | table_len.to(torch.int32)


def decode(enc: Encoded, device: torch.device | str | None = None) -> Tensor:
    """Decodes every chunk in lock-step (one vectorised lane per chunk); returns int32 codes of ``enc.shape``."""
    device = torch.device(device) if device is not None else enc.stream.device
    return decode_buffers(
        enc.stream.to(device), enc.offsets.to(device), enc.symbols, enc.lengths, enc.shape, enc.chunk, enc.max_len
    )


def decode_buffers(
    stream: Tensor,
    offsets: Tensor,
    symbols: Tensor,
    lengths: Tensor,
    shape: tuple[int, ...],
    chunk: int,
    max_len: int,
) -> Tensor:
    """:func:`decode` on raw buffers (what a module holds)."""
    n = math.prod(shape)
    if offsets.numel() != math.ceil(n / chunk):
        raise ValueError(f"{offsets.numel()} chunk offsets for {n} codes in chunks of {chunk}: buffers mismatch")
    out, _ = _lockstep(stream, offsets, symbols, lengths, chunk, max_len)
    return out.reshape(-1)[:n].reshape(shape)


def _lockstep(
    stream: Tensor, offsets: Tensor, symbols: Tensor, lengths: Tensor, chunk: int, max_len: int, every: int = 0
) -> tuple[Tensor | None, Tensor | None]:
    """Decodes all chunks in lock-step: the codes ``[chunks, chunk]``, or with ``every > 0`` only the bit position
    before every ``every``-th symbol (no code tensor: a load-time pass over a large matrix needs none)."""
    dev = stream.device
    table_sym, table_len = (t.to(dev) for t in decode_table(symbols.cpu(), lengths.cpu(), max_len))
    s = stream.to(torch.int64)
    last = s.numel() - 4
    pos = offsets.to(device=dev, dtype=torch.int64).clone()
    out = None if every else torch.empty(offsets.numel(), chunk, dtype=torch.int32, device=dev)
    marks = torch.empty(offsets.numel(), chunk // every, dtype=torch.int64, device=dev) if every else None
    mask = (1 << max_len) - 1
    for t in range(chunk):
        if every and t % every == 0:
            marks[:, t // every] = pos
        byte = torch.clamp(pos >> 3, max=last)  # lanes past their chunk's end read padding; discarded below
        word = (s[byte] << 24) | (s[byte + 1] << 16) | (s[byte + 2] << 8) | s[byte + 3]
        peek = (word >> (32 - max_len - (pos & 7))) & mask
        if out is not None:
            out[:, t] = table_sym[peek]
        pos += table_len[peek]
    return out, marks


def split_offsets(
    stream: Tensor, offsets: Tensor, symbols: Tensor, lengths: Tensor, numel: int, chunk: int, max_len: int, sub: int
) -> Tensor:
    """Bit offsets of chunks of ``sub`` symbols (``chunk`` a multiple of ``sub``) from a stream coded in ``chunk``s.

    The stored format keeps few offsets (0.03 bits per weight at 1024 symbols); a GPU decoder wants many short
    chunks so that enough lanes run in parallel. One lock-step decode at load finds the finer entry points
    (kernel-specific data, derived once, never stored)."""
    if sub < 1 or chunk % sub:
        raise ValueError(f"sub-chunk {sub} must divide the stored chunk {chunk}")
    if sub == chunk:
        return offsets.to(torch.int32)
    _, marks = _lockstep(stream, offsets, symbols, lengths, chunk, max_len, every=sub)
    return marks.reshape(-1)[: math.ceil(numel / sub)].to(torch.int32)


def encoded_bits(enc: Encoded) -> int:
    """Every stored bit: stream (with its padding), offsets, codebook (symbols + lengths)."""
    return 8 * (enc.stream.numel() + 4 * enc.offsets.numel() + 4 * enc.symbols.numel() + enc.lengths.numel())


def estimate_bits(codes: Tensor, max_len: int = DEFAULT_MAX_LEN, chunk: int = DEFAULT_CHUNK) -> int:
    """:func:`encoded_bits` of :func:`encode` ``(codes)`` without building the stream (for scale searches).

    Raises ``ValueError`` like :func:`encode` when the alphabet does not fit ``max_len``-bit codes."""
    flat = codes.detach().reshape(-1).to(torch.int64)
    lo = int(flat.min())
    counts = torch.bincount(flat - lo)
    counts = counts[counts > 0].cpu().numpy()
    lengths = code_lengths(counts, max_len)
    payload = int((counts * lengths).sum())
    return 8 * (math.ceil(payload / 8) + 4) + 32 * math.ceil(flat.numel() / chunk) + 40 * counts.size


def coded_bits(codes: Tensor, max_len: int = DEFAULT_MAX_LEN, chunk: int = DEFAULT_CHUNK) -> float:
    """:func:`estimate_bits`, or ``inf`` when the alphabet does not fit ``max_len``-bit codes (for searches)."""
    try:
        return float(estimate_bits(codes, max_len, chunk))
    except ValueError:
        return math.inf
