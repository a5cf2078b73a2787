"""The shape of the tree: nothing in it can shadow an installed package."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .child import child_error

ROOT = Path(__file__).resolve().parents[1]
# Folders whose .py files run as scripts or are imported with the folder itself first on sys.path
# (``python bench/x.py`` puts bench/ there; pytest puts the rootdir there for the test packages).
SCRIPT_FOLDERS = ("bench", "scripts", "tests", "integration_tests", "kernels", "docs")


def _top_level_names() -> dict[str, str]:
    """Every module name the tree can put at the top of ``sys.path``, with the file that defines it."""
    names: dict[str, str] = {}
    for entry in ROOT.iterdir():
        if entry.name.startswith(".") or entry.name == "hf_babai":
            continue
        if entry.is_file() and entry.suffix == ".py":
            names[entry.stem] = entry.name
        elif entry.is_dir() and (entry / "__init__.py").is_file():  # a regular package beats site-packages
            names[entry.name] = f"{entry.name}/__init__.py"
    for folder in SCRIPT_FOLDERS:
        for f in (ROOT / folder).glob("*.py"):
            if f.stem not in ("__init__", "conftest"):
                names[f.stem] = f"{folder}/{f.name}"
        for d in (ROOT / folder).iterdir() if (ROOT / folder).is_dir() else ():
            if d.is_dir() and (d / "__init__.py").is_file():
                names[d.name] = f"{folder}/{d.name}/__init__.py"
    return names


def test_no_module_in_the_tree_shadows_an_installed_or_standard_module():
    """``bench/kernels.py`` once shadowed Hugging Face's ``kernels`` (which transformers imports) whenever a bench
    script ran. Each name the tree can put first on ``sys.path`` is looked up from outside the tree, in this
    interpreter's own environment: none may be importable there, nor be a standard-library module."""
    names = _top_level_names()
    probe = (
        "import importlib.util, json, sys\n"
        "names = json.loads(sys.argv[1])\n"
        "print(json.dumps([n for n in names if n in sys.stdlib_module_names or importlib.util.find_spec(n)]))"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", probe, json.dumps(sorted(names))], cwd="/", capture_output=True, text=True
    )
    assert out.returncode == 0, child_error(out)
    clashes = {n: names[n] for n in json.loads(out.stdout)}
    assert not clashes, f"rename these: they shadow installed or standard modules {clashes}"


def test_top_level_folders_named_like_packages_stay_namespace_folders():
    """``kernels/`` keeps the Triton sources at the top level by design; it has no ``__init__.py``, so Python
    only ever treats it as a namespace portion, which never wins over an installed ``kernels`` package."""
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert "kernels" not in _top_level_names()


# ------------------------------------------------------------------ layers and the imports each may make

PACKAGE = ROOT / "hf_babai"
# Each room of hf_babai and the rooms it may import (itself included). One way, top to bottom:
# cli/hub/eval -> hf (the transformers adapter) -> engine -> spec -> formats + solver; kernels/ below formats
# (loaded by path); data and perplexity are leaves anyone above the solver may use.
MAY_IMPORT = {
    "solver": {"solver"},
    "formats": {"formats", "solver"},
    "spec": {"spec", "formats", "solver"},
    "engine": {"engine", "spec", "formats", "solver"},
    "data": {"data"},
    "perplexity": {"perplexity"},
    "hf": {"hf", "engine", "spec", "formats", "solver", "data", "perplexity"},
    "hub": {"hub", "hf"},
    "eval": {"eval", "data", "__init__"},
    "assets": {"assets", "data"},
    "cli": {"cli", "__init__", "hf", "engine", "spec", "formats", "solver", "data", "perplexity", "assets", "eval"},
    "__init__": {"__init__", "hf", "eval", "hub"},
    "__main__": {"cli"},
}
# Third-party packages only some rooms may import: the pure layers stay free of transformers, and only the
# commands that ask for them load lm-eval, the Hub client or the offline installer's subprocesses.
ONLY_IN = {
    "transformers": {"hf", "cli", "assets", "eval"},
    "huggingface_hub": {"hub", "eval"},
    "lm_eval": {"eval"},
    "accelerate": {"engine"},
    "subprocess": {"assets"},
    "triton": set(),
}


def _imports(path: Path, package: str) -> set[str]:
    """Absolute names imported anywhere in a source file, run-time imports only (an ``if TYPE_CHECKING:`` block is
    for type hints); relative imports resolved against ``package``; ``from a import b`` gives both ``a`` and
    ``a.b``, since ``b`` may be a module."""
    import ast

    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING":
            return
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            mod = ".".join(p for p in (base, node.module or "") if p)
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return out


def _room(module: str) -> str | None:
    """The room of an ``hf_babai`` module name (``None`` outside the package; ``hf_babai.x`` where ``x`` is no
    module of the package, e.g. ``from hf_babai import BabaiConfig``, is the package's ``__init__``)."""
    parts = module.split(".")
    if parts[0] != "hf_babai":
        return None
    if len(parts) > 1 and ((PACKAGE / parts[1]).is_dir() or (PACKAGE / f"{parts[1]}.py").is_file()):
        return parts[1]
    return "__init__"


