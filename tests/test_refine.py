"""Coordinate descent after Babai: never worse, exact losses, within the grid, against brute-force CVP."""

from __future__ import annotations

import itertools

import pytest
import torch

from hf_babai.engine import QuantSpec, quantize_model
from hf_babai.solver import Grid, babai_quantize, dequantize, factor_hessian, proxy_loss
from hf_babai.solver.grid import expand_per_column, zero_point
from hf_babai.solver.refine import refine_codes, refine_result

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
    ra = quantize_model(a, QuantSpec(bits=3, group_size=32), calib(), progress=False)
    rb = quantize_model(b, QuantSpec(bits=3, group_size=32, refine_sweeps=2), calib(), progress=False)
    # block 0's first layer sees the same inputs: its refined loss is no larger than Babai's
    assert rb[0].stats["loss"] <= ra[0].stats["loss"] + 1e-9 and rb[0].stats["loss_babai"] == pytest.approx(
        ra[0].stats["loss"]
    )
    with pytest.raises(ValueError, match="refine_sweeps"):
        QuantSpec(format="hptq", target_bpw=3.0, refine_sweeps=1)
