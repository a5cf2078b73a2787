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
