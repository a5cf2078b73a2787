"""Quantization orders and the pivoted Cholesky factorization they need.

Naming follows GPTQ users' habits: an order names the sequence in which GPTQ (front-to-back)
*processes* columns. Babai's nearest-plane runs the same computation back-to-front over the Babai order
``t = reversed(GPTQ order)`` (paper §2.2): the lattice basis is factored in ``t`` order and coordinate
``t[c−1]`` is fixed first. All functions here return the Babai order ``t``.

- ``natural``: GPTQ processes columns 0, 1, …, c−1.
- ``act-order``: GPTQ processes columns by descending ``diag H`` (a diagonal-only heuristic).
- ``min-pivot``: the paper's Algorithm 3: a pivoted LDL of the damped H that always takes the remaining
  index with the smallest Schur-complement diagonal. Its pivots are the Gram–Schmidt lengths ``D_jj``, so
  the greedy choice targets ``tr(D)`` and with it Babai's bound ``¼ Σ D_jj s_j²``.

The pivoted factorization is blocked (LAPACK ``dpstrf`` style): each pivot costs one matrix–vector product
and the trailing Schur update is applied once per block as a matrix product, so ordering a 5k×5k Hessian
costs about one Cholesky rather than c rank-1 updates of the full matrix.
"""

from __future__ import annotations

import torch

ORDERS = ("natural", "act-order", "min-pivot")


def pivoted_cholesky(
    a: torch.Tensor, *, largest: bool, tol: float = 0.0, block: int = 512, shift: float = 0.0
) -> tuple[torch.Tensor, int]:
    """Greedy diagonal-pivoted Cholesky ``(A + shift·I)[p][:, p] = L Lᵀ``; returns the pivot order only.

    Args:
        a: symmetric positive semidefinite matrix (not modified, and not copied: the first panel reads it in
            place, so the extra memory is one compacted Schur complement, never a second full copy).
        largest: pick the largest remaining Schur diagonal (rank-revealing, LAPACK's rule) or the smallest
            (the paper's min-pivot rule).
        tol: stop when the chosen pivot is ``<= tol``; the number of pivots taken is the numerical rank.
        shift: added to the diagonal (damping) without forming ``A + shift·I``. The diagonal of the work matrix
            is never read (pivot values come from ``d``, and each pivot's own entry of its column is
            overwritten), so only ``d`` carries the shift; the result equals ``pivoted_cholesky(A + shift·I)``.
        block: pivots per panel. Inside a panel each pivot costs one row read and one small matrix–vector
            product (no row/column swaps: taken indices are masked); at the end of the panel the Schur
            complement of the remaining indices is formed with one matrix product and compacted, so the
            work matrix shrinks as the factorization proceeds.

    Returns:
        ``(perm, rank)``: the pivot order (a full permutation; indices after ``rank`` follow in their
        original order) and the number of pivots above ``tol``.
    """
    n = a.shape[0]
    rem = torch.arange(n, device=a.device)
    work = a
    d = torch.diagonal(a) + shift if shift else torch.diagonal(a).clone()
    taken: list[torch.Tensor] = []
    masked = float("-inf") if largest else float("inf")
    pick = torch.argmax if largest else torch.argmin
    k = 0
    while rem.numel():
        m = rem.numel()
        nb = min(block, m)
        panel = torch.zeros(nb, m, dtype=a.dtype, device=a.device)
        sel = d.clone()
        chosen = torch.zeros(m, dtype=torch.bool, device=a.device)
        picks = []
        for i in range(nb):
            p = int(pick(sel))
            if float(d[p]) <= tol:
                order = torch.cat([*taken, rem[torch.tensor(picks, dtype=torch.long, device=rem.device)], rem[~chosen]])
                return order, k
            piv = torch.sqrt(d[p])
            col = (work[p] - panel[:i].T @ panel[:i, p]) / piv
            col[chosen] = 0
            col[p] = piv
            panel[i] = col
            d -= col**2
            chosen[p] = True
            picks.append(p)
            k += 1
            sel = torch.where(chosen, torch.full_like(d, masked), d)
        taken.append(rem[torch.tensor(picks, dtype=torch.long, device=a.device)])
        keep = (~chosen).nonzero().squeeze(1)
        rest = panel.index_select(1, keep)
        work = work[keep[:, None], keep].addmm_(rest.T, rest, alpha=-1.0)  # one gather: no row-selected copy
        d = d.index_select(0, keep)
        rem = rem.index_select(0, keep)
    return torch.cat(taken), k


def numerical_rank(h: torch.Tensor) -> int:
    """Rank of the (undamped) Hessian: pivots above ``c · eps · max diag`` of a rank-revealing pivoted
    Cholesky, in float32 (a rank estimate needs no more precision than that tolerance)."""
    c = h.shape[0]
    h32 = h.float()
    top = float(torch.diagonal(h32).max()) if c else 0.0
    if top <= 0.0:
        return 0
    tol = c * float(torch.finfo(torch.float32).eps) * top
    return pivoted_cholesky(h32, largest=True, tol=tol)[1]


def babai_order(h: torch.Tensor, order: str, damping: float = 0.0) -> torch.Tensor:
    """Babai order ``t`` (``reversed`` GPTQ processing order) for ``H + damping·I`` (the damped matrix is
    never formed: for a 5k-wide layer each full copy is ~200 MB)."""
    c = h.shape[0]
    if order == "natural":
        return torch.arange(c - 1, -1, -1, device=h.device)
    if order == "act-order":
        gptq = torch.argsort(torch.diagonal(h) + damping, descending=True, stable=True)
        return gptq.flip(0)
    if order == "min-pivot":
        perm, rank = pivoted_cholesky(h, largest=False, shift=damping)
        if rank < c:
            raise torch.linalg.LinAlgError("damped Hessian is not positive definite")
        return perm
    raise ValueError(f"order {order!r} is unknown; use one of {ORDERS}")
