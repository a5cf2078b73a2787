"""Bad inputs across the CLI, the Python API, checkpoint folders and the Hub: each gets the right kind of error, the
words that say what to fix, and leaves every user file as it was.

One table (``CASES``), run on a tiny random Llama with a byte-level tokenizer; the Hub is the local HTTP server of
``integration_tests/local_hub.py`` (plus a port nobody listens on, and one that never answers). The count is
reported in ``docs/reliability.md``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hf_babai
from hf_babai import BabaiConfig, CheckpointError
from hf_babai.cli import main as cli
from hf_babai.engine import QuantizationError
from integration_tests.local_hub import LocalHub

TOKEN = "hf_badinput_3b9f"
IDS = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))


def _tree(*folders: Path) -> dict[str, str]:
    """Every file under the folders, by path, with its SHA-256."""
    out = {}
    for folder in folders:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def _copy(src: Path, dst: Path, edit: Callable[[Path], None] | None = None) -> Path:
    shutil.copytree(src, dst)
    if edit is not None:
        edit(dst)
    return dst


def _nan_scale(d: Path) -> None:
    sd = load_file(d / "model.safetensors")
    key = "model.layers.1.mlp.down_proj.scales"
    sd[key] = sd[key].clone()
    sd[key][0, 0] = float("nan")
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


@dataclass
class Case:
    """``run(env, tmp)`` does the bad thing; a CLI case returns its argv (run in-process: exit code 1 or 2 and the
    words on stderr), a Python case raises ``error`` with the words."""

    name: str
    run: Callable[[dict, Path], list[str] | None]
    words: tuple[str, ...]
    error: type[BaseException] | None = None  # None: a CLI case
    code: int = 1


def q(env: dict, tmp: Path, *extra: str) -> list[str]:
    return ["quantize", str(env["src"]), "--out", str(tmp / "out"), "--quiet", *extra]


def _bad_jsonl(tmp: Path, text: str) -> str:
    return str(_write(tmp / "calib.jsonl", text))


def _dataset_folder(tmp: Path) -> str:
    _write(tmp / "ds" / "train.jsonl", json.dumps({"body": "hello"}) + "\n")
    return "datasets:" + str(tmp / "ds")


def _closed_port() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


def _publish(env: dict, endpoint: str, repo: str = "tester/r", token: str = TOKEN, **kw) -> None:
    hf_babai.publish(env["ckpt"], repo, token=token, endpoint=endpoint, install="pip install hf-babai-test", **kw)


def _stalled(env: dict, tmp: Path) -> None:
    s = socket.socket()  # accepts connections (the kernel's backlog) and never answers
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    try:
        _publish(env, f"http://127.0.0.1:{s.getsockname()[1]}", timeout=1.0)
    finally:
        s.close()


def _with_hub(tmp: Path, fn: Callable[[LocalHub], None]) -> None:
    hub = LocalHub(tmp / "hub", token=TOKEN).start()
    try:
        fn(hub)
    finally:
        hub.stop()


CASES = [
    # ---- CLI quantize: caught before any model loads
    Case(
        "missing model folder", lambda e, t: ["quantize", str(t / "nope"), "--out", str(t / "o")], ("does not exist",)
    ),
    Case("missing ./ model", lambda e, t: ["quantize", "./no/such/model", "--out", str(t / "o")], ("model folder",)),
    Case(
        "out is the model",
        lambda e, t: ["quantize", str(e["src"]), "--out", str(e["src"])],
        ("same folder as the model",),
    ),
    Case("out inside the model", lambda e, t: [*q(e, t)[:2], "--out", str(e["src"] / "q")], ("nested with the model",)),
    Case(
        "out not empty",
        lambda e, t: (_write(t / "out" / "notes.txt", "mine"), q(e, t))[1],
        ("is not empty", "--overwrite"),
    ),
    Case("out is a file", lambda e, t: (_write(t / "out", "x"), q(e, t))[1], ("is a file",)),
    Case("out unwritable", lambda e, t: ["quantize", str(e["src"]), "--out", "/proc/hf_babai/out"], ("cannot write",)),
    Case("gptq export = out", lambda e, t: q(e, t, "--export-gptq", str(t / "out")), ("same folder as --out",)),
    Case("export inside out", lambda e, t: q(e, t, "--export", str(t / "out" / "ct")), ("nested with --out",)),
    Case(
        "two exports in one folder",
        lambda e, t: q(e, t, "--export", str(t / "x"), "--export-gptq", str(t / "x")),
        ("same folder as the compressed-tensors export",),
    ),
    Case("max-memory without a size", lambda e, t: q(e, t, "--max-memory", "cpu"), ("DEVICE=SIZE", "'cpu'")),
    Case("threads 0", lambda e, t: q(e, t, "--threads", "0"), ("--threads must be >= 1",)),
    Case("dataset file missing", lambda e, t: q(e, t, "--dataset", str(t / "nope.txt")), ("nope.txt", "austen")),
    Case(
        "jsonl bad JSON",
        lambda e, t: q(e, t, "--dataset", _bad_jsonl(t, '{"text": "a"}\n{"text": "b"\n')),
        ("calib.jsonl:2: not valid JSON",),
    ),
    Case(
        "jsonl without text",
        lambda e, t: q(e, t, "--dataset", _bad_jsonl(t, '{"body": "a"}\n')),
        ("calib.jsonl:1:", "'text'"),
    ),
    Case(
        "jsonl text and ids mixed",
        lambda e, t: q(e, t, "--dataset", _bad_jsonl(t, '{"text": "a"}\n{"input_ids": [1, 2]}\n')),
        ("calib.jsonl:2:", "not a mix"),
    ),
    Case("jsonl empty", lambda e, t: q(e, t, "--dataset", _bad_jsonl(t, "\n\n")), ("no calibration rows",)),
    Case(
        ".pt not a tensor file",
        lambda e, t: q(e, t, "--dataset", str(_write(t / "ids.pt", "not a tensor"))),
        ("cannot be read with torch.load",),
    ),
    Case(
        ".pt holding a dict",
        lambda e, t: (torch.save({"a": 1}, t / "ids.pt"), q(e, t, "--dataset", str(t / "ids.pt")))[1],
        ("holds dict", "integer tensor"),
    ),
    Case(
        "datasets: missing",
        lambda e, t: q(e, t, "--dataset", "datasets:" + str(t / "no_ds")),
        ("cannot load dataset",),
    ),
    Case(
        "datasets: no such column", lambda e, t: q(e, t, "--dataset", _dataset_folder(t)), ("no column 'text'", "body")
    ),
    Case("bits not offered", lambda e, t: q(e, t, "--bits", "5"), ("invalid choice",), code=2),
    Case("group size 0", lambda e, t: q(e, t, "--group-size", "0"), ("group_size=0",)),
    Case("already quantized", lambda e, t: ["quantize", str(e["ckpt"]), "--out", str(t / "o")], ("already quantized",)),
    # ---- CLI export and info
    Case("export a float model", lambda e, t: ["export", str(e["src"]), str(t / "o")], ("not a babai checkpoint",)),
    Case(
        "export into its source",
        lambda e, t: ["export", str(e["ckpt"]), str(e["ckpt"])],
        ("same folder as the source checkpoint",),
    ),
    Case(
        "export inside its source",
        lambda e, t: ["export", str(e["ckpt"]), str(e["ckpt"] / "ct")],
        ("nested with the source checkpoint",),
    ),
    Case(
        "export over a non-empty folder",
        lambda e, t: (_write(t / "o" / "keep.txt", "k"), ["export", str(e["ckpt"]), str(t / "o")])[1],
        ("is not empty",),
    ),
    Case("info on an empty folder", lambda e, t: (t.mkdir(exist_ok=True), ["info", str(t)])[1], ("no config.json",)),
    Case(
        "info on config only",
        lambda e, t: (_write(t / "c" / "config.json", (e["ckpt"] / "config.json").read_text()), ["info", str(t / "c")])[
            1
        ],
        ("no *.safetensors weights",),
    ),
    Case(
        "info on NaN scales",
        lambda e, t: ["info", str(_copy(e["ckpt"], t / "c", _nan_scale))],
        ("non-finite", "model.layers.1.mlp.down_proj.scales"),
    ),
    Case(
        "info on a truncated file",
        lambda e, t: [
            "info",
            str(_copy(e["ckpt"], t / "c", lambda d: os.truncate(d / "model.safetensors", 4096))),
        ],
        ("truncated",),
    ),
    # ---- CLI publish: evaluation results that may not describe the checkpoint (refused before the Hub is asked)
    Case(
        "eval results without a hash",
        lambda e, t: [
            "publish",
            str(_copy(e["ckpt"], t / "c", lambda d: _write(d / "eval_results.json", '{"eval_results": []}'))),
            "me/x",
        ],
        ("records no checkpoint hash", "hf-babai eval"),
    ),
    Case(
        "eval results of other weights",
        lambda e, t: [
            "publish",
            str(
                _copy(
                    e["ckpt"],
                    t / "c",
                    lambda d: _write(
                        d / "eval_results.json", json.dumps({"eval_results": [], "checkpoint_sha256": "0"})
                    ),
                )
            ),
            "me/x",
        ],
        ("measured on other weights",),
    ),
    Case(
        "eval results file missing",
        lambda e, t: ["publish", str(e["ckpt"]), "me/x", "--eval-results", str(t / "none.json")],
        ("does not exist",),
    ),
    Case(
        "eval results not JSON",
        lambda e, t: ["publish", str(e["ckpt"]), "me/x", "--eval-results", str(_write(t / "e.json", "{"))],
        ("is not an eval_results.json",),
    ),
    # ---- Python API and checkpoints
    Case(
        "load NaN scales",
        lambda e, t: AutoModelForCausalLM.from_pretrained(_copy(e["ckpt"], t / "c", _nan_scale)),
        ("non-finite", "model.layers.1.mlp.down_proj.scales"),
        CheckpointError,
    ),
    Case(
        "load config only",
        lambda e, t: AutoModelForCausalLM.from_pretrained(
            _copy(e["ckpt"], t / "c", lambda d: (d / "model.safetensors").unlink())
        ),
        ("no file named model.safetensors",),
        OSError,
    ),
    Case(
        "load a missing tensor",
        lambda e, t: AutoModelForCausalLM.from_pretrained(
            _copy(
                e["ckpt"],
                t / "c",
                lambda d: save_file(
                    {k: v for k, v in load_file(d / "model.safetensors").items() if "0.mlp.up_proj.qweight" not in k},
                    d / "model.safetensors",
                    metadata={"format": "pt"},
                ),
            )
        ),
        ("up_proj.qweight is missing",),
        CheckpointError,
    ),
    Case(
        "export inside the source (Python)",
        lambda e, t: hf_babai.export(e["ckpt"], e["ckpt"] / "ct"),
        ("inside the source folder",),
        ValueError,
    ),
    Case(
        "dataset without usable columns",
        lambda e, t: AutoModelForCausalLM.from_pretrained(
            e["src"], quantization_config=BabaiConfig(dataset=__import__("datasets").Dataset.from_dict({"x": [1]}))
        ),
        ("'input_ids' or a 'text' column",),
        ValueError,
    ),
    Case(
        "NaN weight names its layer",
        lambda e, t: AutoModelForCausalLM.from_pretrained(
            _copy(
                e["src"],
                t / "m",
                lambda d: save_file(
                    {
                        k: (v.clone().fill_(float("nan")) if k == "model.layers.1.mlp.down_proj.weight" else v)
                        for k, v in load_file(d / "model.safetensors").items()
                    },
                    d / "model.safetensors",
                    metadata={"format": "pt"},
                ),
            ),
            quantization_config=BabaiConfig(bits=4, group_size=32, dataset=IDS),
        ),
        ("model.layers.1.mlp.down_proj",),
        QuantizationError,
    ),
    Case(
        "publish a folder that is no checkpoint",
        lambda e, t: _with_hub(t, lambda hub: hf_babai.publish(t / "hub", "tester/r", token=TOKEN, endpoint=hub.url)),
        ("no config.json",),
        ValueError,
    ),
    # ---- the Hub: down, stalled, wrong token, no write permission
    Case(
        "Hub down", lambda e, t: _publish(e, _closed_port()), ("cannot be reached", "127.0.0.1"), hf_babai.PublishError
    ),
    Case("Hub stalled", _stalled, ("did not answer in time", "127.0.0.1"), hf_babai.PublishError),
    Case(
        "Hub rejects the token",
        lambda e, t: _with_hub(t, lambda hub: _publish(e, hub.url, token="hf_wrong")),
        ("rejected the token (401",),
        hf_babai.PublishError,
    ),
    Case(
        "repo without write permission",
        lambda e, t: _with_hub(t, lambda hub: _publish(e, hub.url, repo="someone-else/r")),
        ("refused the upload to someone-else/r (403", "can write to that namespace"),
        hf_babai.PublishError,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, tiny_env, tmp_path, capsys, monkeypatch):
    env = tiny_env
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)  # the local Hub speaks LFS only
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    before = _tree(env["src"], env["ckpt"])
    if case.error is not None:
        with pytest.raises(case.error) as info:
            case.run(env, tmp_path)
        message = str(info.value)
    else:
        argv = case.run(env, tmp_path)
        mine = _tree(tmp_path)

        def no_model_load(*a, **k):  # every CLI case is refused before a model is loaded (no wasted run)
            raise AssertionError("a model was loaded before the bad input was refused")

        monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_model_load)
        try:
            code = cli(argv)
        except SystemExit as e:  # argparse's usage errors
            code = e.code
        message = capsys.readouterr().err
        assert code == case.code, message
        assert "Traceback" not in message
        assert _tree(tmp_path) == mine, "a user file changed"
        assert not (tmp_path / "out" / "config.json").exists()
    for words in case.words:
        assert words in message, message
    assert TOKEN not in message
    assert _tree(env["src"], env["ckpt"]) == before, "a user file changed"


def test_the_suite_is_large_enough():
    assert len(CASES) >= 40
    assert f"{len(CASES)} bad inputs" in (Path(__file__).parents[1] / "docs" / "reliability.md").read_text()
