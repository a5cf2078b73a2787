"""The transformers integration on real SmolLM2-135M weights (offline): quantize-on-load with most blocks
offloaded to disk, save → plain ``from_pretrained`` reload with identical logits, ``pipeline`` generation,
the CLI (``quantize``, ``info``), corrupt checkpoints and the GPTQ export.

Kept small for CI: 8 calibration windows of 256 tokens, 4-bit group 64.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_babai
from hf_babai import CheckpointError, assets
from hf_babai.formats import BabaiLinear
from hf_babai.perplexity import calibration_windows
from tests.child import child_error

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
PROMPT = "It is a truth universally acknowledged, that a single man"


def _offload_bench():
    """``bench/offload_memory.py`` (a script folder, not a package): its child process quantizes on load and
    measures memory; the same code gives the README's Qwen figure."""
    spec = importlib.util.spec_from_file_location("bench_offload_memory", ROOT / "bench" / "offload_memory.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _quantize_in_subprocess(src: Path, out: Path, ids_file: Path, offload: str) -> dict:
    """Each run in its own process, so its peak RSS is its own (4-bit g64; 160 MiB of CPU when offloaded; min/max
    scales, which halve the time: the search does not touch what is compared here)."""
    budget = "160MiB" if offload != "-" else "-"
    return _offload_bench().run_child(src, out, ids_file, offload, budget, 4, 64, "minmax")


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """One quantize-on-load in memory and one with most blocks offloaded to disk, each saved to a folder."""
    src = assets.ensure_model("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(src)
    ids = calibration_windows(tok, assets.calibration_text(), n=8, seqlen=256)
    tmp = tmp_path_factory.mktemp("hf_real")
    torch.save(ids, tmp / "ids.pt")
    inmem = _quantize_in_subprocess(src, tmp / "inmem", tmp / "ids.pt", "-")
    offloaded = _quantize_in_subprocess(src, tmp / "offloaded", tmp / "ids.pt", str(tmp / "off"))
    tok.save_pretrained(tmp / "inmem")
    model = AutoModelForCausalLM.from_pretrained(tmp / "inmem")
    return {"src": src, "tok": tok, "model": model, "tmp": tmp, "ids": ids, "inmem": inmem, "offloaded": offloaded}


def test_disk_offloaded_quantization_matches_in_memory_and_never_holds_the_float_model(real):
    info, ref = real["offloaded"], real["inmem"]
    assert sum(name.startswith("model.layers.") for name in info["disk"]) >= 20, info["disk"]  # most blocks on disk
    assert ref["disk"] == []
    # the property itself, counted exactly: float Linear weights materialized in the decoder blocks at any
    # time. In memory that is all 30 blocks (405 MiB in fp32); offloaded it is the few blocks that fit in
    # max_memory plus the one being quantized, each freed once quantized.
    block_mb = (576 * 576 * 2 + 576 * 192 * 2 + 576 * 1536 * 3) * 4 / 2**20  # one SmolLM2 block's Linears, fp32
    assert ref["float_peak_mb"] > 29 * block_mb, ref
    blocks_on_disk = sum(name.startswith("model.layers.") for name in info["disk"])
    assert info["float_peak_mb"] <= (30 - blocks_on_disk + 1) * block_mb + 1e-6, info
    # private memory above the process baseline stays well under the float model (513 MiB) plus a block. Total
    # RSS is not asserted: it counts mmapped checkpoint pages and depends on the machine's page cache.
    fp32_mb = 134.5e6 * 4 / 2**20
    assert info["peak_anon_mb"] - info["base_anon_mb"] < 1.5 * fp32_mb, info
    tmp = real["tmp"]
    assert torch.equal(torch.load(tmp / "offloaded" / "logits.pt"), torch.load(tmp / "inmem" / "logits.pt"))


def test_reload_through_plain_from_pretrained_is_exact(real):
    tmp = real["tmp"]
    for name in ("inmem", "offloaded"):
        again = AutoModelForCausalLM.from_pretrained(tmp / name)
        assert sum(isinstance(m, BabaiLinear) for m in again.modules()) == 30 * 7
        with torch.no_grad():
            assert torch.equal(again(real["ids"][:2, :128]).logits, torch.load(tmp / name / "logits.pt"))


def test_pipeline_generates_the_in_memory_models_greedy_text(real):
    pipe = transformers.pipeline("text-generation", model=str(real["tmp"] / "inmem"))
    # 8 tokens: every step dequantizes all 210 layers on the torch path, so each token costs seconds on a CPU
    text = pipe(PROMPT, max_new_tokens=8, do_sample=False)[0]["generated_text"]
    tok = real["tok"]
    enc = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        ids = real["model"].generate(**enc, max_new_tokens=8, do_sample=False)
    assert text == tok.decode(ids[0], skip_special_tokens=True)
    assert len(text) > len(PROMPT) + 8 and text.count(" ") > 11  # real words, not one repeated token


def test_truncated_real_checkpoint_is_refused(real, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(real["tmp"] / "inmem", bad)
    f = bad / "model.safetensors"
    os.truncate(f, f.stat().st_size // 2)
    with pytest.raises(CheckpointError, match="truncated"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_missing_tensor_in_real_checkpoint_is_refused(real, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(real["tmp"] / "inmem", bad)
    sd = load_file(bad / "model.safetensors")
    del sd["model.layers.7.self_attn.k_proj.qweight"]
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"layers\.7\.self_attn\.k_proj\.qweight is missing"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_cli_quantize_and_info(real, tmp_path):
    out = tmp_path / "cli"
    gptq = tmp_path / "cli-gptq"
    cmd = [sys.executable, "-m", "hf_babai", "quantize", str(real["src"]), "--out", str(out), "--bits", "3"]
    cmd += ["--group-size", "64", "--nsamples", "4", "--seqlen", "128", "--dtype", "float32", "--json"]
    cmd += ["--scale-method", "minmax"]  # half the time of the default search; the CLI path is what is tested
    cmd += ["--export-gptq", str(gptq)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, child_error(proc)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["layers"] == 210 and 3.25 <= summary["bits_per_weight"] < 3.3
    assert (out / "quant_log.csv").read_text().count("\n") == 211
    assert "mlp.down_proj" in proc.stdout  # the live per-layer table
    info = subprocess.run(
        [sys.executable, "-m", "hf_babai", "info", str(out), "--json"], capture_output=True, text=True
    )
    assert info.returncode == 0, child_error(info)
    data = json.loads(info.stdout)
    assert data["quantized_layers"] == 210 and data["layer_stats"]["rows"] == 210
    qc = json.loads((gptq / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 3
    # errors: not a babai checkpoint, already-quantized input, missing dataset file
    for args, needle in [
        (["info", str(real["src"])], "not a babai checkpoint"),
        (["quantize", str(out), "--out", str(tmp_path / "x")], "already quantized"),
        (["quantize", str(real["src"]), "--out", str(tmp_path / "y"), "--dataset", "nope.txt"], "nope.txt"),
        (["quantize", str(real["src"]), "--out", str(tmp_path / "z"), "--format", "hptq"], "target_bpw"),
        (["quantize", str(real["src"]), "--out", str(tmp_path / "w"), "--format", "ssqr"], "outlier_rate"),
        (["quantize", str(real["src"]), "--out", str(tmp_path / "v"), "--method", "rtn", "--rescale"], "rescale"),
        (["quantize", str(real["src"]), "--out", str(tmp_path / "t"), "--damp-width", "-1"], "damp_width=-1.0"),
        (
            ["quantize", str(real["src"]), "--out", str(tmp_path / "u"), "--method", "rtn", "--scale-method", "hmse"],
            "hmse",
        ),
    ]:
        bad = subprocess.run([sys.executable, "-m", "hf_babai", *args], capture_output=True, text=True)
        assert bad.returncode == 1 and needle in bad.stderr, bad.stderr[-2000:]


def test_loading_without_import_is_documented_failure(real):
    """Without ``import hf_babai`` transformers does not know quant_method 'babai' (it would load random dense
    weights); the config parser used by lm-eval raises. The README documents the one-line fix."""
    code = (
        "import json, sys\n"
        "from transformers.quantizers.auto import AutoQuantizationConfig\n"
        "cfg = json.load(open(sys.argv[1]))['quantization_config']\n"
        "AutoQuantizationConfig.from_dict(cfg)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(real["tmp"] / "inmem" / "config.json")], capture_output=True, text=True
    )
    assert proc.returncode != 0 and "Unknown quantization type" in proc.stderr
    assert "import hf_babai" in (ROOT / "README.md").read_text()


def test_gptq_export_of_real_model_is_lossless(real, tmp_path):
    from safetensors import safe_open

    from hf_babai.formats.gptq import unpack_stream

    out = hf_babai.export(real["tmp"] / "inmem", tmp_path / "gptq", "gptq")
    mod = real["model"].model.layers[5].mlp.down_proj
    with safe_open(out / "model.safetensors", "pt") as f:
        qweight, qzeros = (
            f.get_tensor("model.layers.5.mlp.down_proj.qweight"),
            f.get_tensor("model.layers.5.mlp.down_proj.qzeros"),
        )
        scales, g_idx = (
            f.get_tensor("model.layers.5.mlp.down_proj.scales"),
            f.get_tensor("model.layers.5.mlp.down_proj.g_idx"),
        )
    codes = unpack_stream(qweight, 4, mod.in_features)  # [K, N]
    zeros = unpack_stream(qzeros.t().contiguous(), 4, mod.out_features).t() + 1  # [G, N]
    w = scales.float()[g_idx.long()] * (codes - zeros[g_idx.long()]).float()
    assert torch.equal(w.t(), mod.dequantize(torch.float32))
    assert (tmp_path / "gptq" / "tokenizer.json").exists()
