"""Calibration windows and perplexity in the GPTQ-paper convention.

Evaluation: the text is tokenized once as a whole (joined), cut into back-to-back non-overlapping windows
of ``seqlen`` tokens, and every token after the first of each window is scored (``logits[:-1]`` against
``ids[1:]``); ``ppl = exp(total NLL / scored tokens)``. If the tokenizer adds a BOS token by itself, each
window is ``[bos] + (seqlen − 1)`` text tokens, so the model sees the start-of-text state it was trained
with. Calibration: ``n`` windows of ``seqlen`` tokens at random offsets (fixed seed) in the calibration text.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _bos(tokenizer) -> int | None:
    """The BOS id if the tokenizer prepends one by default (then windows must start with it)."""
    ids = tokenizer("a")["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos if bos is not None and ids and ids[0] == bos else None


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one id sequence, without special tokens."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def eval_windows(tokenizer, text: str, seqlen: int = 2048, windows: int | None = None) -> torch.Tensor:
    """Back-to-back windows ``[W, seqlen]`` from the start of ``text`` (all that fit, or the first ``windows``)."""
    ids = tokenize(tokenizer, text)
    bos = _bos(tokenizer)
    body = seqlen - (bos is not None)
    count = ids.numel() // body
    if windows is not None:
        if windows > count:
            raise ValueError(f"the text has {count} windows of {seqlen} tokens; {windows} were requested")
        count = windows
    out = ids[: count * body].reshape(count, body)
    if bos is not None:
        out = torch.cat([torch.full((count, 1), bos, dtype=torch.long), out], dim=1)
    return out


def calibration_windows(tokenizer, text: str, n: int = 128, seqlen: int = 512, seed: int = 0) -> torch.Tensor:
    """``n`` random windows ``[n, seqlen]`` (GPTQ's sampling), reproducible through ``seed``."""
    ids = tokenize(tokenizer, text)
    bos = _bos(tokenizer)
    body = seqlen - (bos is not None)
    if ids.numel() <= body:
        raise ValueError(f"calibration text has {ids.numel()} tokens; need more than {body}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - body, (n,), generator=gen)
    out = torch.stack([ids[s : s + body] for s in starts.tolist()])
    if bos is not None:
        out = torch.cat([torch.full((n, 1), bos, dtype=torch.long), out], dim=1)
    return out


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 1) -> float:
    """Perplexity of ``model`` over ``windows [W, T]`` (every position after the first is scored)."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        loss = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        nll += float(loss)
        count += ids[:, 1:].numel()
    return math.exp(nll / count)
