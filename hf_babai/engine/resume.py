"""A run's finished blocks on disk, so that an interrupted quantization continues where it stopped.

As each block is quantized, its packed tensors go to ``blocks/block-NNNNN.safetensors`` in the run folder and its
per-layer records to ``blocks/block-NNNNN.json``; ``hf_babai_run.json`` records what the run is (model, calibration
token ids, settings) and how many blocks are finished. Each file is written under a temporary name and renamed, so
a crash (even SIGKILL) leaves either the whole block or none of it.

Resuming rebuilds the finished blocks from their files (the same modules a reload builds), runs the calibration
inputs through them to recover the next block's inputs (what the interrupted run had in memory: bit for bit the
same, as every block's output is computed by the quantized block itself), and quantizes the rest. The run folder
also holds a ``config.json`` whose ``quantization_config`` says it is unfinished, so ``from_pretrained`` and
``hf-babai info`` refuse it by name instead of loading half a model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..formats import format_of, get_format
from ..spec import QuantSpec
from .blocks import linear_dims, replace_module, target_linears
from .report import LayerRecord

RUN_FILE = "hf_babai_run.json"
UNFINISHED = "unfinished_run"  # the key in the run folder's config.json quantization_config


def unfinished_message(folder: str | Path, done: Any = None, total: Any = None) -> str:
    """What a loader says about a run folder."""
    progress = f" ({done} of {total} blocks done)" if done is not None else ""
    return (
        f"{folder} is an unfinished hf_babai quantization run{progress}, not a checkpoint: continue it with the same "
        "`hf-babai quantize` command plus --resume (or BabaiConfig(run_dir=..., resume=True))"
    )


def run_progress(folder: str | Path) -> tuple[Any, Any]:
    """``(finished blocks, blocks)`` of the run in ``folder`` (``None``s if it cannot be read)."""
    try:
        run = json.loads((Path(folder) / RUN_FILE).read_text())
        return run.get("finished"), run.get("identity", {}).get("blocks")
    except (OSError, ValueError):
        return None, None


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


class BlockStore:
    """The finished blocks of one run in ``folder`` (see the module docstring).

    ``identity`` (model, calibration, settings, block count) must equal the recorded one to resume; ``resume=False``
    refuses a folder that already holds a run, ``resume=True`` one that holds none."""

    def __init__(self, folder: str | Path, identity: dict[str, Any], resume: bool, config: dict | None = None):
        self.folder = Path(folder)
        self.identity = identity
        run = self.folder / RUN_FILE
        if run.is_file():
            recorded = json.loads(run.read_text())
            if not resume:
                raise ValueError(
                    f"{self.folder} holds an unfinished run ({recorded.get('finished', 0)} of "
                    f"{identity.get('blocks')} blocks done): continue it with --resume (resume=True), or remove the "
                    "folder to start again"
                )
            changed = [k for k in sorted(set(identity) | set(recorded["identity"])) if
                       identity.get(k) != recorded["identity"].get(k)]  # fmt: skip
            if changed:
                raise ValueError(
                    f"cannot resume the run in {self.folder}: its {', '.join(changed)} differ from this command's "
                    "(the same model, calibration data and settings are needed to continue it); run the original "
                    "command with --resume, or remove the folder to start again"
                )
            self.finished = int(recorded["finished"])
            return
        if resume:
            raise ValueError(f"nothing to resume: {self.folder} holds no unfinished hf_babai run ({RUN_FILE})")
        (self.folder / "blocks").mkdir(parents=True, exist_ok=True)
        self.finished = 0
        if config is not None:  # so that loaders see a run folder for what it is
            _write_json(self.folder / "config.json", {**config, "quantization_config": {
                "quant_method": "babai", UNFINISHED: str(self.folder)}})  # fmt: skip
        self._record()

    def _record(self) -> None:
        _write_json(self.folder / RUN_FILE, {"identity": self.identity, "finished": self.finished})

    def _path(self, b: int, suffix: str) -> Path:
        return self.block_file(self.folder, b, suffix)

    @staticmethod
    def block_file(folder: str | Path, b: int, suffix: str = "safetensors") -> Path:
        """Block ``b``'s file in the run folder ``folder``: its packed tensors (names relative to the block), or
        with ``suffix="json"`` its sizes and records."""
        return Path(folder) / "blocks" / f"block-{b:05d}.{suffix}"

    def save(self, b: int, block: nn.Module, records: list[LayerRecord]) -> None:
        """Writes block ``b`` (already quantized) and its records, then counts it as finished."""
        from safetensors.torch import save_file

        tensors, sizes = {}, {}
        for name, mod in block.named_modules():
            fmt = format_of(mod)
            if fmt is None:
                continue
            for key, t in mod.state_dict().items():
                tensors[f"{name}.{key}"] = t.detach().contiguous().cpu()
            sizes[name] = fmt.buffer_sizes(mod)
        tmp = self._path(b, "safetensors.tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, self._path(b, "safetensors"))
        _write_json(self._path(b, "json"), {"sizes": sizes, "records": [r.__dict__ for r in records]})
        self.finished = b + 1
        self._record()

    def load(self, b: int, block: nn.Module, spec: QuantSpec, prefix: str) -> list[LayerRecord]:
        """Replaces block ``b``'s Linears by the quantized modules stored for it; returns its records."""
        from safetensors.torch import load_file

        meta = json.loads(self._path(b, "json").read_text())
        tensors = load_file(str(self._path(b, "safetensors")))
        fmt = get_format(spec.format)
        linears = target_linears(block, spec.skip, prefix, spec.quantize_router)
        if set(linears) != set(meta["sizes"]):
            raise ValueError(
                f"{self._path(b, 'json')} stores other layers than block {b} of this model has; remove the run folder "
                "and start again"
            )
        for name, lin in linears.items():
            w = lin.weight
            mod = fmt.empty(*linear_dims(lin), spec, meta["sizes"][name] or None, bias=lin.bias is not None,
                            dtype=w.dtype, device=w.device)  # fmt: skip
            mod.load_state_dict(_own(tensors, name), strict=True, assign=True)  # the file's mapped tensors
            replace_module(block, name, mod.to(w.device))  # on the CPU they stay mapped, as map_into leaves them
        return [LayerRecord(**r) for r in meta["records"]]

    def map_into(self, b: int, block: nn.Module) -> None:
        """Points block ``b``'s quantized tensors on the CPU at its file, memory-mapped. Their pages then belong
        to the file (the kernel can drop and reread them), so a run's private memory does not grow with its
        finished blocks: it holds the working set of one block and the weights outside the blocks. The values
        are the ones just written; tensors on a GPU stay where they are."""
        from safetensors.torch import load_file

        tensors = load_file(str(self._path(b, "safetensors")))
        for name, mod in block.named_modules():
            if format_of(mod) is not None and all(t.device.type == "cpu" for t in mod.state_dict().values()):
                mod.load_state_dict(_own(tensors, name), strict=True, assign=True)


