"""Streaming accumulation of the layer Hessian ``H = (2/n) Σ XᵀX``, exactly, in any order.

The Hessian is the Gram matrix of the lattice in Babai's view (paper Theorem 1): only ``XᵀX`` matters,
so it is all the solver needs from the calibration data.

Why exact: the same calibration set must give the same Hessian, bit for bit, whether its samples are summed in one
process or split over several ranks and reduced (the distributed engine), and whatever order a reduction uses. A
plain float64 running sum depends on the order of its additions; this one does not. Each summand (one sample's
``XₛᵀXₛ``, a float32 product) is rounded onto a grid of absolute binary quanta and split over two float64 bins
whose additions are exact integer arithmetic (the binned summation of ReproBLAS, Demmel and Nguyen 2013). Each row
``i`` has a level that follows the largest entry any summand had in row ``i``; entry ``(i, j)`` uses the coarser
of its row's and column's grids (so the sum stays symmetric) and is exact down to ``2⁻³³`` of that row maximum:
far below the float32 rounding of the large entries, and, for the small ones, far below the damping the solver
adds to the diagonal. When a larger summand arrives the level moves up (dropping the lowest bin), which rounds
every earlier summand exactly as if the final grid had been used from the start. So the result is the correctly
rounded sum of the rounded summands: a function of the multiset of summands only. The price is a second ``c×c``
float64 bin while accumulating (freed by :meth:`HessianAccumulator.finalize`).

Summands: a ``[B, T, c]`` input contributes one summand per sample (so results do not depend on how samples are
batched or spread over ranks); a ``[N, c]`` input (tokens already flattened, e.g. an MoE expert's routed tokens)
is one summand per call. Rows beyond ``chunk_rows`` start a new summand.

:class:`CrossAccumulator` sums a non-symmetric ``Σ AᵀB`` the same way (GPTAQ's cross term, ``asym_alpha``), so a
run that uses it is just as independent of batching, ranks and reduction order.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

BIN_BITS = 34  # bits per bin: each addition is exact while a bin holds fewer than 2**(53 - BIN_BITS) summands
MAX_SUMMANDS = 2 ** (53 - BIN_BITS) - 1
FLOOR = -5  # the lowest level: below that of any normal float32 (float32 subnormals round to 0 on it)


def kept_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The rows of ``x [..., c]`` as ``[N, c]``, less those where ``mask`` (``x``'s shape without its last dimension)
    is 0: the padded positions no Hessian or cross term may see. One rule, so every sum over calibration tokens
    keeps the same ones."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if mask is None else rows[mask.reshape(-1).to(device=rows.device).bool()]


def levels(x: torch.Tensor) -> torch.Tensor:
    """The top level (int8) for each of the float32 values ``x`` ≥ 0: the smallest ``k ≥ FLOOR`` with
    ``2^(BIN_BITS·(k+1)) ≥ 2^(e+1)`` where ``x < 2^e`` (``e`` read from the exponent bits), so that every value
    up to ``x`` rounds to 0 on the level above."""
    biased = (x.view(torch.int32) >> 23) & 0xFF
    k = ((biased - 125).float() * (1 / BIN_BITS)).ceil_() - 1  # e = biased - 126, k = ceil((e + 1) / BIN_BITS) - 1
    return k.clamp_(min=FLOOR).to(torch.int8)


def quantum(level: torch.Tensor, below: int = 0) -> torch.Tensor:
    """``2^(BIN_BITS·(level - below))`` per level, as float64 (a power of two, in float64's normal range)."""
    return torch.exp2(BIN_BITS * (level.double() - below))


class HessianAccumulator:
    """Accumulates ``Σ XᵀX`` over calibration batches for one linear layer's input, exactly (module docstring).

    Each row (and column) ``i`` has a level, the top level of the largest entry any summand had in that row; entry
    ``(i, j)`` lives on the grid of ``max(level_i, level_j)``, so the sum stays symmetric.

    Args:
        in_features: width ``c`` of the layer input.
        device: where the ``c×c`` float64 bins live (CPU by default so GPU memory holds activations only).
        chunk_rows: tokens per float32 product (bounds the temporary memory of the float64 up-cast).
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu", chunk_rows: int = 8192) -> None:
        self.in_features = in_features
        self.device = torch.device(device)
        self.chunk_rows = chunk_rows
        self.block = 1024  # rows of XᵀX formed at a time
        self.high = torch.zeros(in_features, in_features, dtype=torch.float64, device=self.device)
        self.low: torch.Tensor | None = torch.zeros_like(self.high)
        self.level = torch.full((in_features,), FLOOR, dtype=torch.int8, device=self.device)
        self.n = 0  # tokens
        self.summands = 0
        self._final = False

    symmetric = True  # entry levels: the max of row and column (a cross term's: its row's)

    @property
    def sum(self) -> torch.Tensor:
        """``Σ XᵀX`` (before :meth:`finalize`: a new tensor; after: the finalized ``H``)."""
        return self.high if self.low is None else self.high + self.low

    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Adds a batch of inputs ``x[..., c]``; positions where ``mask`` is 0 (padding) are ignored.

        ``mask`` has the shape of ``x`` without its last dimension (e.g. the ``attention_mask`` [B, T]).
        """
        if self._final:
            raise RuntimeError("this Hessian was already finalized; accumulate every batch before finalize()")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, the accumulator expects {self.in_features}")
        for rows in _samples(x.detach(), mask):
            self._add_rows(rows, rows)

    def _add_rows(self, left: torch.Tensor, right: torch.Tensor) -> None:
        """Adds ``leftᵀ right`` (``[N, c]`` rows of one sample), one summand per ``chunk_rows`` tokens."""
        c = self.in_features
        for start in range(0, left.shape[0], self.chunk_rows):
            chunk = right[start : start + self.chunk_rows].float()
            lhs = chunk if left is right else left[start : start + self.chunk_rows].float()
            if self.summands >= MAX_SUMMANDS:
                raise ValueError(
                    f"a Hessian accumulated {self.summands} summands (calibration samples or chunks of "
                    f"{self.chunk_rows} tokens), the most its exact sum can hold; use fewer, longer calibration samples"
                )
            self.summands += 1
            for a in range(0, c, self.block):  # row blocks: the float32 product and its float64 up-cast are
                self._deposit(lhs[:, a : a + self.block].T @ chunk, slice(a, a + self.block))  # [block, c]
        self.n += left.shape[0]

    def _entry_steps(self, rows: slice) -> torch.Tensor:
        """The quantum of each entry of ``rows``: that of the coarser of its row's and column's levels, so the sum
        stays symmetric."""
        step = quantum(self.level)
        return torch.maximum(step[rows, None], step[None, :])

    def _deposit(self, part: torch.Tensor, rows: slice) -> None:
        """Adds one summand's rows (a float32 ``[block, c]`` product) to the bins: its high piece (rounded to each
        entry's top level) and its low piece (the rest, rounded one level below); both additions are exact."""
        top = part.abs().amax(dim=1)
        if not bool(torch.isfinite(top).all()):
            raise ValueError(
                "a layer input produced a non-finite XᵀX (activations overflow float32); the model's forward "
                "on the calibration data is not finite: check the model's dtype and weights"
            )
        new = levels(top.to(self.device))
        if bool((new > self.level[rows]).any()):
            raised = self.level.clone()
            raised[rows] = torch.maximum(raised[rows], new)
            self.align(raised)
        step = self._entry_steps(rows)
        part = part.to(device=self.device, dtype=torch.float64)
        hi = torch.round(part / step).mul_(step)
        self.high[rows] += hi
        # the rest (exact: x minus its rounding to a coarser grid), rounded one level down; equal to
        # R_lo(x) - R_hi(x) because R_hi(x) is an even multiple of the low quantum
        step.mul_(2.0**-BIN_BITS)
        self.low[rows] += part.sub_(hi).div_(step).round_().mul_(step)

    def merge(self, other: HessianAccumulator) -> None:
        """Adds another accumulator's sum (the same calibration set's other samples): exact, so the order in which
        partial sums are merged never changes the result."""
        if other.in_features != self.in_features or other._final or self._final:
            raise ValueError("only unfinalized Hessians of the same width can be merged")
        if self.summands + other.summands > MAX_SUMMANDS:
            raise ValueError(f"merged Hessians would hold more than {MAX_SUMMANDS} summands")
        top = torch.maximum(self.level, other.level)
        self.align(top)
        high, low = other.high.clone(), other.low.clone()
        _align(high, low, other.level, top, self.symmetric)
        self.high += high
        self.low += low
        self.n += other.n
        self.summands += other.summands

    def align(self, level: torch.Tensor) -> None:
        """Moves the bins up to the row levels ``level`` (each ≥ its current one; see :func:`_align`). Ranks align
        to the largest levels any of them reached before their bins are summed."""
        if self._final:
            raise RuntimeError("this Hessian was already finalized")
        if bool((level < self.level).any()):
            raise ValueError("cannot lower the level of a Hessian's bins")
        _align(self.high, self.low, self.level, level, self.symmetric)
        self.level = level.to(device=self.device, dtype=torch.int8).clone()

    def finalize(self) -> torch.Tensor:
        """Returns ``H = (2/n) Σ XᵀX`` in float64 (all zeros if no token was seen).

        The two bins are summed (each entry correctly rounded) and scaled in place, the low bin is freed, and the
        same tensor is returned on every later call (no further ``add``): a copy would double the largest
        allocation of the whole quantization (a 5k-wide layer's H is ~200 MB, a 14k-wide one's 1.6 GB). Callers
        must not modify it."""
        if not self._final:
            self.high += self.low
            self.low = None
            if self.n:
                self.high.mul_(2.0 / self.n)
        self._final = True
        return self.high


class CrossAccumulator(HessianAccumulator):
    """Accumulates ``Σ AᵀB`` over calibration batches, exactly and in any order, like :class:`HessianAccumulator`
    (GPTAQ's cross term ``(X̃ − X)ᵀ X``: ``A`` the float model's input less the quantized model's, ``B`` the latter).

    The matrix is not symmetric, so entry ``(i, j)`` lives on row ``i``'s grid alone; everything else (summands
    per sample, the two bins, the rising levels, :meth:`merge`, a reduction over ranks) is the Hessian's."""

    symmetric = False

    def add(self, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> None:  # type: ignore[override]
        """Adds ``aᵀb`` for a batch of paired inputs ``a, b [..., c]`` (one summand per sample, as the Hessian);
        positions where ``mask`` is 0 are ignored."""
        if a.shape != b.shape:
            raise ValueError(f"a cross term pairs inputs of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
        if self._final:
            raise RuntimeError("this cross term was already finalized; accumulate every batch before finalize()")
        if a.shape[-1] != self.in_features:
            raise ValueError(f"input has {a.shape[-1]} features, the accumulator expects {self.in_features}")
        for left, right in zip(_samples(a.detach(), mask), _samples(b.detach(), mask), strict=True):
            self._add_rows(left, right)

    def _entry_steps(self, rows: slice) -> torch.Tensor:
        return quantum(self.level[rows])[:, None].expand(-1, self.in_features).clone()


def _samples(x: torch.Tensor, mask: torch.Tensor | None) -> Iterator[torch.Tensor]:
    """``x [..., c]`` as the ``[N, c]`` kept rows of each summand, one at a time (a masked sample's rows are a
    copy): one per sample of a ``[B, T, c]`` input, the whole of a ``[N, c]`` one (tokens already flattened, e.g.
    an MoE expert's routed tokens)."""
    if mask is not None and mask.shape != x.shape[:-1]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match input {tuple(x.shape[:-1])}")
    if x.dim() < 3:
        yield kept_rows(x.reshape(-1, x.shape[-1]), None if mask is None else mask.reshape(-1))
        return
    xs = x.reshape(-1, *x.shape[-2:])
    ms = None if mask is None else mask.reshape(-1, mask.shape[-1])
    for i in range(xs.shape[0]):
        yield kept_rows(xs[i], None if ms is None else ms[i])


def _align(high: torch.Tensor, low: torch.Tensor, old: torch.Tensor, new: torch.Tensor, symmetric: bool = True) -> None:
    """Moves bins (in place) from row levels ``old`` to ``new`` (entry levels: the max of row and column, or the
    row's alone where not ``symmetric``): where an entry's level rises by one, its old top bin becomes its low bin;
    whatever falls below the low bin is dropped, exactly as rounding every summand so far onto the new grid would
    (earlier summands round to 0 on every level above their own top)."""
    o = old.to(torch.int16)
    n = new.to(device=old.device, dtype=torch.int16)
    if symmetric:
        rise = torch.maximum(n[:, None], n[None, :]) - torch.maximum(o[:, None], o[None, :])
    else:
        rise = (n - o)[:, None].expand(-1, n.shape[0])
    low.copy_(torch.where(rise == 0, low, torch.where(rise == 1, high, torch.zeros((), dtype=low.dtype))))
    high.masked_fill_(rise != 0, 0.0)


DAMP_WIDTH = 1 / 3  # default of layer_damp and the settings: a down_proj-like width gets about 0.1


def layer_damp(in_features: int, tokens: int, damp: float = 0.01, damp_width: float = DAMP_WIDTH) -> float:
    """Damping fraction (of mean ``diag H``) for one layer: ``max(damp, damp_width · in_features / tokens)``.

    Why: ``H`` is estimated from ``tokens`` calibration tokens, and the nearest-plane solve trusts its correlations
    fully when it feeds each rounding error forward. The wider a layer is per token, the less of that structure
    carries over to other text, so wide layers get more damping. The rule is empirical (measured on held-out
    Hessians and end to end: ``docs/design.md``, "Damping"); ``damp_width=0`` gives GPTQ's fixed damping.
    """
    if tokens <= 0 or damp_width <= 0:
        return damp
    return max(damp, damp_width * in_features / tokens)
