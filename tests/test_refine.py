"""Coordinate descent after Babai: never worse, exact losses, within the grid, against brute-force CVP."""

from __future__ import annotations

import itertools

import pytest
import torch

from hf_babai.engine import QuantSpec, quantize_model
from hf_babai.solver import Grid, babai_quantize, dequantize, factor_hessian, proxy_loss
from hf_babai.solver.grid import expand_per_column, zero_point
from hf_babai.solver.refine import refine_codes, refine_result, refit_scales

from .test_engine import calib, tiny_llama
from .test_entropy import problem


@pytest.mark.parametrize(("bits", "group", "sym"), [(3, 64, True), (2, 32, False), (4, -1, True)])
def test_sweeps_never_increase_the_loss_and_report_it_exactly(bits, group, sym):
    w, h = problem(3, n=64, k=160)
    grid = Grid(bits, sym, group)
    f = factor_hessian(h, "act-order", 0.01)
    res = babai_quantize(w, f, grid)
    ref = refine_result(w, h, f.damping, res, grid, sweeps=3)
    k = w.shape[1]
    step = expand_per_column(res.scales, grid, k)
    zero = expand_per_column(zero_point(res.zeros, res.scales, grid), grid, k)
    _, losses = refine_codes(
        w, h + f.damping * torch.eye(k, dtype=h.dtype), res.codes, step, zero, maxq=grid.maxq, sweeps=3
    )
    assert all(b <= a + 1e-9 * abs(a) for a, b in itertools.pairwise(losses))
    assert ref.codes.dtype == res.codes.dtype and int(ref.codes.min()) >= 0 and int(ref.codes.max()) <= grid.maxq
    assert ref.stats.loss == pytest.approx(
        proxy_loss(w, dequantize(ref.codes, res.scales, res.zeros, grid), h), rel=1e-6
    )
    assert ref.stats.loss_damped <= res.stats.loss_damped + 1e-9  # the damped objective is the one descended
    assert ref.stats.loss_babai == res.stats.loss


def test_between_babai_and_the_true_closest_vector():
    g = torch.Generator().manual_seed(4)
    k = 6
    x = torch.randn(64, k, generator=g) @ torch.randn(k, k, generator=g)
    h = (2 / 64) * (x.T @ x).double()
    grid = Grid(2, True, -1)
    for trial in range(5):
        w = 0.3 * torch.randn(1, k, generator=g)
        res = babai_quantize(w, factor_hessian(h, "act-order", 0.0), grid)
        ref = refine_result(w, h, 0.0, res, grid, sweeps=10)
        best = min(
            proxy_loss(w, dequantize(torch.tensor([c]), res.scales, res.zeros, grid), h)
            for c in itertools.product(range(4), repeat=k)
        )
        assert best - 1e-9 <= ref.stats.loss <= res.stats.loss * (1 + 1e-6), trial


def test_engine_option():
    a, b = tiny_llama(), tiny_llama()
    ra = quantize_model(a, QuantSpec(bits=3, group_size=32, rescale=False), calib(), progress=False)
    rb = quantize_model(b, QuantSpec(bits=3, group_size=32, rescale=False, refine_sweeps=2), calib(), progress=False)
    # block 0's first layer sees the same inputs: its refined loss is no larger than Babai's
    assert rb[0].stats["loss"] <= ra[0].stats["loss"] + 1e-9 and rb[0].stats["loss_babai"] == pytest.approx(
        ra[0].stats["loss"]
    )
    with pytest.raises(ValueError, match="refine_sweeps"):
        QuantSpec(format="hptq", target_bpw=3.0, refine_sweeps=1)


def _row_losses(w, h, codes, scales, zeros, grid):
    e = w.double() - dequantize(codes, scales, zeros, grid).double()
    return ((e @ h) * e).sum(1)


@pytest.mark.parametrize(("bits", "group", "sym"), [(3, -1, True), (3, 64, True), (2, 32, False), (4, 48, True)])
def test_refit_scales_equals_per_row_least_squares_and_never_hurts_a_row(bits, group, sym):
    w, h = problem(5, n=48, k=160)  # 160 = 2·64 + 32 and 3·48 + 16: partial last groups
    grid = Grid(bits, sym, group)
    res = babai_quantize(w, factor_hessian(h, "act-order", 0.01), grid)
    new = refit_scales(w, h, res.codes, res.scales, res.zeros, grid)
    assert new.shape == res.scales.shape and new.dtype == res.scales.dtype
    assert torch.equal(new, new.half().to(new.dtype))  # float16-exact, as stored
    before = _row_losses(w, h, res.codes, res.scales, res.zeros, grid)
    after = _row_losses(w, h, res.codes, new, res.zeros, grid)
    assert bool((after <= before).all()) and float(after.sum()) < float(before.sum())
    # float64 reference: per row, build A (groups × K) explicitly and solve the normal equations
    k = w.shape[1]
    gidx = grid.group_index(k)
    z = expand_per_column(zero_point(res.zeros, res.scales, grid), grid, k).double()
    a_all = res.codes.double() - z
    changed = 0
    for n in range(w.shape[0]):
        a = torch.zeros(res.scales.shape[1], k, dtype=torch.float64)
        a[gidx, torch.arange(k)] = a_all[n]
        ref = torch.linalg.solve(a @ h @ a.T, a @ h @ w[n].double()).half().double()
        if bool((new[n].double() != res.scales[n].double()).any()):  # accepted row: the least-squares optimum
            changed += 1
            ulp = ref.abs() * 2.0**-10
            assert bool(((new[n].double() - ref).abs() <= ulp).all()), n
    assert changed > w.shape[0] // 2


