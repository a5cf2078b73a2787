"""Loads an exported checkpoint with a real loader and compares it with the babai checkpoint it came from.

Run as a child process by ``test_serving_loaders.py``, in the environment of the loader under test:

* ``ct``: ``.venv`` with one ``.loaders/compressed-tensors-<v>`` folder on ``PYTHONPATH``; transformers loads the
  export twice, once as users get it (compressed, decompressed on the first forward: its logits) and once with
  ``CompressedTensorsConfig(dequantize=True)`` (its dense weights), both in float32;
* ``gptqmodel``: ``.venv-gptqmodel``; ``GPTQModel.load`` with its torch kernel (float16, the dtype it runs on CPU);
* ``transformers-gptq``: ``.venv-gptqmodel``; transformers' own GPTQ path (optimum + gptqmodel), float16.

``python loader_check.py LOADER BABAI_DIR EXPORT_DIR [BABAI_DIR EXPORT_DIR ...]`` prints one JSON line per pair:
the loader's version, the layers compared, those whose weight differs from babai's dequantized weight (compared
in the dtype the loader computes in) and the largest logit difference where logits are compared.
"""

from __future__ import annotations

import json
import os
import sys

import torch


def _babai(path: str) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Dequantized float32 weights of every babai module, a fixed batch of token ids and the float32 logits."""
    from transformers import AutoModelForCausalLM

    import hf_babai  # noqa: F401  (registers the babai quantizer with transformers)
    from hf_babai.formats import quantized_modules

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    weights = {n: m.dequantize(torch.float32) for n, m, _ in quantized_modules(model)}
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
    return weights, ids, logits


def _compare(weights: dict[str, torch.Tensor], dense_of, dtype: torch.dtype) -> list[str]:
    return [n for n, w in weights.items() if not torch.equal(dense_of(n).to(dtype), w.to(dtype))]


def check_ct(babai_dir: str, export_dir: str) -> dict:
    import compressed_tensors
    import transformers
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    weights, ids, ref = _babai(babai_dir)
    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(ids).logits
    dense = AutoModelForCausalLM.from_pretrained(
        export_dir, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    unequal = _compare(weights, lambda n: dense.get_submodule(n).weight.detach(), torch.float32)
    return {
        "loader": f"transformers {transformers.__version__} + compressed-tensors {compressed_tensors.__version__}",
        "layers": len(weights),
        "unequal": unequal,
        "logits_max_diff": float((logits - ref).abs().max()),
    }


def check_gptqmodel(babai_dir: str, export_dir: str) -> dict:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
    import gptqmodel
    from gptqmodel import BACKEND, GPTQModel

    weights, _, _ = _babai(babai_dir)
    model = GPTQModel.load(export_dir, device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    unequal = _compare(weights, lambda n: model.model.get_submodule(n).dequantize_weight().T, torch.float16)
    kinds = sorted({type(model.model.get_submodule(n)).__name__ for n in weights})
    return {
        "loader": f"GPTQModel {gptqmodel.__version__} ({', '.join(kinds)})",
        "layers": len(weights),
        "unequal": unequal,
    }


def check_transformers_gptq(babai_dir: str, export_dir: str) -> dict:
    import optimum.version
    import transformers
    from transformers import AutoModelForCausalLM

    weights, _, _ = _babai(babai_dir)
    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float16, device_map="cpu")
    unequal = _compare(weights, lambda n: model.get_submodule(n).dequantize_weight().T, torch.float16)
    kinds = sorted({type(model.get_submodule(n)).__name__ for n in weights})
    loader = f"transformers {transformers.__version__} GPTQ (optimum {optimum.version.__version__}, {', '.join(kinds)})"
    return {"loader": loader, "layers": len(weights), "unequal": unequal}


CHECKS = {"ct": check_ct, "gptqmodel": check_gptqmodel, "transformers-gptq": check_transformers_gptq}


def main(argv: list[str]) -> int:
    loader, dirs = argv[0], argv[1:]
    if loader not in CHECKS or not dirs or len(dirs) % 2:
        print(f"usage: loader_check.py {{{','.join(CHECKS)}}} BABAI_DIR EXPORT_DIR [...]", file=sys.stderr)
        return 2
    for babai_dir, export_dir in zip(dirs[::2], dirs[1::2], strict=True):
        print(json.dumps({"export": export_dir, **CHECKS[loader](babai_dir, export_dir)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
