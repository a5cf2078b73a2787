"""Layer-by-layer engine on tiny random decoders (no downloads)."""

from __future__ import annotations

import csv
import traceback
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers import LlamaConfig, LlamaForCausalLM

from hf_babai.engine import QuantSpec, find_blocks, quantize_model, uses_one_pass
from hf_babai.formats import BabaiLinear
from hf_babai.solver import layer_damp


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(cfg).eval()


def calib(n: int = 6, t: int = 24) -> torch.Tensor:
    return torch.randint(0, 96, (n, t), generator=torch.Generator().manual_seed(1))


def codes_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.dequantize(torch.float32) for n, m in model.named_modules() if isinstance(m, BabaiLinear)}


def test_finds_blocks_and_quantizes_every_block_linear(tmp_path):
    model = tiny_llama()
    name, blocks = find_blocks(model)
    assert name == "model.layers" and len(blocks) == 2
    ref = model(calib()).logits
    records = quantize_model(
        model, QuantSpec(bits=4, group_size=32), calib(), log_path=tmp_path / "q.csv", progress=False
    )
    assert len(records) == 14
    assert sum(isinstance(m, BabaiLinear) for m in model.modules()) == 14
    assert type(model.lm_head) is nn.Linear
    rows = list(csv.DictReader((tmp_path / "q.csv").read_text().splitlines()))
    assert len(rows) == 14 and {"layer", "loss", "bound", "clipped", "damping", "rank"} <= set(rows[0])
    assert int(rows[0]["tokens"]) == 6 * 24
    out = model(calib()).logits
    assert (out - ref).abs().mean() < 0.1 * ref.abs().mean()


def test_each_layer_is_damped_by_its_width_per_calibration_token():
    wide, fixed = tiny_llama(), tiny_llama()
    spec = QuantSpec(bits=4, group_size=32, true_sequential=False)  # block 0 sees the same float inputs in both
    rw = quantize_model(wide, spec, calib(), progress=False)
    rf = quantize_model(fixed, replace(spec, damp_width=0.0), calib(), progress=False)
    tokens = 6 * 24
    for a, b in zip(rw, rf, strict=True):
        if a.block != 0:
            continue
        assert a.tokens == tokens and a.stats["damping"] > 0
        # λ = fraction · mean diag H; same H, so the ratio of the λs is the ratio of the fractions
        want = layer_damp(a.in_features, tokens) / 0.01
        assert a.stats["damping"] / b.stats["damping"] == pytest.approx(want, rel=1e-9), a.name
    assert {a.in_features for a in rw} == {64, 96}  # both widths were checked (0.148 and 0.222 of mean diag)
    with pytest.raises(ValueError, match="damp_width"):
        QuantSpec(damp_width=-1.0)


def test_hessian_is_batch_size_invariant_in_the_two_pass_schedule():
    a, b = tiny_llama(), tiny_llama()
    spec = QuantSpec(bits=3, group_size=16, true_sequential=False)
    quantize_model(a, spec, calib(), progress=False)
    quantize_model(b, spec, calib(), batch_size=2, progress=False)
    ca, cb = codes_of(a), codes_of(b)
    flips = sum(int((ca[k] != cb[k]).sum()) for k in ca)
    assert flips <= 2  # only float-rounding ties of the summed Hessian may differ


def test_one_pass_feeds_quantized_upstream_outputs_downstream():
    one, two = tiny_llama(), tiny_llama()
    quantize_model(one, QuantSpec(bits=3, group_size=16, true_sequential=True), calib(), progress=False)
    quantize_model(two, QuantSpec(bits=3, group_size=16, true_sequential=False), calib(), progress=False)
    c1, c2 = codes_of(one), codes_of(two)
    # block 0's q/k/v and gate... see the same float input in both schedules
    for k in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"):
        assert torch.equal(c1[k], c2[k])
    # o_proj's Hessian comes from quantized q/k/v outputs in the one-pass schedule only
    assert not torch.equal(c1["model.layers.0.self_attn.o_proj"], c2["model.layers.0.self_attn.o_proj"])


class _TwiceBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(torch.tanh(self.proj(x)))


class _TwiceModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(32, 16)
        self.layers = nn.ModuleList([_TwiceBlock(), _TwiceBlock()])

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        x = self.emb(input_ids)
        for layer in self.layers:
            x = layer(x)
        return x


