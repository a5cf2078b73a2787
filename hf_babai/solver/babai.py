"""Babai's nearest-plane quantization of a weight matrix against a layer Hessian (GPTQ back-to-front).

Pure tensor code: tensors in, tensors out, no transformers import.

Algorithm (paper §2.2, inverse-free form, the same feedback structure as QuIP's LDLQ):

    t  = Babai order (reversed GPTQ processing order, see ``ordering``)
    R  = chol_upper((H + λI)[t][:, t])      # lattice basis factor, Rᵀ R = damped H in t order
    M  = R / diag(R)[:, None] − I           # strictly upper
    for j = c−1 … 0:                        # back to front
        w'_j = w_j + Σ_{k>j} M[j, k] (w_k − q_k)      # Babai coefficient ζ_j·s_j
        q_j  = s_j · (ROUND(w'_j / s_j + z_j) − z_j)

All output rows are solved at once (they share H and the order). Columns are processed in blocks from the
end ("lazy batch"): the contribution of every finished block is one matrix product, and the in-block
corrections are one small vector–matrix product per column, so the cost is dominated by GEMMs. The pass
works on transposed copies (column j stored as row j) so that each per-column step reads contiguous memory.
The integers equal those of front-to-back GPTQ run over ``reversed(t)`` and of textbook Babai on the basis
``X·diag(s)`` (``reference.py``; tested).

Error accounting comes for free from the factor: with no clipping the damped error of row i is exactly
``Σ_j R_jj² (w'_ij − q_ij)²`` and each term is at most ``¼ R_jj² s_ij²`` — Babai's worst-case bound
(paper Theorem 5, with ``D = diag(R)²``). Its expected value for near-uniform residuals is a third of it.
The undamped proxy loss ``tr((W−Ŵ) H (W−Ŵ)ᵀ)`` is the damped one minus ``λ‖W−Ŵ‖²`` (exact identity).
When a rounded code falls outside the grid it is clipped, the bound no longer applies, and the count of
such weights is reported.

Semidefinite or ill-conditioned H (dead inputs, fewer tokens than features): damping ``λ = damp ·
mean(diag H)`` makes it positive definite; if a factorization still fails, λ is multiplied by 10 until it
succeeds (λ > 0 always succeeds in exact arithmetic, and ×10 steps reach a numerically safe value fast).
The λ used and the numerical rank of the undamped H are reported. A dead input (zero column of X) gets
``D_jj = λ`` and is decoupled from the rest: it is rounded to nearest, which is the exact minimiser of the
damped objective for that coordinate — not a fallback.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from .grid import Grid, compute_scales, expand_per_column, zero_point
from .ordering import babai_order, numerical_rank

# Rows of a K×K matrix processed at a time where a full-size temporary (R², R/diag(R), the permuted H) would
# otherwise exist beside R or H: 1024 rows of a 5k-wide float64 matrix are 40 MB instead of 200 MB.
ROW_BLOCK = 1024


@dataclass
class HessianFactor:
    """Everything about H the solve needs, shared by all layers reading the same input (q/k/v)."""

    order: str
    t: torch.Tensor  # Babai order, [c]
    r: torch.Tensor  # upper Cholesky factor of the damped H in t order, float64 [c, c]
    damping: float  # λ actually added
    rank: int  # numerical rank of the undamped H
    dead: int  # inputs whose diag(H) is exactly 0

    @property
    def d(self) -> torch.Tensor:
        """Gram–Schmidt lengths ``D_jj = R_jj²`` in t order."""
        return torch.diagonal(self.r) ** 2

    @property
    def diag_h(self) -> torch.Tensor:
        """``diag(H + λI)`` in original column order (``H = RᵀR`` in t order: column norms² of ``R``)."""
        col = torch.zeros(self.t.numel(), dtype=self.r.dtype, device=self.r.device)
        for a in range(0, col.numel(), ROW_BLOCK):  # row blocks: no full-size R² temporary
            col += (self.r[a : a + ROW_BLOCK] ** 2).sum(0)
        out = torch.empty_like(col)
        out[self.t.to(self.r.device)] = col
        return out


@dataclass
class LayerStats:
    """Per-layer record; ``bound`` is valid (and holds: tested) only when ``clipped == 0``."""

    loss: float  # tr((W−Ŵ) H (W−Ŵ)ᵀ), undamped
    loss_damped: float  # tr((W−Ŵ)(H+λI)(W−Ŵ)ᵀ) = Σ R_jj² (w'−q)²
    bound: float  # ¼ Σ_i Σ_j D_jj s_ij²  (Babai worst case, damped objective)
    expected: float  # bound / 3 (uniform-residual expectation)
    trace_d: float  # tr(D): what the order minimises
    clipped: int  # codes that fell outside the grid and were clamped
    weights: int
    damping: float
    rank: int
    dead: int
    order: str
    seconds: float
    outliers: int = 0  # SSQR: codes that overflowed the grid and were kept exactly as sparse outliers
    loss_babai: float = float("nan")  # loss of Babai's point when a refinement step followed (refine.py)
    scales: str = ""  # the scale search behind the codes, set by the engine (e.g. "mse", "hmse+refit")

    def as_dict(self) -> dict[str, float | int | str]:
        """The record as one ``quant_log.csv`` row; without a refinement step, Babai's point is the result, so
        ``loss_babai`` is ``loss`` (never an empty column)."""
        d = asdict(self)
        if math.isnan(self.loss_babai):
            d["loss_babai"] = self.loss
        return d


@dataclass
class QuantResult:
    """Codes ``[N, K]`` (original column order), scales ``[N, G]``, zeros ``[N, G]`` or None, stats; with
    ``outliers=True`` also the sparse outliers, a coalesced float32 COO ``[N, K]`` (their code slots hold the
    zero code)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    stats: LayerStats
    outliers: torch.Tensor | None = None
    clipped_rows: torch.Tensor | None = None  # [N] clipped codes per output row (Babai solves), for K-best


