"""hf_babai: post-training LLM weight quantization with Babai's nearest-plane algorithm.

GPTQ run back-to-front *is* Babai's nearest-plane algorithm on the lattice of the layer Hessian
(arXiv 2507.18553). Importing ``hf_babai`` registers ``quant_method="babai"`` with transformers, so
``from_pretrained(..., quantization_config=BabaiConfig(...))`` quantizes on load and babai checkpoints reload with
plain ``from_pretrained(path)``. ``publish`` (Hub upload with a model card) and ``evaluate`` (lm-eval) are imported
only when first used. Layers, one way: ``cli``/``hub``/``eval`` → ``hf`` (the transformers adapter) → ``engine``
→ ``spec`` → ``formats`` + ``solver`` → ``kernels``; see ``docs/design.md``.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from .hf import (
    BabaiConfig,
    BabaiHfQuantizer,
    BabaiQuantizer,
    CheckpointError,
    export,
    save_streamed,
    set_backend,
    write_quant_log,
)

_LAZY = {"evaluate": "eval", "publish": "hub", "build_card": "hub", "PublishError": "hub"}

__all__ = [
    "BabaiConfig",
    "BabaiHfQuantizer",
    "BabaiQuantizer",
    "CheckpointError",
    "PublishError",
    "__version__",
    "build_card",
    "evaluate",
    "export",
    "publish",
    "save_streamed",
    "set_backend",
    "write_quant_log",
]


def __getattr__(name: str) -> Any:
    """``evaluate``, ``publish``, ``build_card`` and ``PublishError`` load lm-eval / huggingface_hub's card and
    upload stack on first use, not on ``import hf_babai``."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_babai' has no attribute {name!r}")