def test_linear_called_twice_falls_back_to_two_pass():
    torch.manual_seed(0)
    model = _TwiceModel()
    ids = torch.randint(0, 32, (4, 10))
    records = quantize_model(model, QuantSpec(bits=4, group_size=16, true_sequential=True), ids, progress=False)
    assert len(records) == 2 and all(isinstance(b.proj, BabaiLinear) for b in model.layers)
    assert records[0].tokens == 80  # the rows its Hessian saw: 40 calibration tokens, read twice per forward


class _PositionalBlock(nn.Module):
    """A block whose model passes its mask and a second stream positionally (CPM-Ant, XLNet, RecurrentGemma)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, scale: torch.Tensor, *, shift: float = 0.0) -> torch.Tensor:
        return x + self.proj(x) * scale + shift


class _PositionalModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(32, 16)
        self.layers = nn.ModuleList([_PositionalBlock(), _PositionalBlock()])

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        x = self.emb(input_ids)
        scale = torch.linspace(0.5, 1.5, x.shape[1])[None, :, None]
        for layer in self.layers:
            x = layer(x, scale, shift=0.25)
        return x


@pytest.mark.parametrize("true_sequential", [True, False])
def test_arguments_a_model_passes_positionally_reach_the_replayed_block(true_sequential):
    """Blocks are replayed as block(hidden, **kwargs): positional arguments are bound to their names (they used to
    be dropped, and the replay failed with a missing argument), keyword arguments are kept."""
    torch.manual_seed(0)
    model, ids = _PositionalModel(), torch.randint(0, 32, (4, 10))
    spec = QuantSpec(bits=4, group_size=16, true_sequential=true_sequential)
    records = quantize_model(model, spec, ids, progress=False)
    assert len(records) == 2 and all(isinstance(b.proj, BabaiLinear) for b in model.layers)
    assert all(r.tokens == 40 for r in records)


@pytest.mark.parametrize(
    ("spec", "batch_size", "one_pass"),
    [
        (QuantSpec(bits=3, group_size=16), None, True),  # auto: one pass at >= 3 bits ...
        (QuantSpec(bits=4, group_size=16), 6, True),  # ... when one forward holds every sample
        (QuantSpec(bits=3, group_size=16), 2, False),  # ... else two
        (QuantSpec(bits=2, group_size=16), None, False),  # auto: two passes at 2 bits
        (QuantSpec(bits=3, group_size=16, format="ssqr", outlier_rate=0.01), None, False),  # and for no-clipping
        (QuantSpec(bits=2, group_size=16, true_sequential=True), None, True),  # explicit choices win
        (QuantSpec(bits=4, group_size=16, true_sequential=False), None, False),
    ],
)
def test_auto_schedule_runs_what_uses_one_pass_says(spec, batch_size, one_pass):
    assert uses_one_pass(spec, 6, batch_size) is one_pass
    auto = tiny_llama()
    quantize_model(auto, spec, calib(), batch_size=batch_size, progress=False)
    explicit = tiny_llama()
    quantize_model(explicit, replace(spec, true_sequential=one_pass), calib(), batch_size=batch_size, progress=False)
    other = tiny_llama()
    quantize_model(other, replace(spec, true_sequential=not one_pass), calib(), progress=False)
    name = "model.layers.0.self_attn.o_proj"  # the first sub-layer whose Hessian differs between the schedules
    assert torch.equal(codes_of(auto)[name], codes_of(explicit)[name])
    assert not torch.equal(codes_of(auto)[name], codes_of(other)[name])


def test_true_sequential_refuses_split_calibration():
    with pytest.raises(ValueError, match=r"true_sequential=True .* batch_size=2"):
        quantize_model(tiny_llama(), QuantSpec(bits=4, true_sequential=True), calib(), batch_size=2, progress=False)


def test_rtn_needs_no_data_and_babai_does():
    model = tiny_llama()
    quantize_model(model, QuantSpec(bits=4, method="rtn", group_size=32), progress=False)
    assert sum(isinstance(m, BabaiLinear) for m in model.modules()) == 14
    with pytest.raises(ValueError, match="calibration"):
        quantize_model(tiny_llama(), QuantSpec(bits=4), None, progress=False)
    with pytest.raises(ValueError, match="order"):
        QuantSpec(order="random")
    with pytest.raises(ValueError, match="no decoder block"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))


def test_padded_positions_are_left_out_of_the_hessians():
    ids = calib()
    mask = torch.ones_like(ids)
    mask[:, 20:] = 0  # right padding
    padded, trimmed = tiny_llama(), tiny_llama()
    rec = quantize_model(padded, QuantSpec(bits=4, group_size=32), ids, attention_mask=mask, progress=False)
    quantize_model(trimmed, QuantSpec(bits=4, group_size=32), ids[:, :20], progress=False)
    assert rec[0].tokens == 6 * 20
    # causal attention: the first 20 positions are unaffected by the padding, so the Hessians agree
    c1, c2 = codes_of(padded), codes_of(trimmed)
    assert sum(int((c1[k] != c2[k]).sum()) for k in c1) <= 2


def test_memory_of_a_block_is_freed_as_soon_as_it_is_done(monkeypatch):
    """What a wide layer's quantization holds is bounded: in the one-pass schedule each Hessian and its factor
    are freed once the next input arrives, each Linear runs on its dense quantized copy only during its own
    call, and nothing a block's solve built survives into the next block (that leak held a whole block's
    Hessians, ~0.5 GB on Qwen2.5-0.5B, through the next block's solve)."""
    import gc
    import weakref

    import hf_babai.engine as engine
    import hf_babai.engine.schedules as schedules

    alive: list[tuple[str, int, int]] = []
    hessians: list[weakref.ref] = []
    float_ptrs: dict[nn.Linear, int] = {}
    init, solve = engine.BlockHessians.__init__, schedules.solve_layer

    def track(self, spec):
        init(self, spec)
        hessians.append(weakref.ref(self))

    def spy(name, lin, block_hessians):
        res = solve(name, lin, block_hessians)
        dense = [other for other, ptr in float_ptrs.items() if other is not lin and other.weight.data_ptr() != ptr]
        assert not dense, f"{len(dense)} Linears still hold their dense quantized copy while another is solved"
        h = hessians[-1]()
        assert h is block_hessians
        alive.append((name.rsplit(".", 1)[-1], len(h.factors), len({id(a) for a in h.acc.values()})))
        return res

    onload = engine.onload_block

    def check_onload(block):
        gc.collect()  # cycles aside, the previous block's Hessians and factors must be unreachable here
        assert all(h() is None for h in hessians), "a finished block's Hessians and factors are still referenced"
        onload(block)
        float_ptrs.clear()
        float_ptrs.update({m: m.weight.data_ptr() for m in block.modules() if isinstance(m, nn.Linear)})

    monkeypatch.setattr(engine.BlockHessians, "__init__", track)
    monkeypatch.setattr(schedules, "solve_layer", spy)
    monkeypatch.setattr(engine, "onload_block", check_onload)
    model = tiny_llama()
    quantize_model(model, QuantSpec(bits=4, group_size=16, true_sequential=True), calib(), progress=False)
    block0 = dict((n, (f, a)) for n, f, a in alive[:7])
    assert block0["q_proj"] == (1, 1) and block0["v_proj"] == (1, 1)  # q/k/v share one Hessian
    assert block0["o_proj"] == (1, 1) and block0["up_proj"] == (1, 1) and block0["down_proj"] == (1, 1)
    for lin in (m for m in model.modules() if isinstance(m, nn.Linear) and not isinstance(m, BabaiLinear)):
        assert lin.out_features == 96  # only lm_head stays a float Linear


