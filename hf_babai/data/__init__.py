"""Texts shipped inside the package, so calibration and the built-in evaluation need no download.

- ``austen_calibration.txt.xz``: Jane Austen's *Emma* and *Northanger Abbey* (public domain; the text of the
  Debian package ``r-cran-janeaustenr``), 1.3 M characters, about 330 k tokens for a 49 k-vocabulary tokenizer
  and 315 k for Qwen2.5's: enough for 128 windows of 2048 tokens. ``BabaiConfig(dataset="austen")`` uses it.
- ``persuasion_ch1-4.txt``: chapters 1-4 of Austen's *Persuasion*, the text of the offline lm-eval task
  ``babai_ppl`` (used by neither calibration nor the perplexity benchmark).

Both are checked against their sha256 when read, so a damaged install fails loudly instead of calibrating on
something else.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import lzma
import os
from functools import cache
from pathlib import Path

CALIBRATION_FILE = "austen_calibration.txt.xz"
CALIBRATION_SHA256 = "f599416b555e1a981080c60e59c2efa17a4c2a4c81cd47b0f3f5fe688b8e8b5f"  # of the decompressed text
EVAL_FILE = "persuasion_ch1-4.txt"
EVAL_SHA256 = "b6f2fc58a1f11631c6d0507af6a33a7e9b33243826bfcf6f6c56d22ff291bbb9"


CACHE_ENV = "HF_BABAI_CACHE"
"""Environment variable that relocates hf_babai's cache (used by CI); an explicit ``cache_dir`` wins over it."""


def default_cache_dir(cache_dir: Path | str | None = None) -> Path:
    """Where hf_babai keeps files it makes (lm-eval task folders, converted offline models): the argument, else
    ``$HF_BABAI_CACHE``, else ``~/.cache/hf_babai``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hf_babai"


def data_file(name: str) -> Path:
    return Path(str(importlib.resources.files(__name__).joinpath(name)))


def _checked(raw: bytes, sha256: str, name: str) -> str:
    actual = hashlib.sha256(raw).hexdigest()
    if actual != sha256:
        raise RuntimeError(
            f"the packaged text {name} is damaged (sha256 {actual}, expected {sha256}); reinstall hf-babai"
        )
    return raw.decode("utf-8")


@cache
def calibration_text() -> str:
    """The built-in calibration text (``dataset="austen"``)."""
    return _checked(lzma.decompress(data_file(CALIBRATION_FILE).read_bytes()), CALIBRATION_SHA256, CALIBRATION_FILE)


def eval_text_file() -> Path:
    """The built-in evaluation text of the ``babai_ppl`` task, checked."""
    path = data_file(EVAL_FILE)
    _checked(path.read_bytes(), EVAL_SHA256, EVAL_FILE)
    return path
