"""Nothing lost, nothing leaked, nothing stale: publishing over an earlier version, overwriting, interrupting, and
the everyday inputs (token ids, ``datasets`` folders, threads) on a tiny random Llama and the local HTTP Hub."""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

import hf_babai
from hf_babai.cli import main as cli
from hf_babai.hf.summary import weights_sha256
from integration_tests.local_hub import LocalHub

from .conftest import TINY_IDS

TOKEN = "hf_safe_out_51d2"
INSTALL = 'pip install "hf-babai @ git+https://example.org/hf_babai@v0.1.0"'
X = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


def _logits(path: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path)(X).logits


def _quantize(tiny_env, out: Path, *extra: str) -> int:
    return cli(
        ["quantize", str(tiny_env["src"]), "--out", str(out), "--quiet", "--nsamples", "4", "--seqlen", "32", *extra]
    )


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)  # the local Hub speaks LFS only
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    server = LocalHub(tmp_path / "hub", token=TOKEN).start()
    yield server
    server.stop()


def test_publishing_a_second_version_leaves_exactly_its_files(tiny_env, tmp_path, hub, caplog):
    v4 = tmp_path / "v4"
    assert _quantize(tiny_env, v4, "--bits", "4", "--group-size", "32") == 0
    v3 = tmp_path / "v3"
    assert _quantize(tiny_env, v3, "--bits", "3", "--group-size", "32") == 0
    # the first version is sharded (a stale index and shards are what a mix would keep), and has stray files
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "v4s"
    AutoModelForCausalLM.from_pretrained(v4).save_pretrained(sharded, max_shard_size="100KB")
    for f in v4.iterdir():
        if not f.name.startswith("model") and f.name != "config.json":
            shutil.copy(f, sharded / f.name)
    (sharded / ".env").write_text(f"HF_TOKEN={TOKEN}\n")
    (sharded / "notes.txt").write_text("my notes")
    (sharded / "eval_results.json").write_text('{"eval_results": []}')
    assert (sharded / "model.safetensors.index.json").is_file()
    kw = {"token": TOKEN, "endpoint": hub.url, "install": INSTALL, "base_model": "org/tiny"}
    with caplog.at_level(logging.WARNING, logger="hf_babai.hub"):
        hf_babai.publish(sharded, "tester/tiny", **kw)
    assert "not uploaded (not part of a checkpoint): .env, eval_results.json, notes.txt" in caplog.text
    repo = hub.repos["tester/tiny"]
    first = set(repo.commits[repo.refs["main"]])
    assert {"model.safetensors.index.json", "config.json", "README.md"} <= first
    assert not {".env", "notes.txt", "eval_results.json"} & first
    # a dry run lists what the second version changes and uploads nothing
    plan = hf_babai.publish(v3, "tester/tiny", dry_run=True, **kw)
    assert len(hub.repos["tester/tiny"].commits) == 2  # creation + first publish: nothing new
    assert "model.safetensors.index.json" in plan.delete and "model.safetensors" in plan.upload
    assert any(line.startswith("  delete  model-00001-of-") for line in plan.lines())
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_babai.hub"):
        hf_babai.publish(v3, "tester/tiny", **kw)
    assert "deleted from tester/tiny (not in the new checkpoint): model-00001-of-" in caplog.text
    served = set(repo.commits[repo.refs["main"]])
    expected = {*(f.name for f in v3.iterdir()), "README.md", "quant_log.svg"}
    assert served - {".gitattributes"} == expected, served ^ expected  # exactly the second checkpoint, no mix
    assert len(repo.commits) == 3  # one commit per version
    card = ModelCard(hub.blob(repo.commits[repo.refs["main"]]["README.md"].sha256).decode())
    assert card.data.quantization["bits"] == 3
    assert INSTALL in card.text and "import hf_babai  # needed before from_pretrained" in card.text
    assert "pip install hf-babai\n" not in card.text
    assert "the model in 16 bits → this checkpoint" in card.text and "float32 tensors stored in 16 bits" in card.text
    # the per-layer plot: an SVG generated from quant_log.csv, one bar per layer, linked from the card
    import xml.etree.ElementTree as ET

    svg = ET.fromstring(hub.blob(repo.commits[repo.refs["main"]]["quant_log.svg"].sha256))
    assert len(svg.findall("{http://www.w3.org/2000/svg}rect")) == 14  # the tiny model's 14 quantized layers
    assert "](quant_log.svg)" in card.text
    for blob in (tmp_path / "hub" / "blobs").iterdir():
        assert TOKEN.encode() not in blob.read_bytes()


def test_cli_publish_dry_run_and_evaluation_results_of_these_weights(tiny_env, tmp_path, hub, capsys, monkeypatch):
    ckpt = tmp_path / "c"
    shutil.copytree(tiny_env["ckpt"], ckpt)
    row = {
        "task_type": "text-generation",
        "dataset_type": "babai_ppl",
        "dataset_name": "babai_ppl",
        "metric_type": "word_perplexity",
        "metric_value": 12.5,
    }
    saved = {"checkpoint_sha256": weights_sha256(ckpt), "results": {}, "eval_results": [row]}
    (ckpt / "eval_results.json").write_text(json.dumps(saved))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    base = tmp_path / "original.json"  # the original model's figures, for the card's baseline column
    base.write_text(json.dumps({"eval_results": [{**row, "metric_value": 10.25}]}))
    args = ["publish", str(ckpt), "tester/dry", "--dry-run", "--install", INSTALL, "--base-model", "org/tiny"]
    assert cli([*args, "--baseline-eval-results", str(base)]) == 0
    out = capsys.readouterr().out
    assert "  upload  model.safetensors" in out and "  skip    eval_results.json" in out
    # the hash matched: the figures are in the card, beside the original model's
    assert "| task | metric | this model | original (org/tiny) |" in out
    assert "| babai_ppl | word_perplexity | 12.5 | 10.25 |" in out
    assert "dry run: nothing was uploaded" in out and "tester/dry" not in hub.repos
    assert TOKEN not in out


