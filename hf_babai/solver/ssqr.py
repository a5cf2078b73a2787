"""SSQR: low-bit inliers on group scales plus sparse exact outliers, scales tuned to an outlier rate (paper §5.1).

Plain GPTQ/Babai clips: when error feedback pushes a weight's Babai target ``w'_j`` outside the grid, the code is
clamped, the error is large and Babai's bound is lost. SSQR keeps the fixed-width inlier grid but never clips:
an overflowing weight becomes a sparse outlier holding ``w'_j`` exactly (float16), so its error is ~0 and the
bound holds for every weight (``babai_quantize(..., outliers=True)``). Larger scales mean fewer outliers but a
larger bound (``∝ s²``); smaller scales the reverse, so the scales are tuned to spend a given outlier budget.

Decisions on the paper's open points:

* **one common factor per layer** on the MSE group scales, found by bisection so the layer's outlier rate is
  at most the target: a per-layer budget lets outliers concentrate in the rows and groups that have them
  (a per-channel search would force every row to the same rate and enlarge the scales of outlier-heavy rows);
* **outlier value** = the exact Babai target (float16), not the unclipped lattice point ``s·z``: both keep the
  bound, the exact value makes that coordinate's error ~0 and stores in the same 16 bits;
* the factor is searched in both directions from 1 (MSE scales), so a layer with few overflows spends its
  budget on a finer grid, and is rounded with the scales to float16 like every stored scale.

Pure tensor code: no transformers import.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from .babai import HessianFactor, QuantResult, babai_quantize, factor_scales
from .grid import FP16_MAX, FP16_TINY, Grid


def _scaled(scales: Tensor, alpha: float) -> Tensor:
    return (scales * alpha).clamp(FP16_TINY, FP16_MAX).to(torch.float16).float()


def ssqr_quantize(
    w: Tensor,
    factor: HessianFactor,
    grid: Grid,
    outlier_rate: float,
    *,
    scale_method: str = "mse",
    block_size: int = 128,
    rel_tol: float = 0.02,
    max_steps: int = 10,
) -> tuple[QuantResult, float]:
    """Babai with sparse outliers at the smallest common scale factor whose outlier rate is ≤ ``outlier_rate``.

    Returns the result (``outliers`` = CSR of exact values) and the factor applied to the ``scale_method``
    scales.
    """
    if not 0 <= outlier_rate < 1:
        raise ValueError(f"outlier_rate={outlier_rate} must be in [0, 1), e.g. 0.01")
    start = time.perf_counter()
    base, zeros = factor_scales(w, factor, grid, scale_method)
    budget = outlier_rate * w.numel()
    cache: dict[float, QuantResult] = {}

    def solve(alpha: float) -> int:
        if alpha not in cache:
            cache[alpha] = babai_quantize(
                w, factor, grid, scales=(_scaled(base, alpha), zeros), outliers=True, block_size=block_size
            )
        return cache[alpha].stats.outliers

    step = 2 ** (1 / 4)
    alpha = 1.0
    if solve(alpha) <= budget:  # budget left: try finer grids
        hi, lo = alpha, alpha / step
        while solve(lo) <= budget and lo > 2**-6:
            hi, lo = lo, lo / step
    else:
        lo, hi = alpha, alpha * step
        while solve(hi) > budget:
            if hi > 2**10:  # even huge scales overflow: only the all-dead case (never for finite weights)
                raise RuntimeError("could not meet the outlier budget: scales overflow float16")
            lo, hi = hi, hi * step
    steps = 0
    while hi / lo > 1 + rel_tol and steps < max_steps and solve(hi) <= budget:
        mid = (lo * hi) ** 0.5
        steps += 1
        if solve(mid) <= budget:
            hi = mid
        else:
            lo = mid
    res = cache[hi]
    res.stats.seconds = time.perf_counter() - start
    return res, hi
