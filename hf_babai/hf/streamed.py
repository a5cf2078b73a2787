"""Writing a quantized checkpoint from the run folder's block files, so the final save needs no model in memory.

A run with ``BabaiConfig(run_dir=...)`` (every ``hf-babai quantize`` run) writes each finished block's packed
tensors to the run folder as it goes (:class:`~hf_babai.engine.resume.BlockStore`). :func:`save_streamed` then
writes the checkpoint in two parts. transformers' ``save_pretrained`` writes everything that is not in those files
(config, embeddings, norms, head, float weights), so its key conversions, tied weights and disk-offloaded tensors
are handled as always; the block tensors are copied from the run folder, byte range by byte range, under the names
``save_pretrained`` would give them, into shards of at most ``max_shard_size``.

Why: during such a run the finished blocks' packed tensors are memory-mapped from those files (``BlockStore.
map_into``), so the run's private memory does not grow with the model; the save keeps it so, adding only what
``save_pretrained`` needs for the non-block weights (the kernel copies the block bytes file to file). With
safetensors before 0.8, ``save_pretrained`` also serialized each shard (by default up to 50 GB: a whole quantized
model) into one buffer before writing it.

The files are the ones ``save_pretrained`` writes: every tensor under the same name with the same bytes, and a
checkpoint that fits one shard is byte-identical to it (the same safetensors header, tensors in safetensors' own
order: widest dtype first, then by name). Shard boundaries of a larger checkpoint may differ.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: safetensors' dtypes in the order of its ``Dtype`` enum: a file lists its tensors from the last of these to the
#: first (so that each tensor's offset is aligned to its element size), then by name.
DTYPE_ORDER = (
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ",
    "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64",
)  # fmt: skip
DEFAULT_SHARD = "50GB"  # transformers' save_pretrained default
COPY_CHUNK = 8 * 2**20  # the most bytes copied at once (held in memory only where the kernel cannot copy)
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string like ``"5GB"`` / ``"500MiB"`` (transformers' ``max_shard_size``)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
        if m is None:
            raise ValueError(f"max_shard_size={size!r} is not a size: give bytes or a string like '5GB' or '500MiB'")
        value = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if value <= 0:
        raise ValueError(f"max_shard_size={size!r} must be positive")
    return value


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """``(offset of the data section, header)`` of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return 8 + n, json.loads(f.read(n))


class _Source:
    """One tensor to copy: where its bytes are and what they are."""

    __slots__ = ("begin", "dtype", "end", "path", "shape")

    def __init__(self, path: Path, data_start: int, info: dict[str, Any]):
        self.path, self.dtype, self.shape = path, info["dtype"], list(info["shape"])
        self.begin, self.end = data_start + info["data_offsets"][0], data_start + info["data_offsets"][1]

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _rank(dtype: str) -> int:
    if dtype not in DTYPE_ORDER:
        raise ValueError(f"unknown safetensors dtype {dtype!r}: this hf_babai does not know its size")
    return DTYPE_ORDER.index(dtype)


def write_safetensors(path: Path, tensors: dict[str, _Source], metadata: dict[str, str]) -> None:
    """Writes ``tensors`` (copied from their files) to ``path`` with the header ``safetensors`` itself writes."""
    order = sorted(tensors, key=lambda k: (-_rank(tensors[k].dtype), k.encode()))
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for name in order:
        src = tensors[name]
        header[name] = {"dtype": src.dtype, "shape": src.shape, "data_offsets": [offset, offset + src.nbytes]}
        offset += src.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as out, contextlib.ExitStack() as files:
        out.write(struct.pack("<Q", len(text)) + text)
        out.flush()
        at = out.tell()
        opened: dict[Path, int] = {}
        for name in order:
            src = tensors[name]
            if src.path not in opened:
                opened[src.path] = files.enter_context(open(src.path, "rb")).fileno()
            _copy_range(opened[src.path], out.fileno(), src.begin, at, src.nbytes, src.path)
            at += src.nbytes
    os.replace(tmp, path)


def _copy_range(src: int, dst: int, src_at: int, dst_at: int, n: int, what: Path) -> None:
    """Copies ``n`` bytes between two files inside the kernel (``copy_file_range``: no buffer in this process),
    or through a small buffer where the file system cannot."""
    fast = hasattr(os, "copy_file_range")
    while n:
        if fast:
            try:
                k = os.copy_file_range(src, dst, min(n, COPY_CHUNK), src_at, dst_at)
            except OSError:
                fast = False
                continue
        else:
            k = os.pwrite(dst, os.pread(src, min(n, COPY_CHUNK), src_at), dst_at)
        if k == 0:
            raise ValueError(f"{what} ends inside tensor data: the run folder is damaged; save with save_pretrained")
        n, src_at, dst_at = n - k, src_at + k, dst_at + k


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _saved_names(model: nn.Module, names: list[str]) -> dict[str, str]:
    """``{name in memory: name in the checkpoint}``: the renamings ``save_pretrained`` applies (transformers'
    reverse key conversion, e.g. ``model.language_model.layers`` saved as ``model.layers``). Quantized tensors are
    only ever renamed (the quantizer drops converters that would touch them), so empty stand-ins are enough."""
    from transformers.core_model_loading import revert_weight_conversion

    stand_ins = {n: torch.empty(0, device="meta") for n in names}
    reverted = revert_weight_conversion(model, dict(stand_ins))
    by_id = {id(t): n for n, t in stand_ins.items()}
    out = {by_id.get(id(t)): new for new, t in reverted.items()}
    if None in out or len(out) != len(names):
        raise ValueError(
            "transformers converts some quantized tensors on save (not a renaming), so they cannot be copied from "
            "the run folder as they are: save this model with model.save_pretrained(out)"
        )
    return out


