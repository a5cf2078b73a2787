"""transformers integration on a tiny random Llama: config, quantize-on-load, offload, checkpoints, export."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hf_babai
from hf_babai import BabaiConfig, CheckpointError
from hf_babai.formats import BabaiLinear

IDS = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
X = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def quantized(tiny, tmp_path_factory) -> tuple[torch.nn.Module, torch.Tensor, Path]:
    cfg = BabaiConfig(bits=4, group_size=32, dataset=IDS)
    model = AutoModelForCausalLM.from_pretrained(tiny, quantization_config=cfg, dtype=torch.float32)
    out = tmp_path_factory.mktemp("q")
    model.save_pretrained(out)
    with torch.no_grad():
        logits = model(X).logits
    return model, logits, out


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("bits", 5, "bits=5"),
        ("bits", True, "bits=True"),
        ("group_size", 0, "group_size=0"),
        ("order", "random", "order='random'"),
        ("method", "gptq", "method='gptq'"),
        ("damp", 1.5, "damp=1.5"),
        ("damp_width", -0.5, "damp_width=-0.5"),
        ("damp_width", "auto", "damp_width='auto'"),
        ("sym", "yes", "sym='yes'"),
        ("nsamples", 0, "nsamples=0"),
        ("dataset", "wikitext2", "dataset='wikitext2'"),
        ("scale_method", "l1", "scale_method='l1'"),
        ("rescale", "yes", "rescale='yes'"),
        ("refine_sweeps", -1, "refine_sweeps=-1"),
        ("true_sequential", 1, "true_sequential=1"),
    ],
)
def test_config_rejects_bad_fields_by_name(field, value, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace(".", r"\.")):
        BabaiConfig(**{field: value})


def test_config_refinement_options_need_a_babai_int_solve():
    with pytest.raises(ValueError, match=r"'hmse'.*method='rtn'"):
        BabaiConfig(method="rtn", scale_method="hmse")
    with pytest.raises(ValueError, match=r"rescale applies to format='int' only; leave it unset for format='hptq'"):
        BabaiConfig(format="hptq", target_bpw=3.125, rescale=True)
    cfg = BabaiConfig(bits=3, scale_method="hmse", rescale=True, refine_sweeps=1)
    spec = cfg.spec()
    assert (spec.scale_method, spec.rescale, spec.refine_sweeps) == ("hmse", True, 1)
    assert BabaiConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    # defaults are resolved into the config (so config.json records them): "auto" for a Babai int solve at ≥ 3 bits
    for kw in ({"bits": 3, "group_size": -1}, {"bits": 3}, {"bits": 4, "group_size": 64}):
        assert (BabaiConfig(**kw).scale_method, BabaiConfig(**kw).rescale) == ("auto", False), kw
        assert BabaiConfig(**kw).spec().scale_method == "auto"
    assert (BabaiConfig(bits=2, group_size=-1).scale_method, BabaiConfig(bits=2, group_size=-1).rescale) == (
        "mse",
        False,
    )
    assert (BabaiConfig(method="rtn").scale_method, BabaiConfig(method="rtn").rescale) == ("mse", False)
    with pytest.raises(ValueError, match=r"'auto'.*method='rtn'"):
        BabaiConfig(method="rtn", scale_method="auto")


def test_config_true_sequential_reaches_the_engine_and_needs_one_batch():
    with pytest.raises(ValueError, match=r"true_sequential=True.*batch_size=8"):
        BabaiConfig(true_sequential=True, batch_size=8)
    assert BabaiConfig(true_sequential=True).spec().true_sequential
    assert BabaiConfig(true_sequential=False).spec().true_sequential is False
    assert BabaiConfig().spec().true_sequential is None  # auto: one pass at >= 3 bits, two at 2 bits (engine)
    assert BabaiConfig(batch_size=8).spec().true_sequential is None  # auto with split batches: two passes


def test_config_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown fields.*'group'"):
        BabaiConfig(group=64)


def test_config_round_trips_and_never_serialises_calibration_objects():
    cfg = BabaiConfig(
        bits=3, group_size=64, sym=False, order="act-order", dataset=["some private text"] * 3, tokenizer=object()
    )
    d = cfg.to_dict()
    assert "dataset" not in d and "tokenizer" not in d and d["quant_method"] == "babai"
    json.dumps(d)  # JSON-safe
    again = BabaiConfig.from_dict(d)
    assert again.to_dict() == d
    from transformers.quantizers.auto import AutoQuantizationConfig

    assert AutoQuantizationConfig.from_dict(d).to_dict() == d


def test_registration_is_idempotent():
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    hf_babai.hf.register()
    hf_babai.hf.register()
    assert AUTO_QUANTIZER_MAPPING["babai"] is hf_babai.BabaiHfQuantizer


def test_quantize_on_load_without_data_fails_clearly(tiny):
    with pytest.raises(ValueError, match="needs calibration data"):
        AutoModelForCausalLM.from_pretrained(tiny, quantization_config=BabaiConfig())


# ---------------------------------------------------------------- quantize, save, reload


def test_quantize_on_load_swaps_block_linears_only(quantized):
    model, _, out = quantized
    names = {n for n, m in model.named_modules() if isinstance(m, BabaiLinear)}
    assert len(names) == 4 * 7 and all(n.startswith("model.layers.") for n in names)
    assert isinstance(model.lm_head, torch.nn.Linear)
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "babai" and saved["calibration"]["nsamples"] == 8
    assert "dataset" not in saved
    assert len(hf_babai.hf.quant_log_records(model)) == 28


def test_reload_gives_identical_logits(quantized):
    _, logits, out = quantized
    again = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(again.model.layers[2].mlp.down_proj, BabaiLinear)
    with torch.no_grad():
        assert torch.equal(again(X).logits, logits)


def test_disk_offloaded_quantize_on_load_equals_in_memory(tiny, quantized, tmp_path):
    _, logits, _ = quantized
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.layers.2": "disk",
        "model.layers.3": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    cfg = BabaiConfig(bits=4, group_size=32, dataset=IDS)
    model = AutoModelForCausalLM.from_pretrained(
        tiny, quantization_config=cfg, dtype=torch.float32, device_map=device_map, offload_folder=tmp_path / "off"
    )
    assert all(t.device.type == "cpu" for t in model.model.layers[3].state_dict().values())
    with torch.no_grad():
        assert torch.equal(model(X).logits, logits)


def test_dequantize_gives_dense_model_with_same_outputs(quantized):
    _, logits, out = quantized
    model = AutoModelForCausalLM.from_pretrained(out)
    ref = model.model.layers[1].self_attn.o_proj.dequantize(torch.float32)
    dense = model.dequantize()
    assert not any(isinstance(m, BabaiLinear) for m in dense.modules())
    assert torch.equal(dense.model.layers[1].self_attn.o_proj.weight, ref)
    with torch.no_grad():
        assert torch.allclose(dense(X).logits, logits, atol=1e-5)


# ---------------------------------------------------------------- corrupt checkpoints


def _edit(src: Path, dst: Path, fn) -> Path:
    shutil.copytree(src, dst)
    fn(dst)
    return dst


def _edit_tensors(fn):
    def apply(d: Path) -> None:
        sd = load_file(d / "model.safetensors")
        fn(sd)
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})

    return apply


@pytest.mark.parametrize(
    ("case", "edit", "needle"),
    [
        (
            "missing",
            _edit_tensors(lambda sd: sd.pop("model.layers.1.mlp.down_proj.scales")),
            "down_proj.scales is missing",
        ),
        ("dense", _edit_tensors(lambda sd: sd.pop("model.norm.weight")), "model.norm.weight is missing"),
        (
            "shape",
            _edit_tensors(
                lambda sd: sd.update({"model.layers.0.self_attn.q_proj.qweight": torch.zeros(7, 64, dtype=torch.int32)})
            ),
            r"q_proj.qweight has shape \[7, 64\]",
        ),
        (
            "dtype",
            _edit_tensors(
                lambda sd: sd.update(
                    {"model.layers.0.mlp.up_proj.scales": sd["model.layers.0.mlp.up_proj.scales"].float()}
                )
            ),
            "up_proj.scales has dtype F32",
        ),
        (
            "truncated",
            lambda d: os.truncate(d / "model.safetensors", os.path.getsize(d / "model.safetensors") - 64),
            "truncated",
        ),
    ],
)
def test_corrupt_checkpoint_fails_with_clear_error(quantized, tmp_path, case, edit, needle):
    _, _, out = quantized
    bad = _edit(out, tmp_path / case, edit)
    with pytest.raises(CheckpointError, match=needle):
        AutoModelForCausalLM.from_pretrained(bad)


# ---------------------------------------------------------------- GPTQ export


def _gptq_v1_dequant(path: Path, prefix: str, bits: int) -> np.ndarray:
    """Independent reader written from the GPTQ v1 description: per column, qweight is a little-endian bit
    stream of ``bits``-bit codes along the input dimension; qzeros the same along outputs, storing zero − 1."""
    with safe_open(path, "np") as f:
        qweight, qzeros = f.get_tensor(prefix + ".qweight"), f.get_tensor(prefix + ".qzeros")
        scales, g_idx = f.get_tensor(prefix + ".scales").astype(np.float32), f.get_tensor(prefix + ".g_idx")

    def stream(words: np.ndarray, count: int) -> np.ndarray:  # words [W, M] → values [count, M]
        u = words.astype(np.int64) & 0xFFFFFFFF
        bitarr = ((u[:, None, :] >> np.arange(32)[None, :, None]) & 1).reshape(-1, words.shape[1])  # [W*32, M]
        bitarr = bitarr[: count * bits].reshape(count, bits, -1)
        return (bitarr * (1 << np.arange(bits))[None, :, None]).sum(1)

    k = g_idx.shape[0]
    codes = stream(qweight, k)  # [K, N]
    zeros = stream(qzeros.T, scales.shape[1]).T + 1  # [G, N]
    return (scales[g_idx] * (codes - zeros[g_idx])).T  # [N, K]


@pytest.mark.parametrize(("bits", "sym"), [(4, True), (3, True), (2, False), (8, True)])
def test_gptq_export_matches_babai_weights(tiny, tmp_path, bits, sym):
    cfg = BabaiConfig(bits=bits, group_size=32, sym=sym, dataset=IDS)
    model = AutoModelForCausalLM.from_pretrained(tiny, quantization_config=cfg, dtype=torch.float32)
    out = hf_babai.export(model, tmp_path / "gptq", "gptq")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == bits and qc["checkpoint_format"] == "gptq"
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.3.mlp.down_proj"):
        mod = model.get_submodule(name)
        got = _gptq_v1_dequant(out / "model.safetensors", name, bits)
        np.testing.assert_array_equal(got, mod.dequantize(torch.float32).numpy())
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys  # tied


def test_gptq_export_refuses_zero_point_zero(tiny, tmp_path):
    from hf_babai.formats.gptq import gptq_tensors
    from hf_babai.formats.packing import pack_weight

    codes = torch.randint(0, 16, (32, 64))
    zeros = torch.full((32, 2), 3)
    zeros[0, 0] = 0
    buffers = pack_weight(codes, torch.ones(32, 2), zeros, 4, 32)
    with pytest.raises(ValueError, match="zero point 0"):
        gptq_tensors(buffers, 4, 32, False, 64, 32)


# ---------------------------------------------------------------- HPTQ (entropy-coded) checkpoints


@pytest.fixture(scope="module")
def hptq(tiny, tmp_path_factory) -> tuple[torch.nn.Module, torch.Tensor, Path]:
    cfg = BabaiConfig(format="hptq", target_bpw=3.125, dataset=IDS)
    model = AutoModelForCausalLM.from_pretrained(tiny, quantization_config=cfg, dtype=torch.float32)
    out = tmp_path_factory.mktemp("hptq")
    model.save_pretrained(out)
    with torch.no_grad():
        logits = model(X).logits
    return model, logits, out


def test_hptq_quantize_save_reload_is_identical(hptq):
    from hf_babai.engine import model_bits_per_weight
    from hf_babai.formats import HuffmanLinear

    model, logits, out = hptq
    assert sum(isinstance(m, HuffmanLinear) for m in model.modules()) == 28
    assert model_bits_per_weight(model) <= 3.125
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert saved["format"] == "hptq" and len(saved["layers"]) == 28
    again = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(again.model.layers[3].mlp.down_proj, HuffmanLinear)
    with torch.no_grad():
        assert torch.equal(again(X).logits, logits)
    dense = again.dequantize()
    assert not any(isinstance(m, HuffmanLinear) for m in dense.modules())
    with torch.no_grad():
        assert torch.allclose(dense(X).logits, logits, atol=1e-5)


def test_hptq_checkpoint_problems_are_named(hptq, tmp_path):
    _, _, out = hptq

    def drop_sizes(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        del cfg["quantization_config"]["layers"]["model.layers.2.mlp.up_proj"]
        (d / "config.json").write_text(json.dumps(cfg))

    with pytest.raises(CheckpointError, match="without buffer sizes"):
        AutoModelForCausalLM.from_pretrained(_edit(out, tmp_path / "sizes", drop_sizes))
    cut = _edit_tensors(
        lambda sd: sd.update({"model.layers.1.mlp.up_proj.stream": sd["model.layers.1.mlp.up_proj.stream"][:-3]})
    )
    with pytest.raises(CheckpointError, match=r"up_proj.stream has shape"):
        AutoModelForCausalLM.from_pretrained(_edit(out, tmp_path / "cut", cut))
    with pytest.raises(ValueError, match="target_bpw"):
        BabaiConfig(format="hptq")


def test_hptq_card_export_and_info(hptq, tmp_path):
    from hf_babai.hf.summary import checkpoint_summary

    _, _, out = hptq
    q = checkpoint_summary(out)
    assert q["storage"] == "hptq" and q["quantized_layers"] == 28 and q["bits_per_weight"] <= 3.125
    card = hf_babai.build_card(out, "me/tiny-hptq")
    assert "3.125-bpw entropy-coded (HPTQ)" in card.text and "hptq" in card.data.tags
    assert card.data.quantization["format"] == "hptq" and "bits" not in card.data.quantization
    with pytest.raises(ValueError, match="cannot be exported"):
        hf_babai.export(out, tmp_path / "gptq")


def test_weight_conversion_hook_takes_both_transformers_signatures(quantized, monkeypatch):
    """transformers 5.17 (the GPU machine's) calls update_weight_conversions(conversions), later releases
    update_weight_conversions(conversions, model); both must work, and only the latter can filter."""
    from transformers.core_model_loading import Chunk, WeightConverter
    from transformers.quantizers import HfQuantizer

    from hf_babai.hf.quantizer import BabaiHfQuantizer

    model = quantized[0]
    # fused on disk, split on load; its reverse (on save) would concatenate the packed q/k/v codes
    fuse = WeightConverter("query_key_value", ["q_proj", "k_proj", "v_proj"], operations=[Chunk(dim=0)])
    hook = BabaiHfQuantizer(BabaiConfig(bits=4, group_size=32)).update_weight_conversions
    assert hook([fuse], model) == []
    monkeypatch.setattr(HfQuantizer, "update_weight_conversions", lambda self, conversions: conversions)  # 5.17's
    assert hook([fuse]) == [fuse]
