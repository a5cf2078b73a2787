"""The format registry: one class per storage format, registered under its name.

A format is everything the rest of hf_babai needs to know to produce and use one kind of quantized Linear: which
settings it owns, how a layer is solved into it (and rounded to nearest without data), the tensors its module
stores, the module itself (built from a solve, or empty on the meta device for loading), its true bits per
weight, its kernel entry points and what it can be exported to. The engine, the transformers adapter, the
checkpoint checks, ``export``, ``hf-babai info`` and the model card all go through :func:`get_format` /
:func:`format_of`; none of them names a format. Adding one is a module with a :class:`QuantFormat` subclass and
``@register_format`` (``docs/adding-a-format.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from .kernel_ops import BACKENDS
from .packing import bits_per_weight

if TYPE_CHECKING:  # the spec imports this module, never the other way round at run time
    from ..solver.babai import HessianFactor
    from ..spec import QuantSpec

TensorSpecs = dict[str, tuple[tuple[int, ...], torch.dtype]]


class QuantizedLinear(nn.Module):
    """Base of every format's module: what they share towards code written for ``nn.Linear``.

    Model code written for dense layers touches ``.weight`` of modules it believes are Linears: transformers'
    ``_init_weights`` re-initialises ``c_proj.weight`` of GPT-style blocks on every load, and some forwards read a
    projection's weight instead of calling it (Mamba's ``dt_proj.weight @ x``). A quantized module has no dense
    weight parameter, so ``weight`` answers with a fresh dense copy: the dequantized weight in the compute dtype
    (on the meta device while a checkpoint is being loaded), flagged ``_is_hf_initialized`` so transformers' init
    functions skip it. Reads get the true values; a write lands on the copy and is thrown away, so nothing done to
    ``.weight`` can change the stored codes. Each access dequantizes: fine for init and for small projections,
    slow if a model reads a large weight on every step (the quantized module's own forward never does)."""

    in_features: int
    out_features: int
    compute_dtype: torch.dtype

    @property
    def weight(self) -> Tensor:
        dense = self.dequantize(self.compute_dtype).detach()
        dense._is_hf_initialized = True
        return dense


class QuantFormat:
    """One storage format. Subclasses set the class attributes and implement the methods that raise here.

    A *solution* is whatever :meth:`solve` returns for one layer: an object with a ``stats`` attribute
    (:class:`hf_babai.solver.LayerStats`, what the engine logs); the engine hands it back to :meth:`build` and
    :meth:`dense` and never looks inside.
    """

    name: ClassVar[str]
    module: ClassVar[type[nn.Module]]  # the quantized Linear; exactly one format per module class
    primary: ClassVar[str]  # a tensor every module of the format stores: finds a checkpoint's orphaned tensors
    own_settings: ClassVar[tuple[str, ...]] = ()  # settings that apply to this format only
    methods: ClassVar[tuple[str, ...]] = ("babai", "rtn")
    scale_methods: ClassVar[tuple[str, ...]] = ("mse", "hmse", "minmax")
    sized_by_data: ClassVar[bool] = False  # buffer sizes depend on the codes: recorded per module in the config
    one_pass: ClassVar[bool] = False  # the auto schedule may solve it in one pass per block (at >= 3 bits)
    exports: ClassVar[tuple[str, ...]] = ()  # checkpoint formats it converts to losslessly
    no_export: ClassVar[str] = "it has no lossless conversion to other checkpoint formats"
    kernel_ops: ClassVar[tuple[str, ...]] = ()  # torch custom ops its module runs on CUDA (``hf_babai::...``)

    # -- settings --------------------------------------------------------------------------------------------
    def check(self, spec: QuantSpec) -> None:
        """Rules between settings that only this format has (after each field was checked on its own)."""

    def default_scale_method(self, spec: QuantSpec) -> str:
        return "mse"

    def default_asym_alpha(self, spec: QuantSpec) -> float:
        """GPTAQ's step where ``asym_alpha`` is unset: off unless measured better for this format."""
        return 0.0

    # -- quantizing ------------------------------------------------------------------------------------------
    def solve(self, w: Tensor, factor: HessianFactor, spec: QuantSpec, hessian: Callable[[], Tensor]) -> Any:
        """Quantizes ``w [out, in]`` against its factored Hessian (``hessian()`` gives ``H`` itself)."""
        raise NotImplementedError

    def round(self, w: Tensor, spec: QuantSpec) -> Any:
        """``method="rtn"``: the same format without calibration data."""
        raise ValueError(f"format={self.name!r} has no round-to-nearest variant; use method='babai'")

    def dense(self, solution: Any, spec: QuantSpec) -> Tensor:
        """The quantized weight as a float32 ``[out, in]`` matrix (what a one-pass schedule runs with)."""
        raise NotImplementedError

    def build(self, linear: nn.Linear, solution: Any, spec: QuantSpec) -> nn.Module:
        """The quantized module replacing ``linear`` (same device, compute dtype and bias)."""
        raise NotImplementedError

    # -- loading ---------------------------------------------------------------------------------------------
    def empty(
        self,
        in_features: int,
        out_features: int,
        spec: QuantSpec,
        sizes: dict[str, int] | None,
        *,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device | str | None,
    ) -> nn.Module:
        """An unfilled module of the checkpoint's shapes (``sizes``: its :meth:`buffer_sizes` record)."""
        raise NotImplementedError

    def buffer_sizes(self, module: nn.Module) -> dict[str, int]:
        """What a loader must know, beyond the settings, to allocate ``module``: for ``sized_by_data`` formats the
        module's own ``buffer_sizes()``, the keyword arguments :meth:`empty` gets back as ``sizes``."""
        return module.buffer_sizes() if self.sized_by_data else {}

    def tensors(self, module: nn.Module) -> TensorSpecs:
        """``{name: (shape, dtype)}`` of every tensor the module stores for its weight (bias excluded)."""
        return {k: (tuple(t.shape), t.dtype) for k, t in module.packed_buffers().items()}

    def bits_per_weight(self, module: nn.Module) -> float:
        """True storage cost: every stored bit of the weight (codes, scales, zero points, tables, padding)."""
        return bits_per_weight(module.packed_buffers(), module.in_features, module.out_features)

    def dequantize(self, module: nn.Module, dtype: torch.dtype) -> Tensor:
        return module.dequantize(dtype)

    # -- describing and exporting ----------------------------------------------------------------------------
    def describe(self, spec: QuantSpec) -> dict[str, Any]:
        """Words and fields for ``hf-babai info``, the model card and logs: ``format`` (one line), ``headline``
        (a few words), ``layout`` (the stored grid), ``tags`` (Hub tags) and ``card`` (the card's
        ``quantization`` fields)."""
        raise NotImplementedError

    def export_tensors(
        self,
        target: str,
        module: nn.Module,
        *,
        scale_dtype: torch.dtype = torch.float16,
        stored_group: int | None = None,
    ) -> dict[str, Tensor]:
        """The tensors of ``module`` in checkpoint format ``target`` (one of :attr:`exports`); ``scale_dtype`` and
        ``stored_group`` (the group size written) where the target lets the writer choose them."""
        raise ValueError(f"format={self.name!r} cannot be exported to {target!r}: {self.no_export}")


_REGISTRY: dict[str, QuantFormat] = {}


def register_format(cls: type[QuantFormat]) -> type[QuantFormat]:
    """Class decorator: makes ``cls.name`` a value of ``format=`` everywhere (config, CLI, loader, card)."""
    if not isinstance(getattr(cls, "name", None), str) or not cls.name:
        raise ValueError(f"{cls.__name__} needs a class attribute name = '...'")
    taken = _REGISTRY.get(cls.name)
    if taken is not None and type(taken) is not cls:
        raise ValueError(f"format {cls.name!r} is already registered by {type(taken).__name__}")
    if not (isinstance(cls.module, type) and issubclass(cls.module, QuantizedLinear)):
        raise ValueError(
            f"{cls.__name__}.module must be a subclass of hf_babai.formats.QuantizedLinear (model code touches "
            f"'.weight' of the layers it replaces), got {cls.module!r}"
        )
    if any(f.module is cls.module and f.name != cls.name for f in _REGISTRY.values()):
        raise ValueError(f"{cls.module.__name__} already belongs to another format")
    _REGISTRY[cls.name] = cls()
    return cls


def format_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_format(name: str) -> QuantFormat:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"format={name!r} is invalid; use one of {format_names()}") from None