# Tensor factories that place their result on the default device unless told otherwise.
_FACTORIES = {"zeros", "ones", "empty", "full", "arange", "tensor", "eye", "randn", "rand", "randint", "linspace"}
# Deliberately on the CPU: the Huffman code table is built there and moved (formats/huffman.py::decode_table).
_CPU_BY_DESIGN = {("huffman.py", "decode_table")}


class _DevicelessFactories(TorchFunctionMode):
    """Records hf_babai code that creates a non-scalar tensor without naming a device: on a CUDA model such a
    tensor lands on the CPU and the next op mixing it with the layer's tensors fails (or copies silently)."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if getattr(func, "__name__", "") in _FACTORIES and "device" not in kwargs and out.dim() > 0:
            frame = next(f for f in reversed(traceback.extract_stack()[:-1]) if "/hf_babai/" in f.filename or
                         "site-packages" in f.filename or "/tests/" in f.filename)  # fmt: skip
            name = Path(frame.filename).name
            if "/hf_babai/" in frame.filename and (name, frame.name) not in _CPU_BY_DESIGN:
                self.sites.add(f"{name}:{frame.lineno} {frame.line}")
        return out


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=4, group_size=32),
        QuantSpec(bits=3, group_size=32, sym=False, scale_method="hmse"),
        QuantSpec(bits=2, group_size=32, true_sequential=False),
        QuantSpec(bits=3, group_size=32, beams=4),
        QuantSpec(bits=4, group_size=32, refine_sweeps=1, rescale=True),
        QuantSpec(format="ssqr", bits=3, group_size=32, outlier_rate=0.01),
        QuantSpec(format="hptq", target_bpw=3.125),
        QuantSpec(method="rtn", bits=4, group_size=32),
    ],
    ids=["int4", "int3-asym-hmse", "int2-two-pass", "kbest", "refine", "ssqr", "hptq", "rtn"],
)
def test_quantizing_creates_every_tensor_on_the_layers_device(spec):
    """The engine, solver and formats never run on a GPU in CI; what would break there first is a tensor made on
    the default (CPU) device next to the layer's CUDA tensors. Every factory call must name its device."""
    model = tiny_llama()
    scan = _DevicelessFactories()
    with scan:
        quantize_model(model, spec, None if spec.method == "rtn" else calib(), progress=False)
        model(calib(1))
    assert not scan.sites, "tensors created without a device:\n" + "\n".join(sorted(scan.sites))