def _sources() -> list[tuple[str, Path, str]]:
    """``(room, file, package the file's relative imports resolve against)`` for every module of hf_babai."""
    out = []
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = f.relative_to(ROOT).with_suffix("").parts  # ("hf_babai", "engine", "blocks")
        package = ".".join(parts[:-1])
        room = parts[1] if len(parts) > 2 else parts[-1]
        out.append((room, f, package))
    return out


def test_every_room_of_the_package_has_a_rule():
    rooms = {room for room, _, _ in _sources()}
    assert rooms == set(MAY_IMPORT), f"give each room a rule: {sorted(rooms ^ set(MAY_IMPORT))}"


def test_imports_flow_one_way_between_rooms():
    bad = []
    for room, f, package in _sources():
        for name in _imports(f, package):
            target = _room(name)
            if target is not None and target not in MAY_IMPORT[room]:
                bad.append(f"{f.relative_to(ROOT)} imports {name} ({room} -> {target})")
            top = name.split(".")[0]
            if top in ONLY_IN and room not in ONLY_IN[top]:
                bad.append(f"{f.relative_to(ROOT)} imports {top}, which only {sorted(ONLY_IN[top])} may")
    assert not bad, "\n".join(bad)


def test_triton_sources_import_nothing_of_the_package():
    for f in (ROOT / "kernels").glob("*.py"):
        assert not {n for n in _imports(f, "kernels") if n.startswith("hf_babai")}, f.name


# ------------------------------------------------------------------ what `import hf_babai` and quantizing load

_LEAN_CHILD = r"""
import json, os, subprocess, sys, tempfile

def refuse(*a, **k):
    raise AssertionError(f"a subprocess was started: {a[:1]}")

subprocess.run = subprocess.Popen = subprocess.call = subprocess.check_call = subprocess.check_output = refuse
os.system = refuse
import hf_babai  # registers the quantizer
after_import = sorted(sys.modules)
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

class Chars:  # a character-level tokenizer: enough for calibration windows
    bos_token_id = None
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [min(ord(c), 255) for c in text]}

cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
path = tempfile.mkdtemp()
LlamaForCausalLM(cfg).save_pretrained(path)
qcfg = hf_babai.BabaiConfig(bits=4, group_size=16, dataset="austen", tokenizer=Chars(), nsamples=2, seqlen=32)
model = AutoModelForCausalLM.from_pretrained(path, quantization_config=qcfg, dtype=torch.float32)
print(json.dumps({"after_import": after_import, "after_quantize": sorted(sys.modules),
                  "calibration": model.config.quantization_config.calibration}))
"""


def test_import_and_quantize_on_load_stay_lean_and_never_install():
    """``import hf_babai`` registers the quantizer and loads nothing a user did not ask for (no lm-eval, no Hub card
    and upload code, no Triton, no offline installer); quantizing on load with the built-in text starts no
    process (no pip, no apt) and never imports the installer."""
    out = subprocess.run([sys.executable, "-c", _LEAN_CHILD], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, child_error(out)
    run = json.loads(out.stdout.strip().splitlines()[-1])
    heavy = ("lm_eval", "hf_babai.eval", "hf_babai.hub", "hf_babai.assets", "hf_babai.cli", "triton")
    loaded = [m for m in run["after_import"] if m.startswith(heavy)]
    assert not loaded, loaded
    assert "transformers.quantizers.auto" in run["after_import"]
    # (transformers itself may import triton while building a model; hf_babai's kernels load only on CUDA inputs)
    assert not [m for m in run["after_quantize"] if m.startswith((*heavy[:-1], "hf_babai.kernels"))]
    assert run["calibration"]["source"] == "austen" and run["calibration"]["tokens"] == 64


def test_the_packaged_texts_are_checked_when_read(monkeypatch, tmp_path):
    """A damaged install fails loudly instead of calibrating on something else."""
    import lzma

    from hf_babai import data

    text = data.calibration_text()
    assert len(text) > 1_300_000 and text.startswith("EMMA")
    assert data.eval_text_file().read_text().startswith("Chapter 1")
    (tmp_path / data.CALIBRATION_FILE).write_bytes(lzma.compress(text[:-1].encode()))
    monkeypatch.setattr(data, "data_file", lambda name: tmp_path / name)
    data.calibration_text.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"is damaged .* reinstall hf-babai"):
            data.calibration_text()
    finally:
        data.calibration_text.cache_clear()


# ------------------------------------------------------------------ README and docs


def test_readme_is_one_screen_without_run_histories():
    """The README says what hf_babai is, how to install and run it, a short results table and links; measurements,
    designs and histories live in docs/ and bench/results/."""
    import re

    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 85
    assert not re.search(r"\bcommit\s+[0-9a-f]{7,40}\b", text), "no commit hashes in the README"
    for command in ("bash scripts/setup.sh && .venv/bin/hf-babai demo", "bash scripts/test.sh"):
        assert command in text
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()  # CI runs the README's test command


def test_every_setting_is_documented_with_its_default():
    from hf_babai.spec import settings

    usage = (ROOT / "docs" / "usage.md").read_text()
    missing = [name for name in settings() if f"| `{name}` |" not in usage]
    assert not missing, f"docs/usage.md's settings table lacks {missing}"
