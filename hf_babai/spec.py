"""The settings of a quantization run, declared once.

Every setting is one field of :class:`QuantSpec`: its default, a line of help and the rule its value must satisfy.
``BabaiConfig`` (what users pass to ``from_pretrained``), the engine and the ``hf-babai`` command line all take their
field list, defaults, checks and choices from here, so a rule is written once and every bad value gets the same
message, naming the field, the value and what is allowed. Rules that belong to a storage format (``target_bpw`` for
HPTQ, ``outlier_rate`` for SSQR, ...) are declared by that format in :mod:`hf_babai.formats` and checked through
its registry. Why each default is what it is: ``docs/design.md``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .formats import QuantFormat, format_names, get_format
from .solver.grid import SCALE_DTYPES, SCALE_METHODS, SUPPORTED_BITS, Grid
from .solver.hessian import DAMP_WIDTH
from .solver.ordering import ORDERS

METHODS = ("babai", "rtn")
EXPERT_CALIBRATION = ("routed", "all")
VISION_TOWER = ("float", "rtn")
SCALE_CHOICES = (*SCALE_METHODS, "auto")


@dataclass(frozen=True)
class Setting:
    """What the rest of the code needs to know about one field: help text, rule and choices.

    ``valid`` checks the value's type and range (``allowed`` says what passes, for the error); ``choices`` lists
    the accepted values of a name-valued field (a callable for lists known only at run time, like the registered
    formats); ``cli`` is the flag's name when it is not the field's own."""

    help: str
    allowed: str = ""
    valid: Callable[[Any], bool] | None = None
    choices: tuple[Any, ...] | Callable[[], tuple[Any, ...]] | None = None
    cli: str | None = None

    def options(self) -> tuple[Any, ...] | None:
        return self.choices() if callable(self.choices) else self.choices


def _setting(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"setting": Setting(help, **kw)})


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


@dataclass
class QuantSpec:
    """What to do to each Linear, and how to calibrate it. Validated on construction (``ValueError`` names the
    field, the value and what is allowed); ``scale_method=None`` becomes the format's default."""

    format: str = _setting("int", "storage format (docs/formats.md)", choices=format_names)
    bits: int = _setting(4, "code width of the int grid", choices=SUPPORTED_BITS)
    group_size: int = _setting(
        128,
        "input columns per scale; -1 = one scale per output channel",
        allowed="use a positive int (e.g. 32, 64, 128) or -1 for one scale per output channel",
        valid=lambda v: _int(v) and (v == -1 or v >= 1),
    )
    sym: bool = _setting(True, "symmetric grid (no stored zero points)")
    target_bpw: float | None = _setting(
        None,
        "hptq: stored bits per weight to meet, every overhead included (e.g. 3.125)",
        allowed="use the stored bits per weight to meet, a number in [1, 16], e.g. 3.125",
        valid=_optional(lambda v: _real(v) and 1 <= v <= 16),
    )
    outlier_rate: float | None = _setting(
        None,
        "ssqr: fraction of weights kept as exact sparse outliers (e.g. 0.01)",
        allowed="use the fraction of sparse outliers, a number in [0, 1), e.g. 0.01",
        valid=_optional(lambda v: _real(v) and 0 <= v < 1),
    )
    method: str = _setting(
        "babai", "babai: nearest-plane with calibration; rtn: round to nearest, no data", choices=METHODS
    )
    order: str = _setting("act-order", "Babai order of the columns", choices=ORDERS)
    scale_method: str | None = _setting(
        None,
        "scale search (default: auto for a Babai int solve at >= 3 bits, else mse)",
        choices=SCALE_CHOICES,
    )
    rescale: bool = _setting(False, "int: refit the scales to the codes under H after the solve")
    refine_sweeps: int = _setting(
        0,
        "int: coordinate-descent sweeps on the codes after the solve",
        allowed="use an int >= 0 (coordinate-descent sweeps after the solve), e.g. 1",
        valid=lambda v: _int(v) and v >= 0,
    )
    beams: int = _setting(
        1,
        "int: K-best nearest plane, partial solutions kept per row (1 = Babai's nearest plane)",
        allowed="use an int in [1, 64] (K-best beams; 1 = Babai's nearest plane), e.g. 4",
        valid=lambda v: _int(v) and 1 <= v <= 64,
    )
    asym_alpha: float | None = _setting(
        None,
        "GPTAQ asymmetric calibration: move each Linear's target this fraction of the way to the float model's "
        "output (0 = off; unset: the format's default, 0.25 for int at 3 bits and more, else 0)",
        allowed="use None (the format's default) or a float in [0, 1] (0 = off; GPTAQ's default is 0.25)",
        valid=_optional(lambda v: _real(v) and 0 <= v <= 1),
    )
    scale_dtype: str = _setting(
        "float16",
        "int: scales exact in float16, or also in bfloat16 for serving a bf16 model exactly (docs/serving.md)",
        choices=SCALE_DTYPES,
    )
    damp: float = _setting(
        0.01,
        "Hessian damping floor, a fraction of its mean diagonal",
        allowed="use a float in [0, 1) (fraction of the Hessian's mean diagonal), e.g. 0.01",
        valid=lambda v: _real(v) and 0 <= v < 1,
    )
    damp_width: float = _setting(
        DAMP_WIDTH,
        "damping per input feature per calibration token (0 = the fixed damp)",
        allowed="use a float >= 0 (damping per input feature per calibration token, 0 = off)",
        valid=lambda v: _real(v) and v >= 0,
    )
    block_size: int = _setting(
        128,
        "lazy-batch block width of the solver",
        allowed="use a positive int, e.g. 128",
        valid=lambda v: _int(v) and v >= 1,
    )
    hessian_budget_gb: float = _setting(
        4.0,
        "two passes: GiB of Hessians held at once; a block needing more (an MoE's experts) is calibrated in groups",
        allowed="use a number > 0 (GiB of float64 Hessians held at once), e.g. 4",
        valid=lambda v: _real(v) and v > 0,
    )
    true_sequential: bool | None = _setting(
        None,
        "one forward per block, each Linear solved just before it runs (default: one pass at >= 3 bits, two at 2)",
        allowed="use True (one pass per block), False (two passes) or None (auto)",
        valid=lambda v: v is None or isinstance(v, bool),
    )
    modules_to_not_convert: list[str] | None = _setting(
        None,
        "substrings of module names kept in full precision (lm_head always is)",
        allowed="use a list of module-name substrings, e.g. ['mlp.down_proj']",
        valid=lambda v: v is None or (isinstance(v, (list, tuple)) and all(isinstance(m, str) for m in v)),
        cli="--skip",
    )
    quantize_router: bool = _setting(
        False, "MoE: quantize the routers too (default: kept float, small and sensitive; docs/moe.md)"
    )
    expert_calibration: str = _setting(
        "routed",
        "MoE experts: Hessians from the tokens the router sends each expert, or from all tokens (docs/moe.md)",
        choices=EXPERT_CALIBRATION,
    )
    vision_tower: str = _setting(
        "float",
        "vision-language models: the vision tower and projector (all outside the language model) stay float, or "
        "'rtn' rounds their Linears to nearest in the same format (no calibration: hf_babai calibrates with text)",
        choices=VISION_TOWER,
    )
    nsamples: int = _setting(
        128,
        "calibration windows cut from a text dataset",
        allowed="use a positive int (calibration windows), e.g. 128",
        valid=lambda v: _int(v) and v >= 1,
    )
    seqlen: int = _setting(
        512,
        "tokens per calibration window",
        allowed="use an int >= 2 (tokens per calibration window), e.g. 512",
        valid=lambda v: _int(v) and v >= 2,
    )
    batch_size: int | None = _setting(
        None,
        "calibration samples per forward (default: all at once)",
        allowed="use None (all samples in one forward) or a positive int",
        valid=_optional(lambda v: _int(v) and v >= 1),
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            meta: Setting = f.metadata["setting"]
            value = getattr(self, f.name)
            if meta.valid is not None:
                ok = meta.valid(value)
            elif f.type == "bool":
                ok = isinstance(value, bool)
            else:
                ok = value is None and f.default is None
                options = meta.options()
                ok = ok or (value in options and type(value) is type(options[0]))
            if not ok:
                allowed = meta.allowed or ("use True or False" if f.type == "bool" else f"use one of {meta.options()}")
                raise invalid(f.name, value, allowed)
        if self.modules_to_not_convert is not None:
            self.modules_to_not_convert = list(self.modules_to_not_convert)
        fmt = get_format(self.format)
        if self.scale_method is None:
            self.scale_method = fmt.default_scale_method(self)
        if self.asym_alpha is None:
            self.asym_alpha = fmt.default_asym_alpha(self)
        self._check_cross_rules(fmt)
        fmt.check(self)

    def _check_cross_rules(self, fmt: QuantFormat) -> None:
        """Rules between fields, each written once (the format's own follow in ``fmt.check``)."""
        for name in sorted({n for f in format_names() for n in get_format(f).own_settings} - set(fmt.own_settings)):
            owners = [f for f in format_names() if name in get_format(f).own_settings]
            if getattr(self, name) != _DEFAULTS[name]:
                only = " or ".join(f"format={f!r}" for f in owners)
                raise ValueError(f"{name} applies to {only} only; leave it unset for format={self.format!r}")
        for name in fmt.own_settings:
            if _DEFAULTS[name] is None and getattr(self, name) is None:
                raise ValueError(f"format={self.format!r} needs {name}: {_SETTINGS[name].help}")
        if self.method not in fmt.methods:
            raise invalid("method", self.method, f"format={self.format!r} is solved with method in {fmt.methods}")
        if self.scale_method in ("hmse", "auto") and self.method != "babai":
            raise invalid(
                "scale_method",
                self.scale_method,
                "it weighs the search by diag H, which method='rtn' has not: use 'mse'",
            )
        if self.scale_method not in fmt.scale_methods:
            takers = " or ".join(
                f"format={f!r}" for f in format_names() if self.scale_method in get_format(f).scale_methods
            )
            allowed = f"format={self.format!r} takes one of {fmt.scale_methods} ({self.scale_method!r} is for {takers})"
            raise invalid("scale_method", self.scale_method, allowed)
        if self.vision_tower == "rtn" and "rtn" not in fmt.methods:
            raise invalid(
                "vision_tower",
                self.vision_tower,
                f"format={self.format!r} has no round-to-nearest solve: leave vision_tower='float' for this format",
            )
        if self.asym_alpha and self.method != "babai":
            raise ValueError(
                f"asym_alpha={self.asym_alpha} fits each layer to the float model's output, which needs calibration "
                f"and the nearest-plane solve: use method='babai' or leave asym_alpha at 0"
            )
        if self.true_sequential and self.batch_size is not None:
            raise ValueError(
                f"true_sequential=True quantizes inside one forward of all calibration samples; batch_size="
                f"{self.batch_size} splits them: unset batch_size or use true_sequential=False"
            )

    @property
    def grid(self) -> Grid:
        return Grid(self.bits, self.sym, self.group_size, self.scale_dtype)

    @property
    def skip(self) -> tuple[str, ...]:
        """Module-name substrings left in full precision (``lm_head`` always)."""
        return ("lm_head", *(self.modules_to_not_convert or ()))

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _SETTINGS}


def invalid(name: str, value: Any, allowed: str) -> ValueError:
    """The one shape of a bad-value error: the field, the value and what is allowed."""
    return ValueError(f"{name}={value!r} is invalid; {allowed}")


_SETTINGS: dict[str, Setting] = {f.name: f.metadata["setting"] for f in dataclasses.fields(QuantSpec)}
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(QuantSpec)}


def settings() -> dict[str, Setting]:
    """Every setting by field name, in declaration order (what the CLI builds its options from)."""
    return dict(_SETTINGS)


def defaults() -> dict[str, Any]:
    return dict(_DEFAULTS)


_KINDS = {"bool": "bool", "int": "int", "float": "float", "str": "str", "list[str]": "list"}


def setting_kind(name: str) -> str:
    """``"bool"``, ``"int"``, ``"float"``, ``"str"`` or ``"list"``: the value type of a setting, ``None`` aside."""
    annotation = next(f.type for f in dataclasses.fields(QuantSpec) if f.name == name)
    return _KINDS[str(annotation).removesuffix(" | None")]
