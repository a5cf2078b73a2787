"""The quantization algorithm as pure tensor code (no transformers import).

``factor_hessian`` + ``babai_quantize`` are the fast path; ``rtn_quantize`` the baseline. The slow float64
references the solver is tested against live with the tests (``tests/oracles.py``).
"""

from .asymmetric import asymmetric_target
from .babai import HessianFactor, LayerStats, QuantResult, babai_quantize, factor_hessian, proxy_loss
from .grid import Grid, compute_scales, dequantize, rtn_quantize
from .hessian import DAMP_WIDTH, CrossAccumulator, HessianAccumulator, kept_rows, layer_damp
from .ordering import ORDERS, babai_order, numerical_rank, pivoted_cholesky

__all__ = [
    "DAMP_WIDTH",
    "ORDERS",
    "CrossAccumulator",
    "Grid",
    "HessianAccumulator",
    "HessianFactor",
    "LayerStats",
    "QuantResult",
    "asymmetric_target",
    "babai_order",
    "babai_quantize",
    "compute_scales",
    "dequantize",
    "factor_hessian",
    "kept_rows",
    "layer_damp",
    "numerical_rank",
    "pivoted_cholesky",
    "proxy_loss",
    "rtn_quantize",
]
