"""compressed-tensors packing, the export writer and the servability report (the real loaders run in
``integration_tests/test_serving_loaders.py``)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hf_babai
from hf_babai import BabaiConfig
from hf_babai.cli import main as cli
from hf_babai.formats.compressed_tensors import ct_tensors, pack_int32, stored_group_size, unpack_int32
from hf_babai.formats.packing import dequantize_packed, pack_weight
from hf_babai.hf.serving import (
    RULES,
    CheckpointFacts,
    default_path_serves,
    describe_checkpoint,
    format_report,
    servability,
)

IDS = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(0))


def _stream(values: list[int], bits: int) -> list[int]:
    """The reference: one LSB-first bit stream, value i at bit i*bits, cut into 32-bit words."""
    total = 0
    for i, v in enumerate(values):
        total |= v << (i * bits)
    words = -(-len(values) * bits // 32)
    return [((total >> (32 * w)) & 0xFFFFFFFF) for w in range(words)]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_pack_int32_is_the_dense_bit_stream(bits):
    vals = torch.randint(0, 2**bits, (3, 77), generator=torch.Generator().manual_seed(bits))
    packed = pack_int32(vals, bits)
    assert packed.dtype == torch.int32 and packed.shape == (3, -(-77 * bits // 32))
    for r in range(3):
        assert [w & 0xFFFFFFFF for w in packed[r].tolist()] == _stream(vals[r].tolist(), bits)
    assert torch.equal(unpack_int32(packed, bits, 77), vals)


def test_three_bit_codes_straddle_words():
    vals = torch.tensor([[7] * 11])  # code 10 starts at bit 30: two bits in word 0, one in word 1
    packed = pack_int32(vals, 3)
    assert packed.shape == (1, 2) and packed[0, 0].item() == -1 and packed[0, 1].item() == 1


@pytest.mark.parametrize(
    ("k", "g", "stored"), [(576, 128, 64), (1536, 128, 128), (100, 128, 100), (1000, 128, 8), (64, -1, -1)]
)
def test_stored_group_size_tiles_partial_groups(k, g, stored):
    assert stored_group_size(k, g) == stored


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize(("bits", "k", "g"), [(4, 576, 128), (3, 200, 64), (2, 96, -1)])
def test_ct_tensors_dequantize_to_the_babai_weight(bits, k, g, sym):
    n = 24
    gen = torch.Generator().manual_seed(k)
    groups = 1 if g == -1 else -(-k // g)
    codes = torch.randint(0, 2**bits, (n, k), generator=gen)
    scales = (torch.rand(n, groups, generator=gen) + 0.1).half().float()
    zeros = None if sym else torch.randint(0, 2**bits, (n, groups), generator=gen)
    buffers = pack_weight(codes, scales, zeros, bits, g)
    t = ct_tensors(buffers, bits, g, k, n, torch.float32)
    stored = stored_group_size(k, g)
    assert t["weight_shape"].tolist() == [n, k] and t["weight_packed"].shape == (n, -(-k * bits // 32))
    q = unpack_int32(t["weight_packed"], bits, k)
    zp = torch.full((n, t["weight_scale"].shape[1]), 2 ** (bits - 1))
    if not sym:
        zp = unpack_int32(t["weight_zero_point"].t(), bits, n).t()
    per_col = (torch.arange(k) // (k if stored == -1 else stored)).long()
    w = t["weight_scale"][:, per_col] * (q - zp[:, per_col]).float()
    assert torch.equal(w, dequantize_packed(buffers, bits, g, k, torch.float32))
    odd = pack_weight(codes, torch.full_like(scales, 1 + 2**-10), zeros, bits, g)  # float16, not bfloat16
    with pytest.raises(ValueError, match=r"not exactly representable in torch\.bfloat16"):
        ct_tensors(odd, bits, g, k, n, torch.bfloat16)


# ---------------------------------------------------------------------------------- the servability report


def _facts(kind, bits, sym=True, groups=(128,), whole=True):
    return CheckpointFacts(kind, bits, sym, frozenset(groups), whole)


def _loads(verdicts, engine):
    return [v.path for v in verdicts if v.engine.startswith(engine) and v.loads]


def test_every_rule_names_its_release_and_source():
    for r in RULES:
        assert any(ch.isdigit() for ch in r.engine) or r.kind == "babai", r
        assert r.source and r.kind in ("compressed-tensors", "gptq", "babai")


def test_report_int4_compressed_tensors_is_served_by_default_kernels():
    v = servability(_facts("compressed-tensors", 4, groups=(128,)))
    assert _loads(v, "vLLM") == ["Machete", "Marlin", "Humming"]
    assert _loads(v, "SGLang")[0] == "Marlin" and default_path_serves(v, "vLLM") and default_path_serves(v, "SGLang")


def test_report_int3_compressed_tensors_is_humming_in_vllm_and_a_flag_in_sglang():
    v = servability(_facts("compressed-tensors", 3, groups=(64,)))
    assert _loads(v, "vLLM") == ["Humming"] and default_path_serves(v, "vLLM")
    assert not default_path_serves(v, "SGLang")
    assert "SGLang 0.5.23: loads it: Humming (--quantization humming)" in format_report(v)


def test_report_gptq_refusals_name_the_reason():
    v3 = servability(_facts("gptq", 3))
    assert not default_path_serves(v3, "vLLM") and _loads(v3, "vLLM") == ["Humming"]
    asym = format_report(servability(_facts("gptq", 4, sym=False, whole=False)))
    line = next(x for x in asym if x.startswith("vLLM"))
    assert "asymmetric" in line and "partial last group" in line and "refuses" in line
    assert any(x.startswith("GPTQModel 7.6.0: refuses") and "asymmetric" in x for x in asym)


def test_report_babai_checkpoint_points_to_export():
    lines = format_report(servability(_facts("babai", 4, whole=False)))
    assert any("vLLM" in x and "hf-babai export" in x for x in lines)
    assert any(x.startswith("transformers") and "import hf_babai" in x for x in lines)


# ---------------------------------------------------------------------------------- the writer and the CLI


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _quantize(tiny, dtype=torch.float32, **kw):
    cfg = BabaiConfig(dataset=IDS, **kw)
    return AutoModelForCausalLM.from_pretrained(tiny, quantization_config=cfg, dtype=dtype)


def test_ct_export_config_and_tensors(tiny, tmp_path):
    model = _quantize(tiny, bits=4, group_size=64, sym=False)  # 96 = 64 + 32: written at group 32
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a servable export warns about nothing
        out = hf_babai.export(model, tmp_path / "ct", dtype=torch.float32)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    w = qc["config_groups"]["group_0"]["weights"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert w["group_size"] == 32 and w["strategy"] == "group" and w["actorder"] is None and not w["symmetric"]
    assert qc["ignore"] == ["lm_head"] and qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
        assert f.get_slice("model.layers.0.mlp.up_proj.weight_scale").get_dtype() == "F32"
    assert "model.layers.0.mlp.up_proj.weight_zero_point" in names and not any("g_idx" in k for k in names)


def test_bf16_model_scales_are_kept_exact(tiny, tmp_path):
    model = _quantize(tiny, torch.bfloat16, bits=4, group_size=32)
    with pytest.warns(UserWarning, match=r"not exactly representable in torch.bfloat16.*--dtype float16"):
        out = hf_babai.export(model, tmp_path / "ct")
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_slice("model.layers.1.self_attn.q_proj.weight_scale").get_dtype() == "F16"
    with pytest.raises(ValueError, match=r"not exactly representable in torch\.bfloat16"):
        hf_babai.export(model, tmp_path / "ct2", scale_dtype=torch.bfloat16)


def test_bfloat16_scales_make_a_bf16_export_exact(tiny, tmp_path):
    model = _quantize(tiny, torch.bfloat16, bits=4, group_size=32, scale_dtype="bfloat16")
    scales = torch.cat([m.scales.flatten() for _, m, _ in hf_babai.formats.quantized_modules(model)])
    assert torch.equal(scales.to(torch.bfloat16).to(scales.dtype), scales)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = hf_babai.export(model, tmp_path / "ct")
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_slice("model.layers.1.self_attn.q_proj.weight_scale").get_dtype() == "BF16"
    with pytest.raises(ValueError, match="scale_dtype applies to format='int' only"):
        BabaiConfig(format="ssqr", outlier_rate=0.01, scale_dtype="bfloat16")


def test_unservable_gptq_export_warns_and_names_the_alternative(tiny, tmp_path):
    model = _quantize(tiny, bits=2, group_size=32)  # (3-bit GPTQ v1 needs out_features·3 to be a multiple of 32)
    with pytest.warns(UserWarning, match=r"no serving engine loads this gptq.*Export to compressed-tensors"):
        hf_babai.export(model, tmp_path / "gptq", "gptq")


def test_cli_export_and_info_print_the_report(tiny, tmp_path, capsys):
    model = _quantize(tiny, bits=4, group_size=32)
    model.save_pretrained(tmp_path / "q")
    assert cli(["export", str(tmp_path / "q"), str(tmp_path / "ct")]) == 0
    out = capsys.readouterr().out
    assert "compressed-tensors" in out and "vLLM 0.34.0: loads it: Marlin, Humming" in out  # group 32: no Machete
    assert cli(["export", str(tmp_path / "q"), str(tmp_path / "ct")]) == 1  # not empty: refused
    assert "--overwrite" in capsys.readouterr().err
    assert cli(["info", str(tmp_path / "ct")]) == 0
    info = capsys.readouterr().out
    assert "quantized_layers: 14" in info and "4-bit, group [32]" in info and "SGLang 0.5.23: loads it" in info
    assert cli(["info", str(tmp_path / "q")]) == 0
    assert "hf-babai export" in capsys.readouterr().out
    (tmp_path / "cfg_only").mkdir()
    (tmp_path / "cfg_only" / "config.json").write_text((tmp_path / "ct" / "config.json").read_text())
    assert cli(["info", str(tmp_path / "cfg_only")]) == 1
    assert "no *.safetensors" in capsys.readouterr().err


def test_float32_model_warns_and_exports_in_the_dtype_asked(tiny, tmp_path):
    model = _quantize(tiny, bits=4, group_size=32)
    with pytest.warns(UserWarning, match=r"served in float32.*--dtype bfloat16"):
        hf_babai.export(model, tmp_path / "a")
    with pytest.warns(UserWarning, match="not exactly representable"):  # fp16 scales, bf16 model: as warned above
        out = hf_babai.export(model, tmp_path / "b", dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
        assert f.get_slice("model.layers.0.mlp.down_proj.weight_scale").get_dtype() == "F16"


def test_export_refuses_its_source_folder(tiny, tmp_path):
    model = _quantize(tiny, bits=4, group_size=32)
    model.save_pretrained(tmp_path / "q")
    with pytest.raises(ValueError, match=r"the source folder .* would change the checkpoint it reads"):
        hf_babai.export(tmp_path / "q", tmp_path / "q")


def test_moe_checkpoints_need_the_engines_fused_moe_path():
    """vLLM loads an MoE's experts through its fused-MoE method (2-8 bits, whole groups): an int3 compressed-tensors
    MoE is served, a partial-group one is refused by that path too, and engines without an experts rule here say
    that they were not checked for MoE rather than claiming it loads."""
    moe = CheckpointFacts("compressed-tensors", 3, True, frozenset({128}), True, False, True)
    assert "WNA16 fused MoE" in _loads(servability(moe), "vLLM")
    assert "WNA16 fused MoE" not in _loads(servability(_facts("compressed-tensors", 3)), "vLLM")
    partial = CheckpointFacts("compressed-tensors", 4, True, frozenset({128}), False, False, True)
    refused = [v for v in servability(partial) if v.engine.startswith("vLLM")]
    assert not any(v.loads for v in refused) and any(v.path == "WNA16 fused MoE" for v in refused)
    sglang = next(line for line in format_report(servability(moe)) if line.startswith("SGLang"))
    assert "MoE experts (not checked for this engine)" in sglang
    names = {"model.layers.0.mlp.experts.3.up_proj": 64, "model.layers.0.self_attn.q_proj": 64}
    assert describe_checkpoint({"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True}, names).experts
