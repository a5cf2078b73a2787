"""Integer grids, static group scales and round-to-nearest (RTN).

A grid is ``bits`` + symmetric/asymmetric + ``group_size``. Codes are unsigned integers
``u ∈ [0, 2^bits − 1]`` and the dequantized weight is ``s · (u − z)`` with ``z = 2^(bits−1)`` for
symmetric grids (implied, not stored) and a per-group integer zero point ``z`` for asymmetric ones —
the same convention as GPTQ checkpoints.

Scales are *static*: computed once from the original weight, before the nearest-plane pass, over groups
of the **original** column index ``k // group_size`` (the last group may be partial). Babai's error bound
needs the scales fixed before the pass (paper §3.1), and because groups follow the original column index a
checkpoint needs no per-column permutation index (``g_idx``) at inference, whatever processing order the
solver used.

Scales are rounded to float16 *before* the solve, because checkpoints store them in float16: the lattice
the solver works on must be exactly the one inference dequantizes, otherwise the bound and the reported
loss would describe a different model. Scales below float16's smallest normal number are raised to it
(a coarser but still valid grid), so the stored value never underflows. With ``scale_dtype="bfloat16"`` they are
rounded to values that bfloat16 holds too, for models that loaders run in bfloat16 (``Grid.round_scales``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP16_TINY = float(torch.finfo(torch.float16).tiny)
FP16_MAX = float(torch.finfo(torch.float16).max)
SCALE_DTYPES = ("float16", "bfloat16")
BF16_FP16_MAX = 65280.0  # the largest bfloat16 value that float16 holds
SUPPORTED_BITS = (2, 3, 4, 8)
SCALE_METHODS = ("mse", "hmse", "minmax")


@dataclass(frozen=True)
class Grid:
    """A quantization grid: ``bits`` per code, symmetric or not, groups of ``group_size`` input columns
    (``-1`` = one group per output channel)."""

    bits: int
    sym: bool = True
    group_size: int = 128
    scale_dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={self.bits} is not supported; use one of {SUPPORTED_BITS}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype={self.scale_dtype!r} is not supported; use one of {SCALE_DTYPES}")

    def round_scales(self, scale: torch.Tensor) -> torch.Tensor:
        """``scale`` rounded to the nearest value checkpoints store exactly: a float16 value, and with
        ``scale_dtype="bfloat16"`` one that is also a bfloat16 value (8 significant bits), so that a loader which
        casts scales to a bfloat16 model's dtype (vLLM, compressed-tensors) changes nothing. Same dtype out."""
        if self.scale_dtype == "bfloat16":  # bfloat16 values >= 2^-14 are float16 values too
            return scale.to(torch.bfloat16).to(torch.float16).to(scale.dtype)
        return scale.to(torch.float16).to(scale.dtype)
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"group_size={self.group_size} is invalid; use a positive size or -1 (per channel)")

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def num_groups(self, in_features: int) -> int:
        """``G = ceil(K / group_size)``; 1 for per-channel."""
        return num_groups(in_features, self.group_size)

    def group_index(self, in_features: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Group of every original column ``k``: ``k // group_size`` (all zeros per-channel)."""
        k = torch.arange(in_features, device=device)
        return torch.zeros_like(k) if self.group_size == -1 else k // self.group_size

    def effective_group(self, in_features: int) -> int:
        return effective_group_size(in_features, self.group_size)


def effective_group_size(in_features: int, group_size: int) -> int:
    """Columns per group: ``group_size``, or all ``in_features`` for per-channel (``-1``)."""
    if in_features < 1:
        raise ValueError(f"in_features must be >= 1, got {in_features!r}")
    if group_size == -1:
        return in_features
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int or -1 (per-channel), got {group_size!r}")
    return group_size


def num_groups(in_features: int, group_size: int) -> int:
    """``G = ceil(K / group_size)`` (the last group may be partial), or 1 for per-channel (``group_size == -1``)."""
    return -(-in_features // effective_group_size(in_features, group_size))


def _grouped(w: torch.Tensor, grid: Grid) -> torch.Tensor:
    """``W [N, K]`` → ``[N, G, g]`` padded with zeros; zeros never change min/max (0 is always in the
    range) and quantize exactly to 0 on every grid, so padding adds no error."""
    n, k = w.shape
    g = grid.effective_group(k)
    groups = grid.num_groups(k)
    pad = groups * g - k
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(n, groups, g)


def _params_from_range(xmin: torch.Tensor, xmax: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's min/max → (scale, zero) rule, with fp16-exact scales. Returns float tensors."""
    xmin = torch.minimum(xmin, torch.zeros_like(xmin))
    xmax = torch.maximum(xmax, torch.zeros_like(xmax))
    if grid.sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / grid.maxq
    scale = grid.round_scales(scale.clamp(FP16_TINY, BF16_FP16_MAX if grid.scale_dtype == "bfloat16" else None))
    if grid.sym:
        zero = torch.full_like(scale, float((grid.maxq + 1) // 2))
    else:
        zero = torch.round(-xmin / scale).clamp(0, grid.maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int | None) -> torch.Tensor:
    """Nearest grid code ``round(w/s) + z`` (round half to even), clamped to ``[0, maxq]`` unless
    ``maxq`` is None (no-clipping grids keep every integer)."""
    q = torch.round(w / scale) + zero
    return q if maxq is None else q.clamp(0, maxq)


def compute_scales(
    w: torch.Tensor,
    grid: Grid,
    method: str = "mse",
    *,
    max_shrink: float = 0.8,
    steps: int = 100,
    norm: float = 2.4,
    col_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Static per-group scales (and zeros for asymmetric grids) from the original weight.

    ``minmax`` spans each group's range. ``mse`` shrinks the range by factors ``1 − i/steps`` for
    ``i < max_shrink·steps`` and keeps, per group, the one with the smallest ``Σ|w − q|^norm`` — the
    grid search of GPTQ's and llm-compressor's MSE observer, with their norm 2.4: penalising large errors
    a little more than squared error keeps more of each group's tail representable, which helps after error
    propagation (measured: ``docs/benchmarks.md``).

    ``hmse`` is the same search with each column's error weighted by ``col_weight`` (``[K]``, the solver passes
    ``diag(H + λI)``): the proxy loss's own per-column weights. Why: weight-only MSE happily clips a large weight
    to save error on many small ones, and when that weight sits on an input that carries massive activations
    (``down_proj`` of many LLMs) the clipped error dominates the whole layer's loss, which Babai's error feedback
    cannot repair because every other column is tiny by comparison.

    Returns ``scales [N, G]`` (float32 holding fp16-exact values) and ``zeros [N, G]`` (int64) or None
    for symmetric grids.
    """
    if method not in SCALE_METHODS:
        raise ValueError(f"scale method {method!r} is unknown; use one of {SCALE_METHODS}")
    if (method == "hmse") != (col_weight is not None):
        raise ValueError("scale method 'hmse' needs col_weight (diag H) and the others take none")
    wg = _grouped(w.float(), grid)
    xmin, xmax = wg.amin(-1), wg.amax(-1)
    scale, zero = _params_from_range(xmin, xmax, grid)
    if method in ("mse", "hmse"):
        shrink = 1.0 - torch.arange(int(max_shrink * steps), dtype=torch.float32, device=w.device) / steps  # [P]
        flat_w = wg.reshape(-1, wg.shape[-1])  # [N·G, g]
        if col_weight is not None:
            cw = _grouped(col_weight.float().reshape(1, -1), grid)  # [1, G, g]; padded columns weigh 0
            cw = cw.expand(wg.shape[0], -1, -1).reshape(-1, wg.shape[-1])
        lo, hi = xmin.reshape(-1), xmax.reshape(-1)
        best_s, best_z = scale.reshape(-1).clone(), zero.reshape(-1).clone()
        # All shrink candidates of a few thousand groups at once: chunks stay cache-sized, Python calls few.
        rows = max(1, (1 << 20) // (shrink.numel() * flat_w.shape[1]))
        for a in range(0, flat_w.shape[0], rows):
            wc = flat_w[a : a + rows, None, :]  # [r, 1, g]
            s_p, z_p = _params_from_range(lo[a : a + rows, None] * shrink, hi[a : a + rows, None] * shrink, grid)
            # one temporary, everything else in place: |s·(clamp(round(w/s)+z) − z) − w|^norm
            q = torch.div(wc, s_p[..., None]).round_().add_(z_p[..., None]).clamp_(0, grid.maxq)
            q.sub_(z_p[..., None]).mul_(s_p[..., None]).sub_(wc).abs_()
            q = q.square_() if norm == 2.0 else q.pow_(norm)
            if col_weight is not None:
                q.mul_(cw[a : a + rows, None, :])
            err = q.sum(-1)  # [r, P]
            pick = err.argmin(-1, keepdim=True)  # first minimum = the least shrink among ties
            best_s[a : a + rows] = s_p.gather(1, pick).squeeze(1)
            best_z[a : a + rows] = z_p.gather(1, pick).squeeze(1)
        scale, zero = best_s.reshape(scale.shape), best_z.reshape(zero.shape)
    if not torch.isfinite(scale).all() or scale.max() > FP16_MAX:
        raise ValueError("weight range exceeds float16 scales (non-finite or >65504); check the weights")
    return scale, (None if grid.sym else zero.long())


def expand_per_column(t: torch.Tensor, grid: Grid, in_features: int) -> torch.Tensor:
    """``[N, G]`` group parameters → ``[N, K]`` per-column values (original column order)."""
    return t[:, grid.group_index(in_features, t.device)]


def zero_point(zeros: torch.Tensor | None, scales: torch.Tensor, grid: Grid) -> torch.Tensor:
    """The zero point as a float ``[N, G]`` tensor for either grid type."""
    if zeros is None:
        return torch.full_like(scales, float((grid.maxq + 1) // 2))
    return zeros.to(scales.dtype)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, grid: Grid) -> torch.Tensor:
    """``s · (u − z)`` per column, float32 ``[N, K]``."""
    k = codes.shape[1]
    s = expand_per_column(scales, grid, k)
    z = expand_per_column(zero_point(zeros, scales, grid), grid, k)
    return (codes.float() - z) * s


def rtn_quantize(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, grid: Grid) -> torch.Tensor:
    """Round-to-nearest codes on the same grid and scales as the solver: the baseline."""
    k = w.shape[1]
    s = expand_per_column(scales, grid, k)
    z = expand_per_column(zero_point(zeros, scales, grid), grid, k)
    return quantize_codes(w.float(), s, z, grid.maxq).to(torch.uint8 if grid.bits <= 8 else torch.int32)


def count_clipped(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, grid: Grid) -> int:
    """How many weights round-to-nearest would push outside the grid (and so clamp) with these scales."""
    k = w.shape[1]
    s = expand_per_column(scales, grid, k)
    z = expand_per_column(zero_point(zeros, scales, grid), grid, k)
    raw = quantize_codes(w.float(), s, z, None)
    return int(((raw < 0) | (raw > grid.maxq)).sum())
