"""The architecture coverage matrix (docs/architectures.md): every causal-LM and image-text-to-text architecture
of the installed transformers has a recorded outcome, and the round trip reproduces it.

A fast sample runs by default; ``pytest -m arch_matrix integration_tests/test_architectures.py`` runs every
architecture (about ten minutes). A transformers release that adds an architecture fails
``test_every_architecture_has_a_recorded_outcome`` until its row is recorded
(``python -m integration_tests.architectures ARCH --write``) and reviewed.
"""

from __future__ import annotations

import json
import logging
import warnings

import pytest

from .architectures import EXPECTED, architectures, round_trip, summary

RECORDED = json.loads(EXPECTED.read_text())
# The default run's sample: a plain decoder and one architecture for each root cause fixed (renamed and split
# checkpoint keys, GPT-style weight init on reload, Conv1D, positional block arguments, a Linear subclass with its own
# forward, a vision-language model, a forward that reads a weight directly, a fused q/k/v converter on save, layers of
# mixed kinds that each get their own arguments, fused MoE experts, position tables that are not nn.Embeddings
# (CPM-Ant's relative-position bias, Reformer's axial table), an embedding projection outside the blocks (Gemma-4),
# a vision-language model whose forward needs an image, calibrated through its language model (BLIP-2)) and refusals
# by name (weights of an unknown kind: a second block list, experts of a layout not recognised; a decoder that
# cross-attends to the image, which text cannot calibrate: BLIP).
FAST = (
    "llama", "gpt_neox", "exaone", "hrm_text", "gpt_bigcode", "gpt2", "cpmant", "llama4_text", "qwen2_vl", "mamba",
    "param2moe", "gemma3", "minimax", "reformer", "gemma4_text", "blip-2", "blip",
)  # fmt: skip


def test_every_architecture_has_a_recorded_outcome():
    installed = set(architectures())
    assert not installed - set(RECORDED), f"architectures with no recorded outcome: {sorted(installed - RECORDED)}"
    assert not set(RECORDED) - installed, f"recorded but not installed: {sorted(set(RECORDED) - installed)}"


def _check(arch: str) -> None:
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    try:
        got = summary(round_trip(arch))
    finally:
        logging.disable(logging.NOTSET)
    want = RECORDED[arch]
    assert (got["status"], got["step"], got["float"]) == (want["status"], want["step"], want["float"]), got["message"]


@pytest.mark.parametrize("arch", FAST)
def test_fast_sample_round_trips_as_recorded(arch):
    assert RECORDED[arch]["status"] in ("works", "partial", "refused")
    _check(arch)


@pytest.mark.arch_matrix
@pytest.mark.parametrize("arch", sorted(set(RECORDED) - set(FAST)))
def test_architecture_round_trips_as_recorded(arch):
    _check(arch)


@pytest.mark.parametrize("arch", ["qwen2_vl", "gemma3", "blip-2"])
def test_vision_tower_rtn_quantizes_the_tower_and_reloads_exactly(arch, tmp_path):
    """``vision_tower="rtn"`` on vision-language models of three shapes (Qwen2-VL's own vision blocks and merger,
    Gemma-3's SigLIP tower and projector, BLIP-2's vision tower, Q-Former and projection): every Linear outside the
    language model is quantized, the saved checkpoint reloads with the Auto class users load it with, and each
    quantized module (tower and language model) reloads with the same tensors and the same outputs; text logits
    are equal too. Without the setting the reloaded model's tower is float."""
    import torch

    import hf_babai
    from hf_babai.engine import tower_linears
    from hf_babai.formats import quantized_modules

    from .architectures import PROFILES, VOCAB, _loader, _logits, _tiny_model

    warnings.filterwarnings("ignore")
    ids = torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    model = None
    for profile in PROFILES:  # the first shrunk config the model runs with, as the matrix takes it
        try:
            model = _tiny_model(arch, profile, ids)
            break
        except Exception:
            continue
    assert model is not None, f"no tiny {arch} runs"
    cls = _loader(arch, model)
    tower = set(tower_linears(model, ("lm_head",)))
    assert len(tower) >= 4, tower
    model.save_pretrained(tmp_path / "float")
    del model
    cfg = hf_babai.BabaiConfig(bits=4, group_size=16, dataset=ids, vision_tower="rtn")
    model = cls.from_pretrained(tmp_path / "float", quantization_config=cfg, dtype=torch.float32)
    quantized = {name: mod for name, mod, _ in quantized_modules(model)}
    assert tower <= set(quantized), sorted(tower - set(quantized))[:5]
    assert not tower_linears(model, ("lm_head",))  # nothing outside the language model left float
    model.save_pretrained(tmp_path / "q")
    again = cls.from_pretrained(tmp_path / "q")
    reloaded = {name: mod for name, mod, _ in quantized_modules(again)}
    assert set(reloaded) == set(quantized)
    gen = torch.Generator().manual_seed(1)
    for name, mod in quantized.items():
        other = reloaded[name]
        for key, t in mod.state_dict().items():
            assert torch.equal(other.state_dict()[key], t), f"{name}.{key}"
        x = torch.randn(3, mod.in_features, generator=gen)
        with torch.no_grad():
            assert torch.equal(other(x), mod(x)), name
    x = ids[:2, :16]
    assert torch.equal(_logits(again, x), _logits(model, x))
    default = cls.from_pretrained(
        tmp_path / "float", quantization_config=hf_babai.BabaiConfig(bits=4, group_size=16, dataset=ids)
    )
    assert set(tower_linears(default, ("lm_head",))) == tower  # the default keeps the tower float
