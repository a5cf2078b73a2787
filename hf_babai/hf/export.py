"""``hf_babai.export``: write a babai model in a checkpoint format other tools load unchanged.

The model's format says what it converts to losslessly (``QuantFormat.exports``) and gives each module's tensors.
Today that is GPTQ v1 for the ``int`` format: Babai codes on a clipped grid are ordinary GPTQ codes (same grid,
same scales, natural column order), so every quantized module becomes ``qweight/qzeros/scales/g_idx`` (+ ``bias``),
everything else is saved as is, and ``config.json`` gets a GPTQ ``quantization_config`` (``quant_method: "gptq"``,
``checkpoint_format: "gptq"``, ``desc_act: false``).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..formats import quantized_modules

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


def export(model_or_dir: nn.Module | str | Path, out_dir: str | Path, format: str = "gptq") -> Path:
    """Writes ``out_dir`` (``config.json``, ``model.safetensors``, tokenizer files when given a folder).

    Args:
        model_or_dir: a quantized model in memory, or a babai checkpoint folder.
        out_dir: destination folder (created).
        format: ``"gptq"`` (GPTQ v1), the only export format.
    """
    if format != "gptq":
        raise ValueError(f"export format {format!r} is not supported; use 'gptq'")
    src_dir = None
    if isinstance(model_or_dir, (str, Path)):
        from transformers import AutoModelForCausalLM

        src_dir = Path(model_or_dir)
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
    kinds = {(m.bits, m.group_size, m.sym) for m in mods.values()}
    if len(kinds) != 1:
        raise ValueError(
            f"GPTQ checkpoints have one bits/group_size/sym for all layers; this model mixes {sorted(kinds)}"
        )
    bits, group_size, sym = kinds.pop()

    state: dict[str, torch.Tensor] = {}
    for name, mod, fmt in found:
        for k, t in fmt.export_tensors(format, mod).items():
            state[f"{name}.{k}"] = t
        if mod.bias is not None:
            state[f"{name}.bias"] = mod.bias.detach()
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    for key, t in model.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if owner in mods or key in tied:
            continue
        if t.device.type == "meta":
            raise ValueError(f"{key} is offloaded (meta); load the model without disk offload before exporting")
        state[key] = t.detach()

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = copy.deepcopy(model.config)
    babai = getattr(cfg, "quantization_config", None)
    babai = babai.to_dict() if hasattr(babai, "to_dict") else dict(babai or {})
    cfg.quantization_config = {
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
    cfg.save_pretrained(out)
    if src_dir is not None:
        for f in TOKENIZER_FILES:
            if (src_dir / f).exists():
                shutil.copy(src_dir / f, out / f)
    (out / "quantize_config.json").write_text(
        json.dumps({k: cfg.quantization_config[k] for k in ("bits", "group_size", "sym", "desc_act")}, indent=2)
    )
    return out