def test_linear_subclasses_with_their_own_forward_stay_float():
    """A router that subclasses nn.Linear but returns top-k scores (Llama 4, PhiMoE) is not a Linear to replace:
    it stays float; plain Linears and subclasses known to compute x @ Wᵀ + b (Falcon's) are quantized."""
    from transformers.models.falcon.modeling_falcon import FalconLinear
    from transformers.models.llama4.configuration_llama4 import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4Router

    from hf_babai.engine import target_linears

    cfg = Llama4TextConfig(hidden_size=16, num_local_experts=4, num_experts_per_tok=2)
    block = nn.ModuleDict({"router": Llama4Router(cfg), "proj": nn.Linear(16, 16), "falcon": FalconLinear(16, 16)})
    assert sorted(target_linears(block, ())) == ["falcon", "proj"]


def test_conv1d_blocks_are_quantized_as_transposed_linears(tmp_path):
    """GPT-2's Conv1D (x @ W + b, W stored [in, out]) is quantized as the Linear with Wᵀ; the checkpoint reloads
    into GPT2LMHeadModel with identical logits."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from hf_babai import BabaiConfig
    from hf_babai.engine import linearize_conv1d

    cfg = GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).eval()
    block = model.transformer.h[0]
    x = torch.randn(2, 5, 64)
    ref = block.mlp.c_fc(x)
    linearize_conv1d(block)
    assert type(block.mlp.c_fc) is nn.Linear and torch.allclose(block.mlp.c_fc(x), ref, atol=1e-6)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "float")
    q = AutoModelForCausalLM.from_pretrained(
        tmp_path / "float", quantization_config=BabaiConfig(bits=4, group_size=16, dataset=calib())
    )
    assert sum(isinstance(m, BabaiLinear) for m in q.modules()) == 8  # c_attn, c_proj, c_fc, mlp.c_proj per block
    assert q.transformer.h[1].attn.c_attn.in_features == 64 and q.transformer.h[1].attn.c_attn.out_features == 192
    q.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert type(again) is GPT2LMHeadModel
    with torch.no_grad():
        assert torch.equal(again(calib(2)).logits, q(calib(2)).logits)


class _UnusedTowerModel(_TwiceModel):
    """The largest block list (a tower the text forward never runs) is not the decoder."""

    def __init__(self) -> None:
        super().__init__()
        self.tower = nn.ModuleList([nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16)) for _ in range(2)])


def test_a_block_list_the_text_forward_never_reaches_is_refused_by_name():
    with pytest.raises(ValueError, match=r"never reached tower\.0, so its blocks cannot be calibrated from text"):
        quantize_model(
            _UnusedTowerModel(), QuantSpec(bits=4, group_size=16), torch.randint(0, 32, (2, 8)), progress=False
        )


class _MixedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, scale: float = 1.0, use_cache: bool = False) -> torch.Tensor:
        return x + self.proj(x * scale)


class _MixedModel(nn.Module):
    """Hands each kind of layer its own argument, as sliding-window/full-attention models hand each its own mask."""

    def __init__(self) -> None:
        super().__init__()
        self.config = LlamaConfig(
            num_hidden_layers=3, layer_types=["sliding_attention", "full_attention"] * 1 + ["sliding_attention"]
        )
        self.emb = nn.Embedding(32, 16)
        self.layers = nn.ModuleList([_MixedBlock() for _ in range(3)])

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        x = self.emb(input_ids)
        for kind, layer in zip(self.config.layer_types, self.layers, strict=True):
            x = layer(x, scale=10.0 if kind == "full_attention" else 1.0, use_cache=use_cache)
        return x


@pytest.mark.parametrize("true_sequential", [True, False])
def test_each_block_is_replayed_with_its_own_arguments(true_sequential):
    """A model that mixes layer types gives block 1 other arguments than block 0: the replay must too."""
    torch.manual_seed(0)
    model, seen = _MixedModel(), []
    model.layers[1].register_forward_pre_hook(lambda m, a, kw: seen.append(kw["scale"]), with_kwargs=True)
    spec = QuantSpec(bits=4, group_size=16, true_sequential=true_sequential)
    quantize_model(model, spec, torch.randint(0, 32, (4, 10)), progress=False)
    assert seen and set(seen) == {10.0}


def test_a_hybrid_decoder_alternating_layer_classes_is_found():
    """Hybrid models (OLMo-hybrid, ...) alternate attention and linear-attention layer classes in one list; a list
    of unlike modules counts as the decoder when each of them holds Linears, and never otherwise."""
    from hf_babai.engine import find_blocks

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = nn.Linear(8, 8)

    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.out = nn.Linear(8, 8), nn.Linear(8, 8)

    model = nn.Module()
    model.layers = nn.ModuleList([Attn(), Recurrent(), Attn(), Recurrent()])
    model.misc = nn.ModuleList([nn.Linear(8, 8), nn.LayerNorm(8)] * 3)  # unlike, and not every one holds a Linear
    assert find_blocks(model)[0] == "layers"


class _CrossBlock(nn.Module):
    """A decoder block with a cross-attention Linear that only runs when the encoder's states are given."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)
        self.cross = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, encoder_states: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.proj(x)
        return x if encoder_states is None else x + self.cross(encoder_states)


