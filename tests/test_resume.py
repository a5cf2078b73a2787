"""Resume: a quantization killed with SIGKILL in the middle of a block continues from its last finished block with
``--resume`` and writes the same bytes as an uninterrupted run; the unfinished run folder is refused by name by
``from_pretrained``, ``info`` and a new run without ``--resume``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.child import child_error

KILL_AT_SOLVE = 10  # block 1's third Linear (7 per block): block 0 is finished, block 1 half solved

RUNNER = f"""
import os, signal, sys
import hf_babai.engine.schedules as schedules
solve, calls = schedules.solve_layer, [0]
def dying(*a, **k):
    calls[0] += 1
    if calls[0] == {KILL_AT_SOLVE}:
        os.kill(os.getpid(), signal.SIGKILL)
    return solve(*a, **k)
schedules.solve_layer = dying
from hf_babai.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _run(args: list[str], kill: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-c", RUNNER] if kill else [sys.executable, "-m", "hf_babai"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=600)


def test_killed_run_resumes_to_the_same_bytes(tiny_env, tmp_path):
    base = ["quantize", str(tiny_env["src"]), "--quiet", "--bits", "4", "--group-size", "32", "--nsamples", "6"]
    base += ["--seqlen", "32"]
    ref = _run([*base, "--out", str(tmp_path / "ref")])
    assert ref.returncode == 0, child_error(ref)
    out, run_dir = tmp_path / "out", tmp_path / ".out.unfinished"

    killed = _run([*base, "--out", str(out)], kill=True)
    assert killed.returncode == -signal.SIGKILL, child_error(killed)
    assert not out.exists()  # nothing at --out looks finished
    assert sorted(p.name for p in (run_dir / "blocks").iterdir()) == ["block-00000.json", "block-00000.safetensors"]

    info = _run(["info", str(run_dir)])
    assert info.returncode == 1 and "unfinished hf_babai quantization run (1 of 2 blocks done)" in info.stderr
    assert "--resume" in info.stderr and "Traceback" not in info.stderr
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match=r"unfinished hf_babai quantization run \(1 of 2 blocks done\).*--resume"):
        AutoModelForCausalLM.from_pretrained(run_dir)
    again = _run([*base, "--out", str(out)])
    assert again.returncode == 1 and "continue it with --resume" in again.stderr and not out.exists()
    other = _run([*base[:4], "3", *base[5:], "--out", str(out), "--resume"])
    assert other.returncode == 1 and "its settings differ" in other.stderr
    assert (run_dir / "blocks" / "block-00000.safetensors").is_file()  # a refused resume keeps the run

    resumed = _run([*base, "--out", str(out), "--resume"])
    assert resumed.returncode == 0, child_error(resumed)
    for name in ("model.safetensors", "config.json"):
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    assert not run_dir.exists()  # finished: the run folder is gone
    nothing = _run([*base, "--out", str(tmp_path / "new"), "--resume"])
    assert nothing.returncode == 1 and "no unfinished run to continue" in nothing.stderr


def test_python_api_resume_needs_a_run_dir(tiny_env):
    from transformers import AutoModelForCausalLM

    from hf_babai import BabaiConfig

    cfg = BabaiConfig(bits=4, group_size=32, dataset=torch.randint(0, 256, (2, 16)), resume=True)
    with pytest.raises(ValueError, match=r"resume=True\) needs run_dir"):
        AutoModelForCausalLM.from_pretrained(tiny_env["src"], quantization_config=cfg, dtype=torch.float32)
    assert "run_dir" not in cfg.to_dict() and "resume" not in cfg.to_dict()  # never saved into config.json
