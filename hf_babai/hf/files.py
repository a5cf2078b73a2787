"""Which files make a checkpoint, and writing one so that no crash or Ctrl-C leaves a folder that looks finished.

A checkpoint is written into a hidden sibling folder (``.NAME.partial-PID``) and moved into place only when every
file is there; until then the destination holds nothing new, so ``from_pretrained`` and ``hf-babai info`` can
never read half a checkpoint. Files that are not part of a checkpoint (a user's notes in the folder) are never
touched; the earlier checkpoint's files are replaced as a whole, so no stale shard or index survives.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

#: What a checkpoint folder is made of: weights and their index, config, generation config, tokenizer files, the
#: per-layer log. Custom-code models (``auto_map`` in the config) add their ``*.py`` files.
CHECKPOINT_PATTERNS = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "quant_log.csv",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)


def is_checkpoint_file(name: str, custom_code: bool = False) -> bool:
    """Whether a top-level file name belongs to a checkpoint (:data:`CHECKPOINT_PATTERNS`)."""
    if any(fnmatch.fnmatchcase(name, pat) for pat in CHECKPOINT_PATTERNS):
        return True
    return custom_code and name.endswith(".py")


def checkpoint_files(folder: str | Path) -> tuple[list[str], list[str]]:
    """``(checkpoint files, other files)`` of a folder, as sorted paths relative to it.

    Everything outside :data:`CHECKPOINT_PATTERNS` (hidden files, tokens, notes, earlier evaluation results, a
    ``README.md``, sub-folders) is "other", so that nothing private or stale is published or replaced."""
    folder = Path(folder)
    cfg = folder / "config.json"
    custom_code = cfg.is_file() and bool(json.loads(cfg.read_text()).get("auto_map"))
    ours, other = [], []
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = f.relative_to(folder).as_posix()
        (ours if "/" not in rel and is_checkpoint_file(rel, custom_code) else other).append(rel)
    return ours, other


def check_destination(out: str | Path, *, overwrite: bool, sources: dict[str, str | Path] | None = None) -> Path:
    """Refuses, before any work, an output folder that would lose data or cannot be written.

    ``out`` may not be, contain or lie inside any of ``sources`` (``{"the model": path}``); an existing
    non-empty ``out`` needs ``overwrite``; its parent must be creatable and writable (tested by creating and
    removing a probe folder)."""
    out = Path(out)
    target = out.resolve()
    for what, src in (sources or {}).items():
        s = Path(src).resolve()
        if target == s or s in target.parents or target in s.parents:
            raise ValueError(
                f"{out} is {'the same folder as' if target == s else 'nested with'} {what} ({src}); writing there "
                "would overwrite it: choose a separate folder"
            )
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is a file, not a folder; choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out} exists and is not empty; choose a new folder or pass --overwrite (overwrite=True)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.parent / f".{out.name}.probe-{os.getpid()}"
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise ValueError(f"cannot write {out} ({e.strerror or e}); choose a folder you can write to") from None
    return out


@contextlib.contextmanager
def staged_folder(out: str | Path) -> Iterator[Path]:
    """Yields an empty hidden folder beside ``out`` to write a checkpoint into; on success its files replace
    ``out``'s checkpoint files (other files in ``out`` stay), on any error or interrupt it is removed and ``out``
    is left as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        _commit(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _commit(tmp: Path, out: Path) -> None:
    """Moves a finished checkpoint from ``tmp`` into ``out``: one rename when ``out`` is new or empty, else the old
    checkpoint files are removed and the new ones moved in (config.json last, so the folder only looks like a
    checkpoint once its weights are all there)."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        if out.exists():
            out.rmdir()
        tmp.rename(out)
        return
    old, _ = checkpoint_files(out)
    if "config.json" in old:  # first, so that an interrupt here leaves no folder that loads
        (out / "config.json").unlink()
    for name in old:
        (out / name).unlink(missing_ok=True)
    names = sorted((p.name for p in tmp.iterdir()), key=lambda n: n == "config.json")
    for name in names:
        dst = out / name
        if dst.is_dir():
            shutil.rmtree(dst)
        os.replace(tmp / name, dst)
