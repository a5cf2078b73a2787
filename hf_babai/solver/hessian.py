"""Streaming accumulation of the layer Hessian ``H = (2/n) Σ XᵀX``.

The Hessian is the Gram matrix of the lattice in Babai's view (paper Theorem 1): only ``XᵀX`` matters,
so it is all the solver needs from the calibration data.

Precision: each chunk product ``XcᵀXc`` is computed in float32 (BLAS speed; a chunk holds at most
``chunk_rows`` tokens, so its rounding error is ~1e-7 relative), and the running sum is kept in float64
so that summing hundreds of chunks over a long calibration set does not lose the small eigen-directions
that decide the triangular factor. The final ``H`` is float64.
"""

from __future__ import annotations

import torch


class HessianAccumulator:
    """Accumulates ``Σ XᵀX`` over calibration batches for one linear layer's input.

    Args:
        in_features: width ``c`` of the layer input.
        device: where the ``c×c`` float64 sum lives (CPU by default so GPU memory holds activations only).
        chunk_rows: tokens per float32 product (bounds the temporary memory of the float64 up-cast).
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu", chunk_rows: int = 8192) -> None:
        self.in_features = in_features
        self.device = torch.device(device)
        self.chunk_rows = chunk_rows
        self.block = 1024  # rows of XᵀX formed at a time
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64, device=self.device)
        self.n = 0
        self._final = False

    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Adds a batch of inputs ``x[..., c]``; positions where ``mask`` is 0 (padding) are ignored.

        ``mask`` has the shape of ``x`` without its last dimension (e.g. the ``attention_mask`` [B, T]).
        """
        if self._final:
            raise RuntimeError("this Hessian was already finalized; accumulate every batch before finalize()")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, the accumulator expects {self.in_features}")
        rows = x.detach().reshape(-1, self.in_features)
        if mask is not None:
            if mask.shape != x.shape[:-1]:
                raise ValueError(f"mask shape {tuple(mask.shape)} does not match input {tuple(x.shape[:-1])}")
            rows = rows[mask.reshape(-1).to(device=rows.device).bool()]
        c = self.in_features
        for start in range(0, rows.shape[0], self.chunk_rows):
            chunk = rows[start : start + self.chunk_rows].float()
            for a in range(0, c, self.block):  # row blocks: the float32 product and its float64 up-cast are
                part = chunk[:, a : a + self.block].T @ chunk  # [block, c], never two more [c, c] matrices
                self.sum[a : a + self.block] += part.to(device=self.device, dtype=torch.float64)
        self.n += rows.shape[0]

    def finalize(self) -> torch.Tensor:
        """Returns ``H = (2/n) Σ XᵀX`` in float64 (all zeros if no token was seen).

        The sum is scaled in place and the same tensor is returned on every later call (no further ``add``):
        a copy would double the largest allocation of the whole quantization (a 5k-wide layer's H is ~200 MB,
        a 14k-wide one's 1.6 GB). Callers must not modify it."""
        if not self._final and self.n:
            self.sum.mul_(2.0 / self.n)
        self._final = True
        return self.sum


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
