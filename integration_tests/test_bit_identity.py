"""Bit identity of real quantized checkpoints: today's int / SSQR / HPTQ SmolLM2 checkpoints must not change.

Each configuration quantizes SmolLM2-135M (its real weights) on load with fixed calibration ids, saves it, reloads
it with plain ``from_pretrained`` and compares, against ``bit_identity_smollm2.json``: the sha256 of every saved
tensor (name, dtype, shape, bytes), the sha256 of the reloaded model's logits, and the saved quantization config.
A refactor must leave all three unchanged; a deliberate change of results regenerates the file:

    .venv/bin/python integration_tests/test_bit_identity.py --write          # the default (4-block) run
    .venv/bin/python integration_tests/test_bit_identity.py --write --full   # also all 30 blocks (~9 min)

The default run keeps the first 4 decoder blocks (28 Linears per configuration, about 75 s for all of them);
``-m full_model`` adds the same check on all 30 blocks. Floating-point results depend on the torch build and the
thread count, so the run uses 2 threads and is skipped (with the reason) under another torch version than the one
that wrote the file.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).with_name("bit_identity_smollm2.json")
THREADS = 2
CONFIGS = {
    "int3": {"bits": 3},
    "int4": {"bits": 4},
    "int2-two-pass": {"bits": 2, "group_size": 64},
    "int4-rtn-asym": {"bits": 4, "method": "rtn", "sym": False},
    "ssqr3": {"format": "ssqr", "bits": 3, "outlier_rate": 0.01},
    "ssqr4": {"format": "ssqr", "bits": 4, "outlier_rate": 0.01},
    "hptq3": {"format": "hptq", "target_bpw": 3.125},
    "hptq4": {"format": "hptq", "target_bpw": 4.125},
}
FULL = ("int3", "int4", "ssqr3", "ssqr4", "hptq3", "hptq4")
BLOCKS = 4


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensors_sha256(folder: Path) -> str:
    """One digest over every tensor of the checkpoint's safetensors files, in name order."""
    from safetensors import safe_open

    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for name in sorted(sf.keys()):
                t = sf.get_tensor(name).contiguous()
                h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _inputs():
    from transformers import AutoTokenizer

    from hf_babai import assets
    from hf_babai.perplexity import calibration_windows

    src = assets.ensure_model("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(src)
    ids = calibration_windows(tok, assets.calibration_text(), n=4, seqlen=128)
    probe = calibration_windows(tok, assets.eval_text(), n=2, seqlen=64, seed=1)
    return src, ids, probe


def run_config(name: str, blocks: int | None, tmp: Path, inputs) -> dict:
    """Quantize on load, save, reload; the record compared with the golden file."""
    from transformers import AutoModelForCausalLM

    import hf_babai

    src, ids, probe = inputs
    extra = {} if blocks is None else {"num_hidden_layers": blocks}
    cfg = hf_babai.BabaiConfig(dataset=ids, **CONFIGS[name])
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg, dtype=torch.float32, **extra)
    out = tmp / f"{name}-{blocks}"
    model.save_pretrained(out)
    del model
    again = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        logits = again(probe).logits.float().contiguous()
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    return {
        "tensors_sha256": tensors_sha256(out),
        "logits_sha256": _sha(logits.numpy().tobytes()),
        "quantization_config": qcfg,
    }


def _golden() -> dict:
    return json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def inputs():
    golden = _golden()
    if torch.__version__ != golden["torch"]:
        pytest.skip(f"bit identity is recorded for torch {golden['torch']}; this is torch {torch.__version__}")
    src, ids, probe = _inputs()
    assert _sha(ids.numpy().tobytes()) == golden["calibration_ids_sha256"], "the calibration ids changed"
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield src, ids, probe
    torch.set_num_threads(threads)


def _compare(got: dict, want: dict) -> None:
    assert got["tensors_sha256"] == want["tensors_sha256"], "the saved tensors changed"
    assert got["logits_sha256"] == want["logits_sha256"], "the reloaded model's logits changed"
    assert got["quantization_config"] == want["quantization_config"]


pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", list(CONFIGS))
def test_first_blocks_of_smollm2_quantize_bit_identically(name, inputs, tmp_path):
    _compare(run_config(name, BLOCKS, tmp_path, inputs), _golden()["blocks"][name])


@pytest.mark.full_model
@pytest.mark.parametrize("name", FULL)
def test_whole_smollm2_quantizes_bit_identically(name, inputs, tmp_path):
    _compare(run_config(name, None, tmp_path, inputs), _golden()["full"][name])


def write(full: bool) -> None:
    import tempfile

    torch.set_num_threads(THREADS)
    inputs = _inputs()
    old = _golden() if GOLDEN.is_file() else {}
    record = {
        "torch": torch.__version__,
        "calibration_ids_sha256": _sha(inputs[1].numpy().tobytes()),
        "blocks": {},
        "full": old.get("full", {}),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in CONFIGS:
            record["blocks"][name] = run_config(name, BLOCKS, Path(tmp), inputs)
            print(name, record["blocks"][name]["tensors_sha256"], flush=True)
        for name in FULL if full else ():
            record["full"][name] = run_config(name, None, Path(tmp), inputs)
            print(name, "full", record["full"][name]["tensors_sha256"], flush=True)
    GOLDEN.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    if "--write" not in sys.argv:
        sys.exit("usage: test_bit_identity.py --write [--full]  (pytest runs the checks)")
    write("--full" in sys.argv)
