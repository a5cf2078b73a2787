"""Tiny random models of every causal-LM and image-text-to-text architecture in the installed transformers, and the
round trip that decides whether hf_babai supports each: quantize on load → ``save_pretrained`` → plain
``from_pretrained`` → equal logits, with every float weight left in the language model listed ("partial" when any
is outside the keep-list of routers).

Configs are shrunk generically: every size field a config class declares (hidden size, layers, heads, experts,
state sizes, ... under any of the names transformers uses) is passed small to its constructor, so derived fields
(``layer_types``, head dims) follow; composite configs (``text_config``, ``vision_config``) are shrunk the same
way. ``python -m integration_tests.architectures [ARCH ...] [--write]`` prints one JSON line per architecture; with
``--write`` it records the outcomes in ``architectures_expected.json`` and regenerates ``docs/architectures.md``.
"""

from __future__ import annotations

import contextlib
import filecmp
import gc
import json
import re
import signal
import sys
import tempfile
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

# Size fields under every name transformers' configs use, and the tiny value each gets when the class has it.
TINY: dict[str, Any] = {
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "dim", "embed_dim", "n_embed", "model_dim"), 64),
    **dict.fromkeys(
        (
            "intermediate_size",
            "n_inner",
            "ffn_dim",
            "d_ff",
            "ffn_hidden_size",
            "mlp_hidden_size",
            "decoder_ffn_dim",
            "encoder_ffn_dim",
            "d_inner",
            "intermediate_dim",
        ),
        128,
    ),
    **dict.fromkeys(("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers", "encoder_layers"), 2),
    **dict.fromkeys(
        ("num_attention_heads", "n_head", "n_heads", "num_heads", "decoder_attention_heads", "encoder_attention_heads"),
        4,
    ),
    **dict.fromkeys(("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num"), 2),
    **dict.fromkeys(("vocab_size",), 512),
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length"), 256),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts", "top_k_experts"), 2),
    **dict.fromkeys(("moe_intermediate_size", "expert_intermediate_size", "shared_expert_intermediate_size"), 32),
    "n_shared_experts": 1,
    "n_group": 1,
    "topk_group": 1,
    "depth": 2,
    "first_k_dense_replace": 1,
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    **dict.fromkeys(("state_size", "ssm_state_size", "mamba_d_state", "d_state"), 8),
    **dict.fromkeys(("time_step_rank",), 8),
    **dict.fromkeys(("sliding_window", "attention_window", "local_window_size"), 32),
    **dict.fromkeys(("pad_token_id",), 0),
    **dict.fromkeys(("bos_token_id",), 1),
    **dict.fromkeys(("eos_token_id",), 2),
    "rotary_dim": 8,
}
# Shrinking profiles tried in turn until the float model runs: the tiny one, then one keeping 128-wide heads, which
# rotary sections and head-dim-derived fields of some configs (Qwen2-VL's mrope, MLA) are written against.
PROFILES: tuple[dict[str, Any], ...] = (
    {},
    {
        **dict.fromkeys(("hidden_size", "n_embd", "d_model", "dim", "embed_dim", "n_embed", "model_dim"), 512),
        **dict.fromkeys(("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num"), 4),
        "rotary_dim": 64,
        "qk_rope_head_dim": 64,
        "qk_nope_head_dim": 128,
        "v_head_dim": 128,
        "kv_lora_rank": 128,
        "q_lora_rank": 128,
    },
)
VOCAB = 512
# Inkling's attention widths (its defaults make 8192-wide projections)
_INKLING = {
    "head_dim": 16,
    "swa_num_attention_heads": 4,
    "swa_num_key_value_heads": 2,
    "swa_head_dim": 16,
    "sliding_window_size": 16,
}
_INKLING2 = {**_INKLING, "unpadded_vocab_size": 512}
# RoPE given per attention type (Cohere Compass reads rope_parameters[layer_type])
_PER_TYPE_ROPE = {t: {"rope_type": "default", "rope_theta": 10000.0} for t in ("full_attention", "sliding_attention")}
_MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}  # 16-wide heads' halves
_NEMOTRON_H = {"head_dim": 16, "mamba_num_heads": 4, "mamba_head_dim": 16, "n_groups": 1}
# Florence-2's DaViT stages are lists (the shrinking changes ints only); its projection feeds the 64-wide text model
_DAVIT = {"depths": [1] * 4, "embed_dim": [16, 16, 32, 32], "num_heads": [1, 1, 2, 2], "num_groups": [1, 1, 2, 2]}
_DAVIT["projection_dim"] = 64
# Fields a family's config derives from its full size, or validates against its layer count, that the generic
# shrinking cannot know: set for that architecture on top of every profile.
FAMILY: dict[str, dict[str, Any]] = {
    "apertus1p5": {  # image then audio codebook tokens at the top of the vocabulary
        "image_token_id": 300,
        "audio_token_id": 301,
        "image_token_offset": 400,
        "audio_token_offset": 432,
        "vision_config": {
            "codebook_size": 32,
            "base_channels": 32,
            "latent_channels": 32,
            "channel_multiplier": [1, 2],
        },
        "audio_config": {"codebook_dim": 64, "codebook_size": 32},
    },
    "bailing_hybrid": {"num_expert_group": 1, "topk_group": 1, "num_experts_per_token": 2},
    "blt": {
        "encoder_hash_byte_group_vocab": 512,
        "encoder_config": {"hidden_size_global": 64},
        "decoder_config": {"hidden_size_global": 64},
    },
    "chameleon": {"vocabulary_map": {"<image>": 8}},
    "cohere_compass": {"text_config": {"rope_parameters": _PER_TYPE_ROPE}},
    "cohere_compass_text": {"rope_parameters": _PER_TYPE_ROPE},
    "ctrl": {"dff": 128},
    "dbrx": {
        "attn_config": {"kv_n_heads": 2, "clip_qkv": 8.0, "rope_theta": 10000.0},
        "ffn_config": {"ffn_hidden_size": 128, "moe_num_experts": 4, "moe_top_k": 2},
    },
    "deepseek_ocr2": {"text_config": {"mlp_layer_types": ["dense", "sparse"]}},
    "deepseek_v4": {"head_dim": 32, "o_lora_rank": 32, "index_topk": 8},
    "ernie4_5_moe": {"moe_k": 2},
    "gemma4": {
        "text_config": {
            "head_dim": 16,
            "hidden_size_per_layer_input": 16,
            "global_head_dim": 16,
            "vocab_size_per_layer_input": 512,
        }
    },
    "gemma3n_text": {  # per-layer widths are a list; the per-layer-input vocabulary is the full one
        "num_kv_shared_layers": 0,
        "intermediate_size": [128, 128],
        "vocab_size_per_layer_input": 512,
    },
    "gemma4_assistant": {"text_config": {"hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0}},
    "gemma4_text": {"head_dim": 16, "hidden_size_per_layer_input": 16, "global_head_dim": 16},
    **{glm: {"text_config": {"rope_parameters": _MROPE}} for glm in ("glm4v", "glm46v", "glm_ocr", "glmga")},
    "glm5_next": {  # its DSA layers are NoPE
        "text_config": {
            "num_key_value_heads": 4,
            "qk_rope_head_dim": 0,
            "qk_nope_head_dim": 16,
            "v_head_dim": 16,
            "index_head_dim": 16,
            "linear_head_dim": 16,
            "linear_num_heads": 4,
        }
    },
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    "granite4_vision": {
        "deepstack_layer_map": [[0, 0], [1, 1]],
        "spatial_target_layers": [0, 1, 0, 1],
        "downsample_rate": "1/2",
    },
    "granite_docling": {"vision_config": {"out_hidden_size": 64}},
    "hunyuan_v1_dense": {"head_dim": 16},
    "hunyuan_v1_moe": {"head_dim": 16},
    "hunyuan_vl": {"text_config": {"head_dim": 16, "rope_parameters": {**_MROPE, "mrope_section": [2, 2, 2, 2]}}},
    "inkling_mm_model": {"text_config": _INKLING},
    "inkling_text": _INKLING,
    "inkling2": {"vision_config": {"text_hidden_size": 64}, "text_config": _INKLING2},
    "inkling2_loop": {"vision_config": {"text_hidden_size": 64}, "text_config": _INKLING2},
    "inkling2_loop_text": _INKLING2,
    "inkling2_text": _INKLING2,
    "janus": {
        "vision_config": {"projection_dim": 64},
        "vq_config": {
            "projection_dim": 64,
            "image_token_embed_dim": 64,
            "num_embeddings": 512,
            "base_channels": 32,
            "latent_channels": 32,
            "channel_multiplier": [1, 2],
        },
    },
    "kimi_linear": {"num_experts_per_token": 2, "linear_head_dim": 16},
    "kolibri1_1": {"index_num_heads": 2},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "llava_onevision1_5": {"vision_config": {"out_hidden_size": 64}},
    "mamba2": {"head_dim": 32, "n_groups": 1},
    "ministral": {"head_dim": 16},
    "molmo2": {"adapter_config": {"vision_feature_layer": [1, 0]}},
    "muse_spark": {
        "audio_config": {"patch_sizes": [16, 6], "hidden_sizes": [32, 64], "depths": [1, 1], "out_hidden_size": 64}
    },
    "nemotron_h": _NEMOTRON_H,
    "nemotron_h_omni": {"vision_config": {"video_temporal_patch_size": 2}, "text_config": _NEMOTRON_H},
    "reformer": {  # axial positions: shape product = positions, dims sum = hidden size
        "is_decoder": True,
        "attn_layers": ["local", "lsh"],
        "axial_pos_shape": [16, 16],
        "axial_pos_embds_dim": [32, 32],
        "local_attn_chunk_length": 16,
        "lsh_attn_chunk_length": 16,
    },
    "t5gemma2": {  # its encoder nests text and vision configs one level deeper than the shrinking reaches
        "encoder": {
            "text_config": {
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "head_dim": 16,
                "vocab_size": 512,
            },
            "vision_config": {
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
            },
        },
        "decoder": {"head_dim": 16},
    },
    # as from_encoder_decoder_pretrained builds it: a text decoder that cross-attends to the image encoder
    "vision-encoder-decoder": {"decoder": {"is_decoder": True, "add_cross_attention": True}},
    "ernie4_5_vl_moe": {"text_config": {"moe_intermediate_size": [128, 64], "moe_k": 2}},  # per-modality experts
    "florence2": {"vision_config": _DAVIT},
    "xlm": {"emb_dim": 64},
    "xmod": {"default_language": "en_XX"},  # its adapters need a language (users call set_default_language)
    "zamba": {"num_hidden_layers": 3, "layers_block_type": ["mamba", "hybrid", "hybrid"]},
    "zamba2": {"layer_types": ["mamba", "hybrid"], "hybrid_layer_ids": [1]},
    "zaya": {"num_experts_per_tok": 1},
}
MAX_PARAMS = 40_000_000  # a shrunk model larger than this is a shrinking failure, not a model to run


@dataclass
class Outcome:
    arch: str
    status: str  # works | partial (float weights outside the keep-list) | refused | fails | no-tiny-model
    step: str = ""  # where it stopped: config, build, quantize, forward, save, reload, compare
    message: str = ""
    float_weights: list[str] = field(default_factory=list)  # float by design beyond embeddings/norms/routers
    quantized: int = 0
    params: int = 0


# Any other width field a config class invents (``first_dense_intermediate_size``, ``shared_expert_dim``, ...).
_OTHER_WIDTH = re.compile(r"(intermediate|ffn|hidden|inner|mlp|expert).*(size|dim)$|^dim_(ff|model)$")
MAX_IN_FEATURES = 4096  # a block Linear wider than this after shrinking: the solver's H would not be tiny


def _shrink(defaults: dict[str, Any], profile: dict[str, Any]) -> dict[str, Any]:
    sizes = {**TINY, **profile}
    out = {k: v for k, v in sizes.items() if k in defaults and not isinstance(defaults[k], (dict, list))}
    for k, v in defaults.items():
        if k not in out and _OTHER_WIDTH.search(k) and isinstance(v, int) and not isinstance(v, bool) and v > 256:
            out[k] = 128
    return out


def _shrink_sub(sub: dict[str, Any], profile: dict[str, Any]) -> dict[str, Any]:
    """A sub-config's sizes (and which class), and those of the configs nested in it (PI0's VLM holds a vision and a
    text config, DeepSeek-OCR-2's vision config a SAM and an encoder config: each names its ``model_type``)."""
    out = {**{k: sub[k] for k in ("model_type",) if k in sub}, **_shrink(sub, profile)}
    for k, v in sub.items():
        if isinstance(v, dict) and "model_type" in v:
            out[k] = _shrink_sub(v, profile)
    return out


def tiny_config(arch: str, profile: dict[str, Any] | None = None):
    """The config of ``arch`` with every declared size field made tiny (sub-configs too)."""
    from transformers import CONFIG_MAPPING

    cls = getattr(model_class(arch), "config_class", None) or CONFIG_MAPPING[arch]  # MusicGen's decoder config
    try:
        defaults = cls().to_dict()
    except Exception:  # defaults that do not validate alone (an assistant's fields): the family's fields fix them
        defaults = cls(**FAMILY.get(arch, {})).to_dict()
    kwargs = _shrink(defaults, profile or {})
    for key in getattr(cls, "sub_configs", {}) or {}:
        sub = defaults.get(key)
        if isinstance(sub, dict):  # only the sizes (and which class): derived fields then follow them
            kwargs[key] = _shrink_sub(sub, profile or {})
    for key, value in FAMILY.get(arch, {}).items():  # a family's own fields, set as they are
        kwargs[key] = {**kwargs.get(key, {}), **value} if isinstance(value, dict) else value
    return cls(**kwargs)


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _deadline(seconds: int):
    def stop(*_):
        raise _Timeout(f"took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The model's output on text: through the module calibration text goes to (its language model where the
    model's own forward needs an image, :func:`hf_babai.engine.text_entry`)."""
    from hf_babai.engine import find_blocks, text_entry

    entry = text_entry(model, find_blocks(model)[0], ids)
    with torch.no_grad():
        out = entry(input_ids=ids, use_cache=False)
    return (out.logits if hasattr(out, "logits") else out[0]).float()


def _refused(exc: BaseException) -> bool:
    """Raised by hf_babai itself (a refusal with its reason), not by the model or the harness."""
    frames = traceback.extract_tb(exc.__traceback__)
    return isinstance(exc, (ValueError, NotImplementedError)) and bool(frames) and "/hf_babai/" in frames[-1].filename


def float_leftovers(model) -> list[str]:
    """≥2-D float weights of the language model that are not embeddings, the LM head, norms or MoE routers (the
    engine's own classification, :func:`hf_babai.engine.weight_kinds`): what a ``partial`` outcome leaves float by
    design (convolutions, state-space parameters, embedding-stage projections, hyper-connections). The vision tower
    of a vision-language model is outside the language model and not listed."""
    from hf_babai.engine import weight_kinds

    by_design = {"quantized", "embedding", "lm_head", "norm", "vector", "router", "outside the language model"}
    return [f"{w.name} ({w.kind})" for w in weight_kinds(model, ("lm_head",)) if w.kind not in by_design]


def architectures() -> dict[str, str]:
    """Every architecture of the causal-LM and image-text-to-text mappings, with the Auto class that builds it."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    out = dict.fromkeys(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, "AutoModelForImageTextToText")
    out.update(dict.fromkeys(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "AutoModelForCausalLM"))
    return dict(sorted(out.items()))


def model_class(arch: str):
    """The model class the mappings name for ``arch`` (its config class may differ from ``CONFIG_MAPPING``'s: the
    causal-LM MusicGen is the decoder alone, with the decoder's config)."""
    import transformers
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    names = {**MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, **MODEL_FOR_CAUSAL_LM_MAPPING_NAMES}
    return getattr(transformers, names[arch], None)


def _tiny_model(arch: str, profile: dict[str, Any], ids: torch.Tensor):
    """A tiny float model of ``arch`` that runs a forward, or an exception saying why not."""
    import transformers

    cfg = tiny_config(arch, profile)
    auto = getattr(transformers, architectures()[arch])
    if type(cfg) not in auto._model_mapping:  # a config the Auto class does not map (Evolla's): the named class
        auto = model_class(arch)
    build = getattr(auto, "from_config", None) or auto._from_config  # an Auto class, or a model class
    with torch.device("meta"):  # sized before any memory is spent on it
        model = build(cfg, dtype=torch.float32)
    params = sum(p.numel() for p in model.parameters())
    from hf_babai.engine import find_blocks

    try:  # the solver's Hessians are those of the decoder blocks' Linears (a float vision tower may be wider)
        blocks = find_blocks(model)[1]
    except ValueError:
        blocks = model
    widest = max((m.in_features for m in blocks.modules() if isinstance(m, torch.nn.Linear)), default=0)
    if params > MAX_PARAMS or widest > MAX_IN_FEATURES:
        raise ValueError(f"{params} parameters, Linears up to {widest} inputs after shrinking")
    torch.manual_seed(0)
    model = build(cfg, dtype=torch.float32).eval()  # as from_pretrained returns it
    try:
        _logits(model, ids[:2, :16])
    except Exception as exc:
        if not _refused(exc):
            raise
        raise _RefusedText(model) from exc  # it builds; hf_babai refuses its text path by name
    return model


class _RefusedText(Exception):
    """A tiny model that builds but whose forward hf_babai refuses to calibrate from text (it needs images)."""

    def __init__(self, model) -> None:
        super().__init__("refused by hf_babai")
        self.model = model


def _loader(arch: str, model):
    """The Auto class users load ``arch`` with, or the model's own class where the Auto class does not map its
    config (Emu3's and Mllama's text configs): the class that ``save_pretrained``'s key conversion matches."""
    import transformers

    auto = getattr(transformers, architectures()[arch])
    return auto if type(model.config) in auto._model_mapping else type(model)


def round_trip(arch: str, seconds: int = 120) -> Outcome:
    """Quantize on load, save, reload, compare logits; the outcome says where and why it stopped."""
    import hf_babai
    from hf_babai.engine import find_blocks
    from hf_babai.formats import quantized_modules

    out = Outcome(arch, "fails")
    step = "config"
    try:
        with _deadline(seconds), tempfile.TemporaryDirectory() as tmp:
            ids = torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
            model, why, refused = None, "", None
            for profile in PROFILES:  # a shrunk config the model itself cannot run is the harness's failure
                try:
                    model = _tiny_model(arch, profile, ids)
                    break
                except _Timeout:
                    raise
                except _RefusedText as exc:  # another profile may still run (a rotary section written for it)
                    refused = refused or exc.model
                except Exception as exc:
                    why = " ".join(f"{type(exc).__name__}: {exc}".split())[:400]  # a validator's cause: line 2
            model = model or refused  # none runs on text, one builds: the quantize step records hf_babai's refusal
            if model is None:
                return Outcome(arch, "no-tiny-model", "config", why)
            cls = _loader(arch, model)
            out.params = sum(p.numel() for p in model.parameters())
            step = "blocks"
            find_blocks(model)
            try:  # the float model's own save failing is the harness's problem, not a quantization outcome
                model.save_pretrained(f"{tmp}/float")
            except Exception as exc:
                return Outcome(arch, "no-tiny-model", "float save", f"{type(exc).__name__}: {exc}"[:400])
            del model
            step = "quantize"
            qcfg = hf_babai.BabaiConfig(bits=4, group_size=16, dataset=ids, run_dir=f"{tmp}/run")
            model = cls.from_pretrained(f"{tmp}/float", quantization_config=qcfg, dtype=torch.float32)
            out.quantized = sum(1 for _ in quantized_modules(model))
            out.float_weights = float_leftovers(model)
            step = "forward"
            x = ids[:2, :16]
            ref = _logits(model, x)
            step = "save"
            model.save_pretrained(f"{tmp}/q")
            step = "streamed save"  # the same files, block tensors copied from the run folder
            hf_babai.save_streamed(model, f"{tmp}/qs")
            differ = [f.name for f in Path(f"{tmp}/q").iterdir() if not filecmp.cmp(f, f"{tmp}/qs/{f.name}", False)]
            if differ or len(list(Path(f"{tmp}/qs").iterdir())) != len(list(Path(f"{tmp}/q").iterdir())):
                out.message = f"the streamed save differs from save_pretrained's: {differ or 'other files'}"
                out.step = step
                return out
            step = "reload"
            again = cls.from_pretrained(f"{tmp}/q")
            step = "compare"
            got = _logits(again, x)
            if not torch.equal(got, ref):
                out.message = f"reloaded logits differ (max {float((got - ref).abs().max()):.3g})"
                out.step = step
                return out
            out.status = "partial" if out.float_weights else "works"
    except Exception as exc:
        out.step = step
        out.message = f"{type(exc).__name__}: {exc}".splitlines()[0][:400]
        refused = isinstance(exc, (ValueError, NotImplementedError)) and "/hf_babai/" in traceback.format_exc()
        if step in ("blocks", "quantize") and refused:
            out.status = "refused"
    finally:
        gc.collect()
    return out


EXPECTED = Path(__file__).with_name("architectures_expected.json")
TABLE = Path(__file__).parents[1] / "docs" / "architectures.md"
STATUS_TEXT = {
    "works": "works",
    "partial": "works, some weights float",
    "refused": "refused",
    "fails": "fails (known)",
    "no-tiny-model": "not tested",
}


def summary(outcome: Outcome) -> dict[str, Any]:
    """What the expectations record of an outcome: status, step, and the float weights as per-block patterns."""
    floats = sorted({re.sub(r"\.\d+\.", ".N.", w) for w in outcome.float_weights})
    return {"status": outcome.status, "step": outcome.step, "float": floats, "message": outcome.message}


def write_table(expected: dict[str, dict[str, Any]], path: Path = TABLE) -> None:
    """docs/architectures.md from the recorded outcomes."""
    counts = {s: sum(1 for e in expected.values() if e["status"] == s) for s in STATUS_TEXT}
    lines = [
        "# Architectures",
        "",
        "Every architecture of the installed transformers' causal-LM and image-text-to-text mappings, as a tiny random",
        "model (its config class with every size field shrunk, plus the few fields a family derives from its full",
        "size, `FAMILY` in `integration_tests/architectures.py`), through quantize on load → `save_pretrained` (and",
        "the streamed save, which must write the same files) → plain `from_pretrained` → identical logits.",
        "Generated by `python -m integration_tests.architectures --write` (the test",
        "`integration_tests/test_architectures.py` checks every row; `-m arch_matrix` runs them all).",
        "",
        f"Of {len(expected)} architectures: **{counts['works']} work**; {counts['partial']} work with some weights "
        f"left float (listed); refused with a message: {counts['refused']}; failing (known, listed): "
        f"{counts['fails']}; not tested: {counts['no-tiny-model']}, where no tiny model could be built from the "
        "config class (the reason is given: a validator, a required image input, a size the shrinking "
        "cannot reach).",
        "",
        "What stays float by design: embeddings, the LM head, norms, MoE routers (`gate`/`router`), vision towers and",
        "projectors of vision-language models (only the language model is quantized), convolutions and state-space",
        "parameters (`A_log`, `conv1d`): a `partial` row lists them. Fused 3-D MoE experts are quantized one Linear",
        "per expert matrix ([Mixture of experts](moe.md)). A weight of any other kind is refused before quantizing,",
        "by name (`hf_babai/engine/coverage.py`): those rows say `refused` and name it.",
        "",
        "How the rules behind the table work (`hf_babai/engine/blocks.py`): the blocks are the largest list of",
        "identical modules holding Linear layers inside the model's language model (`get_decoder()`); GPT-2-style",
        "`Conv1D` layers count as Linears with their weight transposed; an `nn.Linear` subclass with a forward of",
        "its own (a top-k router) stays float; arguments the model passes to its blocks positionally are kept by",
        "name, and a model that mixes layer kinds (`config.layer_types`) has each block replayed with its own",
        "arguments. Reload maps checkpoint keys with transformers' own conversion mapping.",
        "",
        "Vision-language models are calibrated with text alone: the ids run through the model's forward, which",
        "sends them to the language model; where that forward insists on an image (BLIP-2, InstructBLIP, Kosmos-2),",
        "the ids go to the language model itself (`hf_babai.engine.text_entry`, logged). A decoder that",
        "cross-attends to the image encoder's outputs (BLIP, Pix2Struct, UDOP, VisionEncoderDecoder) would leave",
        "its cross-attention uncalibrated on text and is refused by name, as is a model no part of which runs on",
        'token ids alone (IDEFICS, Gemma-4\'s draft models). `method="rtn"` needs no calibration: BLIP and',
        "Pix2Struct quantize and reload that way.",
        "",
        'The vision tower and projector stay float by default; `vision_tower="rtn"` rounds every Linear outside',
        "the language model to nearest in the same format and grid (scale search `mse`), and the checkpoint reloads",
        "with them quantized (tested on Qwen2-VL, Gemma-3 and BLIP-2: every module's tensors and outputs equal",
        "after reload). They are rounded, not solved, because calibration text never reaches them. How image-text",
        "calibration would be added: the calibration batches carry `pixel_values` (and the image token ids the",
        "processor writes), so the model's own forward runs the tower and the image tokens reach the language model",
        "through the projector; the tower's encoder layers are then a second block list, quantized by the same",
        "schedules with block-0 inputs captured from those forwards, before the language model's blocks (whose",
        "calibration then sees the quantized tower's image tokens).",
        "",
        "| architecture | status | float by design (kind) / reason |",
        "|---|---|---|",
    ]
    for arch, e in expected.items():
        detail = ", ".join(f"`{f}`" for f in e["float"]) if e["status"] in ("works", "partial") else e["message"]
        detail = detail.replace("|", "\\|")
        lines.append(f"| {arch} | {STATUS_TEXT[e['status']]} | {detail} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str]) -> None:
    write = "--write" in argv
    archs = [a for a in argv if not a.startswith("--")] or list(architectures())
    results = {}
    for arch in archs:
        outcome = round_trip(arch)
        results[arch] = summary(outcome)
        print(json.dumps(asdict(outcome)), flush=True)
    if write:
        expected = json.loads(EXPECTED.read_text()) if EXPECTED.is_file() else {}
        expected.update(results)
        expected = {a: expected[a] for a in sorted(expected) if a in architectures()}
        EXPECTED.write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
        write_table(expected)


if __name__ == "__main__":
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    main(sys.argv[1:])
