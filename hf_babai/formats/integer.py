"""The ``int`` format: ``bits``-bit codes on static group scales, the grid GPTQ checkpoints and servers use.

A layer is solved by Babai's nearest plane with the scale rule of ``scale_method`` (``"auto"``: GPTQ's weight-only
MSE scales, and a second solve with Hessian-aware scales + refit only where clipping broke Babai's bound; why:
``docs/design.md``), optionally refined. ``BabaiLinear`` stores the result.

The packed buffers (see :mod:`hf_babai.formats.packing`) are registered up front with their
final shapes and dtypes, so a quantized model can be instantiated on the meta device and then
filled from safetensors with ``load_state_dict(..., assign=True)`` without ever materialising
dense weights. ``forward`` runs the fused Triton kernel on CUDA inputs and dequantizes with plain torch
otherwise; :meth:`BabaiLinear._select_forward` is the one place that decides.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..solver.babai import HessianFactor, LayerStats, QuantResult, babai_quantize
from ..solver.grid import compute_scales, count_clipped, dequantize, rtn_quantize
from ..solver.kbest import kbest_quantize
from ..solver.refine import refine_result
from .compressed_tensors import ct_tensors
from .gptq import gptq_tensors
from .kernel_ops import dense_matmul, select_backend
from .packing import bit_planes, dequantize_packed, pack_weight, packed_buffer_specs
from .registry import QuantFormat, QuantizedLinear, register_format

if TYPE_CHECKING:
    from ..spec import QuantSpec

__all__ = ["DEFAULT_CHUNK_SIZE", "BabaiLinear", "IntFormat"]

# Rows dequantized at once in the torch path: bounds the dense temporary to chunk_size * K values
# (e.g. 4096 x 4096 fp32 = 64 MiB) instead of N * K for very wide layers such as lm_head.
DEFAULT_CHUNK_SIZE = 4096


class BabaiLinear(QuantizedLinear):
    """Linear layer with a ``bits``-bit grouped quantized weight in canonical packed form.

    Attributes: ``in_features``, ``out_features``, ``bits``, ``group_size``, ``sym``,
    ``compute_dtype`` (dtype of the original weight; default for :meth:`dequantize` and the
    bias dtype), ``chunk_size`` (output rows dequantized at once in the torch path) and ``backend``
    (``"auto"``: Triton for CUDA inputs, torch otherwise; ``"torch"`` / ``"triton"`` force one).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        sym: bool,
        bias: bool = True,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(sym, bool):
            raise ValueError(f"sym must be a bool, got {sym!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        # Validates bits and group_size with descriptive errors before anything is allocated.
        specs = packed_buffer_specs(in_features, out_features, bits, group_size, sym)

        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.sym = sym
        self.compute_dtype = dtype
        self.chunk_size = DEFAULT_CHUNK_SIZE
        self.backend = "auto"  # "torch" forces the dequantize + F.linear path (debugging); see select_backend
        for name, (shape, buf_dtype) in specs.items():
            self.register_buffer(name, torch.zeros(shape, dtype=buf_dtype, device=device), persistent=True)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        codes: Tensor,
        scales: Tensor,
        zeros: Tensor | None,
        bits: int,
        group_size: int,
        sym: bool,
    ) -> BabaiLinear:
        """Build from a float ``linear`` and the solver's ``codes [N,K]``, ``scales [N,G]``, ``zeros``.

        The result lives on the linear's device with ``compute_dtype`` equal to its weight dtype,
        so swapping modules in a model changes neither placement nor activation dtype.
        """
        n, k = linear.out_features, linear.in_features
        if tuple(codes.shape) != (n, k):
            raise ValueError(f"codes shape {list(codes.shape)} does not match the linear's weight [out, in] = {[n, k]}")
        if sym != (zeros is None):
            raise ValueError(
                f"sym={sym} but zeros is {'None' if zeros is None else 'given'}: symmetric grids "
                "carry no zeros (implied 2^(bits-1)), asymmetric grids need them"
            )
        weight = linear.weight
        module = cls(
            k,
            n,
            bits,
            group_size,
            sym,
            bias=linear.bias is not None,
            dtype=weight.dtype,
            device=weight.device,
        )
        packed = pack_weight(codes, scales, zeros, bits, group_size)
        with torch.no_grad():
            for name, target in module.packed_buffers().items():
                if packed[name].shape != target.shape:  # copy_ would broadcast silently
                    raise ValueError(f"{name}: packed shape {tuple(packed[name].shape)} != {tuple(target.shape)}")
                target.copy_(packed[name])
            if module.bias is not None:
                module.bias.copy_(linear.bias.detach())
        return module

    def packed_buffers(self) -> dict[str, Tensor]:
        """The quantization buffers by canonical name (no bias)."""
        names = ["qweight" + p.suffix for p in bit_planes(self.bits)] + ["scales"]
        if not self.sym:
            names += ["qzeros" + p.suffix for p in bit_planes(self.bits)]
        return {name: getattr(self, name) for name in names}

    def dequantize(self, dtype: torch.dtype | None = None, rows: slice | None = None) -> Tensor:
        """Dense weight ``[N, K]`` (or ``[rows, K]``) in ``dtype`` (default ``compute_dtype``)."""
        return dequantize_packed(
            self.packed_buffers(),
            self.bits,
            self.group_size,
            self.in_features,
            self.compute_dtype if dtype is None else dtype,
            rows=rows,
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected last input dim {self.in_features}, got shape {tuple(x.shape)}")
        if not x.dtype.is_floating_point:
            raise ValueError(f"input must be floating point, got {x.dtype}")
        return self._select_forward(x)(x)

    def _select_forward(self, x: Tensor) -> Callable[[Tensor], Tensor]:
        """The one place that picks a compute backend for ``x`` (``self.backend``: auto / torch / triton)."""
        return self._forward_triton if select_backend(x, self.backend) == "triton" else self._forward_torch

    def kernel_planes(self) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None, Tensor | None]:
        """``(qweight, qweight_hi, scales, qzeros, qzeros_hi)`` as the kernel ops take them (absent ones ``None``)."""
        return (
            self.qweight,
            getattr(self, "qweight_hi", None),
            self.scales,
            getattr(self, "qzeros", None),
            getattr(self, "qzeros_hi", None),
        )

    def _kernel_outliers(self) -> tuple[Tensor, Tensor, Tensor] | tuple[None, None, None]:
        """CSR outlier buffers for the kernel (none here; :class:`SSQRLinear` has them)."""
        return None, None, None

    def _forward_triton(self, x: Tensor) -> Tensor:
        """Fused dequantize + matmul straight from the packed buffers (``hf_babai::dense_matmul``)."""
        group = self.in_features if self.group_size == -1 else self.group_size
        y = dense_matmul(x, *self.kernel_planes(), self.bits, group, self.out_features, *self._kernel_outliers())
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _forward_torch(self, x: Tensor) -> Tensor:
        """Dequantize ``chunk_size`` output rows at a time in ``x.dtype`` and run ``F.linear``.

        Each chunk gets its own slice of the bias, so chunking never changes which operations
        produce an output column.
        """
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {self.chunk_size!r}")
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.chunk_size >= self.out_features:
            return F.linear(x, self.dequantize(x.dtype), bias)
        outputs = []
        for start in range(0, self.out_features, self.chunk_size):
            rows = slice(start, min(start + self.chunk_size, self.out_features))
            outputs.append(F.linear(x, self.dequantize(x.dtype, rows), None if bias is None else bias[rows]))
        return torch.cat(outputs, dim=-1)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, sym={self.sym}, bias={self.bias is not None}"
        )


