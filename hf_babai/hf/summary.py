"""What a saved babai checkpoint is: format, true bits per weight, sizes, calibration, per-layer error vs bound.

Shared by ``hf-babai info`` and the model-card generator, so both report the same numbers. Everything
comes from the folder itself (``config.json``, safetensors headers, ``quant_log.csv``), read without
loading a weight: the model is built on the meta device and every packed tensor is checked against it.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ..engine import weight_report
from ..formats import get_format, model_bits_per_weight
from .config import QUANT_METHOD, BabaiConfig
from .quantizer import (
    _ST_DTYPES,
    CheckpointError,
    _as_loaded,
    _read_headers,
    check_checkpoint,
    nonfinite_in_files,
    replace_with_quantized_modules,
)
from .serving import describe_checkpoint, format_report, servability


def read_config(path: str | Path) -> dict[str, Any]:
    """``config.json`` of a checkpoint folder; a clear error when there is none."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{path} has no config.json; pass a checkpoint folder written by save_pretrained")
    return json.loads(cfg_file.read_text())


def weights_sha256(path: str | Path) -> str:
    """SHA-256 over a checkpoint folder's ``*.safetensors`` files (names and bytes, in name order): what an
    evaluation result records, so that it is never attached to another version of the checkpoint."""
    import hashlib

    h = hashlib.sha256()
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} has no *.safetensors weights")
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def read_babai_config(path: str | Path) -> BabaiConfig:
    """The checkpoint's ``BabaiConfig``; a clear error for a folder that is not a babai checkpoint."""
    path = Path(path)
    qraw = read_config(path).get("quantization_config")
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
    describes it. ``size_16bit_bytes`` is the same model with every parameter in 16 bits (BF16/FP16, the dtype
    of nearly every original release), the "before" size a reader has in mind; ``size_after_16bit_bytes`` is this
    checkpoint with any float32 tensors (a model quantized in float32) counted at 16 bits."""
    path = Path(path)
    qcfg = read_babai_config(path)
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    modules = replace_with_quantized_modules(skeleton, qcfg)
    files = sorted(str(f) for f in path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"{path} has a config.json but no *.safetensors weights; copy or download the whole checkpoint folder"
        )
    check_checkpoint(skeleton, modules, files)
    bad = nonfinite_in_files(files)
    if bad:
        raise CheckpointError(f"{path} stores non-finite values (the model would give NaN logits): " + "; ".join(bad))
    quantized = sum(m.in_features * m.out_features for m in modules.values())
    spec = qcfg.spec()
    about = get_format(spec.format).describe(spec)
    dense = sum(p.numel() for n, p in skeleton.named_parameters(remove_duplicate=True))
    weights = weight_report(skeleton, spec.skip)
    q_bits = weights["bits_per_weight"] * quantized
    raw = _read_headers(files)
    dense_bits = _dense_bits(_as_loaded(skeleton, raw), set(modules))
    f32_bytes = 4 * sum(math.prod(shape) for shape, dtype, _ in raw.values() if dtype == "F32")
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
        "bits_per_weight_all": round((q_bits + dense_bits) / (quantized + dense), 4),
        "float_share": weights["float_share"],
        "size_bytes": sum(Path(f).stat().st_size for f in files),
        "size_16bit_bytes": 2 * (quantized + dense),
        "size_after_16bit_bytes": sum(Path(f).stat().st_size for f in files) - f32_bytes // 2,
        "calibration": qcfg.calibration,
        "layer_stats": layer_stats(path / "quant_log.csv"),
        "serving": format_report(
            servability(describe_checkpoint(qcfg.to_dict(), {n: m.in_features for n, m in modules.items()}))
        ),
    }


_FLOAT_BITS = {name: torch.finfo(dt).bits for dt, name in _ST_DTYPES.items() if dt.is_floating_point}


def _dense_bits(header: dict[str, tuple[tuple[int, ...], str, str]], quantized: set[str]) -> int:
    """Stored bits of the checkpoint's float tensors outside the quantized modules' packed weights (biases
    included), at the width they are stored in."""
    total = 0
    for key, (shape, dtype, _) in header.items():
        owner, leaf = key.rsplit(".", 1) if "." in key else ("", key)
        if dtype in _FLOAT_BITS and (owner not in quantized or leaf == "bias"):
            total += math.prod(shape) * _FLOAT_BITS[dtype]
    return total


EXPORTED_PRIMARY = {"compressed-tensors": "weight_packed", "gptq": "qweight"}


def exported_summary(path: str | Path) -> dict[str, Any]:
    """Describes a checkpoint written by :func:`hf_babai.export` (or any compressed-tensors / GPTQ int checkpoint)
    from its config and safetensors headers: the quantized layers, true bits per weight, size and which engines
    load it. Raises ``ValueError`` when no weights are present."""
    from safetensors import safe_open

    path = Path(path)
    config = read_config(path)
    qcfg = config.get("quantization_config") or {}
    kind = qcfg.get("quant_method")
    if kind not in EXPORTED_PRIMARY:
        raise ValueError(f"{path} is not a compressed-tensors or GPTQ checkpoint (quant_method={kind!r})")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} has a config.json but no *.safetensors weights; copy the whole checkpoint folder")
    # one pass over the headers: each module's tensors (shape, dtype), and the small weight_shape records' values
    owned: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {}
    recorded: dict[str, tuple[int, int]] = {}
    for f in files:
        with safe_open(f, "pt") as sf:
            names = sf.keys()
            for key in names:
                owner, leaf = key.rsplit(".", 1) if "." in key else ("", key)
                if leaf == "weight_shape":  # bookkeeping (N, K), not stored weight bits
                    n, k = (int(v) for v in sf.get_tensor(key).tolist())
                    recorded[owner] = (n, k)
                    continue
                sl = sf.get_slice(key)
                owned.setdefault(owner, {})[leaf] = (tuple(sl.get_shape()), sl.get_dtype())
    primary = EXPORTED_PRIMARY[kind]
    layers = sorted(owner for owner, leaves in owned.items() if primary in leaves)
    if not layers:
        raise ValueError(f"{path}: no {primary} tensors; the weights do not match its {kind} config")
    bits = weights = 0
    sizes = {"I8": 8, "U8": 8, "I32": 32, "F16": 16, "BF16": 16, "F32": 32, "I64": 64, "F64": 64}
    in_features = {}
    for layer in layers:
        parts = owned[layer]
        bits += sum(math.prod(shape) * sizes[d] for leaf, (shape, d) in parts.items() if leaf != "bias")
        if kind == "compressed-tensors":
            if layer not in recorded:
                raise ValueError(f"{path}: {layer}.weight_shape is missing; the checkpoint is incomplete")
            n, k = recorded[layer]
        else:
            k, n = parts["g_idx"][0][0], parts["scales"][0][1]
        weights += n * k
        in_features[layer] = k
    facts = describe_checkpoint(qcfg, in_features)
    return {
        "checkpoint": str(path),
        "architecture": (config.get("architectures") or ["?"])[0],
        "format": f"{kind}: {facts.bits}-bit, group {sorted(facts.group_sizes)}, "
        + ("symmetric" if facts.sym else "asymmetric"),
        "quantized_layers": len(layers),
        "bits_per_weight": round(bits / weights, 4),
        "size_bytes": sum(f.stat().st_size for f in files),
        "serving": format_report(servability(facts)),
    }
