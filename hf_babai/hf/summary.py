"""What a saved babai checkpoint is: format, true bits per weight, sizes, calibration, per-layer error vs bound.

Shared by ``hf-babai info`` and the model-card generator, so both report the same numbers. Everything
comes from the folder itself (``config.json``, safetensors headers, ``quant_log.csv``), read without
loading a weight: the model is built on the meta device and every packed tensor is checked against it.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ..formats import get_format, model_bits_per_weight
from .config import QUANT_METHOD, BabaiConfig
from .quantizer import check_checkpoint, replace_with_quantized_modules


def read_babai_config(path: str | Path) -> BabaiConfig:
    """The checkpoint's ``BabaiConfig``; a clear error for a folder that is not a babai checkpoint."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{path} has no config.json; pass a checkpoint folder written by save_pretrained")
    qraw = json.loads(cfg_file.read_text()).get("quantization_config")
    if not isinstance(qraw, dict) or qraw.get("quant_method") != QUANT_METHOD:
        qm = qraw.get("quant_method") if isinstance(qraw, dict) else None
        raise ValueError(f"{path} is not a babai checkpoint (quant_method={qm!r}); quantize it with hf_babai first")
    return BabaiConfig.from_dict(qraw)


def layer_stats(log_file: str | Path) -> dict[str, Any] | None:
    """Totals of ``quant_log.csv``: achieved proxy loss vs Babai's bound, clipping, the worst layer."""
    log_file = Path(log_file)
    if not log_file.is_file():
        return None
    with open(log_file) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    loss = sum(float(r["loss"]) for r in rows)
    bound = sum(float(r["bound"]) for r in rows)
    ratios = sorted(float(r["loss"]) / max(float(r["bound"]), 1e-30) for r in rows)
    worst = max(rows, key=lambda r: float(r["loss"]) / max(float(r["bound"]), 1e-30))
    return {
        "rows": len(rows),
        "loss_total": loss,
        "babai_bound_total": bound,
        "loss_over_bound": loss / bound if bound else None,
        "median_layer_loss_over_bound": ratios[len(ratios) // 2],
        "layers_above_bound": sum(r > 1 for r in ratios),
        "clipped_fraction": sum(int(r["clipped"]) for r in rows) / max(1, sum(int(r["weights"]) for r in rows)),
        "worst_layer_vs_bound": f"block {worst['block']} {worst['layer']}",
    }


def checkpoint_summary(path: str | Path) -> dict[str, Any]:
    """Validates the checkpoint (raises ``CheckpointError`` naming a missing/short/mis-shaped tensor) and
    describes it. ``size_16bit_bytes`` is the same model with every parameter in 16 bits, the usual
    "before" size of a quantized release."""
    path = Path(path)
    qcfg = read_babai_config(path)
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    modules = replace_with_quantized_modules(skeleton, qcfg)
    files = sorted(str(f) for f in path.glob("*.safetensors"))
    check_checkpoint(skeleton, modules, files)
    quantized = sum(m.in_features * m.out_features for m in modules.values())
    spec = qcfg.spec()
    about = get_format(spec.format).describe(spec)
    dense = sum(p.numel() for n, p in skeleton.named_parameters(remove_duplicate=True))
    return {
        "checkpoint": str(path),
        "architecture": (config.architectures or ["?"])[0],
        "format": f"babai v{qcfg.format_version}: {about['format']}",
        "storage": qcfg.format,
        "target_bpw": qcfg.target_bpw,
        "outlier_rate": qcfg.outlier_rate,
        "headline": about["headline"],
        "layout": about["layout"],
        "tags": about["tags"],
        "card": about["card"],
        "method": qcfg.method,
        "order": qcfg.order,
        "bits": qcfg.bits,
        "group_size": qcfg.group_size,
        "sym": qcfg.sym,
        "quantized_layers": len(modules),
        "quantized_weights": quantized,
        "parameters": quantized + dense,
        "bits_per_weight": round(model_bits_per_weight(skeleton), 4),
        "size_bytes": sum(Path(f).stat().st_size for f in files),
        "size_16bit_bytes": 2 * (quantized + dense),
        "calibration": qcfg.calibration,
        "layer_stats": layer_stats(path / "quant_log.csv"),
    }
