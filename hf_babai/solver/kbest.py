"""K-best nearest plane: a breadth-limited search of Babai's tree, for a closer lattice point on the same grid.

Babai's nearest plane (``babai.py``) decides one coordinate at a time, back to front, and keeps one path: at
coordinate ``j`` it rounds the corrected target ``w'_j`` to the nearest grid value. The damped objective splits
along the same order, ``‖R (w − q)‖² = Σ_j R_jj² (w'_j − q_j)²``, where ``w'_j`` depends only on the decisions
already made (``q_k``, ``k > j``). So the decisions form a tree whose edge costs are the terms of that sum, and
the closest vector is its cheapest root-to-leaf path. K-best (the sphere-decoding literature's breadth-first
search) keeps, for every output row, the ``beams`` partial paths of lowest accumulated cost; each is extended by
its ``candidates`` nearest grid values (inside the clip range) and the ``beams`` cheapest of the extensions
survive. ``beams=1, candidates=1`` is Babai; when ``beams`` covers every path and ``candidates`` every grid value
the search is exhaustive and returns the exact closest vector (tested against brute force).

A pruned search is not guaranteed to beat the greedy path, so each row keeps Babai's point unless the search
found a cheaper one: the result is never farther than Babai's and Babai's bound still holds when nothing is
clipped. The search runs the same lazy-batch block structure as ``babai_quantize`` with a beam axis: finished
blocks enter as one GEMM over all rows × beams, and survivors are re-indexed per column inside the block and
once per block for the history; the chosen path is read back from per-column back-pointers. Rows are
independent, so they are searched in chunks that bound the memory of the beam axis.

Pure tensor code: no transformers import.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch
from torch import Tensor

from .babai import ROW_BLOCK, HessianFactor, QuantResult, babai_quantize, factor_scales
from .grid import Grid, expand_per_column, zero_point

CHUNK_ELEMENTS = 1 << 25  # rows × beams × columns per chunk of the search (128 MB of float32 error history)
MAX_BEAMS = 1 << 14  # back-pointers are int16


def kbest_quantize(
    w: Tensor,
    factor: HessianFactor,
    grid: Grid,
    *,
    beams: int = 4,
    candidates: int = 2,
    scales: tuple[Tensor, Tensor | None] | None = None,
    scale_method: str = "mse",
    block_size: int = 128,
    dtype: torch.dtype = torch.float32,
) -> QuantResult:
    """Quantizes ``W [N, K]`` on the clipped grid by K-best nearest plane; per row never worse than Babai.

    Args:
        w, factor, grid, scales, scale_method, block_size, dtype: as :func:`hf_babai.solver.babai_quantize`.
        beams: partial solutions kept per row (1 with ``candidates=1`` is Babai).
        candidates: grid values tried per coordinate and beam, nearest first (2 or 3 in practice).
    Returns:
        the result with ``stats.loss_babai`` set to Babai's loss on the same scales.
    """
    if not (1 <= beams <= MAX_BEAMS and candidates >= 1):
        raise ValueError(f"need 1 <= beams <= {MAX_BEAMS} and candidates >= 1, got {beams=}, {candidates=}")
    if grid.maxq > 255:
        raise ValueError(f"K-best stores codes as uint8: bits <= 8, got a grid with maxq={grid.maxq}")
    start = time.perf_counter()
    scale_g, zeros = scales if scales is not None else factor_scales(w, factor, grid, scale_method)
    babai = babai_quantize(w, factor, grid, scales=(scale_g, zeros), block_size=block_size, dtype=dtype)
    n, k = w.shape
    dev = w.device
    t = factor.t.to(dev)
    st = expand_per_column(scale_g, grid, k)[:, t].T.contiguous().to(dtype)
    zt = expand_per_column(zero_point(zeros, scale_g, grid), grid, k)[:, t].T.contiguous().to(dtype)
    wt = w[:, t].T.contiguous().to(dtype)
    r = factor.r.to(dev)
    rdiag = torch.diagonal(r)
    m = torch.empty(k, k, dtype=dtype, device=dev)
    for a in range(0, k, ROW_BLOCK):
        m[a : a + ROW_BLOCK] = (r[a : a + ROW_BLOCK] / rdiag[a : a + ROW_BLOCK, None]).to(dtype)
    d = rdiag.double() ** 2

    codes_t = torch.empty_like(wt)
    clipped = torch.empty(n, dtype=torch.long, device=dev)
    rows = max(1, CHUNK_ELEMENTS // (beams * k))
    for a in range(0, n, rows):
        b = min(n, a + rows)
        codes_t[:, a:b], clipped[a:b] = _search(
            wt[:, a:b], st[:, a:b], zt[:, a:b], m, d, grid.maxq, beams, candidates, block_size
        )

    # per row, the search's point or Babai's, whichever is closer under the damped objective
    q_search = (codes_t - zt) * st
    err_search = (wt - q_search).double()
    babai_codes_t = babai.codes.T[t].to(dtype)
    err_babai = (wt - (babai_codes_t - zt) * st).double()
    rd = r.double()
    row_search = ((rd @ err_search) ** 2).sum(0)
    row_babai = ((rd @ err_babai) ** 2).sum(0)
    better = row_search < row_babai
    codes_t = torch.where(better[None, :], codes_t, babai_codes_t)
    err = torch.where(better[None, :], err_search, err_babai)
    loss_damped = float(torch.where(better, row_search, row_babai).sum())

    codes = torch.empty_like(codes_t)
    codes[t] = codes_t
    codes = codes.T.contiguous().to(torch.uint8)
    stats = replace(
        babai.stats,
        loss=loss_damped - factor.damping * float((err**2).sum()),
        loss_damped=loss_damped,
        clipped=int(torch.where(better, clipped, babai.clipped_rows).sum()),
        loss_babai=babai.stats.loss,
        seconds=time.perf_counter() - start,
    )
    return QuantResult(codes, scale_g, zeros, stats, None, torch.where(better, clipped, babai.clipped_rows))


def _search(
    wt: Tensor, st: Tensor, zt: Tensor, m: Tensor, d: Tensor, maxq: int, beams: int, cands: int, block: int
) -> tuple[Tensor, Tensor]:
    """The K-best search for a chunk of rows (``wt``, ``st``, ``zt``: ``[c, n]`` in Babai order): the codes of
    each row's cheapest path ``[c, n]`` and how many of its decisions had their nearest value outside the grid."""
    c, n = wt.shape
    dt = wt.dtype
    dev = wt.device
    rows = torch.arange(n, device=dev)[:, None]
    acc = torch.full((n, beams), float("inf"), dtype=torch.float64, device=dev)
    acc[:, 0] = 0.0  # all beams start as one path; the others join as it branches
    clip = torch.zeros(n, beams, dtype=torch.long, device=dev)
    err = torch.zeros(c, n, beams, dtype=dt, device=dev)  # w − q of every finished block's paths
    chosen = torch.empty(c, n, beams, dtype=torch.uint8, device=dev)  # the code each path took at column j
    parent = torch.empty(c, n, beams, dtype=torch.int16, device=dev)  # back-pointers (beams <= MAX_BEAMS)
    offsets = torch.arange(-cands, cands + 1, device=dev, dtype=dt)[None, None]
    for hi in range(c, 0, -block):
        lo = max(0, hi - block)
        # targets of this block from the finished blocks, per beam as the beams stood at block start
        base = wt[lo:hi, :, None].expand(-1, -1, beams).clone()
        if hi < c:
            base += (m[lo:hi, hi:] @ err[hi:].reshape(c - hi, n * beams)).reshape(hi - lo, n, beams)
        perm = torch.arange(beams, device=dev).expand(n, beams).contiguous()  # each beam's ancestor at block start
        eb = torch.zeros(n, beams, hi - lo, dtype=dt, device=dev)  # this block's errors, columns lo..hi-1
        for j in range(hi - 1, lo - 1, -1):
            i = j - lo
            target = base[i].gather(1, perm)
            if j + 1 < hi:
                target = target + eb[:, :, i + 1 :] @ m[j, j + 1 : hi]
            s, z = st[j][:, None, None], zt[j][:, None, None]
            x = target[:, :, None] / s
            near = torch.round(x) + z  # [n, beams, 1]: Babai's rounding, ties included
            u = _candidates(x + z, near, maxq, cands, offsets)
            cost = d[j] * ((target[:, :, None] - (u - z) * s).double() ** 2)
            if cands > 2:  # the general candidate set holds invalid slots
                cost = torch.where((u >= 0) & (u <= maxq), cost, float("inf"))
                cost, pick = cost.topk(cands, dim=2, largest=False)
                u = u.gather(2, pick)
            total = (acc[:, :, None] + cost).reshape(n, -1)
            acc, idx = total.topk(beams, dim=1, largest=False)
            par = idx // cands
            code = u.reshape(n, -1).gather(1, idx)
            out = ((near[:, :, 0] < 0) | (near[:, :, 0] > maxq)).long()  # Babai would have clipped here
            clip = (clip + out).gather(1, par)
            chosen[j], parent[j] = code, par
            if j + 1 < hi:  # the decided part of this block's history follows the survivors
                done = eb[:, :, i + 1 :]
                eb[:, :, i + 1 :] = done.gather(1, par[:, :, None].expand(-1, -1, done.shape[2]))
            eb[:, :, i] = wt[j][:, None] - (code - zt[j][:, None]) * st[j][:, None]
            perm = perm.gather(1, par)
        err[lo:hi] = eb.permute(2, 0, 1)
        if hi < c:  # the finished blocks' history follows the survivors, once per block
            err[hi:] = err[hi:, rows, perm]
    # read the cheapest path back from its leaf (column 0, the last decided) to column c − 1
    best = acc.argmin(1)
    beam = best
    codes = torch.empty(c, n, dtype=dt, device=dev)
    for j in range(c):
        codes[j] = chosen[j, rows[:, 0], beam]
        beam = parent[j, rows[:, 0], beam].long()
    return codes, clip[rows[:, 0], best]


def _candidates(x: Tensor, near: Tensor, maxq: int, cands: int, offsets: Tensor) -> Tensor:
    """Grid values to try for targets ``x`` (code units, ``[n, beams, 1]``): the nearest in-range value and, for
    two candidates, the next nearest (the other side when the nearer neighbour is off the grid; bits >= 2 so it
    exists). More candidates: every value within ``cands`` of the nearest, the caller keeps the valid cheapest
    (for a convex cost the ``cands`` nearest grid values all lie there)."""
    u0 = near.clamp(0, maxq)
    if cands == 1:
        return u0
    if cands == 2:
        step = torch.where(x >= u0, 1.0, -1.0).to(x.dtype)
        u1 = u0 + step
        u1 = torch.where((u1 < 0) | (u1 > maxq), u0 - step, u1)
        return torch.cat([u0, u1], 2)
    return u0 + offsets
