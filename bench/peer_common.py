"""What both peer runners (``peer_llmcompressor.py``, ``peer_gptqmodel.py``) share, so their records are comparable:
offline Hub settings, the saved token windows, the perplexity formula, the peak-memory figure and the result file.

Each runner runs in its peer's own virtual environment, so this module imports neither hf_babai nor a peer tool;
the runners import it as a sibling (``python bench/peer_*.py`` puts ``bench/`` first on ``sys.path``). Importing it
sets the offline environment variables, so import it before transformers.
"""

from __future__ import annotations

import json
import math
import os
import resource
from typing import Any

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402


def load_windows(path: str) -> torch.Tensor:
    """Load a torch-saved 2-D integer tensor of token ids as int64."""
    t = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype.is_floating_point:
        raise SystemExit(f"{path}: expected an integer tensor [n, seqlen], got {type(t)} {getattr(t, 'shape', '')}")
    return t.to(torch.int64).contiguous()


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch: int = 1) -> float:
    """``exp(total NLL / predicted tokens)``; each window scores ``logits[:-1]`` against ``ids[1:]``."""
    model.eval()
    total_nll = 0.0
    total_tok = 0
    for i in range(0, windows.shape[0], batch):
        ids = windows[i : i + batch]
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += float(nll)
        total_tok += ids[:, 1:].numel()
    return math.exp(total_nll / total_tok)


def peak_rss_gb() -> float:
    """Peak resident memory of this process in GB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def write_result(result: dict[str, Any], path: str) -> None:
    """Writes the record to ``path`` (pretty-printed JSON, which the benchmark drivers read back) and prints it."""
    text = json.dumps(result, indent=2)
    with open(path, "w") as f:
        f.write(text + "\n")
    print(text)
