"""A closest-vector step beyond Babai: exact coordinate descent on the proxy loss, started from Babai's point.

Babai's nearest-plane point is within its bound of the lattice point nearest to ``w`` but usually not the nearest.
Given the other coordinates, the loss ``f(q) = (w − q) H (w − q)ᵀ`` of one row is a 1-D convex quadratic in
coordinate ``q_j`` with minimum at ``q_j + g_j / H_jj`` (``g = (w − q) H``); the best grid value is that point
rounded to the grid (and clamped, for clipped grids: a 1-D convex quadratic's best integer in an interval is
the clamp of its rounded minimiser). Sweeping every coordinate so never increases the loss, for every row at
once, and each sweep costs about one Babai solve (blocked like GPTQ's lazy batch: a small in-block product
per column, one GEMM per block). This is greedy coordinate descent (as in QuantEase, Behdin et al. 2023) on the
lattice coordinates; the paper leaves stronger CVP steps to future work. Because it only lowers the loss of
Babai's point, Babai's bound still holds for the refined point when nothing is clipped.

Pure tensor code: no transformers import.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch
from torch import Tensor

from .babai import QuantResult
from .grid import Grid, expand_per_column, zero_point


def refine_codes(
    w: Tensor,
    h: Tensor,
    u: Tensor,
    step: Tensor,
    zero: Tensor,
    *,
    maxq: int | None,
    sweeps: int = 1,
    block_size: int = 128,
) -> tuple[Tensor, list[float]]:
    """Coordinate-descent sweeps on integer codes ``u`` (``ŵ = step · (u − zero)``, all ``[N, K]``).

    Args:
        w: original weight ``[N, K]``.
        h: the (undamped) Hessian ``[K, K]``; the loss is ``tr((w − ŵ) H (w − ŵ)ᵀ)``.
        u: starting codes (e.g. Babai's), any integer dtype.
        step, zero: per-weight scale and zero point ``[N, K]`` (expanded from the groups).
        maxq: codes are kept in ``[0, maxq]``; ``None`` for unbounded (no-clipping) codes.
        sweeps: passes over all columns.
    Returns:
        the refined codes (same dtype as ``u``) and the loss after each sweep, preceded by the starting loss.
    """
    hd = h.to(w.device, torch.float64)
    q = step.double() * (u.double() - zero.double())
    e = w.double() - q
    g = e @ hd  # gradient / 2 of the row losses: g = e H
    uu = u.double().clone()
    diag = torch.diagonal(hd)
    k = w.shape[1]
    losses = [float((g * e).sum())]
    for _ in range(sweeps):
        for a in range(0, k, block_size):
            b = min(a + block_size, k)
            de = torch.zeros(w.shape[0], b - a, dtype=torch.float64, device=w.device)
            for j in range(a, b):
                if diag[j] <= 0:  # dead input: any value has the same loss
                    continue
                gj = g[:, j] + de[:, : j - a] @ hd[a:j, j]
                target = uu[:, j] + (gj / diag[j]) / step[:, j].double()
                new = torch.round(target)
                if maxq is not None:
                    new.clamp_(0, maxq)
                delta = new - uu[:, j]
                if not bool(delta.any()):
                    continue
                uu[:, j] = new
                de[:, j - a] = -delta * step[:, j].double()  # e_j changes by −Δq_j
            g += de @ hd[a:b]
            e[:, a:b] += de
        losses.append(float((g * e).sum()))
    return uu.to(u.dtype), losses


def refine_result(w: Tensor, h: Tensor, damping: float, res: QuantResult, grid: Grid, sweeps: int) -> QuantResult:
    """``res`` (a clipped-grid Babai result) after ``sweeps`` coordinate-descent sweeps on the damped objective
    ``H + λI`` (the one Babai's point comes from; the damping keeps the step from over-fitting a rank-deficient
    Hessian). ``stats.loss`` becomes the refined undamped loss; ``stats.loss_babai`` keeps Babai's."""
    start = time.perf_counter()
    k = w.shape[1]
    step = expand_per_column(res.scales, grid, k)
    zero = expand_per_column(zero_point(res.zeros, res.scales, grid), grid, k)
    hd = h.double() + damping * torch.eye(k, dtype=torch.float64, device=h.device)
    codes, _ = refine_codes(w, hd, res.codes, step, zero, maxq=grid.maxq, sweeps=sweeps)
    e = w.double() - step.double() * (codes.double() - zero.double())
    loss = float(((e @ h.double().to(e.device)) * e).sum())
    stats = replace(
        res.stats,
        loss=loss,
        loss_damped=loss + damping * float((e**2).sum()),
        loss_babai=res.stats.loss,
        seconds=res.stats.seconds + time.perf_counter() - start,
    )
    return QuantResult(codes, res.scales, res.zeros, stats, res.outliers)