def format_of(module: nn.Module) -> QuantFormat | None:
    """The format whose module ``module`` is (exact class), or ``None`` for any other module."""
    for fmt in _REGISTRY.values():
        if type(module) is fmt.module:
            return fmt
    return None


def quantized_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, QuantFormat]]:
    """``(name, module, format)`` of every quantized module of ``model``."""
    for name, mod in model.named_modules():
        fmt = format_of(mod)
        if fmt is not None:
            yield name, mod, fmt


def model_bits_per_weight(model: nn.Module) -> float:
    """True storage bits per weight over all quantized modules."""
    total = weights = 0.0
    for _, mod, fmt in quantized_modules(model):
        n = mod.in_features * mod.out_features
        total += fmt.bits_per_weight(mod) * n
        weights += n
    if not weights:
        raise ValueError("the model has no quantized layers")
    return total / weights


def set_backend(model: nn.Module, backend: str) -> int:
    """Sets the compute backend (``"auto"``, ``"torch"`` or ``"triton"``) of every quantized module of ``model``;
    returns how many it set. The model-wide switch for what each module's ``backend`` attribute decides."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown; use one of {BACKENDS}")
    count = 0
    for _, mod, _fmt in quantized_modules(model):
        mod.backend = backend
        count += 1
    if not count:
        raise ValueError("the model has no quantized layers to set a backend on")
    return count
