"""Mixture-of-experts models: fused 3-D experts are quantized one Linear per expert matrix, reload exactly, and no
weight is left float without a name."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hf_babai
from hf_babai import BabaiConfig, CheckpointError
from hf_babai.engine import UnfusedExperts, quantize_model, unfuse_experts, weight_kinds
from hf_babai.engine.coverage import QUANTIZED
from hf_babai.engine.experts import is_fused_experts
from hf_babai.formats import quantized_modules
from integration_tests.architectures import PROFILES

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.randint(3, 512, (4, 32), generator=torch.Generator().manual_seed(0))
X = IDS[:2, :16]
# one of each layout: [gate; up] rows (Mixtral, Qwen3-MoE, DeepSeek-V3 with a shared expert and a dense first
# layer), interleaved transposed rows with biases and clamped gating (gpt-oss)
ARCHS = ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"]

# every architecture of the installed transformers whose fused experts were recognised (the arch_matrix run)
RECOGNISED = (
    "afmoe", "aria", "aria_text", "axk1", "axk2", "cohere2_moe", "deepseek_v2", "deepseek_v3", "deepseek_v32",
    "dots1", "dots3_note_text", "ernie4_5_moe", "exaone_moe", "flex_olmo", "glm4_moe", "glm4_moe_lite", "glm4v_moe",
    "glm_moe_dsa", "gpt_oss", "granitemoe", "granitemoe_swa", "granitemoehybrid", "granitemoeshared",
    "hunyuan_v1_moe", "hy_v3", "hy_v4", "hy_v4_vl", "inkling2", "inkling2_loop", "inkling2_loop_text",
    "inkling2_text", "inkling_text", "jamba", "kimi_k25", "kimi_linear", "kolibri1", "laguna",
    "lara_mini", "llama4", "llama4_text", "longcat_flash", "mellum", "mimo_v2_flash", "minicpm5_moe", "minimax",
    "minimax_m2", "minimax_m3_vl", "minimax_m3_vl_text", "mistral4", "mistral_large4", "mixtral", "muse_spark",
    "nemotron_h", "nemotron_h_omni", "olmoe", "param2moe", "phimoe", "qwen2_moe", "qwen3_5_moe", "qwen3_5_moe_text",
    "qwen3_moe", "qwen3_next", "qwen3_omni_moe_thinker", "qwen3_vl_moe", "qwen4_exp", "qwen4_exp_text",
    "sarvam_mla", "sarvam_moe", "solar_open", "zaya",
)  # fmt: skip


def _model(arch: str) -> torch.nn.Module:
    from integration_tests.architectures import _tiny_model

    for profile in PROFILES:  # the first shrunk config the model runs with, as the architecture matrix builds it
        try:
            torch.manual_seed(0)
            return _tiny_model(arch, profile, IDS).eval()
        except Exception as exc:
            why = exc
    raise AssertionError(f"{arch}: no tiny model ({why})")


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X, use_cache=False).logits


def _fused(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if is_fused_experts(m)]


@pytest.mark.parametrize(
    "arch", [*ARCHS, *(pytest.param(a, marks=pytest.mark.arch_matrix) for a in RECOGNISED if a not in ARCHS)]
)
def test_unfused_experts_compute_what_the_fused_module_computes(arch):
    model = _model(arch)
    fused = _fused(model)
    assert fused, f"{arch}: no fused experts module recognised"
    experts = model.get_submodule(fused[0])
    ref = _logits(model)
    assert unfuse_experts(model) == fused
    assert not _fused(model)
    unfused = model.get_submodule(fused[0])
    assert isinstance(unfused, UnfusedExperts) and len(list(unfused.children())) >= experts.num_experts
    torch.testing.assert_close(_logits(model), ref, rtol=1e-5, atol=1e-5)
    # the unfused model changes when an expert's matrix does: the Linears are the ones the forward uses (noise, not
    # a scale: a post-expert norm would cancel a scale)
    with torch.no_grad():
        for e in range(unfused.num_experts):
            w = unfused[e].down_proj.weight
            w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(e)) * w.abs().mean())
    assert not torch.allclose(_logits(model), ref, atol=1e-4)


@pytest.fixture(scope="module", params=ARCHS)
def moe_round_trip(request, tmp_path_factory):
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    _model(arch).save_pretrained(root / "float")
    cfg = BabaiConfig(bits=4, group_size=16, dataset=IDS)
    model = AutoModelForCausalLM.from_pretrained(root / "float", quantization_config=cfg, dtype=torch.float32)
    model.save_pretrained(root / "q")
    return arch, model, root


def test_every_expert_is_quantized_and_reloads_exactly(moe_round_trip):
    arch, model, root = moe_round_trip
    experts = [m for m in model.modules() if isinstance(m, UnfusedExperts)]
    assert experts and not _fused(model)
    for ex in experts:
        for e in range(ex.num_experts):
            for lin in ex[e].children():
                assert lin in {m for _, m, _ in quantized_modules(model)}, f"{arch}: expert {e} {lin} is float"
    leftover = [w for w in weight_kinds(model, ("lm_head",)) if "expert" in w.name and w.kind != QUANTIZED]
    assert not leftover, leftover
    with safe_open(str(root / "q" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert any(".experts.0.up_proj." in k for k in keys), sorted(keys)[:20]
    again = AutoModelForCausalLM.from_pretrained(root / "q")
    assert torch.equal(_logits(again), _logits(model))


def test_a_missing_expert_tensor_is_refused_by_name(moe_round_trip, tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, root = moe_round_trip
    for f in (root / "q").iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(tmp_path / "model.safetensors"))
    gone = next(k for k in sorted(tensors) if ".experts.1.down_proj." in k)
    del tensors[gone]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    leaf = gone.split(".experts.")[1]  # Mixtral's disk name block_sparse_moe is mlp in memory
    with pytest.raises(CheckpointError, match=rf"layers\.\d\.\w+\.experts\.{leaf.replace('.', r'[.]')} is missing"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def _token_log(model, spec_kw, tmp_path) -> dict[str, int]:
    from hf_babai.spec import QuantSpec

    log = tmp_path / "log.csv"
    quantize_model(model, QuantSpec(bits=4, group_size=16, **spec_kw), IDS, log_path=log, progress=False)
    with open(log) as f:
        return {f"{r['block']}.{r['layer']}": int(r["tokens"]) for r in csv.DictReader(f)}


def test_each_expert_hessian_counts_its_own_tokens(tmp_path):
    model = _model("mixtral")
    k, tokens = model.config.num_experts_per_tok, IDS.numel()
    routed = _token_log(model, {}, tmp_path)
    for b in range(model.config.num_hidden_layers):
        per_expert = [routed[f"{b}.mlp.experts.{e}.up_proj"] for e in range(model.config.num_local_experts)]
        assert sum(per_expert) == tokens * k  # every token goes to k experts
        assert routed[f"{b}.self_attn.q_proj"] == tokens
    everyone = _token_log(_model("mixtral"), {"expert_calibration": "all"}, tmp_path)
    assert {v for n, v in everyone.items() if ".experts." in n} == {tokens}


def test_all_token_calibration_keeps_the_routed_output():
    """ "all" changes what the Hessians see, never what the layer computes."""
    model = _model("qwen3_moe")
    unfuse_experts(model)
    ref = _logits(model)
    for m in model.modules():
        if isinstance(m, UnfusedExperts):
            m.calibration = "all"
    torch.testing.assert_close(_logits(model), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("one_pass", [False, True], ids=["two-pass", "one-pass"])
def test_asymmetric_calibration_leaves_routed_experts_unmoved(caplog, one_pass):
    """``asym_alpha`` pairs each Linear's input rows in the float and the quantized forward. A routed expert's rows
    are the tokens its router chose, which differ between the two, so its target stays unmoved and each block logs
    how many; attention and the routers are paired. With ``expert_calibration="all"`` every expert sees every token
    in both forwards, so every target moves."""
    import logging
    import re

    from hf_babai.spec import QuantSpec

    caplog.set_level(logging.INFO, logger="hf_babai.engine.schedules")
    spec = dict(bits=4, group_size=16, asym_alpha=0.25, true_sequential=one_pass)
    records = quantize_model(_model("qwen3_moe"), QuantSpec(**spec), IDS, progress=False)
    found = [re.search(r"block (\d+): asym_alpha leaves the target of (\d+) Linears unmoved.*e\.g\. (\S+)", r.message)
             for r in caplog.records]  # fmt: skip
    found = [m for m in found if m]
    experts = {b: sum(".experts." in r.name for r in records if r.block == b) for b in {r.block for r in records}}
    assert experts and {int(m[1]): int(m[2]) for m in found} == experts
    assert all(".experts." in m[3] for m in found)
    caplog.clear()
    quantize_model(_model("qwen3_moe"), QuantSpec(**spec, expert_calibration="all"), IDS, progress=False)
    assert not [r for r in caplog.records if "asym_alpha leaves" in r.message]


def test_a_subclass_overriding_the_experts_forward_is_not_unfused():
    model = _model("mixtral")
    name = _fused(model)[0]
    experts = model.get_submodule(name)
    cls = type(experts)
    experts.__class__ = type("Rewired", (cls,), {"forward": lambda self, h, i, w: 2 * cls.forward(self, h, i, w)})
    assert name not in _fused(model)


# ------------------------------------------------------------------ never silent


def _llama_with_extra_weight() -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.model.layers[1].mlp.mixer = torch.nn.Parameter(torch.randn(4, 32, 32))  # a weight kind nobody handles
    return model


def test_a_weight_of_unknown_kind_is_refused_before_any_work():
    model = _llama_with_extra_weight()
    from hf_babai.spec import QuantSpec

    with pytest.raises(ValueError, match=r"(?s)model\.layers\.1\.mlp\.mixer \[4, 32, 32\].*modules_to_not_convert"):
        quantize_model(model, QuantSpec(bits=4, group_size=16), IDS, progress=False)
    assert not list(quantized_modules(model))  # refused before anything was quantized


def test_a_listed_weight_stays_float_knowingly():
    model = _llama_with_extra_weight()
    from hf_babai.spec import QuantSpec

    spec = QuantSpec(bits=4, group_size=16, modules_to_not_convert=["layers.1.mlp.mixer"])
    quantize_model(model, spec, IDS, progress=False)
    kinds = {w.name: w.kind for w in weight_kinds(model, spec.skip)}
    assert kinds["model.layers.1.mlp.mixer"] == "modules_to_not_convert"
    assert kinds["model.embed_tokens.weight"] == "embedding"
    assert len(list(quantized_modules(model))) == 14


def test_embedding_stage_position_tables_and_hyper_connections_are_kinds_kept_float():
    """Weights the block-by-block engine cannot calibrate or should not touch get a kind of their own (float,
    listed): a projection of the embeddings outside the blocks, a position table that is not an nn.Embedding, a
    hyper-connection's mixing matrix. The same tensors under other names stay unknown and are refused."""

    class AxialPositionEmbeddings(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weights = nn.ParameterList(
                [nn.Parameter(torch.randn(16, 1, 16)), nn.Parameter(torch.randn(1, 16, 16))]
            )

    class StreamHyperConnection(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fn = nn.Parameter(torch.randn(8, 64))

    model = _llama_with_extra_weight()
    del model.model.layers[1].mlp.mixer
    model.model.embeddings_project = nn.Linear(32, 32)
    model.model.per_layer_model_projection = nn.Linear(32, 64)
    model.model.altup_projections = nn.ModuleList([nn.Linear(32, 32)])  # Gemma-3n's extra residual streams
    model.model.position_table = AxialPositionEmbeddings()
    model.model.layers[0].attn_hc = StreamHyperConnection()
    kinds = {w.name: w.kind for w in weight_kinds(model, ("lm_head",))}
    assert kinds["model.embeddings_project.weight"] == "embedding projection"
    assert kinds["model.per_layer_model_projection.weight"] == "embedding projection"
    assert kinds["model.altup_projections.0.weight"] == "embedding projection"
    assert kinds["model.position_table.weights.0"] == kinds["model.position_table.weights.1"] == "embedding"
    assert kinds["model.layers.0.attn_hc.fn"] == "hyper-connection"

    model.model.project = nn.Linear(32, 32)  # outside the blocks, named like nothing known
    model.model.layers[0].mix = nn.Parameter(torch.randn(8, 64))
    kinds = {w.name: w.kind for w in weight_kinds(model, ("lm_head",))}
    assert kinds["model.project.weight"] == kinds["model.layers.0.mix"] == "unknown"


def test_routers_stay_float_and_are_named_so(moe_round_trip):
    _, model, _ = moe_round_trip
    kinds = {w.name: w.kind for w in weight_kinds(model, ("lm_head",))}
    routers = [n for n, k in kinds.items() if k == "router"]
    assert routers and all(("gate" in n or "router" in n) for n in routers)
    assert not [n for n, k in kinds.items() if k == "unknown"]


@pytest.mark.parametrize("arch", ARCHS)
def test_quantize_router_solves_every_router_and_reloads_exactly(arch, tmp_path):
    """With ``quantize_router`` every router is solved as a Linear (through the child ``linear`` that holds its
    weight), its forward then reads the quantized weight, no router is left float, and the checkpoint reloads
    into the same structure with identical logits."""
    from hf_babai.formats import format_of

    float_model = _model(arch)
    routers = [w.name.rsplit(".", 1)[0] for w in weight_kinds(float_model, ("lm_head",)) if w.kind == "router"]
    assert routers
    float_model.save_pretrained(tmp_path / "float")
    cfg = BabaiConfig(bits=4, group_size=16, dataset=IDS, quantize_router=True)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=cfg, dtype=torch.float32)
    assert not [w.name for w in weight_kinds(model, ("lm_head",)) if w.kind == "router"]
    for name in routers:
        router = model.get_submodule(name)
        fmt = format_of(router.linear)
        assert fmt is not None, f"{name} was not quantized"
        assert torch.equal(router.weight, fmt.dequantize(router.linear, torch.float32))
        assert not torch.equal(router.weight, float_model.get_submodule(name).weight)  # on the grid now
    model.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert torch.equal(_logits(again), _logits(model))
    with pytest.raises(ValueError, match=r"quantized MoE router .*without quantize_router"):
        hf_babai.export(model, tmp_path / "ct", "compressed-tensors", dtype=torch.float32)


def test_a_quantized_router_sees_every_token(tmp_path):
    model = _model("mixtral")
    log = _token_log(model, {"quantize_router": True}, tmp_path)
    for b in range(model.config.num_hidden_layers):
        assert log[f"{b}.mlp.gate.linear"] == IDS.numel()  # the router's input is every token of the block


@pytest.mark.parametrize(
    ("arch", "router"), [("qwen2_moe", "layers.0.mlp.shared_expert_gate"), ("afmoe", "layers.1.mlp.router.gate")]
)
def test_routers_that_are_linears_stay_float_unless_asked(arch, router):
    """Plain ``nn.Linear`` routers (a shared expert's scalar gate, AfMoE's ``router.gate``) are routers too: float
    by default, named so, and quantized only with ``quantize_router``."""
    from hf_babai.formats import format_of
    from hf_babai.spec import QuantSpec

    name = f"model.{router}"
    model = _model(arch)
    quantize_model(model, QuantSpec(bits=4, group_size=16), IDS, progress=False)
    assert type(model.get_submodule(name)) is torch.nn.Linear
    assert {w.name: w.kind for w in weight_kinds(model, ("lm_head",))}[f"{name}.weight"] == "router"
    model = _model(arch)
    quantize_model(model, QuantSpec(bits=4, group_size=16, quantize_router=True), IDS, progress=False)
    assert format_of(model.get_submodule(name)) is not None


def test_only_routers_of_experts_count_as_routers():
    """A gate is a router only beside experts or by a router class: a linear-attention layer's ``forget_gate``
    and a gated MLP's Linears are quantized like any other."""

    from hf_babai.engine import router_linears

    class ForgetGate(nn.Module):  # Kimi-Linear's and Bailing's shape: a "*Gate" holding Linears
        def __init__(self):
            super().__init__()
            self.f_proj = nn.Linear(8, 8)

    class GatingMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    class TopKRouter(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(8, 4)

    moe = nn.Module()
    moe.experts, moe.gate, moe.shared_expert_gate = nn.ModuleList(), nn.Linear(8, 4), nn.Linear(8, 1)
    block = nn.Module()
    block.attn, block.mlp, block.moe, block.router = nn.Module(), GatingMLP(), moe, TopKRouter()
    block.attn.forget_gate, block.attn.gate = ForgetGate(), nn.Linear(8, 8)
    assert router_linears(block) == {"moe.gate", "moe.shared_expert_gate", "router.layer"}


def test_float_share_counts_what_stays_float(moe_round_trip):
    from hf_babai.engine import float_share

    _, model, _ = moe_round_trip
    share = float_share(model, ("lm_head",))
    assert share["embedding"] == model.get_input_embeddings().weight.numel()
    assert "quantized" not in share and "unknown" not in share


def test_bits_per_weight_count_every_weight_of_the_checkpoint(moe_round_trip):
    """``bits_per_weight_all`` is every stored bit over every weight: on an MoE whose experts were left float it
    would be near 32, not the format's 4.x."""
    from hf_babai.hf.summary import checkpoint_summary

    _, _, root = moe_round_trip
    summary = checkpoint_summary(root / "q")
    with safe_open(str(root / "q" / "model.safetensors"), "pt") as f:
        stored_bits = sum(8 * f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())  # noqa: SIM118
    assert summary["bits_per_weight_all"] == pytest.approx(stored_bits / summary["parameters"], rel=1e-3)
    assert summary["bits_per_weight"] < summary["bits_per_weight_all"] < 32
    assert {"embedding", "router"} <= set(summary["float_share"])
    assert summary["float_share"]["router"] < 0.05


def test_moe_export_has_llm_compressors_layout(tmp_path):
    """The compressed-tensors export of an MoE names, shapes and types every tensor as llm-compressor's own
    checkpoint of the same model does (recorded by ``bench/peer_moe_layout.py``): per-expert
    ``experts.E.{gate,up,down}_proj.weight_packed / weight_scale / weight_shape``, routers float."""
    import json

    from transformers import Qwen3MoeConfig

    import hf_babai

    peer = json.loads((ROOT / "bench" / "results" / "llmcompressor_qwen3_moe_layout.json").read_text())
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(Qwen3MoeConfig(**peer["config"])).save_pretrained(tmp_path / "float")
    cfg = BabaiConfig(bits=4, group_size=128, dataset=IDS)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=cfg, dtype=torch.float32)
    hf_babai.export(model, tmp_path / "ct", "compressed-tensors", dtype=torch.float32)
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as f:
        ours = {k: [list(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()] for k in f.keys()}  # noqa: SIM118
    theirs = peer["tensors"]
    assert set(ours) == set(theirs)
    assert {k: v[0] for k, v in ours.items()} == {k: v[0] for k, v in theirs.items()}
    # packed codes and shapes have one type; scales follow the served dtype in both tools (float32 here)
    assert ours == theirs


def test_hessians_held_in_groups_give_the_same_model():
    """Two passes under a Hessian budget: the experts' Hessians are built a group at a time (one more block forward
    per group) and the quantized model is bit-identical to the one built with every Hessian held at once."""
    from hf_babai.engine.schedules import hessian_groups
    from hf_babai.solver import hessian as hessian_mod
    from hf_babai.spec import QuantSpec

    def run(budget: float) -> tuple[dict[str, torch.Tensor], int]:
        model = _model("qwen3_moe")
        live = peak = 0
        init = hessian_mod.HessianAccumulator.__init__

        def counting(self, *a, **kw):
            nonlocal live, peak
            init(self, *a, **kw)
            live += 1
            peak = max(peak, live)

            def gone(*_):
                nonlocal live
                live -= 1

            import weakref

            weakref.finalize(self, gone)

        hessian_mod.HessianAccumulator.__init__ = counting
        try:
            spec = QuantSpec(bits=4, group_size=16, true_sequential=False, hessian_budget_gb=budget)
            quantize_model(model, spec, IDS, progress=False)
        finally:
            hessian_mod.HessianAccumulator.__init__ = init
        state = {k: v for k, v in model.state_dict().items() if ".experts." in k}
        return state, peak

    whole, peak_whole = run(4.0)
    grouped, peak_grouped = run(2e-6)  # below one 64-wide Hessian (2 bins: 64 KiB): every Linear is a group of its own
    assert whole.keys() == grouped.keys() and all(torch.equal(whole[k], grouped[k]) for k in whole)
    assert peak_grouped < peak_whole
    linears = {f"l{i}": torch.nn.Linear(64, 8) for i in range(5)}
    assert hessian_groups(linears, 2 * 16 * 64 * 64 / 2**30) == [["l0", "l1"], ["l2", "l3"], ["l4"]]
    assert hessian_groups(linears, 1e-9) == [[f"l{i}"] for i in range(5)]


def test_disk_offloaded_moe_quantizes_like_in_memory(moe_round_trip, tmp_path):
    """An MoE whose blocks accelerate offloaded to disk: each block is onloaded, its experts unfused and quantized;
    the result equals the in-memory quantization."""
    arch, model, root = moe_round_trip
    if arch != "mixtral":
        pytest.skip("one architecture is enough for the offload path")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk"}
    device_map.update({"model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"})
    cfg = BabaiConfig(bits=4, group_size=16, dataset=IDS)
    offloaded = AutoModelForCausalLM.from_pretrained(
        root / "float", quantization_config=cfg, dtype=torch.float32, device_map=device_map,
        offload_folder=tmp_path / "off",
    )  # fmt: skip
    experts = offloaded.model.layers[1].mlp.experts
    assert isinstance(experts, UnfusedExperts)
    assert all(t.device.type == "cpu" for t in offloaded.model.layers[1].state_dict().values())
    assert torch.equal(_logits(offloaded), _logits(model))


@pytest.mark.parametrize("fmt", [{"format": "ssqr", "outlier_rate": 0.01}, {"format": "hptq", "target_bpw": 3.5}])
def test_no_clip_formats_quantize_experts_and_reload(fmt, tmp_path):
    _model("qwen3_moe").save_pretrained(tmp_path / "float")
    cfg = BabaiConfig(bits=3, group_size=16, dataset=IDS, **fmt) if fmt["format"] == "ssqr" else None
    cfg = cfg or BabaiConfig(dataset=IDS, **fmt)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=cfg, dtype=torch.float32)
    experts = [m for m in model.modules() if isinstance(m, UnfusedExperts)]
    names = {m for _, m, _ in quantized_modules(model)}
    assert experts and all(lin in names for ex in experts for e in range(ex.num_experts) for lin in ex[e].children())
    model.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert torch.equal(_logits(again), _logits(model))


def test_export_writes_the_checkpoint_names_engines_read(moe_round_trip, tmp_path):
    """The export names tensors as the architecture's checkpoints do (what ``save_pretrained`` writes and engines
    read): Mixtral's experts under ``block_sparse_moe`` (vLLM 0.34's Mixtral maps ``.gate_proj.`` to ``.w1.``),
    not transformers' in-memory ``mlp``."""
    import hf_babai

    arch, model, _ = moe_round_trip
    if arch != "mixtral":
        pytest.skip("Mixtral is the MoE whose disk and memory names differ")
    hf_babai.export(model, tmp_path / "ct", "compressed-tensors", dtype=torch.float32)
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.1.block_sparse_moe.experts.3.gate_proj.weight_packed" in keys
    assert not any(".mlp." in k for k in keys)
