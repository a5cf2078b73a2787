"""Per-layer and per-run decisions: how much to damp each Hessian, which schedule runs, and solving one layer.

The scale rule is the format's own (``QuantFormat.default_scale_method`` and ``solve``); what is decided here is
what every format shares. Why these rules, with the measurements behind them: ``docs/design.md``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..formats import get_format
from ..solver import HessianFactor, asymmetric_target, factor_hessian, layer_damp
from ..solver.hessian import HessianAccumulator
from ..spec import QuantSpec
from .blocks import trim_heap

if TYPE_CHECKING:  # hessians imports this module for the damping rule
    from .hessians import BlockHessians

log = logging.getLogger(__name__)


class QuantizationError(ValueError):
    """A layer could not be quantized; the message starts with the layer's name (block and Linear)."""


def layer_damping(in_features: int, tokens: int, spec: QuantSpec) -> float:
    """The damping fraction of one layer: ``spec.damp``, raised for layers wide per calibration token."""
    return layer_damp(in_features, tokens, spec.damp, spec.damp_width)


def factor_layer(acc: HessianAccumulator, spec: QuantSpec) -> HessianFactor:
    """Damps, orders and factors one accumulated Hessian."""
    return factor_hessian(acc.finalize(), spec.order, layer_damping(acc.in_features, acc.n, spec))


def uses_one_pass(spec: QuantSpec, n_samples: int, batch_size: int | None = None) -> bool:
    """Whether a block is quantized in one forward (each Linear solved in a pre-hook just before it runs) rather
    than two (Hessians of the float block, then a propagation pass).

    ``spec.true_sequential`` decides when set. Auto (``None``): one pass for formats that allow it at ≥ 3 bits
    when every sample fits one forward (as good as two passes there, and one forward per block cheaper); two
    passes otherwise (far better at 2 bits)."""
    if spec.method == "rtn":
        return False
    if spec.true_sequential is not None:
        return spec.true_sequential
    whole = batch_size is None or batch_size >= n_samples
    return get_format(spec.format).one_pass and spec.bits >= 3 and whole


def solve_layer(name: str, lin: nn.Linear, hessians: BlockHessians) -> Any:
    """Solves the Linear ``name`` of a block into its format, with the block's Hessian of its input."""
    spec = hessians.spec
    w = lin.weight.detach().float()
    try:
        factor, hessian = hessians.factor(name, w.shape[1])
        cross = hessians.cross_of(name)
        if cross is not None:
            w = asymmetric_target(w, hessian(), cross, factor.damping, spec.asym_alpha)
        solution = get_format(spec.format).solve(w, factor, spec, hessian)
    except (ValueError, torch.linalg.LinAlgError) as e:
        raise QuantizationError(f"{name}: {e}") from e
    trim_heap()
    return solution
