"""SSQR: fixed-width inliers + sparse exact outliers; no clipping, Babai bound, scale search, module, checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

import hf_babai
from hf_babai import BabaiConfig, CheckpointError
from hf_babai.engine import model_bits_per_weight
from hf_babai.formats import SSQRLinear
from hf_babai.formats.packing import format_bits_per_weight
from hf_babai.solver import Grid, babai_quantize, dequantize, factor_hessian, proxy_loss
from hf_babai.solver.ssqr import ssqr_quantize

from .test_entropy import problem
from .test_hf import IDS, X, tiny  # noqa: F401 - tiny is a fixture


def reconstruct(res, grid: Grid) -> torch.Tensor:
    return dequantize(res.codes, res.scales, res.zeros, grid) + res.outliers.to_dense()


@pytest.mark.parametrize(("bits", "group", "sym"), [(3, 64, True), (4, 32, False), (2, -1, True)])
def test_outliers_replace_clipping_and_the_bound_holds(bits, group, sym):
    w, h = problem(0, n=80, k=192)
    grid = Grid(bits, sym, group)
    factor = factor_hessian(h, "act-order", 0.01)
    clipped = babai_quantize(w, factor, grid)
    res = babai_quantize(w, factor, grid, scales=(clipped.scales, clipped.zeros), outliers=True)
    assert clipped.stats.clipped > 0  # the problem does overflow the grid
    assert res.stats.clipped == 0 and res.stats.outliers > 0
    assert res.stats.loss <= res.stats.loss_damped <= res.stats.bound  # nothing clipped: Babai's bound holds
    assert res.stats.loss == pytest.approx(proxy_loss(w, reconstruct(res, grid), h), rel=1e-5)
    assert res.stats.loss < clipped.stats.loss  # same scales, outliers kept instead of clipped
    zero = 2 ** (bits - 1) if sym else res.zeros[:, grid.group_index(w.shape[1])]
    idx = res.outliers.coalesce().indices()
    assert torch.equal(
        res.codes[idx[0], idx[1]].long(), torch.as_tensor(zero).expand_as(res.codes)[idx[0], idx[1]].long()
    )
    # where nothing overflows, the outlier path is the plain solve
    quiet = babai_quantize(w, factor, grid, scales=(clipped.scales * 8, clipped.zeros), outliers=True)
    plain = babai_quantize(w, factor, grid, scales=(clipped.scales * 8, clipped.zeros))
    assert quiet.stats.outliers == 0 and torch.equal(quiet.codes, plain.codes)
    with pytest.raises(ValueError, match="needs clip=True"):
        babai_quantize(w, factor, grid, clip=False, outliers=True)


def test_scale_search_meets_the_outlier_budget_and_spends_it():
    w, h = problem(1, n=96, k=256)
    grid = Grid(3, True, 64)
    factor = factor_hessian(h, "act-order", 0.01)
    losses = []
    for rate in (0.005, 0.02, 0.05):
        res, _ = ssqr_quantize(w, factor, grid, rate)
        assert res.stats.outliers <= rate * w.numel()
        assert res.stats.outliers >= 0.5 * rate * w.numel()  # the budget is used, not wasted on large scales
        assert res.stats.clipped == 0 and res.stats.loss <= res.stats.bound
        losses.append(res.stats.loss)
    assert losses[0] > losses[1] > losses[2]
    assert losses[2] < babai_quantize(w, factor, grid).stats.loss  # beats clipping GPTQ/Babai here
    with pytest.raises(ValueError, match="outlier_rate"):
        ssqr_quantize(w, factor, grid, 1.5)


def test_ssqr_linear_matches_its_dense_weight_and_round_trips(tmp_path):
    w, h = problem(2, n=40, k=100)
    grid = Grid(4, True, 32)
    res, _ = ssqr_quantize(w, factor_hessian(h), grid, 0.03)
    lin = nn.Linear(100, 40)
    mod = SSQRLinear.from_linear(lin, res.codes, res.scales, res.zeros, 4, 32, True, outliers=res.outliers)
    dense = reconstruct(res, grid)
    assert torch.equal(mod.dequantize(torch.float32), dense)  # outliers are stored as the solver chose them
    x = torch.randn(3, 7, 100)
    ref = nn.functional.linear(x, mod.dequantize(torch.float32), lin.bias)
    mod.chunk_size = 16  # row chunks split the CSR rows too
    assert torch.allclose(mod(x), ref, atol=1e-5)
    mod.backend = "triton"  # fused inliers + gather/scatter outliers (interpreter on CPU)
    assert torch.allclose(mod(x), ref, atol=1e-4)
    mod.backend = "auto"
    extra = 16 * mod.nnz + 16 * mod.nnz + 32 * 41
    assert model_bits_per_weight(nn.Sequential(mod)) == pytest.approx(
        format_bits_per_weight(100, 40, 4, 32, True) + extra / 4000
    )
    save_file(dict(mod.state_dict()), tmp_path / "m.safetensors")
    with torch.device("meta"):
        fresh = SSQRLinear(100, 40, 4, 32, True, **mod.buffer_sizes(), dtype=torch.float32)
    fresh.load_state_dict(load_file(tmp_path / "m.safetensors"), assign=True)
    fresh.chunk_size = mod.chunk_size
    assert torch.equal(fresh(x), mod(x))


def test_ssqr_through_transformers(tiny, tmp_path):  # noqa: F811 - pytest fixture
    cfg = BabaiConfig(bits=3, group_size=32, format="ssqr", outlier_rate=0.02, dataset=IDS)
    model = AutoModelForCausalLM.from_pretrained(tiny, quantization_config=cfg, dtype=torch.float32)
    mods = [m for m in model.modules() if isinstance(m, SSQRLinear)]
    assert len(mods) == 28 and sum(m.nnz for m in mods) > 0
    assert all(m.nnz <= 0.02 * m.in_features * m.out_features for m in mods)
    assert model_bits_per_weight(model) > format_bits_per_weight(64, 64, 3, 32, True)
    out = tmp_path / "ssqr"
    model.save_pretrained(out)
    with torch.no_grad():
        logits = model(X).logits
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert saved["format"] == "ssqr" and len(saved["layers"]) == 28
    again = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(again.model.layers[0].self_attn.q_proj, SSQRLinear)
    with torch.no_grad():
        assert torch.equal(again(X).logits, logits)
    card = hf_babai.build_card(out, "me/tiny-ssqr")
    assert "ssqr" in card.data.tags and card.data.quantization["outlier_rate"] == 0.02
    with pytest.raises(ValueError, match="cannot be exported"):
        hf_babai.export(out, tmp_path / "gptq")

    def drop(d: Path) -> None:
        sd = load_file(d / "model.safetensors")
        sd.pop("model.layers.1.mlp.down_proj.outlier_values")
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})

    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    drop(bad)
    with pytest.raises(CheckpointError, match=r"down_proj\.outlier_values is missing"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_config_validates_ssqr_fields():
    with pytest.raises(ValueError, match="outlier_rate"):
        BabaiConfig(format="ssqr")
    with pytest.raises(ValueError, match="method"):
        BabaiConfig(format="ssqr", outlier_rate=0.01, method="rtn")
    with pytest.raises(ValueError, match="ssqr' only"):
        BabaiConfig(outlier_rate=0.01)
