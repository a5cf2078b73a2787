"""``hf_babai.export``: write a babai model in a checkpoint format that serving engines load unchanged.

Two targets, both lossless for the ``int`` format (each format declares what it converts to in
``QuantFormat.exports`` and gives each module's tensors):

* ``"compressed-tensors"`` (default): ``pack-quantized`` weight-only int, what llm-compressor writes and vLLM,
  SGLang and transformers (with the ``compressed-tensors`` package) load. One config group targets every
  ``Linear``; the Linears left in float are listed under ``ignore``. A layer whose last group is partial is
  written at a smaller group size with repeated scales (see :mod:`hf_babai.formats.compressed_tensors`).
* ``"gptq"``: GPTQ v1 (``qweight/qzeros/scales/g_idx``), for tools that read only GPTQ.

Babai's act-order and min-pivot orders only steer calibration: codes are stored in natural column order, so
neither target carries a ``g_idx`` permutation (``actorder: null`` / ``desc_act: false``).

Scales: babai scales are float16 values. compressed-tensors writes them in the model's dtype, which every loader
also computes in; when the model is bfloat16 and a scale is not exactly a bfloat16 value they are written as
float16 and a warning says what rounds where (``docs/serving.md``). After writing, the servability report of
:mod:`hf_babai.hf.serving` is checked: a combination no engine serves by default warns and names one that does.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..engine import router_linears
from ..formats import quantized_modules
from ..formats.compressed_tensors import stored_group_size
from .serving import default_path_serves, describe_checkpoint, format_report, servability

__all__ = ["CT_VERSION", "EXPORT_FORMATS", "export", "export_report"]

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("compressed-tensors", "gptq")
CT_VERSION = "0.17.0"  # the compressed-tensors release vLLM 0.34 pins; the config is also read by the newest

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
)


def export(
    model_or_dir: nn.Module | str | Path,
    out_dir: str | Path,
    format: str = "compressed-tensors",
    *,
    dtype: torch.dtype | None = None,
    scale_dtype: torch.dtype | None = None,
) -> Path:
    """Writes ``out_dir`` (``config.json``, ``model.safetensors``, tokenizer files when given a folder).

    Args:
        model_or_dir: a quantized model in memory, or a babai checkpoint folder.
        out_dir: destination folder (created); it may not be the source folder.
        format: ``"compressed-tensors"`` (default) or ``"gptq"`` (GPTQ v1).
        dtype: the dtype the export is served in (``config.json``'s ``dtype``; unquantized tensors are cast to
            it). Default: the model's own; a float32 model (quantized in float32 for CPU speed) warns, since
            engines would then run it in float32: pass the original model's dtype (usually bfloat16).
        scale_dtype: compressed-tensors only: the dtype of the written scales. Default: ``dtype`` when it holds
            every scale exactly, else ``torch.float16`` (with a warning).
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"export format={format!r} is not supported; use one of {EXPORT_FORMATS}")
    if scale_dtype is not None and format != "compressed-tensors":
        raise ValueError("scale_dtype applies to compressed-tensors exports only (GPTQ v1 stores float16 scales)")
    out = Path(out_dir)
    src_dir = None
    if isinstance(model_or_dir, (str, Path)):
        from transformers import AutoModelForCausalLM

        src_dir = Path(model_or_dir)
        same = out.resolve() == src_dir.resolve()
        if same or src_dir.resolve() in out.resolve().parents:
            where = "the source folder" if same else "inside the source folder"
            raise ValueError(
                f"export into {out}, {where} {src_dir}, would change the checkpoint it reads; choose another folder"
            )
        model = AutoModelForCausalLM.from_pretrained(src_dir)
    else:
        model = model_or_dir
    found = list(quantized_modules(model))
    if not found:
        raise ValueError("the model has no quantized layers; quantize it with hf_babai first")
    for fmt in {f.name: f for _, _, f in found}.values():
        if format not in fmt.exports:
            raise ValueError(f"format={fmt.name!r} models cannot be exported to {format!r}: {fmt.no_export}")
    mods = {n: m for n, m, _ in found}
    routers = sorted(set(mods) & router_linears(model))
    if routers:
        raise ValueError(
            f"{routers[0]} is a quantized MoE router ({len(routers)} in all); serving engines load routers in float, "
            f"so a {format} checkpoint cannot hold them: quantize again without quantize_router (CLI: drop "
            "--quantize-router) to export"
        )
    kinds = {(m.bits, m.group_size, m.sym) for m in mods.values()}
    if len(kinds) != 1:
        raise ValueError(f"{format} checkpoints have one bits/group_size/sym for all layers; this model mixes {kinds}")
    bits, group_size, sym = kinds.pop()
    dtype = _served_dtype(model, dtype)
    babai = getattr(model.config, "quantization_config", None)
    babai = babai.to_dict() if hasattr(babai, "to_dict") else dict(babai or {})

    options: dict[str, Any] = {}
    if format == "compressed-tensors":
        stored = (
            -1 if group_size == -1 else math.gcd(*(stored_group_size(m.in_features, group_size) for m in mods.values()))
        )
        if stored not in (-1, group_size):
            log.warning(
                "group_size=%d is written as group_size=%d with repeated scales (same weights): compressed-tensors "
                "needs whole groups and in_features %s are not multiples of %d",
                group_size,
                stored,
                sorted({m.in_features for m in mods.values() if m.in_features % group_size}),
                group_size,
            )
        options = {"stored_group": stored, "scale_dtype": _scale_dtype(mods, dtype, scale_dtype)}
        qcfg = _ct_config(model, bits, sym, stored, babai)
    else:
        qcfg = _gptq_config(bits, group_size, sym, babai)

    state: dict[str, torch.Tensor] = {}
    for name, mod, fmt in found:
        for k, t in fmt.export_tensors(format, mod, **options).items():
            state[f"{name}.{k}"] = t
        if mod.bias is not None:
            state[f"{name}.bias"] = mod.bias.detach().to(dtype)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    for key, t in model.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if owner in mods or key in tied:
            continue
        if t.device.type == "meta":
            raise ValueError(f"{key} is offloaded (meta); load the model without disk offload before exporting")
        state[key] = t.detach().to(dtype) if t.is_floating_point() else t.detach()

    out.mkdir(parents=True, exist_ok=True)
    state = checkpoint_names(model, state)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = copy.deepcopy(model.config)
    cfg.quantization_config = qcfg
    cfg.dtype = dtype
    cfg.save_pretrained(out)
    if src_dir is not None:
        for f in TOKENIZER_FILES:
            if (src_dir / f).exists():
                shutil.copy(src_dir / f, out / f)
    if format == "gptq":
        (out / "quantize_config.json").write_text(
            json.dumps({k: qcfg[k] for k in ("bits", "group_size", "sym", "desc_act")}, indent=2)
        )
    in_features = {n: m.in_features for n, m in mods.items()}
    verdicts = servability(describe_checkpoint(qcfg, in_features))
    if not default_path_serves(verdicts, "vLLM"):
        warnings.warn(
            f"no serving engine loads this {format} checkpoint by default ("
            + "; ".join(format_report(verdicts))
            + "). Export to compressed-tensors to serve it with vLLM's default kernels.",
            stacklevel=2,
        )
    return out


