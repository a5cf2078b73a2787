"""The shape of the tree: nothing in it can shadow an installed package."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    assert out.returncode == 0, out.stderr[-2000:]
    clashes = {n: names[n] for n in json.loads(out.stdout)}
    assert not clashes, f"rename these: they shadow installed or standard modules {clashes}"


def test_top_level_folders_named_like_packages_stay_namespace_folders():
    """``kernels/`` keeps the Triton sources at the top level by design; it has no ``__init__.py``, so Python
    only ever treats it as a namespace portion, which never wins over an installed ``kernels`` package."""
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert "kernels" not in _top_level_names()