def _own(tensors: dict[str, torch.Tensor], module: str) -> dict[str, torch.Tensor]:
    """The tensors of ``module`` (a name inside the block) among a block file's, under their names in it."""
    return {k[len(module) + 1 :]: t for k, t in tensors.items() if k.startswith(module + ".")}


def run_identity(model: nn.Module, spec: QuantSpec, input_ids: torch.Tensor | None, n_blocks: int) -> dict[str, Any]:
    """What must match for a run to be resumed: the model's architecture and sizes (its config), the calibration
    token ids, the settings and the number of blocks. (Weights are not hashed: reading a large model twice to
    check it would cost more than the check is worth; a different checkpoint of the same architecture is the
    user's responsibility, and the docs say so.)"""
    import hashlib

    cfg = getattr(model, "config", None)
    fields = cfg.to_dict() if hasattr(cfg, "to_dict") else {"repr": repr(cfg)}
    for volatile in ("quantization_config", "_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        fields.pop(volatile, None)  # set while loading or quantizing: not what makes the model this model
    text = json.dumps(fields, sort_keys=True, default=str)
    ids = b"" if input_ids is None else input_ids.to(torch.int64).contiguous().numpy().tobytes()
    return {
        "model_config_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "calibration_sha256": hashlib.sha256(ids).hexdigest(),
        "settings": spec.to_dict(),
        "blocks": n_blocks,
    }