def checkpoint_names(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` under the names the architecture's checkpoints use, as ``save_pretrained`` writes them: transformers
    renames keys between disk and memory for many models (Mixtral's ``block_sparse_moe`` is ``mlp`` in memory,
    GPT-NeoX's ``embed_out`` is ``lm_head``), and engines read the disk names. Only renamings and the converters
    that leave packed tensors alone are reversed (:func:`without_quantized_converters`)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange, revert_weight_conversion
    except ImportError:  # pragma: no cover - transformers without key conversion: memory names are disk names
        return state
    from .quantizer import without_quantized_converters

    saved = getattr(model, "_weight_conversions", None)
    conversions = saved
    if conversions is None:  # built without from_pretrained: the architecture's mapping, as save_pretrained does
        conversions = [
            c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)
        ]
    model._weight_conversions = without_quantized_converters(conversions, model) or None
    try:
        return revert_weight_conversion(model, state)
    finally:
        model._weight_conversions = saved


def export_report(checkpoint: str | Path) -> list[str]:
    """The servability report of an exported checkpoint folder, one line per engine (its layer widths read from
    the safetensors headers, so partial groups count)."""
    from .summary import exported_summary

    return exported_summary(checkpoint)["serving"]


def _served_dtype(model: nn.Module, requested: torch.dtype | None) -> torch.dtype:
    """``requested``, else the model's dtype, with a warning when that is float32 (no engine's fast path)."""
    if requested is not None:
        if requested not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"dtype={requested} is not a dtype engines serve; use torch.bfloat16 or torch.float16")
        return requested
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if dtype == torch.float32:
        warnings.warn(
            "the model is float32 (quantized in float32?), so the export would be served in float32, which engines' "
            "quantized kernels do not run; pass dtype=torch.bfloat16 (hf-babai export --dtype bfloat16), the "
            "original model's dtype, to serve it as released",
            stacklevel=3,
        )
    return dtype


def _scale_dtype(mods: dict[str, nn.Module], dtype: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    """``requested``, or the served ``dtype`` when every scale is exactly one of its values, else float16."""
    if requested is not None:
        return requested
    if dtype in (torch.float16, torch.float32):
        return dtype
    inexact = sum(int((m.scales.to(dtype).to(m.scales.dtype) != m.scales).sum()) for m in mods.values())
    if inexact:
        total = sum(m.scales.numel() for m in mods.values())
        warnings.warn(
            f"{inexact} of {total} scales are not exactly representable in {dtype} (the model's dtype); they are "
            "written as float16. Loaders cast scales to the dtype they run the model in: serve in float16 "
            f"(vllm serve --dtype float16) for exactly the quantized weights; in {dtype} each such scale rounds "
            "by at most 2^-9 of its value. Quantizing with scale_dtype='bfloat16' avoids this (docs/serving.md).",
            stacklevel=3,
        )
        return torch.float16
    return dtype


def _ct_config(model: nn.Module, bits: int, sym: bool, stored_group: int, babai: dict) -> dict[str, Any]:
    """compressed-tensors ``quantization_config``: the fields compressed-tensors 0.17.0 writes, which the newest
    release and vLLM also read; unknown keys are ignored by compressed-tensors, so provenance goes under
    ``babai``."""
    weights = {
        "num_bits": bits,
        "type": "int",
        "symmetric": sym,
        "group_size": None if stored_group == -1 else stored_group,
        "strategy": "channel" if stored_group == -1 else "group",
        "block_structure": None,
        "dynamic": False,
        "actorder": None,
        "scale_dtype": None,
        "zp_dtype": None if sym else "torch.int8",  # what compressed-tensors writes
        "observer": "memoryless_minmax",
        "observer_kwargs": {},
    }
    ignore = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
                "format": "pack-quantized",
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_VERSION,
        "babai": {"quantizer": "hf_babai", **{k: babai.get(k) for k in ("order", "method", "calibration", "damp")}},
    }


def _gptq_config(bits: int, group_size: int, sym: bool, babai: dict) -> dict[str, Any]:
    return {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": bits,
        "group_size": group_size,
        "sym": sym,
        "desc_act": False,
        "true_sequential": True,
        "damp_percent": babai.get("damp", 0.01),
        "meta": {"quantizer": ["hf_babai"], "babai": {k: babai.get(k) for k in ("order", "method", "calibration")}},
    }