def factor_hessian(h: torch.Tensor, order: str = "act-order", damp: float = 0.01) -> HessianFactor:
    """Damps, orders and factors ``H`` once; never fails for a symmetric PSD input."""
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"Hessian must be square, got shape {tuple(h.shape)}")
    if not torch.isfinite(h).all():
        raise ValueError("Hessian has NaN/inf entries: the calibration activations overflowed")
    h = h.double()
    diag = torch.diagonal(h)
    if (diag < 0).any():
        raise ValueError("Hessian has a negative diagonal entry: it is not XᵀX of any activations")
    dead = int((diag == 0).sum())
    scale = float(diag.mean()) if float(diag.mean()) > 0 else 1.0
    lam = damp * scale
    rank = numerical_rank(h)
    for _ in range(16):
        try:
            t = babai_order(h, order, lam)
            try:
                r, info = _cholesky_upper_inplace(_permuted_damped(h, t, lam))
            except RuntimeError:  # a backend that refuses the aliased out=: same numbers, one more copy
                r, info = torch.linalg.cholesky_ex(_permuted_damped(h, t, lam), upper=True)
            if int(info) == 0:
                return HessianFactor(order, t, r, lam, rank, dead)
        except torch.linalg.LinAlgError:
            pass
        lam = max(lam * 10.0, 1e-8 * scale)
    raise RuntimeError(f"could not factor the Hessian even with damping {lam:g}; it is not symmetric PSD")


def _permuted_damped(h: torch.Tensor, t: torch.Tensor, lam: float, rows: int = ROW_BLOCK) -> torch.Tensor:
    """``(H + λI)[t][:, t]`` as one new matrix in column-major layout (what LAPACK factors in place), gathered in
    row blocks so no second full-size copy exists (``h[t][:, t]`` would make two). Same values as forming
    ``H + λI`` first (off-diagonal ``+ 0`` is exact), also where rounding left ``H`` slightly asymmetric."""
    buf = torch.empty_like(h)  # buf = P^T row-major, i.e. P column-major
    for a in range(0, t.numel(), rows):
        buf[a : a + rows] = h[t[None, :], t[a : a + rows, None]]
    p = buf.T
    p.diagonal().add_(lam)
    return p


