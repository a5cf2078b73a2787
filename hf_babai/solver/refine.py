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

The second step here, :func:`refit_scales`, changes the lattice instead of the point: with the codes fixed, the
best group scales under ``H`` are a small least-squares problem per row (the engine's ``rescale`` option).

Pure tensor code: no transformers import.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch
from torch import Tensor

from .babai import QuantResult
from .grid import FP16_TINY, Grid, expand_per_column, zero_point


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


def refit_scales(w: Tensor, h: Tensor, codes: Tensor, scales: Tensor, zeros: Tensor | None, grid: Grid) -> Tensor:
    """Per-group scales that minimise the proxy loss for fixed integer codes (float16-exact; never worse per row).

    Why: scales are chosen before the solve from the weights alone (min/max or an MSE shrink search), which ignores
    how much each input column matters. Once the codes are fixed, ``ŵ = s_g · (u − z)`` is linear in the scales,
    so the best scales of a row solve a ``G × G`` least-squares system ``(A H Aᵀ) s = A H wᵀ`` (``A[g, j] = u_j − z``
    for ``j`` in group ``g``); per channel it is one division. This matters most where a few input columns carry
    massive activations (e.g. ``down_proj`` in many LLMs): there the weight-only scale leaves a large error on
    exactly the column ``H`` weighs most. The system carries a tiny ridge toward the old scales so that groups
    whose codes are all zero keep their scale; the result is rounded to float16 (what checkpoints store) and a
    row keeps its old scales unless the rounded new ones lower its loss, so the loss never increases.

    Args:
        w: ``[N, K]`` weight; h: ``[K, K]`` Hessian of the objective (pass the damped one to descend that);
        codes: ``[N, K]`` integer codes; scales / zeros: ``[N, G]`` as the solver returns them.
    Returns:
        new scales, same shape and dtype as ``scales``.
    """
    n, k = w.shape
    ng = scales.shape[1]
    hd = h.to(w.device, torch.float64)
    zero = expand_per_column(zero_point(zeros, scales, grid), grid, k).double()
    a = codes.double() - zero  # ŵ = s_g · a
    wd = w.double()
    gidx = grid.group_index(k, w.device)
    wh = wd @ hd
    rhs = torch.zeros(n, ng, dtype=torch.float64, device=w.device).index_add_(1, gidx, wh * a)
    m = torch.empty(n, ng, ng, dtype=torch.float64, device=w.device)
    for g in range(ng):  # column block g' = g of A H Aᵀ: segment sums of a ⊙ (a[:, cols_g] H[cols_g, :])
        cols = (gidx == g).nonzero().squeeze(1)
        r = a[:, cols] @ hd[cols]
        m[:, :, g] = torch.zeros(n, ng, dtype=torch.float64, device=w.device).index_add_(1, gidx, a * r)
    diag = torch.diagonal(m, dim1=1, dim2=2)
    ridge = 1e-9 * diag.mean(1, keepdim=True).clamp_min(1e-30) + 1e-30
    old = scales.double()
    new = torch.linalg.solve(m + torch.diag_embed(ridge.expand(n, ng)), (rhs + ridge * old).unsqueeze(-1)).squeeze(-1)
    new = grid.round_scales(new)
    floor = FP16_TINY if grid.scale_dtype == "bfloat16" else 0.0  # float16 subnormals need not be bfloat16 values
    ok = torch.isfinite(new).all(1) & (new > 0).all(1) & (new >= floor).all(1)
    new = torch.where(ok[:, None], new, old)
    c = (wh * wd).sum(1)

    def row_loss(s: Tensor) -> Tensor:
        # (w − s·A) H (w − s·A)ᵀ = wHwᵀ − 2 s·rhs + sᵀ M s: from the G×G system, no further N×K×K product
        # (float64 keeps the cancellation error ~1e-16·wHwᵀ, far below any loss difference that matters)
        return c - 2 * (s * rhs).sum(1) + torch.einsum("ng,ngh,nh->n", s, m, s)

    better = row_loss(new) < row_loss(old)
    return torch.where(better[:, None], new, old).to(scales.dtype)


def refine_result(
    w: Tensor,
    h: Tensor,
    damping: float,
    res: QuantResult,
    grid: Grid,
    sweeps: int,
    *,
    rescale: bool = False,
) -> QuantResult:
    """``res`` (a clipped-grid Babai result) after ``sweeps`` coordinate-descent sweeps on the damped objective
    ``H + λI`` (the one Babai's point comes from; the damping keeps the step from over-fitting a rank-deficient
    Hessian), and with ``rescale`` the scales refitted for the codes (:func:`refit_scales`) before and after the
    sweeps. Each step is a minimisation over its own variables, so the damped loss never increases.
    ``stats.loss`` becomes the refined undamped loss; ``stats.loss_babai`` keeps Babai's."""
    start = time.perf_counter()
    k = w.shape[1]
    hd = h.to(torch.float64, copy=True)  # H + λI without a second full-size temporary (eye)
    hd.diagonal().add_(damping)
    codes, scales = res.codes, res.scales
    if rescale:
        scales = refit_scales(w, hd, codes, scales, res.zeros, grid)
    if sweeps:
        step = expand_per_column(scales, grid, k)
        zero = expand_per_column(zero_point(res.zeros, scales, grid), grid, k)
        codes, _ = refine_codes(w, hd, codes, step, zero, maxq=grid.maxq, sweeps=sweeps)
        if rescale:
            scales = refit_scales(w, hd, codes, scales, res.zeros, grid)
    step = expand_per_column(scales, grid, k)
    zero = expand_per_column(zero_point(res.zeros, scales, grid), grid, k)
    e = w.double() - step.double() * (codes.double() - zero.double())
    loss = float(((e @ h.double().to(e.device)) * e).sum())
    stats = replace(
        res.stats,
        loss=loss,
        loss_damped=loss + damping * float((e**2).sum()),
        loss_babai=res.stats.loss,
        seconds=res.stats.seconds + time.perf_counter() - start,
    )
    return QuantResult(codes, scales, res.zeros, stats, res.outliers)
