"""The Hugging Face adapter: ``BabaiConfig`` and ``BabaiHfQuantizer``, registered with transformers on import.

transformers has no entry-point discovery for quantization methods: ``quant_method="babai"`` is known only
after ``import hf_babai`` ran :func:`register` (without it, ``from_pretrained`` on a babai checkpoint warns
and loads random dense weights). Registration is idempotent, so re-imports and reloads are safe.
"""

from __future__ import annotations

from ..formats import set_backend
from .config import QUANT_METHOD, BabaiConfig
from .export import export
from .optimum_api import BabaiQuantizer
from .quantizer import BabaiHfQuantizer, CheckpointError, check_checkpoint, replace_with_quantized_modules
from .streamed import save_streamed

__all__ = [
    "QUANT_METHOD",
    "BabaiConfig",
    "BabaiHfQuantizer",
    "BabaiQuantizer",
    "CheckpointError",
    "check_checkpoint",
    "export",
    "quant_log_records",
    "register",
    "replace_with_quantized_modules",
    "save_streamed",
    "set_backend",
    "write_quant_log",
]


def quant_log_records(model) -> list:
    """The per-layer records of a model quantized on load in this process (empty for loaded checkpoints)."""
    quantizer = getattr(model, "hf_quantizer", None)
    return list(getattr(quantizer, "records", []) or [])


def write_quant_log(model, path) -> None:
    """Writes ``quant_log.csv`` (one row per quantized Linear) for a model quantized on load."""
    from ..engine import write_log

    records = quant_log_records(model)
    if not records:
        raise ValueError("this model was not quantized in this process, so it has no per-layer records")
    write_log(records, path)


def register() -> None:
    """Adds ``"babai"`` to transformers' quantization registries (once)."""
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )

    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(BabaiConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(BabaiHfQuantizer)


register()
