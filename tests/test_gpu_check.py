"""``scripts/gpu_check.sh`` (the first GPU run) dry-run on CPU, so that the script a lent GPU session runs in one
call cannot rot: every part runs on tiny sizes in Triton's interpreter and writes the JSON the GPU run writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .child import child_error

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("triton", reason="the GPU check runs the kernels (installed by scripts/setup.sh)")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--dry-run", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, child_error(proc)
    return out, proc.stdout


def _load(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text())


def test_every_part_runs_and_writes_its_json(dry_run):
    out, stdout = dry_run
    assert sorted(p.name for p in out.iterdir()) == [
        "decode.json", "distributed.json", "engine.json", "kernels.json", "summary.json", "tests.json",
    ]  # fmt: skip
    summary = _load(out, "summary")
    assert summary["device"] == "cpu (dry run)"
    assert {name: p["status"] for name, p in summary["parts"].items()} == dict.fromkeys(
        ("tests", "kernels", "engine", "decode", "distributed"), "ok"
    ), stdout
    assert summary["tests"] == {"passed": 1, "failed": 0, "errors": 0, "skipped": 1}  # the gpu test skips on CPU
    assert summary["triton_kernels_qualify_as_cuda_default"] is False  # never from a run without a GPU
    assert "Triton kernels qualify as the CUDA default: False" in stdout
    for name in ("tests", "kernels", "engine", "decode", "distributed"):
        assert _load(out, name)["device"] == "cpu (dry run)"
    dist = _load(out, "distributed")["records"]  # gloo on the CPU; NCCL on the GPU, same script
    assert dist["backend"] == "gloo" and dist["identical"] and dist["logits_equal"] and summary["distributed_identical"]


def test_kernel_records_carry_what_the_gpu_tables_need(dry_run):
    recs = _load(dry_run[0], "kernels")["records"]
    keys = {"device", "format", "bits", "group_size", "N", "K", "M", "us", "gbps", "pct_copy_bw", "bf16_us",
            "speedup", "ideal_speedup", "copy_gbps"}  # fmt: skip
    assert {r["format"] for r in recs} == {"int4", "int3-asym", "ssqr", "hptq"} and {r["M"] for r in recs} == {1, 3}
    for rec in recs:
        assert keys <= rec.keys() and rec["max_rel_err"] < 1e-5 and rec["us"] > 0
    int4 = next(r for r in recs if r["format"] == "int4" and r["M"] == 3)
    assert int4["ideal_speedup"] == round(16 / 4.125, 3)  # an fp16 scale per 128 weights
    assert int4["path"] == "fused" and {"fused_us", "dequant_us"} <= int4.keys()
    ssqr = next(r for r in recs if r["format"] == "ssqr")
    assert ssqr["bits_per_weight"] > 3 + 16 / 64  # inliers + scales + every byte of the CSR outliers
    hptq = next(r for r in recs if r["format"] == "hptq")
    assert hptq["path"] == "fused-gemv" and hptq["read_bits_per_weight"] > hptq["bits_per_weight"]


def test_engine_part_compares_two_runs_layer_by_layer(dry_run):
    engine = _load(dry_run[0], "engine")["records"]
    assert engine["passed"] is True
    tiny, stack = engine["parts"]
    assert tiny["reload_logits_equal"] is True and len(tiny["layers"]) == 14
    assert len(stack["layers"]) == 14 and stack["shape"]["blocks"] == 2
    for row in stack["layers"]:  # CPU against CPU in the dry run: the same codes, the same loss
        assert row["codes_equal"] == 1.0 and row["loss_rel_diff"] == 0.0 and row["solve_s"] > 0


def test_decode_part_measures_bf16_then_each_run(dry_run):
    recs = _load(dry_run[0], "decode")["records"]
    assert [(r["format"], r["backend"]) for r in recs] == [("bf16", "-"), ("int", "triton"), ("int", "torch"),
                                                           ("hptq", "torch")]  # fmt: skip
    assert recs[0]["speedup"] == 1.0 and all(r["tokens_per_s"] > 0 and r["deterministic"] for r in recs)


def test_report_keeps_a_stopped_part_and_checks_the_targets(tmp_path, load_bench):
    """A part past its budget is reported as a timeout with the records it printed; targets are judged."""
    report = load_bench("gpu_report")
    work, dest = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    rec = {"N": 4096, "K": 14336, "copy_gbps": 3000.0, "max_rel_err": 1e-3}
    lines = [
        {**rec, "format": "int4", "M": 1, "speedup": 3.6},
        {**rec, "format": "int3", "M": 1, "speedup": 4.0},
        {**rec, "format": "int4", "M": 128, "speedup": 0.95},
        {**rec, "format": "ssqr", "M": 128, "speedup": 0.8, "max_rel_err": 0.5},
        {"format": "hptq", "N": 4096, "K": 14336, "error": "CompilationError: out of resources"},
    ]
    (work / "kernels.stdout").write_text("\n".join(map(json.dumps, lines)) + "\n{truncated")
    (work / "kernels.status").write_text("124 150")
    (work / "kernels.stderr").write_text("compiling...\n")
    summary = report.main(work, dest)
    kernels = json.loads((dest / "kernels.json").read_text())
    assert kernels["status"] == "timeout" and len(kernels["records"]) == 5
    met = {c["target"].split(" ")[0]: c["met"] for c in kernels["targets"]}
    assert met == {"int4": True, "int3": False, "ssqr": None, "hptq": None, "every": False}
    assert kernels["wrong_results"] == [
        "ssqr 4096x14336 M=128: 0.5", "hptq 4096x14336: CompilationError: out of resources"
    ]  # fmt: skip
    assert summary["parts"]["tests"]["status"] == "not run"
    assert summary["triton_kernels_qualify_as_cuda_default"] is False
