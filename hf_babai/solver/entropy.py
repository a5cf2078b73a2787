"""HPTQ and HRTN: one scale per matrix, unbounded integer codes, entropy-coded to a bit budget (paper §5.2).

The premise of the no-clipping formats: with nothing clipped, Babai's error bound holds for every weight
(``¼ Σ D_jj s²``), and a scalar scale makes every column share one evenly spaced grid, so the only question
is how finely to space it. A finer grid (smaller ``s``) lowers the bound as ``s²`` and raises the entropy of
the codes by about ``log2`` of the ratio; the entropy coder (``formats.huffman``, passed in as ``code_bits``)
turns that entropy into stored bits. The scale is therefore searched so that the *stored* size — codewords,
chunk offsets, codebook and the 16-bit scale — meets a bits-per-weight target (paper: 4.125 / 3.125 / 2.125, the budgets
of b-bit group-128 formats). Decisions on the paper's open points:

* one codebook per weight matrix (per row would cost ~40 bits × alphabet per row);
* overheads are counted in the budget (the honest comparison with fixed-width formats);
* search: bisection on ``log s`` with RTN codes (cheap, gives HRTN directly), then a bracketed bisection with
  Babai solves started from the RTN scale (the factor of ``H`` does not depend on ``s``, so each step is one
  solve and no refactorisation); a Babai step stops when the bracket is within 1 %. The smallest scale that
  meets the budget is returned (cost is monotone in ``s`` in practice, not provably for Babai, so the result
  always comes from an evaluated scale that met the budget).

Pure tensor code: no transformers import.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .babai import HessianFactor, LayerStats, babai_quantize, proxy_loss
from .grid import FP16_TINY, Grid

SCALE_BITS = 16  # the per-matrix scale is stored in float16
_GRID = Grid(bits=8, sym=True, group_size=-1)  # bits only set the zero point (128) when nothing is clipped
_ZERO = 128


@dataclass
class EntropyResult:
    """``W ≈ scale · codes`` with int32 ``codes [N, K]`` (signed, unbounded); ``bits`` as stored."""

    codes: Tensor
    scale: float
    bits: int
    bpw: float
    stats: LayerStats
    steps: int


def _fp16(s: float) -> float:
    return float(torch.tensor(max(s, FP16_TINY)).to(torch.float16).float())


CodeBits = Callable[[Tensor], float]
"""Stored bits of an integer code tensor under the entropy coder (``inf`` if it cannot code it). The coder is a
format concern (``hf_babai.formats.huffman.coded_bits``), so the search takes it as an argument."""


def stored_bits(codes: Tensor, code_bits: CodeBits) -> float:
    """Bits of the coded integers plus the float16 scale."""
    return code_bits(codes) + SCALE_BITS


def _rtn_codes(w: Tensor, s: float) -> Tensor:
    return torch.round(w.float() / s).to(torch.int32)


def _bisect(cost, lo: float, hi: float, target: float, rel_tol: float, max_steps: int) -> tuple[float, int]:
    """Smallest ``s`` in ``[lo, hi]`` with ``cost(s) ≤ target`` (``cost(hi) ≤ target < cost(lo)`` given)."""
    steps = 0
    while hi / lo > 1 + rel_tol and steps < max_steps:
        mid = _fp16(math.sqrt(lo * hi))
        if mid in (lo, hi):
            break
        steps += 1
        if cost(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi, steps


def rtn_scale(w: Tensor, target_bpw: float, code_bits: CodeBits) -> tuple[float, int]:
    """HRTN's scale: the smallest float16 scale whose rounded codes fit ``target_bpw``; returns (scale, steps)."""
    n = w.numel()
    budget = target_bpw * n
    amax = float(w.abs().max())
    if amax == 0:
        return 1.0, 0
    hi = _fp16(2 * amax)  # every code in {-1, 0, 1}: the cheapest non-trivial grid
    if stored_bits(_rtn_codes(w, hi), code_bits) > budget:
        raise ValueError(
            f"target {target_bpw} bits per weight is below what a 3-symbol code of this {tuple(w.shape)} matrix "
            "costs with its codebook and chunk offsets; raise the target"
        )
    lo = hi
    while stored_bits(_rtn_codes(w, lo), code_bits) <= budget:
        lo = _fp16(lo / 2)
        if lo <= FP16_TINY:
            return lo, 0
    return _bisect(lambda s: stored_bits(_rtn_codes(w, s), code_bits), lo, hi, budget, 2**-10, 40)


def entropy_quantize(
    w: Tensor,
    factor: HessianFactor | None,
    target_bpw: float,
    *,
    code_bits: CodeBits,
    h: Tensor | None = None,
    block_size: int = 128,
    rel_tol: float = 0.01,
    max_steps: int = 12,
) -> EntropyResult:
    """HPTQ (``factor`` given: Babai/GPTQ without clipping) or HRTN (``factor=None``: round to nearest).

    Args:
        w: weight ``[out, in]``.
        factor: :func:`factor_hessian` of the layer input, or None for HRTN.
        target_bpw: stored bits per weight to meet, all overheads included.
        code_bits: the entropy coder's stored size of a code tensor (``formats.huffman.coded_bits``).
        h: the undamped Hessian, only to report HRTN's proxy loss (HPTQ reports it from the factor).
    """
    start = time.perf_counter()
    n_weights = w.numel()
    budget = target_bpw * n_weights
    s_rtn, steps = rtn_scale(w, target_bpw, code_bits)
    if factor is None:
        codes = _rtn_codes(w, s_rtn)
        nan = float("nan")
        loss = proxy_loss(w, codes.float() * s_rtn, h) if h is not None else nan
        stats = LayerStats(loss, nan, nan, nan, nan, 0, n_weights, 0.0, -1, 0, "rtn", time.perf_counter() - start)
        bits = stored_bits(codes, code_bits)
        return EntropyResult(codes, s_rtn, int(bits), bits / n_weights, stats, steps)

    cache: dict[float, tuple[float, object]] = {}

    def solve(s: float) -> float:
        if s not in cache:
            scales = torch.full((w.shape[0], 1), s, dtype=torch.float32, device=w.device)
            res = babai_quantize(w, factor, _GRID, scales=(scales, None), clip=False, block_size=block_size)
            cache[s] = (stored_bits(res.codes - _ZERO, code_bits), res)
        return cache[s][0]

    # Bracket around the RTN scale: Babai's codes spread a little wider than RTN's, so s usually goes up.
    ratio = 2 ** (1 / 8)
    s = s_rtn
    if solve(s) <= budget:
        hi = s
        lo = _fp16(s / ratio)
        while solve(lo) <= budget and lo > FP16_TINY:
            hi, lo = lo, _fp16(lo / ratio)
    else:
        lo = s
        hi = _fp16(s * ratio)
        while solve(hi) > budget:
            if hi > 64 * s_rtn:  # Babai's codes spread a little wider than RTN's, never by this much
                raise RuntimeError(f"no scale up to {hi:g} meets {target_bpw} bits per weight with the Babai solve")
            lo, hi = hi, _fp16(hi * ratio)
    best, _ = _bisect(solve, lo, hi, budget, rel_tol, max_steps)
    bits, res = cache[best]
    res.stats.seconds = time.perf_counter() - start
    return EntropyResult(res.codes - _ZERO, best, int(bits), bits / n_weights, res.stats, len(cache) + steps)
