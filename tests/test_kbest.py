"""K-best nearest plane: Babai at one beam, the exact closest vector when the beams cover the tree, never farther
than Babai in between, and reported losses that are the true ones."""

from __future__ import annotations

import itertools

import pytest
import torch

from hf_babai.solver import Grid, babai_quantize, compute_scales, dequantize, factor_hessian, proxy_loss
from hf_babai.solver.grid import expand_per_column, zero_point
from hf_babai.solver.kbest import _search, kbest_quantize

from .test_solver import damped, random_problem


def _damped_row_losses(w, codes, scales, zeros, grid, hd):
    e = w.double() - dequantize(codes, scales, zeros, grid).double()
    return ((e @ hd) * e).sum(1)


@pytest.mark.parametrize(("bits", "sym", "group"), [(2, True, 8), (3, False, 16), (4, True, -1)])
def test_one_beam_one_candidate_is_babai(bits, sym, group):
    w, h = random_problem(seed=bits, n=6, k=40)
    grid = Grid(bits, sym, group)
    factor = factor_hessian(h)
    scales = compute_scales(w, grid, "mse")
    babai = babai_quantize(w, factor, grid, scales=scales, dtype=torch.float64, block_size=7)
    # candidates=1: the search follows the nearest value only, so every row's path is Babai's
    k = w.shape[1]
    t = factor.t
    st = expand_per_column(scales[0], grid, k)[:, t].T.contiguous().double()
    zt = expand_per_column(zero_point(scales[1], scales[0], grid), grid, k)[:, t].T.contiguous().double()
    r = factor.r
    m = r / torch.diagonal(r)[:, None]
    codes_t, clipped = _search(w[:, t].T.double(), st, zt, m, torch.diagonal(r) ** 2, grid.maxq, 1, 1, 7)
    codes = torch.empty_like(codes_t)
    codes[t] = codes_t
    assert torch.equal(codes.T.to(torch.uint8), babai.codes)
    assert torch.equal(clipped, babai.clipped_rows) and int(clipped.sum()) == babai.stats.clipped


@pytest.mark.parametrize(("bits", "sym", "k"), [(2, True, 5), (2, False, 5), (3, True, 3)])
def test_exhaustive_beams_find_the_exact_closest_vector(bits, sym, k):
    """With beams covering every path and every grid value a candidate, the search is brute force."""
    g = torch.Generator().manual_seed(k * 10 + bits)
    x = torch.randn(64, k, generator=g, dtype=torch.float64) @ torch.randn(k, k, generator=g, dtype=torch.float64)
    h = 2 * x.T @ x / 64
    grid = Grid(bits, sym, -1)
    levels = grid.maxq + 1
    w = 0.7 * torch.randn(8, k, generator=g)
    factor = factor_hessian(h, "act-order", damp=0.0)
    scales = compute_scales(w, grid, "minmax")
    res = kbest_quantize(w, factor, grid, beams=levels**k, candidates=levels, scales=scales, dtype=torch.float64)
    hd = damped(h, factor.damping)
    every = torch.tensor(list(itertools.product(range(levels), repeat=k)), dtype=torch.uint8)
    for i in range(w.shape[0]):
        sc = scales[0][i : i + 1]
        zs = None if scales[1] is None else scales[1][i : i + 1]
        brute = _damped_row_losses(
            w[i : i + 1].expand(len(every), -1),
            every,
            sc.expand(len(every), -1),
            None if zs is None else zs.expand(len(every), -1),
            grid,
            hd,
        )
        mine = _damped_row_losses(w[i : i + 1], res.codes[i : i + 1], sc, zs, grid, hd)
        assert float(mine) == pytest.approx(float(brute.min()), rel=1e-12, abs=1e-12), i


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("bits", "sym", "group", "beams", "cands"), [(2, True, 16, 4, 2), (3, False, 16, 8, 3)])
def test_never_farther_than_babai_and_reports_the_true_losses(seed, bits, sym, group, beams, cands):
    w, h = random_problem(seed=seed, n=12, k=48)
    grid = Grid(bits, sym, group)
    factor = factor_hessian(h)
    scales = compute_scales(w, grid, "mse")
    babai = babai_quantize(w, factor, grid, scales=scales, block_size=16)
    res = kbest_quantize(w, factor, grid, beams=beams, candidates=cands, scales=scales, block_size=16)
    hd = damped(h, factor.damping)
    row_k = _damped_row_losses(w, res.codes, *scales, grid, hd)
    row_b = _damped_row_losses(w, babai.codes, *scales, grid, hd)
    assert (row_k <= row_b * (1 + 1e-6)).all()
    assert res.stats.loss_damped == pytest.approx(float(row_k.sum()), rel=1e-5)
    assert res.stats.loss == pytest.approx(proxy_loss(w, dequantize(res.codes, *scales, grid), h), rel=1e-4)
    assert res.stats.loss_babai == babai.stats.loss
    assert res.codes.max() <= grid.maxq
    assert row_k.sum() < row_b.sum()  # the search finds a closer point on these lattices


