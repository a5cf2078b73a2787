"""Distributed quantization on real SmolLM2-135M weights: ``hf-babai quantize --nproc 2`` (torchrun, two gloo
ranks) writes the same checkpoint bytes as one process with the two-pass schedule.

Kept small for CI: the first 4 of the 30 decoder blocks (real weights and shapes), 8 calibration windows of 128
tokens, one thread per process (float results depend on the thread count).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_babai import assets
from tests.child import child_error

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_two_ranks_write_the_single_process_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = assets.ensure_model("smollm2-135m")
    small = tmp_path / "smollm2-4-blocks"
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, num_hidden_layers=4).save_pretrained(small)
    AutoTokenizer.from_pretrained(src).save_pretrained(small)
    cli = [sys.executable, "-m", "hf_babai", "quantize", str(small), "--quiet", "--bits", "4", "--nsamples", "8"]
    cli += ["--seqlen", "128"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    one = subprocess.run(
        [*cli, "--out", str(tmp_path / "one"), "--no-true-sequential", "--threads", "1"],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert one.returncode == 0, child_error(one)
    two = subprocess.run(
        [*cli, "--out", str(tmp_path / "two"), "--nproc", "2"], capture_output=True, text=True, env=env, timeout=900
    )
    assert two.returncode == 0, child_error(two)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
