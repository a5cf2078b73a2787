"""Slow, textbook float64 references the fast solver is tested against.

- :func:`babai_reference`: Babai's nearest-plane (paper Algorithm 2, no basis reduction) run per output
  channel on an explicit lattice basis ``B = 𝒳[:, t]·diag(s)`` with ``𝒳ᵀ𝒳 = H`` and target ``y = 𝒳 w``.
- :func:`gptq_reference`: classic front-to-back GPTQ (Frantar et al.) with the inverse-Hessian Cholesky
  and static scales.

Both share nothing with ``babai.py`` but the grid helpers, so agreement is evidence, not tautology.
"""

from __future__ import annotations

import torch

from hf_babai.solver.grid import Grid, expand_per_column, zero_point


def babai_reference(
    w: torch.Tensor,
    h_damped: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    grid: Grid,
    t: torch.Tensor,
    clip: bool = True,
) -> torch.Tensor:
    """Codes ``[N, K]`` from per-channel textbook Babai in Babai order ``t``."""
    w = w.double()
    n, k = w.shape
    x = torch.linalg.cholesky(h_damped.double(), upper=True)  # any 𝒳 with 𝒳ᵀ𝒳 = H works (Theorem 1)
    s = expand_per_column(scales, grid, k).double()
    zp = expand_per_column(zero_point(zeros, scales, grid), grid, k).double()
    codes = torch.empty(n, k, dtype=torch.float64)
    for i in range(n):
        basis = x[:, t] * s[i, t][None, :]
        y = x @ w[i]
        lo = (-zp[i, t]) if clip else None
        hi = (grid.maxq - zp[i, t]) if clip else None
        z = nearest_plane(basis, y, lo, hi)
        codes[i, t] = z + zp[i, t]
    return codes


def nearest_plane(
    basis: torch.Tensor, y: torch.Tensor, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None
) -> torch.Tensor:
    """Babai's nearest plane for ``min_z ‖B z − y‖``, ``z`` integer, optionally boxed per coordinate.

    Back to front over the columns of ``basis``: project the moving target on the j-th Gram–Schmidt
    direction, round (clamp into the box: Babai's ROUND targets the finite grid), subtract the chosen
    lattice vector.
    """
    q, _ = torch.linalg.qr(basis)
    c = basis.shape[1]
    z = torch.zeros(c, dtype=basis.dtype)
    target = y.clone()
    for j in range(c - 1, -1, -1):
        zj = torch.round(torch.dot(q[:, j], target) / torch.dot(q[:, j], basis[:, j]))
        if lo is not None and hi is not None:
            zj = zj.clamp(lo[j], hi[j])
        z[j] = zj
        target = target - basis[:, j] * zj
    return z


def gptq_reference(
    w: torch.Tensor,
    h_damped: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    grid: Grid,
    gptq_order: torch.Tensor,
    clip: bool = True,
) -> torch.Tensor:
    """Codes ``[N, K]`` from classic front-to-back GPTQ processing columns in ``gptq_order``."""
    k = w.shape[1]
    p = gptq_order
    wp = w.double()[:, p].clone()
    s = expand_per_column(scales, grid, k).double()[:, p]
    zp = expand_per_column(zero_point(zeros, scales, grid), grid, k).double()[:, p]
    hinv = torch.linalg.cholesky(torch.linalg.inv(h_damped.double()[p][:, p]), upper=True)
    codes = torch.empty_like(wp)
    for i in range(k):
        col = wp[:, i]
        u = torch.round(col / s[:, i]) + zp[:, i]
        if clip:
            u = u.clamp(0, grid.maxq)
        q = (u - zp[:, i]) * s[:, i]
        codes[:, i] = u
        e = (col - q) / hinv[i, i]
        wp[:, i:] -= e[:, None] * hinv[i, i:][None, :]
    out = torch.empty_like(codes)
    out[:, p] = codes
    return out
