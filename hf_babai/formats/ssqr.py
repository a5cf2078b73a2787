"""The ``ssqr`` format: ``bits``-bit group-scaled inliers plus sparse exact outliers instead of clipping (paper §5.1).

A layer is solved by :func:`hf_babai.solver.ssqr.ssqr_quantize` (Babai with overflowing codes kept as exact
outliers, one scale factor per layer tuned to ``outlier_rate``); ``SSQRLinear`` stores it as a ``BabaiLinear``
plus the outliers.

The inliers are the canonical packed codes of :mod:`hf_babai.formats.packing` (outlier slots hold the zero code,
so they dequantize to exactly 0); the outliers add, in row-compressed (CSR) form:

==================  =======================  =========================================================
buffer              dtype                    meaning
==================  =======================  =========================================================
``outlier_rowptr``  int32 ``[N + 1]``        outliers of output row ``n`` are entries
                                             ``rowptr[n] : rowptr[n + 1]``
``outlier_cols``    int16 (int32 if          their input column, ascending within a row
                    ``K > 32768``) ``[nnz]``
``outlier_values``  float16 ``[nnz]``        the exact weight value
==================  =======================  =========================================================

``W = dequant(inliers) + CSR``. Every buffer is counted in bits per weight. ``nnz`` depends on the data: a
loader gets it from the checkpoint's quantization config (``buffer_sizes``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..solver.babai import HessianFactor, QuantResult
from ..solver.grid import dequantize
from ..solver.ssqr import ssqr_quantize
from .integer import BabaiLinear
from .registry import QuantFormat, register_format

if TYPE_CHECKING:
    from ..spec import QuantSpec

__all__ = ["SSQRFormat", "SSQRLinear"]

_OUTLIER_BUFFERS = ("outlier_rowptr", "outlier_cols", "outlier_values")


def _col_dtype(in_features: int) -> torch.dtype:
    return torch.int16 if in_features <= 32768 else torch.int32


class SSQRLinear(BabaiLinear):
    """``BabaiLinear`` with ``nnz`` sparse float16 outliers added to the dequantized inliers."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        sym: bool,
        nnz: int,
        bias: bool = True,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bits, group_size, sym, bias=bias, dtype=dtype, device=device)
        if isinstance(nnz, bool) or not isinstance(nnz, int) or not 0 <= nnz <= in_features * out_features:
            raise ValueError(f"nnz must be an int in [0, in_features * out_features], got {nnz!r}")
        self.nnz = nnz
        for name, shape, buf_dtype in (
            ("outlier_rowptr", (out_features + 1,), torch.int32),
            ("outlier_cols", (nnz,), _col_dtype(in_features)),
            ("outlier_values", (nnz,), torch.float16),
        ):
            self.register_buffer(name, torch.zeros(shape, dtype=buf_dtype, device=device), persistent=True)

    @classmethod
    def from_linear(  # type: ignore[override]
        cls,
        linear: nn.Linear,
        codes: Tensor,
        scales: Tensor,
        zeros: Tensor | None,
        bits: int,
        group_size: int,
        sym: bool,
        outliers: Tensor | None = None,
    ) -> SSQRLinear:
        """As :meth:`BabaiLinear.from_linear`, plus ``outliers``: a sparse ``[N, K]`` tensor of exact values."""
        if outliers is None:
            raise ValueError("SSQRLinear.from_linear needs the solver's outliers (babai_quantize(..., outliers=True))")
        n, k = linear.out_features, linear.in_features
        if tuple(outliers.shape) != (n, k):
            raise ValueError(f"outliers shape {list(outliers.shape)} does not match the weight {[n, k]}")
        coo = outliers.to_sparse().coalesce().cpu()
        rows, cols = coo.indices()
        vals = coo.values().to(torch.float16)
        base = BabaiLinear.from_linear(linear, codes, scales, zeros, bits, group_size, sym)
        module = cls(
            k,
            n,
            bits,
            group_size,
            sym,
            int(vals.numel()),
            bias=linear.bias is not None,
            dtype=base.compute_dtype,
            device=linear.weight.device,
        )
        with torch.no_grad():
            for name, buf in base.state_dict().items():
                getattr(module, name).copy_(buf)
            rowptr = torch.zeros(n + 1, dtype=torch.int64, device=rows.device)
            rowptr[1:] = torch.bincount(rows, minlength=n).cumsum(0)
            module.outlier_rowptr.copy_(rowptr)
            module.outlier_cols.copy_(cols.to(module.outlier_cols.dtype))
            module.outlier_values.copy_(vals)
        return module

    def buffer_sizes(self) -> dict[str, int]:
        """What a loader needs to allocate this module before reading its buffers."""
        return {"nnz": self.nnz}

    def packed_buffers(self) -> dict[str, Tensor]:
        return {**super().packed_buffers(), **{name: getattr(self, name) for name in _OUTLIER_BUFFERS}}

    def _outlier_coords(self, rows: slice | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(row relative to ``rows.start``, column, value) of the outliers in ``rows``."""
        r0 = 0 if rows is None else rows.start
        r1 = self.out_features if rows is None else rows.stop
        ptr = self.outlier_rowptr.to(torch.int64)
        lo, hi = int(ptr[r0]), int(ptr[r1])
        counts = ptr[r0 + 1 : r1 + 1] - ptr[r0:r1]
        row = torch.repeat_interleave(torch.arange(r1 - r0, device=ptr.device), counts)
        return row, self.outlier_cols[lo:hi].to(torch.int64), self.outlier_values[lo:hi]

    def dequantize(self, dtype: torch.dtype | None = None, rows: slice | None = None) -> Tensor:
        w = super().dequantize(torch.float32, rows)
        row, col, val = self._outlier_coords(rows)
        w[row, col] += val.float()  # the slots dequantize to exactly 0, so this sets the outlier values
        return w.to(self.compute_dtype if dtype is None else dtype)

    def _kernel_outliers(self) -> tuple[Tensor, Tensor, Tensor]:
        """The CSR buffers as they are: the kernel fuses them into the dense program (``hf_babai::dense_matmul``)."""
        return self.outlier_rowptr, self.outlier_cols, self.outlier_values

    def extra_repr(self) -> str:
        return super().extra_repr() + f", outliers={self.nnz}"


@register_format
class SSQRFormat(QuantFormat):
    """Int inliers + float16 CSR outliers; no weight is clipped, so Babai's bound holds for every weight."""

    name = "ssqr"
    module = SSQRLinear
    primary = "qweight"
    own_settings = ("outlier_rate",)
    methods = ("babai",)  # the scale factor is tuned on the Babai solve
    sized_by_data = True
    no_export = (
        "its sparse outliers keep unclipped values, and GPTQ checkpoints hold fixed-width codes on a clipped grid; "
        "export a format='int' model instead"
    )
    kernel_ops = ("hf_babai::dense_matmul", "hf_babai::dense_dequantize")

    def solve(self, w: Tensor, factor: HessianFactor, spec: QuantSpec, hessian: Callable[[], Tensor]) -> QuantResult:
        args = (w, factor, spec.grid, spec.outlier_rate)
        return ssqr_quantize(*args, scale_method=spec.scale_method, block_size=spec.block_size)[0]

    def dense(self, solution: QuantResult, spec: QuantSpec) -> Tensor:
        w = dequantize(solution.codes, solution.scales, solution.zeros, spec.grid)
        return w + solution.outliers.to_dense().to(w.device)

    def build(self, linear: nn.Linear, solution: QuantResult, spec: QuantSpec) -> SSQRLinear:
        r = solution
        args = (linear, r.codes, r.scales, r.zeros, spec.bits, spec.group_size, spec.sym)
        return SSQRLinear.from_linear(*args, outliers=r.outliers)

    def empty(self, in_features, out_features, spec, sizes, *, bias, dtype, device) -> SSQRLinear:
        shape = (in_features, out_features, spec.bits, spec.group_size, spec.sym)
        return SSQRLinear(*shape, **sizes, bias=bias, dtype=dtype, device=device)

    def describe(self, spec: QuantSpec) -> dict[str, Any]:
        sym = "symmetric" if spec.sym else "asymmetric"
        rate = spec.outlier_rate
        return {
            "format": f"{spec.bits}-bit, group {spec.group_size}, {sym}, sparse exact outliers (at most {rate:.2%} "
            "per layer, SSQR)",
            "headline": f"{spec.bits}-bit + {rate:.2%} outliers (SSQR)",
            "layout": f"{spec.bits} / {spec.group_size} ({sym}) + float16 CSR outliers, ≤ {rate:.2%} of weights per "
            "layer",
            "tags": [f"{spec.bits}-bit", "ssqr"],
            "card": {
                "format": self.name,
                "bits": spec.bits,
                "group_size": spec.group_size,
                "sym": spec.sym,
                "outlier_rate": rate,
            },
        }