class _ImageTextModel(nn.Module):
    """A vision-language model whose forward insists on an image (BLIP-2's shape): a vision tower, and a language
    model that runs on token ids alone (``cross=True``: its blocks cross-attend to the image features instead)."""

    def __init__(self, cross: bool = False) -> None:
        super().__init__()
        self.vision = nn.Linear(8, 16)
        self.language_model = _TwiceModel()
        if cross:
            self.language_model.layers = nn.ModuleList([_CrossBlock(), _CrossBlock()])

    def get_decoder(self) -> nn.Module:  # as transformers' VLMs name their language model
        return self.language_model

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        return self.language_model(input_ids) + self.vision(pixel_values).mean()


def test_a_model_that_needs_an_image_is_calibrated_through_its_language_model(caplog):
    """Its forward cannot run on text, so the text goes to its language model (logged), whose blocks are then
    quantized exactly as the language model alone would be; the vision tower stays float."""
    from hf_babai.engine import text_entry

    torch.manual_seed(0)
    vlm, ids = _ImageTextModel(), torch.randint(0, 32, (4, 10))
    alone = _TwiceModel()
    alone.load_state_dict(vlm.language_model.state_dict())
    with caplog.at_level("WARNING", logger="hf_babai.engine.blocks"):
        assert text_entry(vlm, "language_model.layers", ids) is vlm.language_model
    assert "missing 1 required positional argument: 'pixel_values'" in caplog.text
    assert "calibrating through its language model `language_model`" in caplog.text
    assert text_entry(alone, "layers", ids) is alone  # a model that runs on text is its own entry
    spec = QuantSpec(bits=4, group_size=16)
    quantize_model(vlm, spec, ids, progress=False)
    quantize_model(alone, spec, ids, progress=False)
    assert type(vlm.vision) is nn.Linear
    for a, b in zip(vlm.language_model.layers, alone.layers, strict=True):
        assert torch.equal(a.proj.qweight, b.proj.qweight)