AUTO_SCALES = ("mse", "hmse")
"""``scale_method="auto"``: the first search is solved; the second (with the scale refit) only when the first
solve's damped loss exceeds its Babai bound ``¼ Σ D_jj s_j²``, which without clipping it never can, so clipping
has cost more than all of the rounding it saved."""
KBEST_CANDIDATES = 2  # K-best (beams > 1) tries the two grid values nearest each corrected target (docs/formats.md)


@register_format
class IntFormat(QuantFormat):
    """``bits``-bit codes, group scales (zero points when asymmetric), natural column order: GPTQ's layout."""

    name = "int"
    module = BabaiLinear
    primary = "qweight"
    own_settings = ("rescale", "refine_sweeps", "beams", "scale_dtype")
    scale_methods = ("mse", "hmse", "minmax", "auto")
    one_pass = True
    exports = ("compressed-tensors", "gptq")
    kernel_ops = ("hf_babai::dense_matmul", "hf_babai::dense_dequantize")

    def check(self, spec: QuantSpec) -> None:
        if (spec.rescale or spec.refine_sweeps or spec.beams > 1) and spec.method != "babai":
            raise ValueError("rescale/refine_sweeps/beams refine a Babai solve; unset them for method='rtn'")

    def default_scale_method(self, spec: QuantSpec) -> str:
        return "auto" if spec.method == "babai" and spec.bits != 2 else "mse"

    def default_asym_alpha(self, spec: QuantSpec) -> float:
        """0.25 (GPTAQ's step) for a calibrated solve at 3 bits and more, where it was measured better than the
        plain target against both peers (``docs/benchmarks.md``); 2 bits was not measured."""
        return 0.25 if spec.method == "babai" and spec.bits >= 3 else 0.0

    def solve(self, w: Tensor, factor: HessianFactor, spec: QuantSpec, hessian: Callable[[], Tensor]) -> QuantResult:
        """The solve under ``spec.scale_method``; ``stats.scales`` records the search that was kept (with
        ``"auto"`` the candidate of lower proxy loss, each a full exact solve)."""
        grid = spec.grid

        def run(method: str, rescale: bool) -> tuple[QuantResult, QuantResult]:
            if spec.beams > 1:
                babai = kbest_quantize(
                    w,
                    factor,
                    grid,
                    beams=spec.beams,
                    candidates=KBEST_CANDIDATES,
                    scale_method=method,
                    block_size=spec.block_size,
                )
            else:
                babai = babai_quantize(w, factor, grid, scale_method=method, block_size=spec.block_size)
            res = babai
            if spec.refine_sweeps or rescale:
                res = refine_result(w, hessian(), factor.damping, babai, grid, spec.refine_sweeps, rescale=rescale)
            label = method + ("+refit" if rescale else "")
            return replace(res, stats=replace(res.stats, scales=label)), babai

        if spec.scale_method != "auto":
            return run(spec.scale_method, spec.rescale)[0]
        first, babai = run(AUTO_SCALES[0], spec.rescale)
        if babai.stats.loss_damped <= babai.stats.bound:
            return first
        second = run(AUTO_SCALES[1], True)[0]
        return min((first, second), key=lambda r: r.stats.loss)  # the first wins ties

    def round(self, w: Tensor, spec: QuantSpec) -> QuantResult:
        """Round to nearest on the same grid and scales; no Hessian, so loss and bound are NaN."""
        start = time.perf_counter()
        grid = spec.grid
        scales, zeros = compute_scales(w.float(), grid, spec.scale_method)
        codes = rtn_quantize(w.float(), scales, zeros, grid)
        n, k = w.shape
        nan = float("nan")
        clipped = count_clipped(w, scales, zeros, grid)
        stats = LayerStats(nan, nan, nan, nan, nan, clipped, n * k, 0.0, -1, 0, "rtn", time.perf_counter() - start)
        return QuantResult(codes, scales, zeros, stats)

    def dense(self, solution: QuantResult, spec: QuantSpec) -> Tensor:
        return dequantize(solution.codes, solution.scales, solution.zeros, spec.grid)

    def build(self, linear: nn.Linear, solution: QuantResult, spec: QuantSpec) -> BabaiLinear:
        r = solution
        return BabaiLinear.from_linear(linear, r.codes, r.scales, r.zeros, spec.bits, spec.group_size, spec.sym)

    def empty(self, in_features, out_features, spec, sizes, *, bias, dtype, device) -> BabaiLinear:
        shape = (in_features, out_features, spec.bits, spec.group_size, spec.sym)
        return BabaiLinear(*shape, bias=bias, dtype=dtype, device=device)

    def describe(self, spec: QuantSpec) -> dict[str, Any]:
        sym = "symmetric" if spec.sym else "asymmetric"
        return {
            "format": f"{spec.bits}-bit, group {spec.group_size}, {sym}",
            "headline": f"{spec.bits}-bit",
            "layout": f"{spec.bits} / {spec.group_size} ({sym})",
            "tags": [f"{spec.bits}-bit", "gptq-family"],
            "card": {"format": self.name, "bits": spec.bits, "group_size": spec.group_size, "sym": spec.sym},
        }

    def export_tensors(
        self,
        target: str,
        module: nn.Module,
        *,
        scale_dtype: torch.dtype = torch.float16,
        stored_group: int | None = None,
    ) -> dict[str, Tensor]:
        m = module
        shape = (m.in_features, m.out_features)
        if target == "gptq":
            return gptq_tensors(m.packed_buffers(), m.bits, m.group_size, m.sym, *shape)
        if target == "compressed-tensors":
            return ct_tensors(m.packed_buffers(), m.bits, m.group_size, *shape, scale_dtype, stored_group)
        return super().export_tensors(target, module, scale_dtype=scale_dtype, stored_group=stored_group)
