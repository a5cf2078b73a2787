"""HPTQ / HRTN: scale search to a bit budget, Babai bound without clipping, HuffmanLinear round trips."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hf_babai.engine import QuantSpec, model_bits_per_weight, quantize_model
from hf_babai.formats import HuffmanLinear
from hf_babai.formats.huffman import coded_bits
from hf_babai.solver import factor_hessian, proxy_loss
from hf_babai.solver.entropy import entropy_quantize, rtn_scale, stored_bits

from .test_engine import calib, tiny_llama


def problem(seed: int, n: int = 96, k: int = 160, outliers: float = 0.01):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, k, generator=g) @ (0.3 * torch.randn(k, k, generator=g) + torch.eye(k))
    h = (2 / 2048) * (x.T @ x).double()
    w = 0.02 * torch.randn(n, k, generator=g)
    w[torch.rand(n, k, generator=g) < outliers] *= 12
    return w, h


@pytest.mark.parametrize("target", [2.125, 3.125, 4.125])
@pytest.mark.parametrize("seed", range(3))
def test_hptq_meets_the_budget_keeps_the_bound_and_beats_hrtn(seed, target):
    w, h = problem(seed)
    factor = factor_hessian(h, "act-order", 0.01)
    hp = entropy_quantize(w, factor, target, code_bits=coded_bits)
    hr = entropy_quantize(w, None, target, code_bits=coded_bits, h=h)
    for r in (hp, hr):
        assert r.bpw <= target
        assert r.bpw > target - 0.15  # the search uses the budget instead of stopping early
        assert r.bits == stored_bits(r.codes, coded_bits)
    # nothing is clipped, so Babai's bound holds (damped objective ≥ undamped loss)
    assert hp.stats.clipped == 0
    assert hp.stats.loss <= hp.stats.loss_damped <= hp.stats.bound
    assert hp.stats.loss == pytest.approx(proxy_loss(w, hp.codes.float() * hp.scale, h), rel=1e-4)
    assert hp.stats.loss < hr.stats.loss


def test_scale_search_is_the_smallest_scale_that_fits():
    w, _ = problem(5)
    s, _ = rtn_scale(w, 3.125, coded_bits)
    budget = 3.125 * w.numel()
    assert stored_bits(torch.round(w / s).int(), coded_bits) <= budget
    finer = s * (1 - 2**-9)
    assert stored_bits(torch.round(w / finer).int(), coded_bits) > budget or s == pytest.approx(finer, rel=2e-3)
    with pytest.raises(ValueError, match="raise the target"):
        rtn_scale(w, 0.01, coded_bits)


def test_huffman_linear_forward_and_safetensors_round_trip(tmp_path):
    w, h = problem(1, n=48, k=80)
    lin = nn.Linear(80, 48, bias=True)
    with torch.no_grad():
        lin.weight.copy_(w)
    r = entropy_quantize(w, factor_hessian(h), 3.125, code_bits=coded_bits)
    mod = HuffmanLinear.from_linear(lin, r.codes, r.scale, chunk=64)
    assert torch.equal(mod.codes(), r.codes)
    assert HuffmanLinear.from_linear(lin, r.codes, r.scale).storage_bits() == r.bits  # budgeted == stored
    assert mod.storage_bits() == stored_bits(r.codes, lambda c: coded_bits(c, chunk=64))
    x = torch.randn(5, 80)
    ref = nn.functional.linear(x, r.codes.float() * mod.scale.float(), lin.bias)
    assert torch.allclose(mod(x), ref, atol=1e-5)

    save_file(dict(mod.state_dict()), tmp_path / "m.safetensors")
    with torch.device("meta"):
        fresh = HuffmanLinear(80, 48, **mod.buffer_sizes(), bias=True, dtype=torch.float32)
    fresh.load_state_dict(load_file(tmp_path / "m.safetensors"), assign=True)
    assert torch.equal(fresh(x), mod(x))
    fresh.cache_dense = True
    assert torch.equal(fresh(x), mod(x)) and fresh._dense is not None

    with pytest.raises(ValueError, match="does not match"):
        HuffmanLinear.from_linear(lin, r.codes[:, :10], r.scale)
    with pytest.raises(ValueError, match="positive"):
        HuffmanLinear.from_linear(lin, r.codes, -1.0)


@pytest.mark.parametrize("method", ["babai", "rtn"])
def test_engine_hptq_and_hrtn_on_a_tiny_decoder(method):
    model = tiny_llama()
    ref = model(calib()).logits
    spec = QuantSpec(method=method, format="hptq", target_bpw=4.125)
    records = quantize_model(model, spec, calib() if method == "babai" else None, progress=False)
    assert len(records) == 14 and sum(isinstance(m, HuffmanLinear) for m in model.modules()) == 14
    assert model_bits_per_weight(model) <= 4.125
    if method == "babai":
        assert all(r.stats["clipped"] == 0 and r.stats["loss"] <= r.stats["bound"] for r in records)
    out = model(calib()).logits
    assert (out - ref).abs().mean() < 0.1 * ref.abs().mean()


def test_spec_validates_the_format():
    with pytest.raises(ValueError, match="needs target_bpw"):
        QuantSpec(format="hptq")
    with pytest.raises(ValueError, match=r"applies to format=.hptq. only"):
        QuantSpec(target_bpw=3.0)
    with pytest.raises(ValueError, match=r"format='nf4' is invalid; use one of \('int', 'ssqr', 'hptq'\)"):
        QuantSpec(format="nf4")
