"""Real model, real text: Babai beats RTN, the bound holds on a real layer, BabaiLinear reproduces the solve.

Uses SmolLM2-135M and the Austen texts installed by ``scripts/setup.sh`` (offline). Kept small for CI:
16 calibration windows of 256 tokens and 2 evaluation windows of 1024 tokens.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_babai import assets
from hf_babai.engine import QuantSpec, capture_block_inputs, find_blocks, model_bits_per_weight, quantize_model
from hf_babai.formats import BabaiLinear
from hf_babai.perplexity import calibration_windows, eval_windows, perplexity
from hf_babai.solver import Grid, HessianAccumulator, babai_quantize, factor_hessian

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup():
    path = assets.ensure_model("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path)
    calib = calibration_windows(tok, assets.calibration_text(), n=16, seqlen=256)
    evalw = eval_windows(tok, assets.eval_text(), seqlen=1024, windows=2)
    return path, calib, evalw


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_babai_perplexity_below_rtn_at_3_bits(setup):
    path, calib, evalw = setup
    spec = dict(bits=3, group_size=128)
    rtn = _load(path)
    quantize_model(rtn, QuantSpec(method="rtn", **spec), progress=False)
    babai = _load(path)
    records = quantize_model(babai, QuantSpec(method="babai", order="min-pivot", **spec), calib, progress=False)
    ppl_rtn, ppl_babai = perplexity(rtn, evalw), perplexity(babai, evalw)
    assert ppl_babai < ppl_rtn, (ppl_babai, ppl_rtn)
    assert len(records) == 30 * 7  # every Linear of every block; lm_head and embeddings untouched
    assert isinstance(babai.lm_head, torch.nn.Linear) and not isinstance(babai.lm_head, BabaiLinear)
    # K=576 is not a multiple of 128: a partial last group, counted honestly (3 + 16/128 + padding)
    assert 3.125 <= model_bits_per_weight(babai) < 3.14


def test_babai_bound_holds_on_a_real_layer(setup):
    """Theorem 5 on SmolLM2 block 0's MLP input with real activations, no clipping."""
    path, calib, _ = setup
    model = _load(path)
    _, blocks = find_blocks(model)
    ((hidden, kwargs),) = capture_block_inputs(model, blocks[0], calib, None, batch_size=calib.shape[0])
    layer = blocks[0].mlp.gate_proj
    acc = HessianAccumulator(layer.in_features)
    handle = layer.register_forward_pre_hook(lambda _m, a: acc.add(a[0]))
    with torch.no_grad():
        blocks[0](hidden, **kwargs)
    handle.remove()
    h = acc.finalize()
    factor = factor_hessian(h, "min-pivot")
    grid = Grid(3, True, 64)
    res = babai_quantize(layer.weight.detach(), factor, grid, clip=False, dtype=torch.float64)
    assert res.stats.clipped == 0
    assert res.stats.loss <= res.stats.loss_damped <= res.stats.bound
    # the realised error sits near the uniform-residual expectation (a third of the worst case)
    assert 0.2 * res.stats.bound < res.stats.loss_damped < 0.5 * res.stats.bound
    assert factor.rank == layer.in_features and factor.dead == 0


def test_quantized_model_equals_its_dequantized_dense_twin(setup):
    """BabaiLinear's packed buffers reproduce the solver's lattice point exactly."""
    path, calib, evalw = setup
    model = _load(path)
    quantize_model(model, QuantSpec(bits=4, group_size=64), calib[:4], progress=False)
    dense = _load(path)
    for name, mod in model.named_modules():
        if isinstance(mod, BabaiLinear):
            dense.get_submodule(name).weight.data = mod.dequantize(torch.float32)
    ids = evalw[:1, :256]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)