def test_block_size_and_row_chunks_do_not_change_the_result(monkeypatch):
    import hf_babai.solver.kbest as kbest

    w, h = random_problem(seed=9, n=10, k=40)
    grid = Grid(3, True, 8)
    factor = factor_hessian(h)
    scales = compute_scales(w, grid, "mse")
    a = kbest_quantize(w, factor, grid, beams=4, scales=scales, dtype=torch.float64, block_size=40)
    monkeypatch.setattr(kbest, "CHUNK_ELEMENTS", 3 * 4 * 40)  # three rows per chunk
    b = kbest_quantize(w, factor, grid, beams=4, scales=scales, dtype=torch.float64, block_size=7)
    assert torch.equal(a.codes, b.codes)


def test_bad_arguments_are_refused():
    w, h = random_problem(seed=1, n=2, k=8)
    with pytest.raises(ValueError, match="beams"):
        kbest_quantize(w, factor_hessian(h), Grid(4, True, -1), beams=0)


def test_engine_option_lowers_the_first_layers_loss_and_records_babais():
    from hf_babai.engine import QuantSpec, quantize_model

    from .test_engine import calib, tiny_llama

    a, b = tiny_llama(), tiny_llama()
    ra = quantize_model(a, QuantSpec(bits=3, group_size=32, scale_method="mse"), calib(), progress=False)
    rb = quantize_model(b, QuantSpec(bits=3, group_size=32, scale_method="mse", beams=4), calib(), progress=False)
    # block 0's first layer sees the same inputs in both runs: the search's loss is at most Babai's, which it records
    assert rb[0].stats["loss_babai"] == pytest.approx(ra[0].stats["loss"], rel=1e-6)
    assert rb[0].stats["loss"] < ra[0].stats["loss"]
    with pytest.raises(ValueError, match="beams"):
        QuantSpec(method="rtn", beams=4)


@pytest.mark.parametrize("maxq", [3, 7, 15])
def test_two_candidates_are_the_two_nearest_grid_values(maxq):
    from hf_babai.solver.kbest import _candidates

    g = torch.Generator().manual_seed(maxq)
    x = (torch.rand(4000, 1, 1, generator=g, dtype=torch.float64) * (maxq + 6) - 3).to(torch.float32)
    x[:8, 0, 0] = torch.tensor([0.0, 0.5, maxq, maxq + 0.5, -0.5, 1.5, -7.0, maxq + 9.0])  # ties and far off
    u = _candidates(x, torch.round(x), maxq, 2, None)
    grid = torch.arange(maxq + 1, dtype=torch.float32)
    dist = (x[:, 0, :] - grid).abs()  # [4000, levels]
    best2 = dist.topk(2, dim=1, largest=False).values
    got = (x[:, 0, :] - u[:, 0, :]).abs()
    assert torch.equal(got[:, 0], best2[:, 0])  # the first is the nearest grid value
    assert torch.equal(got[:, 1], best2[:, 1])  # the second the next nearest (ties: either side)
    assert ((u >= 0) & (u <= maxq)).all() and (u[:, 0, 0] != u[:, 0, 1]).all()
