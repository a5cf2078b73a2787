"""bench/paired.py: which records count as today's defaults, and the paired mean / standard error."""

from __future__ import annotations

import math

import pytest

from hf_babai.solver import DAMP_WIDTH


@pytest.fixture(scope="module")
def paired(load_bench):
    return load_bench("paired")


def _ours(seed: int, ppl: float, **over) -> dict:
    rec = dict(
        model="m", tool="hf_babai", method="babai", order="act-order", sym=True, bits=3, group_size=64, n_calib=32,
        calib_seqlen=512, scale_method="auto", rescale=False, calib_batch=None, true_sequential=True,
        damp_width=DAMP_WIDTH, asym_alpha=0.25, calib_seed=seed, ppl=ppl, windows=4,
    )  # fmt: skip
    rec.update(over)
    return rec


def _peer(seed: int, ppl: float) -> dict:
    return dict(
        model="m", tool="llm-compressor", method="gptq", actorder="static", sym=True, bits=3, group_size=64,
        n_calib=32, seqlen=512, calib_seed=seed, ppl=ppl, windows=4, details={"observer_preset": "mse"},
    )  # fmt: skip


def test_only_default_records_are_paired(paired):
    records = [
        _ours(0, 11.0), _ours(1, 9.0), _peer(0, 10.0), _peer(1, 10.0), _peer(2, 10.0),  # seed 2: no partner
        _ours(0, 1.0, rescale=True), _ours(0, 1.0, damp_width=0.0), _ours(0, 1.0, scale_method="hmse"),
        _ours(0, 1.0, true_sequential=False), _ours(0, 1.0, order="min-pivot"),  # none of these are defaults
        _ours(0, 1.0, beams=4), _ours(0, 1.0, asym_alpha=0.0),
    ]  # fmt: skip
    rtn = dict(model="m", tool="hf_babai", method="rtn", sym=True, bits=3, group_size=64, ppl=42.0, windows=4)
    # a 4-bit RTN has no pair (no row); a min/max-scaled RTN is not the baseline
    others = [{**rtn, "bits": 4, "ppl": 7.0}, {**rtn, "scale_method": "minmax", "ppl": 9.0}]
    (row,) = paired.pair([*records, rtn, *others])
    assert row["rtn"] == 42.0
    assert row["seeds"] == [0, 1]
    assert row["ours"] == [11.0, 9.0] and row["peer"] == [10.0, 10.0]
    assert row["rel_diff"] == pytest.approx([0.1, -0.1])
    assert row["rel_diff_mean"] == pytest.approx(0.0)
    assert row["rel_diff_se"] == pytest.approx(math.sqrt(0.02 / 1 / 2))  # sample variance 0.02, two seeds
    assert "| 4 | 42 | 0, 1 |" in paired.markdown([row]) and "+0.0 ± 10.0 %" in paired.markdown([row])


def test_two_bit_default_is_two_passes(paired):
    two_bit = dict(bits=2, scale_method="mse", asym_alpha=0.0)
    assert not paired.is_default_ours(_ours(0, 1.0, **two_bit))  # one pass at 2 bits is not the default
    assert paired.is_default_ours(_ours(0, 1.0, true_sequential=False, **two_bit))


def test_an_option_is_paired_in_place_of_the_defaults(paired):
    """``--ours asym_alpha=0``: the records with the plain target (and the schedule the defaults imply for them:
    one pass at 3 bits; a record without the field ran before the option existed, so with 0) are our side; the
    default records and those of other options are not. ``true_sequential=false`` picks the two-pass records."""
    plain = _ours(0, 9.0, asym_alpha=0.0)
    older = _ours(1, 7.0)
    del older["asym_alpha"]
    two = _ours(0, 8.0, true_sequential=False)
    others = [_ours(0, 1.0, asym_alpha=0.5), _ours(0, 3.0, asym_alpha=0.0, beams=4)]
    others.append(_ours(0, 2.0, asym_alpha=0.0, true_sequential=False))
    records = [_ours(0, 11.0), plain, older, two, *others, _peer(0, 10.0), _peer(1, 10.0)]
    (row,) = paired.pair(records, {"asym_alpha": 0.0})
    assert row["ours"] == [9.0, 7.0] and row["rel_diff"] == pytest.approx([-0.1, -0.3])
    (row,) = paired.pair(records, {"true_sequential": False})
    assert row["ours"] == [8.0]
    (row,) = paired.pair(records)
    assert row["ours"] == [11.0]


