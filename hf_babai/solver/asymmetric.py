"""GPTAQ's asymmetric calibration in the lattice view: the same Hessian, a moved target."""

from __future__ import annotations

import torch


def asymmetric_target(
    w: torch.Tensor, h: torch.Tensor, cross: torch.Tensor, damping: float, alpha: float
) -> torch.Tensor:
    """GPTAQ's asymmetric calibration as a moved nearest-plane target (``asym_alpha``).

    Fitting ``Ŵ`` on the quantized model's input ``X`` to the float model's output ``W X̃`` minimises
    ``‖W X̃ − Ŵ X‖²`` = ``tr((W* − Ŵ) H (W* − Ŵ)ᵀ)`` + const with ``W* = W + W C H⁻¹``, ``C = (2/n) Σ (X̃ − X)ᵀ X``
    (``cross``) and ``H = (2/n) Σ XᵀX``: the same lattice with the target moved. ``alpha`` takes that fraction of
    the move (GPTAQ's implementation weighs its correction by 0.25); the damped ``H + λI`` keeps it bounded where
    the calibration barely spans a direction."""
    hd = h.clone()
    hd.diagonal().add_(damping)
    chol = torch.linalg.cholesky(hd)
    move = torch.cholesky_solve((w.double() @ cross).t(), chol).t()  # W C (H + λI)⁻¹
    return (w.double() + alpha * move).to(w.dtype)