def test_refit_recovers_exact_scales_and_keeps_all_zero_groups():
    w, h = problem(6, n=8, k=128)
    grid = Grid(3, True, 32)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 8, (8, 128), generator=g, dtype=torch.uint8)
    codes[:, 32:64] = 4  # group 1 of every row: all codes at the zero point
    truth = (0.01 + 0.05 * torch.rand(8, 4, generator=g)).half().float()
    w = dequantize(codes, truth, None, grid)  # w lies exactly on the lattice of `truth`
    start = (truth * 1.3).half().float()
    new = refit_scales(w, h, codes, start, None, grid)
    assert torch.equal(new[:, [0, 2, 3]], truth[:, [0, 2, 3]])
    assert torch.equal(new[:, 1], start[:, 1])  # nothing to fit: the scale is left alone


@pytest.mark.parametrize("group", [-1, 32])
def test_rescale_option_lowers_the_loss_and_the_module_stores_the_new_scales(group):
    from hf_babai.formats import BabaiLinear

    a, b = tiny_llama(), tiny_llama()
    ra = quantize_model(
        a, QuantSpec(bits=3, group_size=group, scale_method="hmse", rescale=False), calib(), progress=False
    )
    rb = quantize_model(
        b,
        QuantSpec(bits=3, group_size=group, scale_method="hmse", rescale=True, refine_sweeps=1),
        calib(),
        progress=False,
    )
    assert rb[0].stats["loss"] < ra[0].stats["loss"] and rb[0].stats["loss_babai"] == pytest.approx(ra[0].stats["loss"])
    name = rb[0].name
    mod, ref = b.model.layers[0].get_submodule(name), a.model.layers[0].get_submodule(name)
    assert isinstance(mod, BabaiLinear) and isinstance(ref, BabaiLinear)
    assert not torch.equal(mod.scales, ref.scales)  # the refitted scales are what the module stores
    with pytest.raises(ValueError, match="rescale"):
        QuantSpec(method="rtn", rescale=True)
    # the defaults: "auto" (GPTQ's mse, a second hmse + refit solve where the bound breaks) for a Babai int
    # solve at >= 3 bits, plain mse otherwise; the refit itself is off unless asked for
    for kw in ({}, {"group_size": -1}, {"bits": 3, "group_size": 64}, {"bits": 8, "group_size": -1}):
        assert (QuantSpec(**kw).scale_method, QuantSpec(**kw).rescale) == ("auto", False), kw
    assert (QuantSpec(bits=2, group_size=-1).scale_method, QuantSpec(bits=2, group_size=-1).rescale) == ("mse", False)
    assert (QuantSpec(method="rtn").scale_method, QuantSpec(method="rtn").rescale) == ("mse", False)
    hptq = QuantSpec(format="hptq", target_bpw=3.0)
    assert (hptq.scale_method, hptq.rescale) == ("mse", False)


def _solve_one(w: torch.Tensor, x: torch.Tensor, **spec):
    """One Linear solved by the engine's block quantizer on inputs ``x`` (what quantize_model runs per layer)."""
    from torch import nn

    from hf_babai.engine import BlockHessians, solve_layer

    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data = w.clone()
    hessians = BlockHessians(QuantSpec(**spec))
    hessians.accumulate("l", x, None)
    return solve_layer("l", lin, hessians)


@pytest.mark.parametrize("group", [-1, 32])
def test_auto_scales_solve_again_only_where_clipping_broke_the_babai_bound(group):
    g = torch.Generator().manual_seed(0)
    n, k = 48, 96
    x = torch.randn(1024, k, generator=g) @ (0.3 * torch.randn(k, k, generator=g) + torch.eye(k))
    w = 0.02 * torch.randn(n, k, generator=g)
    # an ordinary layer: GPTQ's scales stay within Babai's bound, so "auto" is exactly "mse" (same codes)
    auto, mse = (
        _solve_one(w, x, bits=3, group_size=group),
        _solve_one(w, x, bits=3, group_size=group, scale_method="mse"),
    )
    assert auto.stats.loss_damped <= auto.stats.bound and auto.stats.scales == "mse"
    assert torch.equal(auto.codes, mse.codes) and torch.equal(auto.scales, mse.scales)
    # input 5 carries massive activations and every row has a large weight there: the weight-only search clips
    # exactly those weights, the loss breaks the bound, and the second (hmse + refit) solve is kept
    x[:, 5] *= 40
    w[:, 5] = 0.08 * torch.sign(torch.randn(n, generator=g))
    auto = _solve_one(w, x, bits=3, group_size=group)
    mse = _solve_one(w, x, bits=3, group_size=group, scale_method="mse")
    hess = _solve_one(w, x, bits=3, group_size=group, scale_method="hmse", rescale=True)
    assert mse.stats.loss_damped > mse.stats.bound and mse.stats.scales == "mse"
    assert auto.stats.scales == "hmse+refit" and torch.equal(auto.codes, hess.codes)
    assert auto.stats.loss == hess.stats.loss < mse.stats.loss / 5
    with pytest.raises(ValueError, match=r"'auto'.*format='int'"):
        QuantSpec(format="ssqr", outlier_rate=0.01, scale_method="auto")
    with pytest.raises(ValueError, match=r"'auto'.*method='rtn'"):
        QuantSpec(method="rtn", scale_method="auto")


def test_scale_methods_are_the_registered_ones():
    """``"best"`` (``"auto"``'s two solves on every layer) was measured no better than ``"auto"`` and removed."""
    allowed = r"use one of \('mse', 'hmse', 'minmax', 'auto'\)"
    with pytest.raises(ValueError, match=r"scale_method='best' is invalid; " + allowed):
        QuantSpec(scale_method="best")
    with pytest.raises(ValueError, match="scale_method='l2'"):
        QuantSpec(scale_method="l2")
