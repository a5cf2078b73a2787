"""An optimum-style quantizer: ``optimum.gptq.GPTQQuantizer``'s method names on top of ``BabaiConfig``.

Users of optimum switch with one import::

    from hf_babai import BabaiQuantizer as GPTQQuantizer
    quantizer = GPTQQuantizer(bits=4, dataset=texts, model_seqlen=512)
    model = quantizer.quantize_model(model, tokenizer)
    quantizer.save(model, "out")            # reloads with import hf_babai; from_pretrained("out")

and ``BabaiQuantizer.from_pretrained(model_or_path).quantize(save_dir)`` follows optimum's
``OptimumQuantizer`` interface. The quantization itself is the same code path as quantize-on-load
(``BabaiHfQuantizer``), so both give identical checkpoints.

GPTQ options with no meaning here are accepted when they cannot change the result and rejected with an
explanation when they would (a silent mismatch would be worse than an error).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from .config import BabaiConfig
from .quantizer import BabaiHfQuantizer

log = logging.getLogger(__name__)

# GPTQQuantizer options that do not change hf_babai's result (it caches block outputs and runs the torch/Triton
# kernels of its own format whatever they say).
_HARMLESS = {
    "use_cuda_fp16",
    "cache_block_outputs",
    "backend",
    "exllama_config",
    "disable_exllama",
    "max_input_length",
    "pad_token_id",
    "meta",
    "act_group_aware",
    "use_exllama",
}
_REQUIRED_VALUES = {"checkpoint_format": "gptq"}
_HUB_DATASETS = {"wikitext2", "c4", "c4-new"}


class BabaiQuantizer:
    """Quantizes a loaded transformers model with Babai nearest-plane and saves a babai checkpoint.

    Args (GPTQ names where they exist):
        bits, group_size, sym, dataset, batch_size: as in ``GPTQQuantizer``; ``dataset`` is a list of texts,
            ``"austen"`` (offline built-in), token ids or pre-tokenized dicts.
        damp_percent: Hessian damping as a fraction of its mean diagonal (hf_babai's ``damp``; default 0.01).
        desc_act: ``True`` = GPTQ's act-order, which is also hf_babai's default either way: with static groups it
            costs nothing at inference (no ``g_idx``). GPTQ's ``desc_act=False`` order is ``order="natural"``.
        model_seqlen: calibration window length (``seqlen``); ``nsamples``: number of windows.
        format: ``"gptq"`` (GPTQQuantizer's default) means hf_babai's GPTQ-compatible ``"int"`` format;
            ``"hptq"`` / ``"ssqr"`` select the no-clipping formats (with ``target_bpw`` / ``outlier_rate``).
        true_sequential: GPTQ's option, passed on; hf_babai's default is ``None`` (auto: one pass per block at
            ≥ 3 bits, two passes at 2 bits, where the one-pass schedule measured far worse; docs/design.md), not
            GPTQQuantizer's unconditional True.
        order, method, modules_to_not_convert, ...: any other ``BabaiConfig`` field.
    """

    def __init__(
        self,
        bits: int = 4,
        dataset: Any = None,
        group_size: int = 128,
        damp_percent: float = 0.01,
        desc_act: bool = False,
        sym: bool = True,
        model_seqlen: int | None = None,
        nsamples: int = 128,
        batch_size: int | None = None,
        order: str | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("format") == "gptq":  # GPTQQuantizer's name for its checkpoint layout = our "int" format
            kwargs["format"] = "int"
        for key in list(kwargs):
            if key in _HARMLESS:
                log.info("BabaiQuantizer: %s=%r has no effect in hf_babai; ignored", key, kwargs.pop(key))
            elif key in _REQUIRED_VALUES:
                value = kwargs.pop(key)
                if value != _REQUIRED_VALUES[key]:
                    raise ValueError(
                        f"BabaiQuantizer: {key}={value!r} is not supported; hf_babai always uses "
                        f"{key}={_REQUIRED_VALUES[key]!r} (export a GPTQ checkpoint with hf_babai.export)"
                    )
        if isinstance(dataset, str) and dataset in _HUB_DATASETS:
            raise ValueError(
                f"dataset={dataset!r} is a GPTQ Hub dataset name; pass the texts themselves (a list of strings) "
                "or 'austen' for the offline built-in calibration text"
            )
        if order is None:
            order = "act-order"
        elif desc_act and order != "act-order":
            raise ValueError(f"desc_act=True conflicts with order={order!r}; pass one of them")
        self.config = BabaiConfig(
            bits=bits,
            group_size=group_size,
            sym=sym,
            damp=damp_percent,
            order=order,
            dataset=dataset,
            nsamples=nsamples,
            seqlen=model_seqlen or 512,
            batch_size=batch_size,
            **kwargs,  # BabaiConfig rejects unknown names with the list of valid ones
        )
        self.model: nn.Module | None = None
        self.tokenizer: Any = None

    # -- GPTQQuantizer interface ----------------------------------------------------------------------
    def quantize_model(self, model: nn.Module, tokenizer: Any = None) -> nn.Module:
        """Quantizes ``model`` in place (calibration text is tokenized with ``tokenizer``) and returns it,
        ready for ``save_pretrained``/``save``; the per-layer records are in ``model.hf_quantizer.records``."""
        if getattr(model, "is_quantized", False):
            raise ValueError("this model is already quantized; load the full-precision model")
        cfg = self.config
        if tokenizer is not None:
            cfg.tokenizer = tokenizer
        quantizer = BabaiHfQuantizer(cfg, pre_quantized=False)
        quantizer.validate_environment()
        model.is_quantized = True
        model.quantization_method = cfg.quant_method
        quantizer.postprocess_model(model)
        model.hf_quantizer = quantizer
        self.model, self.tokenizer = model, tokenizer
        return model

    def save(
        self, model: nn.Module, save_dir: str | Path, max_shard_size: str = "10GB", safe_serialization: bool = True
    ) -> None:
        """``save_pretrained`` + the tokenizer + ``quant_log.csv`` (per-layer loss vs Babai bound)."""
        if not safe_serialization:
            raise ValueError("babai checkpoints are safetensors only; use safe_serialization=True")
        from . import write_quant_log

        save_dir = Path(save_dir)
        model.save_pretrained(save_dir, max_shard_size=max_shard_size)
        if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(save_dir)
        write_quant_log(model, save_dir / "quant_log.csv")

    def to_dict(self) -> dict[str, Any]:
        return self.config.to_dict()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> BabaiQuantizer:
        d = {k: v for k, v in config_dict.items() if k not in ("quant_method", "calibration", "format_version")}
        d["damp_percent"] = d.pop("damp", 0.01)
        d["model_seqlen"] = d.pop("seqlen", None)
        return cls(**d)

    # -- OptimumQuantizer interface -------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model_or_path: nn.Module | str | Path, **config: Any) -> BabaiQuantizer:
        """Binds a quantizer to a model (or loads a full-precision model and its tokenizer from a path/Hub id)."""
        self = cls(**config)
        if isinstance(model_or_path, (str, Path)):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.model = AutoModelForCausalLM.from_pretrained(model_or_path, dtype="auto")
            self.tokenizer = AutoTokenizer.from_pretrained(model_or_path)
        else:
            self.model = model_or_path
        return self

    def quantize(self, save_dir: str | Path, file_prefix: str | None = None, **kwargs: Any) -> Path:
        """Quantizes the bound model and saves it to ``save_dir``; returns the folder."""
        if self.model is None:
            raise ValueError("no model bound: use BabaiQuantizer.from_pretrained(model_or_path) first")
        if file_prefix is not None:
            raise ValueError("file_prefix is not supported: checkpoints use transformers' file names")
        self.quantize_model(self.model, kwargs.pop("tokenizer", self.tokenizer))
        self.save(self.model, save_dir, **kwargs)
        return Path(save_dir)
