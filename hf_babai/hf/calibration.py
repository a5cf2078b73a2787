"""Turns ``BabaiConfig.dataset`` into calibration token windows for the engine."""

from __future__ import annotations

from typing import Any

import torch

from ..data import calibration_text as builtin_calibration_text
from ..perplexity import calibration_windows
from .config import BabaiConfig, describe_calibration

MISSING_DATASET = (
    "BabaiConfig(method='babai') needs calibration data to quantize on load: pass dataset=[texts...] "
    "(and tokenizer=...), dataset='austen' for the built-in text, or method='rtn' for no calibration"
)


def _load_tokenizer(tokenizer: Any, model: torch.nn.Module) -> Any:
    if tokenizer is not None and not isinstance(tokenizer, str):
        return tokenizer
    from transformers import AutoTokenizer

    path = tokenizer or getattr(model, "name_or_path", None)
    if not path:
        raise ValueError(
            "BabaiConfig: a text dataset needs a tokenizer; pass tokenizer=AutoTokenizer.from_pretrained(...)"
        )
    return AutoTokenizer.from_pretrained(path)


def _from_dicts(rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-tokenised ``{"input_ids", "attention_mask"}`` rows, right-padded with mask 0 to one length."""
    ids = [torch.as_tensor(r["input_ids"]).reshape(-1) for r in rows]
    masks = [
        torch.as_tensor(r.get("attention_mask", torch.ones_like(i))).reshape(-1) for r, i in zip(rows, ids, strict=True)
    ]
    for i, (a, m) in enumerate(zip(ids, masks, strict=True)):
        if a.shape != m.shape:
            raise ValueError(
                f"BabaiConfig: dataset[{i}] has input_ids of length {a.numel()} but an attention_mask of {m.numel()}"
            )
    t = max(a.numel() for a in ids)
    out_ids = torch.zeros(len(ids), t, dtype=torch.long)
    out_mask = torch.zeros(len(ids), t, dtype=torch.long)
    for i, (a, m) in enumerate(zip(ids, masks, strict=True)):
        out_ids[i, : a.numel()] = a
        out_mask[i, : m.numel()] = m
    return out_ids, out_mask


def dataset_rows(ds: Any, column: str | None = None) -> list[str] | list[dict]:
    """Calibration rows of a ``datasets.Dataset``: the given ``column`` (non-empty texts if it holds strings, else
    token ids), or by default its ``input_ids`` column (with ``attention_mask`` if present), failing that its
    ``text`` column."""
    cols = ds.column_names
    if column is not None:
        values = ds[column]
        if all(isinstance(v, str) for v in values):
            return [v for v in values if v.strip()]
        return [{"input_ids": list(v)} for v in values]
    if "input_ids" in cols:
        keep = [c for c in ("input_ids", "attention_mask") if c in cols]
        return [{c: row[c] for c in keep} for row in ds]
    if "text" in cols:
        return [t for t in ds["text"] if isinstance(t, str) and t.strip()]
    raise ValueError(
        f"BabaiConfig: a datasets.Dataset needs an 'input_ids' or a 'text' column, this one has {cols}; "
        "select or rename one (ds.rename_column(...))"
    )


def calibration_batches(
    cfg: BabaiConfig, model: torch.nn.Module
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    """``(input_ids [n, T], attention_mask or None, descriptor)`` from ``cfg.dataset``.

    Text (a list of strings or the built-in ``"austen"``) is joined and cut into ``cfg.nsamples`` windows of
    ``cfg.seqlen`` tokens at fixed-seed random offsets, as GPTQ samples its calibration set."""
    data = cfg.dataset
    if data is None:
        raise ValueError(MISSING_DATASET)
    mask = None
    if hasattr(data, "column_names") and not isinstance(data, (list, str)):  # a datasets.Dataset
        data = dataset_rows(data)
    if isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"BabaiConfig: a tensor dataset must be integer token ids [n, T], got {data.dtype} {tuple(data.shape)}"
            )
        ids, source = data.long(), "token ids"
    elif isinstance(data, list) and data and all(isinstance(d, dict) for d in data):
        ids, mask = _from_dicts(data)
        source = "pre-tokenized"
    elif data == "austen" or (isinstance(data, list) and data and all(isinstance(d, str) for d in data)):
        if data == "austen":
            text, source = builtin_calibration_text(), "austen"
        else:
            text, source = "\n\n".join(data), "texts"
        tok = _load_tokenizer(cfg.tokenizer, model)
        ids = calibration_windows(tok, text, cfg.nsamples, cfg.seqlen)
    else:
        raise ValueError(
            f"BabaiConfig: dataset of type {type(data).__name__} is not supported; pass a non-empty list of texts, "
            "'austen', a [n, T] tensor of token ids, or a list of {'input_ids', 'attention_mask'} dicts"
        )
    return ids, mask, describe_calibration(source, ids, mask)