def _cholesky_upper_inplace(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of column-major ``a``, written over ``a``'s memory: ``(R, info)``.

    Why: ``torch.linalg.cholesky_ex`` returns a fresh matrix, so ``a`` and ``R`` would coexist — the largest
    term of the solver's peak memory on wide layers. LAPACK factors a column-major matrix in place, so passing
    ``a`` as both input and output factors it in place, bit-identical to the out-of-place call (tested); ``R``
    keeps that column-major layout. A backend that refuses the aliased ``out=`` raises; the caller then factors a
    freshly built matrix out of place (``a`` may be partly overwritten by then)."""
    info = torch.empty((), dtype=torch.int32, device=a.device)
    torch.linalg.cholesky_ex(a, upper=True, out=(a, info))
    return a, info


def factor_scales(
    w: torch.Tensor, factor: HessianFactor, grid: Grid, scale_method: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`compute_scales` for a layer with a factored Hessian: ``"hmse"`` gets ``diag(H + λI)`` as its weights."""
    col_weight = factor.diag_h.to(w.device) if scale_method == "hmse" else None
    return compute_scales(w, grid, scale_method, col_weight=col_weight)


def babai_quantize(
    w: torch.Tensor,
    factor: HessianFactor,
    grid: Grid,
    *,
    scales: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    scale_method: str = "mse",
    clip: bool = True,
    outliers: bool = False,
    block_size: int = 128,
    dtype: torch.dtype = torch.float32,
) -> QuantResult:
    """Quantizes ``W [N, K]`` by nearest-plane against the factored Hessian.

    Args:
        w: weight in ``nn.Linear`` orientation ``[out, in]``.
        factor: from :func:`factor_hessian` for this layer's input.
        grid: bits / symmetric / group size.
        scales: precomputed ``(scales, zeros)``; default: :func:`compute_scales` with ``scale_method``
            (``"hmse"`` weighs the search by this factor's ``diag(H + λI)``).
        clip: clamp codes to ``[0, 2^bits−1]`` (standard formats). ``False`` keeps every integer
            (no-clipping formats) and returns int32 codes.
        outliers: SSQR's no-clipping with a fixed width: a code that overflows the grid is not clipped; the
            weight keeps the exact Babai target ``w'_j`` (rounded to float16, as stored) as a sparse outlier, so
            its error is ~0 and nothing propagates from it, and its grid slot holds the zero code. Needs
            ``clip=True`` (the inlier codes stay in range).
        block_size: lazy-batch width; changes speed, not the result beyond float rounding.
        dtype: precision of the pass (float32 for speed; float64 to compare with references).
    """
    start = time.perf_counter()
    n, k = w.shape
    if factor.t.numel() != k:
        raise ValueError(f"weight has {k} input columns but the Hessian is {factor.t.numel()}×{factor.t.numel()}")
    dev = w.device
    scale_g, zeros = scales if scales is not None else factor_scales(w, factor, grid, scale_method)
    t = factor.t.to(dev)
    # Transposed ("column j is row j") so every per-column step touches contiguous memory.
    st = expand_per_column(scale_g, grid, k)[:, t].T.contiguous().to(dtype)
    zt = expand_per_column(zero_point(zeros, scale_g, grid), grid, k)[:, t].T.contiguous().to(dtype)
    wt = w[:, t].T.contiguous().to(dtype)
    r = factor.r.to(dev)
    rdiag = torch.diagonal(r)
    m = torch.empty(k, k, dtype=dtype, device=dev)  # R / diag(R) in the pass's precision, made in row blocks
    for a in range(0, k, ROW_BLOCK):  # so the float64 quotient never exists at full size
        m[a : a + ROW_BLOCK] = (r[a : a + ROW_BLOCK] / rdiag[a : a + ROW_BLOCK, None]).to(dtype)
    maxq = grid.maxq if clip else None
    if outliers and not clip:
        raise ValueError("outliers=True keeps fixed-width inlier codes: it needs clip=True")
    over_t = torch.zeros_like(wt, dtype=torch.bool) if outliers else None

    err = torch.zeros_like(wt)  # err[j] = w_j − q_j (original w), [c, N]
    codes_t = torch.zeros_like(wt)
    resid = torch.zeros_like(wt)  # w'_j − q_j, for the exact error identity
    clipped = torch.zeros(n, dtype=torch.long, device=dev)  # per row, summed once (no sync per column)
    for hi in range(k, 0, -block_size):
        lo = max(0, hi - block_size)
        blk = wt[lo:hi].clone()
        if hi < k:
            blk.addmm_(m[lo:hi, hi:], err[hi:])  # all finished blocks in one GEMM
        for j in range(hi - 1, lo - 1, -1):
            target = blk[j - lo]
            if j + 1 < hi:  # in-block corrections, left-looking: one vector-matrix product
                target = target + m[j, j + 1 : hi] @ err[j + 1 : hi]
            u = torch.round(target / st[j]).add_(zt[j])
            if over_t is not None:
                over = (u < 0) | (u > maxq)
                u = torch.where(over, zt[j], u)
                q = torch.where(over, target.half().to(dtype), (u - zt[j]).mul_(st[j]))
                over_t[j] = over
            else:
                if maxq is not None:
                    clipped += (u < 0) | (u > maxq)
                    u.clamp_(0, maxq)
                q = (u - zt[j]).mul_(st[j])
            codes_t[j] = u
            resid[j] = target - q
            err[j] = wt[j] - q

    codes = torch.empty_like(codes_t)
    codes[t] = codes_t
    codes = codes.T.contiguous().to(torch.uint8 if clip else torch.int32)
    sparse = None
    n_out = 0
    if over_t is not None:
        mask = torch.empty_like(over_t)
        mask[t] = over_t
        mask = mask.T.contiguous()
        w_hat_t = wt - err  # the values chosen for every weight, in t order
        vals = torch.empty_like(w_hat_t)
        vals[t] = w_hat_t
        sparse = torch.where(mask, vals.T.float(), 0.0).to_sparse().coalesce()
        n_out = int(mask.sum())

    d = rdiag.to(dtype) ** 2
    loss_damped = float((d.double() @ resid.double() ** 2).sum())
    loss = loss_damped - factor.damping * float((err.double() ** 2).sum())
    bound = 0.25 * float((d.double() @ st.double() ** 2).sum())
    stats = LayerStats(
        loss=loss,
        loss_damped=loss_damped,
        bound=bound,
        expected=bound / 3.0,
        trace_d=float(d.sum()),
        clipped=int(clipped.sum()),
        weights=n * k,
        damping=factor.damping,
        rank=factor.rank,
        dead=factor.dead,
        order=factor.order,
        seconds=time.perf_counter() - start,
        outliers=n_out,
    )
    return QuantResult(codes, scale_g, zeros, stats, sparse, clipped)


def proxy_loss(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """``tr((W−Ŵ) H (W−Ŵ)ᵀ)`` computed directly in float64 (for RTN and for checks)."""
    e = (w.double() - w_hat.double()).to(h.device)
    return float(((e @ h.double()) * e).sum())