def test_vision_tower_rtn_rounds_the_tower_and_leaves_the_language_model_as_it_was():
    """``vision_tower="rtn"``: the Linears outside the language model are rounded to nearest (the Hessian-free
    scale search, since text never reaches them) and recorded as such; the language model's codes are those of
    the default run; a skipped tower stays float; a format without a round-to-nearest solve refuses the setting."""
    from hf_babai.engine import TOWER_BLOCK, quantizable_linears
    from hf_babai.formats import format_of, get_format

    torch.manual_seed(0)
    ids = torch.randint(0, 32, (4, 10))
    plain, tower = _ImageTextModel(), _ImageTextModel()
    tower.load_state_dict(plain.state_dict())
    vision = nn.Linear(8, 16)
    vision.load_state_dict(plain.vision.state_dict())
    spec = QuantSpec(bits=4, group_size=16)
    assert "vision" not in quantizable_linears(plain, spec)
    assert "vision" in quantizable_linears(plain, replace(spec, vision_tower="rtn"))  # the loader's rule too
    quantize_model(plain, spec, ids, progress=False)
    records = quantize_model(tower, replace(spec, vision_tower="rtn"), ids, progress=False)
    assert type(plain.vision) is nn.Linear and format_of(tower.vision) is not None
    assert [(r.block, r.name) for r in records if r.block == TOWER_BLOCK] == [(TOWER_BLOCK, "vision")]
    rtn = replace(spec, method="rtn", scale_method="mse", asym_alpha=0.0)
    want = get_format("int").build(vision, get_format("int").round(vision.weight.detach(), rtn), rtn)
    for key, t in want.state_dict().items():
        assert torch.equal(tower.vision.state_dict()[key], t), key
    for a, b in zip(tower.language_model.layers, plain.language_model.layers, strict=True):
        assert torch.equal(a.proj.qweight, b.proj.qweight)
    skipped = _ImageTextModel()
    quantize_model(skipped, replace(spec, vision_tower="rtn", modules_to_not_convert=["vision"]), ids, progress=False)
    assert type(skipped.vision) is nn.Linear
    with pytest.raises(ValueError, match=r"vision_tower='rtn' is invalid; format='ssqr' has no round-to-nearest"):
        QuantSpec(format="ssqr", outlier_rate=0.01, vision_tower="rtn")


def test_a_decoder_that_cross_attends_to_the_image_is_refused_by_name():
    """Text alone leaves its cross-attention uncalibrated: refused, naming the layer, not rounded to nearest."""
    with pytest.raises(ValueError, match=r"does not call language_model\.layers\.0\.cross on text"):
        quantize_model(
            _ImageTextModel(cross=True), QuantSpec(bits=4, group_size=16), torch.randint(0, 32, (2, 8)), progress=False
        )


def test_a_model_no_part_of_which_runs_on_text_is_refused_by_name():
    class NeedsImage(_TwiceModel):
        def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
            raise ValueError("You have to specify pixel_values")

    with pytest.raises(ValueError, match=r"NeedsImage's forward does not run on token ids alone \(ValueError: You "):
        quantize_model(NeedsImage(), QuantSpec(bits=4, group_size=16), torch.randint(0, 32, (2, 8)), progress=False)
    quantize_model(NeedsImage(), QuantSpec(bits=4, group_size=16, method="rtn"), None, progress=False)  # the fix