def test_evaluation_sizes_are_not_mixed(paired):
    """A full-book evaluation (81 windows) is a different measurement from the 4-window one: separate rows, each
    with its own RTN, and an ours/peer pair only within one size."""
    rtn = dict(model="m", tool="hf_babai", method="rtn", sym=True, bits=3, group_size=64)
    records = [
        _ours(0, 11.0), _peer(0, 10.0), {**rtn, "ppl": 42.0, "windows": 4},
        {**_ours(0, 30.0), "windows": 81}, {**_peer(0, 33.0), "windows": 81}, {**rtn, "ppl": 50.0, "windows": 81},
        {**_ours(1, 5.0), "windows": 81}, _peer(1, 5.5),  # seed 1: the two tools on different texts, no pair
    ]  # fmt: skip
    rows = {r["windows"]: r for r in paired.pair(records)}
    assert sorted(rows) == [4, 81]
    assert rows[4]["ours"] == [11.0] and rows[4]["peer"] == [10.0] and rows[4]["rtn"] == 42.0
    assert rows[81]["ours"] == [30.0] and rows[81]["peer"] == [33.0] and rows[81]["rtn"] == 50.0
    assert rows[81]["seeds"] == [0]


def test_gptqmodel_in_its_better_configuration_is_paired_on_the_seeds_it_ran(paired):
    """The second peer's column is its ``best`` preset or ``best`` with GPTAQ, whichever has the lower mean on the
    seeds both ran; paired with us on its seeds. Its out-of-the-box preset never counts; with no shared seed the
    column keeps ``best``."""
    gm = dict(model="m", tool="gptqmodel", method="gptq", preset="best", bits=3, group_size=64, n_calib=32, seqlen=512,
              windows=4)  # fmt: skip
    base = [
        _ours(0, 11.0), _ours(1, 9.0), _peer(0, 10.0), _peer(1, 10.0),
        {**gm, "calib_seed": 1, "ppl": 12.0},
        {**gm, "calib_seed": 0, "ppl": 1.0, "preset": "default"},
    ]  # fmt: skip
    (row,) = paired.pair([*base, {**gm, "calib_seed": 0, "ppl": 1.0, "method": "gptaq"}])  # no shared seed
    assert row["gptqmodel_preset"] == "best" and row["gptqmodel"] == {1: 12.0}
    assert row["gptqmodel_rel_diff_mean"] == pytest.approx(9.0 / 12.0 - 1)
    assert "| best: 1: 12.00 | -25.0 % |" in paired.markdown([row])
    assert "| not run | – |" in paired.markdown([{**row, "gptqmodel": {}}])
    gptaq = [{**gm, "calib_seed": s, "ppl": p, "method": "gptaq"} for s, p in ((0, 10.0), (1, 10.0))]
    (row,) = paired.pair([*base, *gptaq])  # seed 1: 10 < 12, so GPTAQ is the better configuration
    assert row["gptqmodel_preset"] == "best+gptaq" and row["gptqmodel"] == {0: 10.0, 1: 10.0}
    assert row["gptqmodel_rel_diff_mean"] == pytest.approx((11.0 / 10.0 + 9.0 / 10.0) / 2 - 1)
    (row,) = paired.pair([*base, {**gptaq[1], "ppl": 13.0}])
    assert row["gptqmodel_preset"] == "best" and row["gptqmodel"] == {1: 12.0}