def _run_sources(model: nn.Module, run_dir: Path) -> dict[str, _Source]:
    """The block tensors in the run folder, under their full in-memory names, checked against the model."""
    from ..engine import find_blocks
    from ..engine.resume import BlockStore, run_progress

    finished, total = run_progress(run_dir)
    prefix, blocks = find_blocks(model)
    if finished is None or finished != total or total != len(blocks):
        raise ValueError(
            f"{run_dir} does not hold a finished run of this model ({finished} of {total} blocks done, the model has "
            f"{len(blocks)}): save it with model.save_pretrained(out)"
        )
    state = model.state_dict()
    ignored = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    sources: dict[str, _Source] = {}
    for b in range(len(blocks)):
        path = BlockStore.block_file(run_dir, b)
        start, header = read_header(path)
        for local, info in header.items():
            if local == "__metadata__":
                continue
            name = f"{prefix}.{b}.{local}"
            mem = state.get(name)
            if mem is None or list(mem.shape) != info["shape"]:
                raise ValueError(
                    f"{path} holds {local} {info['shape']}, which block {b} of the model in memory does not have in "
                    "that shape: the run folder belongs to another run; save with model.save_pretrained(out)"
                )
            if name not in ignored:
                sources[name] = _Source(path, start, info)
    return sources


@contextlib.contextmanager
def _leaving_out(model: nn.Module, names: set[str]) -> Iterator[None]:
    """``save_pretrained`` writes every tensor but ``names`` (through the quantizer's state-dict hook)."""
    quantizer = model.hf_quantizer
    quantizer.saved_elsewhere = names
    try:
        yield
    finally:
        quantizer.saved_elsewhere = None


def save_streamed(model: nn.Module, out: str | Path, max_shard_size: int | str = DEFAULT_SHARD) -> None:
    """Saves ``model``, quantized on load with ``BabaiConfig(run_dir=...)`` in this process, to ``out``: the same
    checkpoint as ``model.save_pretrained(out)``, with the quantized block tensors copied from the run folder
    instead of serialized from memory (see the module docstring). The run folder is left as it is."""
    from .config import BabaiConfig

    cfg = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
    if not isinstance(cfg, BabaiConfig) or cfg.run_dir is None:
        raise ValueError(
            "save_streamed needs a model quantized on load with BabaiConfig(run_dir=...), whose run folder holds the "
            "finished blocks; save any other model with model.save_pretrained(out)"
        )
    limit = parse_size(max_shard_size)
    out = Path(out)
    sources = _run_sources(model, Path(cfg.run_dir))
    renamed = _saved_names(model, sorted(sources))
    rest = out / ".hf_babai_rest"
    shutil.rmtree(rest, ignore_errors=True)
    try:
        with _leaving_out(model, set(sources)):
            model.save_pretrained(rest, max_shard_size=limit)
        tensors = {renamed[n]: src for n, src in sources.items()}
        metadata: dict[str, str] = {}
        for file in sorted(rest.glob("*.safetensors")):
            start, header = read_header(file)
            metadata = header.pop("__metadata__", None) or metadata
            for name, info in header.items():
                if name in tensors:
                    raise ValueError(
                        f"transformers saved {name} although it is copied from the run folder (this transformers "
                        "does not call the quantizer's get_state_dict_and_metadata): save with "
                        "model.save_pretrained(out)"
                    )
                tensors[name] = _Source(file, start, info)
        _write_shards(model, out, tensors, metadata, limit)
        for file in rest.iterdir():  # config.json, generation_config.json, custom code
            if not (file.name.endswith(".safetensors") or file.name.endswith(".safetensors.index.json")):
                os.replace(file, out / file.name)
    finally:
        shutil.rmtree(rest, ignore_errors=True)


def _write_shards(model: nn.Module, out: Path, tensors: dict[str, _Source], metadata: dict, limit: int) -> None:
    """Groups ``tensors`` (natural name order) into shards of at most ``limit`` bytes, as transformers does."""
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(tensors, key=_natural):
        n = tensors[name].nbytes
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    for stale in [*out.glob(WEIGHTS), *out.glob("model-*-of-*.safetensors"), *out.glob(INDEX)]:
        stale.unlink()  # an earlier save's shards, as save_pretrained removes them
    if len(shards) == 1:
        write_safetensors(out / WEIGHTS, tensors, metadata)
        return
    weight_map = {}
    for i, names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(out / file, {n: tensors[n] for n in names}, metadata)
        weight_map.update(dict.fromkeys(names, file))
    total = {"total_size": sum(t.nbytes for t in tensors.values())}
    if hasattr(model, "num_parameters"):
        total["total_parameters"] = model.num_parameters()
    index = {"metadata": total, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
