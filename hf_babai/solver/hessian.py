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
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64, device=self.device)
        self.shift_sum: torch.Tensor | None = None  # Σ (X̃ − X)ᵀ X, only when reference inputs are given
        self.n = 0

    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None, x_ref: torch.Tensor | None = None) -> None:
        """Adds a batch of inputs ``x[..., c]``; positions where ``mask`` is 0 (padding) are ignored.

        ``mask`` has the shape of ``x`` without its last dimension (e.g. the ``attention_mask`` [B, T]).
        ``x_ref`` (same shape as ``x``): what the layer would receive in the full-precision model; when given,
        ``Σ (X̃ − X)ᵀ X`` is accumulated too, for :func:`fp_output_target`. Give it on every call or never.
        """
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, the accumulator expects {self.in_features}")
        if (x_ref is None) != (self.shift_sum is None) and self.n:
            raise ValueError("x_ref must be given on every add() or on none")
        if x_ref is not None and x_ref.shape != x.shape:
            raise ValueError(f"x_ref shape {tuple(x_ref.shape)} does not match input {tuple(x.shape)}")
        rows = x.detach().reshape(-1, self.in_features)
        refs = None if x_ref is None else x_ref.detach().reshape(-1, self.in_features).to(rows.device)
        if mask is not None:
            if mask.shape != x.shape[:-1]:
                raise ValueError(f"mask shape {tuple(mask.shape)} does not match input {tuple(x.shape[:-1])}")
            keep = mask.reshape(-1).to(device=rows.device).bool()
            rows = rows[keep]
            refs = None if refs is None else refs[keep]
        if refs is not None and self.shift_sum is None:
            self.shift_sum = torch.zeros_like(self.sum)
        for start in range(0, rows.shape[0], self.chunk_rows):
            chunk = rows[start : start + self.chunk_rows].float()
            self.sum += (chunk.T @ chunk).to(device=self.device, dtype=torch.float64)
            if refs is not None:
                diff = refs[start : start + self.chunk_rows].float() - chunk
                self.shift_sum += (diff.T @ chunk).to(device=self.device, dtype=torch.float64)
        self.n += rows.shape[0]

    def finalize(self) -> torch.Tensor:
        """Returns ``H = (2/n) Σ XᵀX`` in float64 (all zeros if no token was seen)."""
        if self.n == 0:
            return self.sum.clone()
        return self.sum * (2.0 / self.n)

    def finalize_shift(self) -> torch.Tensor | None:
        """``(2/n) Σ (X̃ − X)ᵀ X`` in float64, on the Hessian's scale; ``None`` if no reference input was given."""
        if self.shift_sum is None or self.n == 0:
            return None
        return self.shift_sum * (2.0 / self.n)
