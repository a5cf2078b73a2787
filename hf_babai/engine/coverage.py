"""Which weights stay float, and why: nothing is left unquantized without a name.

Every floating-point parameter of two or more dimensions gets a kind. Kinds kept float by design: embeddings
(position tables too) and the LM head, norms, vectors stored with extra unit dimensions, MoE routers (small and
sensitive), convolutions (the short depthwise convolutions of state-space and linear-attention layers), state-space
parameters (``A_log``), everything outside the language model of a vision-language model (its vision tower and
projector), and what the user listed in ``modules_to_not_convert``. Linears inside the decoder blocks and MoE
experts are quantized. Any other weight is of an unknown kind: :func:`check_float_weights` refuses the model before
any solve, naming each one, because quantizing around it would leave most of a model float while reporting low bits
(an MoE whose experts are not recognised looks quantized until someone looks at its size).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .blocks import _language_model, find_blocks, is_quantizable, output_head
from .experts import UnfusedExperts, is_fused_experts
from .routers import is_router, router_linears

QUANTIZED = "quantized"
UNKNOWN = "unknown"
SSM_STATE = frozenset({"A_log", "A", "D", "dt_bias"})


@dataclass
class FloatWeight:
    name: str
    shape: tuple[int, ...]
    kind: str


def weight_kinds(model: nn.Module, skip: tuple[str, ...]) -> list[FloatWeight]:
    """Every ≥2-D floating-point parameter of ``model`` with its kind (``quantized`` for those the engine will
    quantize or has replaced: Linears of the decoder blocks, fused MoE experts)."""
    from ..formats import format_of

    blocks_name, _ = find_blocks(model)
    root = _language_model(model)
    embeddings = {id(m) for m in model.modules() if isinstance(m, nn.Embedding)}
    for m in model.modules():  # a position table that is not an nn.Embedding (Reformer's axial one) is one too
        if re.search(r"position(al)?embedding", type(m).__name__.lower()):
            embeddings |= {id(sub) for sub in m.modules()}
    head = output_head(model)
    head_stage = _head_stage(model, head, blocks_name)
    routers = router_linears(model)
    out: list[FloatWeight] = []
    for name, mod in model.named_modules():
        own = [(p, t) for p, t in mod.named_parameters(recurse=False) if t.dim() >= 2 and t.dtype.is_floating_point]
        if not own or format_of(mod) is not None:
            continue
        in_blocks = name.startswith(blocks_name + ".")
        for pname, t in own:
            full = f"{name}.{pname}" if name else pname
            if id(mod) in embeddings:
                kind = "embedding"
            elif (head is not None and mod is head) or "lm_head" in full or _under(name, head_stage):
                kind = "lm_head"  # the output head and any layer of it (an MLM-style head's dense), always float
            elif any(s in full for s in skip):
                kind = "modules_to_not_convert"
            elif in_blocks and name in routers:
                kind = "router"  # a router Linear: float unless quantize_router (then a quantized module, not listed)
            elif sum(d > 1 for d in t.shape) <= 1:
                kind = "vector"  # a [1, 1, H] mixing or scaling vector stored with extra dims (RWKV)
            elif root and not name.startswith(root + "."):
                kind = "outside the language model"
            elif not in_blocks and _embedding_stage(name):
                kind = "embedding projection"
            elif in_blocks and (is_quantizable(mod) or is_fused_experts(mod) or isinstance(mod, UnfusedExperts)):
                kind = QUANTIZED
            elif "norm" in type(mod).__name__.lower() or "norm" in pname:
                kind = "norm"
            elif in_blocks and is_router(name, mod):
                kind = "router"
            elif isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or "conv" in type(mod).__name__.lower():
                kind = "convolution"
            elif pname in SSM_STATE:
                kind = "state-space parameter"
            elif _hyper_connection(name, mod):
                kind = "hyper-connection"
            else:
                kind = UNKNOWN
            out.append(FloatWeight(full, tuple(t.shape), kind))
    return out


def _under(name: str, prefix: str | None) -> bool:
    return prefix is not None and name.startswith(prefix + ".")


def _head_stage(model: nn.Module, head: nn.Module | None, blocks_name: str) -> str | None:
    """The module holding the output head and the layers that run with it, when it holds nothing else: a BERT-style
    head (``cls.predictions``) puts a dense transform and a norm before its decoder; they act on the last block's
    output, where the head is, and stay float with it. ``None`` when the head's parent is the model or holds the
    blocks (``model.lm_head`` beside ``model.layers``)."""
    if head is None:
        return None
    name = next((n for n, m in model.named_modules() if m is head), "")
    parent = name.rpartition(".")[0]
    if not parent or blocks_name == parent or blocks_name.startswith(parent + "."):
        return None
    return parent


# Gemma-3n's and Gemma-4's projection of the embeddings into every layer's extra input, and Gemma-3n's AltUp
# projections of the embeddings into its extra residual streams and of those streams back (their names have no
# "embed"; they run before the first block and after the last).
PER_LAYER_INPUT_PROJECTIONS = frozenset(
    {"per_layer_model_projection", "altup_projections", "altup_unembed_projections"}
)


def _embedding_stage(name: str) -> bool:
    """Whether a module outside the decoder blocks belongs to the embedding stage by its name: a projection of the
    embeddings (ELECTRA's ``embeddings_project``, RemBERT's ``embedding_hidden_mapping_in``, BLT's
    ``patch_embedding_projection``), Gemma's per-layer input projection or Gemma-3n's AltUp projections. It runs
    outside the blocks (before the first one; AltUp's way back after the last), so the
    block-by-block engine has no calibrated input for it; like the embeddings themselves it stays float."""
    parts = name.split(".")
    return any("embed" in p or p in PER_LAYER_INPUT_PROJECTIONS for p in parts)


def _hyper_connection(name: str, module: nn.Module) -> bool:
    """Hyper-connections (HunYuan-V4, GLM-5-next, Qwen-4-exp) mix several residual streams with small learned
    matrices (``attn_hc.fn [n·(n+2), n·H]``): few weights that every token passes through, as sensitive as a router,
    so they stay float like one."""
    return "hyper" in type(module).__name__.lower() or any("hyper_connection" in p for p in name.split("."))


def check_float_weights(model: nn.Module, skip: tuple[str, ...]) -> None:
    """Refuses, before any quantization, a model with weights of unknown kind (see the module docstring)."""
    unknown = [w for w in weight_kinds(model, skip) if w.kind == UNKNOWN]
    if not unknown:
        return
    shown = "\n  ".join(f"{w.name} {list(w.shape)}" for w in unknown[:12])
    more = f"\n  ... and {len(unknown) - 12} more" if len(unknown) > 12 else ""
    others = f" and {len(unknown) - 1} more weights are" if len(unknown) > 1 else " is a weight"
    raise ValueError(
        f"{unknown[0].name}{others} of a kind hf_babai does not quantize (not a Linear of the decoder blocks, nor "
        f"fused MoE experts, nor an embedding, norm, router or convolution):\n  {shown}{more}\n"
        "Quantizing the rest would leave them float while reporting low bits. To keep them float knowingly, list "
        "their module names in modules_to_not_convert (CLI: --skip); otherwise this architecture is not supported "
        "yet (docs/architectures.md)."
    )


def float_share(model: nn.Module, skip: tuple[str, ...]) -> dict[str, int]:
    """Parameters left float, by kind (every float parameter of any shape; 1-D ones count as ``other``), for the
    reports: how much of a quantized model is not quantized, and why."""
    kinds = {w.name: w.kind for w in weight_kinds(model, skip)}
    out: dict[str, int] = {}
    for name, p in model.named_parameters():
        if not p.dtype.is_floating_point:
            continue
        kind = kinds.get(name, "other (1-D: biases, norms, state)")
        if kind != QUANTIZED:
            out[kind] = out.get(kind, 0) + p.numel()
    return out


def dtype_bits(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits if dtype.is_floating_point else torch.iinfo(dtype).bits


def weight_report(model: nn.Module, skip: tuple[str, ...], float_bits: int | None = None) -> dict:
    """Bits per weight two ways and what stays float: ``bits_per_weight`` over the quantized layers (the format's
    figure), ``bits_per_weight_all`` over every weight of the model (float ones at their dtype's width, or
    ``float_bits`` when given: the stored width of a checkpoint read on the meta device) and ``float_share``, the
    fraction of all weights left float, by kind."""
    from ..formats import quantized_modules

    q_bits = q_n = 0.0
    for _, mod, fmt in quantized_modules(model):
        n = mod.in_features * mod.out_features
        q_bits += fmt.bits_per_weight(mod) * n
        q_n += n
    floats = [p for p in model.parameters() if p.dtype.is_floating_point]
    f_n = sum(p.numel() for p in floats)
    f_bits = sum(p.numel() * (float_bits or dtype_bits(p.dtype)) for p in floats)
    total = q_n + f_n
    if not q_n:
        raise ValueError("the model has no quantized layers")
    return {
        "bits_per_weight": round(q_bits / q_n, 4),
        "bits_per_weight_all": round((q_bits + f_bits) / total, 4),
        "float_share": {
            k: round(v / total, 4) for k, v in sorted(float_share(model, skip).items(), key=lambda kv: -kv[1])
        },
    }