def test_asymmetric_calibration_moves_only_the_blocks_whose_inputs_drifted():
    """asym_alpha fits each Linear to the float model's output. In two passes, block 0's inputs are the float
    model's own (its cross term is zero), so its codes equal the plain run's; later blocks see drifted inputs and
    move. The option needs a calibrated solve. The default is 0.25 for int at 3 bits and more, 0 at 2 bits and
    for the other formats."""
    ids = calib()
    zero, asym = tiny_llama(), tiny_llama()
    quantize_model(zero, QuantSpec(bits=3, group_size=16, true_sequential=False, asym_alpha=0.0), ids, progress=False)
    quantize_model(asym, QuantSpec(bits=3, group_size=16, true_sequential=False), ids, progress=False)
    c_zero, c_asym = codes_of(zero), codes_of(asym)
    first = [k for k in c_zero if k.startswith("model.layers.0.")]
    later = [k for k in c_zero if not k.startswith("model.layers.0.")]
    assert first and later
    assert all(torch.equal(c_zero[k], c_asym[k]) for k in first)
    assert any(not torch.equal(c_zero[k], c_asym[k]) for k in later)
    with pytest.raises(ValueError, match=r"asym_alpha=0\.25 fits each layer to the float model's output"):
        QuantSpec(bits=3, asym_alpha=0.25, method="rtn")
    with pytest.raises(ValueError, match=r"asym_alpha=1\.5 is invalid"):
        QuantSpec(asym_alpha=1.5)
    assert QuantSpec(bits=3).asym_alpha == QuantSpec(bits=8).asym_alpha == 0.25
    assert QuantSpec(bits=2).asym_alpha == QuantSpec(bits=4, method="rtn").asym_alpha == 0.0
    assert QuantSpec(format="hptq", target_bpw=3.0).asym_alpha == 0.0


def test_asymmetric_calibration_in_one_pass():
    """``asym_alpha`` in the one-pass schedule (the default at 3 bits and more): one float forward per block keeps
    every Linear's float input,
    then the one-pass schedule solves each Linear against its moved target. Block 0's q/k/v read the model's own
    embeddings (no drift yet: their codes equal the plain one-pass run's); its o_proj already reads the quantized
    attention's output, so it moves, as do later blocks; and the result differs from the two-pass asymmetric run's
    (whose Linears' inputs come from the float block)."""
    ids = calib()
    plain, one, two = tiny_llama(), tiny_llama(), tiny_llama()
    quantize_model(plain, QuantSpec(bits=3, group_size=16, asym_alpha=0.0), ids, progress=False)
    quantize_model(one, QuantSpec(bits=3, group_size=16, asym_alpha=0.25), ids, progress=False)  # one pass: auto
    quantize_model(two, QuantSpec(bits=3, group_size=16, asym_alpha=0.25, true_sequential=False), ids, progress=False)
    c_plain, c_one, c_two = codes_of(plain), codes_of(one), codes_of(two)
    qkv = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    moved = [k for k in c_plain if k not in qkv]
    assert all(torch.equal(c_plain[k], c_one[k]) for k in qkv)
    assert not torch.equal(c_plain["model.layers.0.self_attn.o_proj"], c_one["model.layers.0.self_attn.o_proj"])
    assert any(not torch.equal(c_plain[k], c_one[k]) for k in moved if ".layers.1." in k)
    assert any(not torch.equal(c_two[k], c_one[k]) for k in moved)


def test_an_asymmetric_run_resumes_to_the_codes_of_an_uninterrupted_one(tmp_path):
    """A resumed asym_alpha run rebuilds its float stream by running each finished block in float before loading
    its quantized version, so block 1's target is moved exactly as in one run (a stream taken from the quantized
    blocks instead would move it differently)."""
    from hf_babai.engine import BlockStore, run_identity

    ids, spec = calib(), QuantSpec(bits=3, group_size=16, asym_alpha=0.25)
    reference = tiny_llama()
    quantize_model(reference, spec, ids, progress=False)
    crashed = tiny_llama()

    def crash(*_):
        raise ValueError("crash")

    crashed.model.layers[1].register_forward_pre_hook(crash)
    store = BlockStore(tmp_path / "run", run_identity(crashed, spec, ids, 2), resume=False)
    with pytest.raises(ValueError, match="crash"):
        quantize_model(crashed, spec, ids, progress=False, store=store)
    resumed = tiny_llama()
    store = BlockStore(tmp_path / "run", run_identity(resumed, spec, ids, 2), resume=True)
    assert store.finished == 1
    quantize_model(resumed, spec, ids, progress=False, store=store)
    want, got = codes_of(reference), codes_of(resumed)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
