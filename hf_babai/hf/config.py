"""``BabaiConfig``: the ``quantization_config`` a user passes to ``from_pretrained``.

It holds the settings of :class:`hf_babai.spec.QuantSpec` (field list, defaults and every rule live there; the
config only adds transformers' conventions) plus what is not a setting:

- **calibration inputs** (``dataset``, ``tokenizer``) needed only while quantizing. They are never serialised: a list
  of texts or a tokenizer object in ``config.json`` would be large, unreproducible and sometimes private.
  ``to_dict`` writes a small ``calibration`` descriptor instead (source, sample count, sequence length, token count,
  a hash of the token ids), so a checkpoint still says what it was calibrated on;
- **loader metadata**: ``format_version`` and, for formats whose buffer sizes depend on the data, ``layers`` (each
  module's sizes, needed to allocate the modules before a checkpoint's tensors are read).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
from typing import Any

import torch
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..engine.resume import UNFINISHED, run_progress, unfinished_message
from ..formats import format_names, get_format
from ..spec import QuantSpec, defaults, invalid, settings

QUANT_METHOD = "babai"
FORMAT_VERSION = 1
BUILTIN_DATASETS = ("austen",)
_EXTRA = ("dataset", "tokenizer", "calibration", "format_version", "layers", "run_dir", "resume")
_NOT_SAVED = ("dataset", "tokenizer", "run_dir", "resume")


class BabaiConfig(QuantizationConfigMixin):
    """Quantization settings for hf_babai (``quant_method="babai"``).

    Takes every field of :class:`hf_babai.spec.QuantSpec` as a keyword (``bits``, ``group_size``, ``sym``,
    ``format``, ``method``, ``order``, ...; ``docs/usage.md`` lists them with their defaults), plus:

    Args:
        dataset: calibration data: a list of texts (joined, cut into random windows), ``"austen"`` (the built-in
            public-domain text shipped with the package), a ``[n, T]`` tensor of token ids, a list of
            ``{"input_ids", "attention_mask"}`` dicts, or a ``datasets.Dataset`` with an ``input_ids`` or ``text``
            column. Not saved.
        tokenizer: tokenizer object or path for text datasets (default: the model's own). Not saved.
        calibration: descriptor of the calibration data, filled in when quantizing (read back from checkpoints).
        format_version: the checkpoint layout version this hf_babai reads.
        layers: per-module buffer sizes of formats sized by their data, filled in when quantizing.
        run_dir: a folder where each finished block is written as the run goes, so that an interrupted run can be
            continued (``resume=True``); remove it once the model is saved. Not saved.
        resume: continue the unfinished run in ``run_dir`` (same model, calibration data and settings, checked)
            instead of starting one; without it, a ``run_dir`` that holds a run is refused. Not saved.
    """

    def __init__(
        self,
        *,
        dataset: Any = None,
        tokenizer: Any = None,
        calibration: dict[str, Any] | None = None,
        format_version: int = FORMAT_VERSION,
        layers: dict[str, dict[str, int]] | None = None,
        run_dir: Any = None,
        resume: bool = False,
        **fields: Any,
    ) -> None:
        fields.pop("quant_method", None)
        if UNFINISHED in fields:  # the config.json of a run folder (hf_babai.engine.resume)
            raise ValueError(unfinished_message(fields[UNFINISHED], *run_progress(fields[UNFINISHED])))
        unknown = sorted(set(fields) - set(settings()))
        if unknown:
            raise ValueError(f"BabaiConfig got unknown fields {unknown}; allowed: {', '.join([*settings(), *_EXTRA])}")
        self.quant_method = QUANT_METHOD
        self.__dict__.update({**defaults(), **fields})
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.calibration = calibration
        self.format_version = format_version
        self.layers = layers
        self.run_dir = run_dir
        self.resume = resume
        self.post_init()

    def post_init(self) -> None:
        """Validates every field (the settings through ``QuantSpec``); the message names the field, the value and
        what is allowed. The settings' defaults are resolved here (``scale_method``), so ``config.json`` records
        what was used."""
        self.__dict__.update(self.spec().to_dict())
        if self.format_version != FORMAT_VERSION:
            raise _error(invalid("format_version", self.format_version, "upgrade hf_babai to read this checkpoint"))
        sized = [f for f in format_names() if get_format(f).sized_by_data]
        if self.layers is not None and not get_format(self.format).sized_by_data:
            raise _error(ValueError(f"layers (per-module buffer sizes) apply to format in {sized} only"))
        if isinstance(self.dataset, str) and self.dataset not in BUILTIN_DATASETS:
            raise _error(
                invalid(
                    "dataset",
                    self.dataset,
                    f"strings name built-in datasets {BUILTIN_DATASETS}; pass your texts as a list of strings "
                    "(hf_babai downloads nothing from the Hub)",
                )
            )

    def spec(self) -> QuantSpec:
        """The validated settings of this config (what the engine runs)."""
        return _spec({name: getattr(self, name) for name in settings()})

    def update(self, **kwargs: Any) -> dict[str, Any]:
        """transformers' ``update``, then the same validation as construction."""
        unused = super().update(**kwargs)
        self.post_init()
        return unused

    def to_dict(self) -> dict[str, Any]:
        """Everything needed to load the checkpoint; calibration objects are replaced by their descriptor."""
        out = {k: copy.deepcopy(v) for k, v in self.__dict__.items() if k not in _NOT_SAVED}
        out["quant_method"] = QUANT_METHOD
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        """Fields that differ from the defaults (``quant_method`` always kept)."""
        default = BabaiConfig().to_dict()
        return {k: v for k, v in self.to_dict().items() if k == "quant_method" or default.get(k) != v}

    def __iter__(self):
        """``dict(cfg)`` gives the serialisable fields only, like :meth:`to_dict`."""
        yield from self.to_dict().items()

    def __repr__(self) -> str:
        return f"BabaiConfig {self.to_dict()}"


def _spec(fields: dict[str, Any]) -> QuantSpec:
    try:
        return QuantSpec(**fields)
    except ValueError as e:
        raise _error(e) from None


def _error(e: ValueError) -> ValueError:
    return ValueError(f"BabaiConfig: {e}")


def _signature() -> inspect.Signature:
    """``help(BabaiConfig)`` and IDEs that read ``__signature__`` see every field with its default."""
    kw = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(f.name, kw, default=f.default) for f in dataclasses.fields(QuantSpec)]
    extra = inspect.signature(BabaiConfig.__init__).parameters
    params += [p for name, p in extra.items() if name in _EXTRA]
    return inspect.Signature(params)


BabaiConfig.__init__.__signature__ = _signature()


def describe_calibration(source: str, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> dict[str, Any]:
    """The small, JSON-safe record of the calibration data that goes into ``config.json``."""
    tokens = int(attention_mask.sum()) if attention_mask is not None else int(input_ids.numel())
    digest = hashlib.sha256(input_ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]
    return {
        "source": source,
        "nsamples": int(input_ids.shape[0]),
        "seqlen": int(input_ids.shape[1]),
        "tokens": tokens,
        "ids_sha256": digest,
    }