def test_overwrite_replaces_the_old_checkpoint_and_keeps_user_files(tiny_env, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    AutoModelForCausalLM.from_pretrained(tiny_env["ckpt"]).save_pretrained(out, max_shard_size="100KB")
    (out / "notes.txt").write_text("mine")
    assert _quantize(tiny_env, out, "--bits", "3", "--group-size", "32", "--overwrite", "--json") == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed.strip().splitlines()[-1])
    assert {"peak_rss_gib", "size_before_mib", "size_after_mib"} <= set(summary)  # binary units, named as such
    assert " GiB, checkpoint " in printed and " MiB -> " in printed and " GB" not in printed
    names = {f.name for f in out.iterdir()}
    assert "model.safetensors.index.json" not in names and not any(n.startswith("model-0") for n in names)
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 3
    assert not list(tmp_path.glob(".out.partial-*"))
    _logits(out)


@pytest.mark.parametrize("when", ["save", "export"])
def test_interrupted_or_failed_run_leaves_nothing_that_loads(tiny_env, tmp_path, capsys, monkeypatch, when):
    """Ctrl-C while writing: exit 130 with one line, no folder at --out; a failure while overwriting keeps the
    old checkpoint as it was."""
    import hf_babai.cli

    def boom(*a, **k):
        raise KeyboardInterrupt

    target = "write_quant_log" if when == "save" else "export"
    monkeypatch.setattr(hf_babai, target, boom)
    extra = ["--export", str(tmp_path / "ct")] if when == "export" else []
    assert _quantize(tiny_env, tmp_path / "out", *extra) == 130
    err = capsys.readouterr().err
    assert (
        err.strip().splitlines()[-1].startswith("interrupted: `hf-babai quantize` stopped") and "Traceback" not in err
    )
    if when == "save":
        assert not (tmp_path / "out").exists()
    else:  # the babai checkpoint was finished before the export began; the export folder is absent
        assert (tmp_path / "out" / "config.json").is_file() and not (tmp_path / "ct").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    # overwriting a good checkpoint, then failing: the good one is untouched
    old = tmp_path / "old"
    shutil.copytree(tiny_env["ckpt"], old)
    before = {f.name: f.read_bytes() for f in old.iterdir()}

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(hf_babai, "write_quant_log", fail)
    assert _quantize(tiny_env, old, "--overwrite") == 1
    assert "disk full" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in old.iterdir()} == before
    assert hf_babai.cli is not None


def test_calibration_from_token_ids_jsonl_and_a_datasets_folder_equals_the_tensor(tiny_env, tmp_path):
    """The same token ids given as a tensor (Python), a .pt file, a JSONL of input_ids and a local ``datasets``
    folder give bit-identical checkpoints."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(
        tiny_env["src"],
        quantization_config=hf_babai.BabaiConfig(bits=4, group_size=32, dataset=TINY_IDS),
        dtype=torch.float32,
    )
    ref.save_pretrained(tmp_path / "ref")
    want = load_file(tmp_path / "ref" / "model.safetensors")
    torch.save(TINY_IDS, tmp_path / "ids.pt")
    rows = "".join(json.dumps({"input_ids": r.tolist()}) + "\n" for r in TINY_IDS)
    (tmp_path / "ids.jsonl").write_text(rows)
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.jsonl").write_text(rows)
    for name, source in [("pt", "ids.pt"), ("jsonl", "ids.jsonl"), ("ds", "datasets:" + str(tmp_path / "ds"))]:
        src = source if source.startswith("datasets:") else str(tmp_path / source)
        out = tmp_path / f"q-{name}"
        extra = ["--dataset", src, "--dataset-column", "input_ids", "--threads", "1"]
        assert _quantize(tiny_env, out, "--bits", "4", "--group-size", "32", "--dtype", "float32", *extra) == 0
        got = load_file(out / "model.safetensors")
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), name
        assert json.loads((out / "config.json").read_text())["quantization_config"]["calibration"]["tokens"] == 128


def test_narrow_layers_are_named_and_the_log_has_no_empty_column(tiny_env, tmp_path, caplog):
    from transformers import AutoModelForCausalLM

    cfg = hf_babai.BabaiConfig(bits=4, group_size=128, dataset=TINY_IDS)  # every Linear here is 64 or 128 wide
    with caplog.at_level(logging.WARNING, logger="hf_babai.engine"):
        model = AutoModelForCausalLM.from_pretrained(tiny_env["src"], quantization_config=cfg, dtype=torch.float32)
    assert (
        "12 layers are narrower than group_size=128" in caplog.text and "model.layers.0.self_attn.q_proj" in caplog.text
    )
    hf_babai.write_quant_log(model, tmp_path / "log.csv")
    with open(tmp_path / "log.csv") as f:
        rows = list(csv.DictReader(f))
    for col in rows[0]:
        values = [r[col] for r in rows]
        assert all(v != "" and v.lower() != "nan" for v in values), col
    documented = (Path(__file__).parents[1] / "docs" / "usage.md").read_text()
    for col in rows[0]:
        assert f"`{col}`" in documented, f"quant_log.csv column {col} is not documented in docs/usage.md"
    assert all(math.isfinite(float(r["loss_babai"])) for r in rows)
