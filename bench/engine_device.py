"""The engine on a GPU: the same quantization run on CUDA and on the CPU, codes compared, solve time per layer.

Two parts, each run on both devices from the same seeded weights and calibration ids:

- ``tiny``: a tiny random Llama quantized on load (``from_pretrained(folder, quantization_config=BabaiConfig(...),
  device_map=...)``, the path users take), saved and reloaded on the device; codes, scales and logits compared.
- ``stack``: a random decoder with Qwen2.5-1.5B's block shapes (hidden 1536, MLP 8960, 12/2 heads; two blocks, a
  small vocabulary) through ``quantize_model``; per layer the share of equal codes and scales, both proxy losses
  and both solve times.

Nothing here needs the two devices to agree bit for bit: float sums in another order move a few weights across
a rounding boundary and Babai carries each change along its row. What must hold is that the GPU run is the same
algorithm (almost every code equal, the same proxy loss to a fraction of a percent), and how much faster it is.

GPU:  python bench/engine_device.py --out engine.json
CPU:  python bench/engine_device.py --tiny   (both "devices" are the CPU: checks the script's logic)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

# Agreement a GPU run must reach to count as the same algorithm (see the module docstring).
MIN_CODES_EQUAL = 0.99
MAX_LOSS_REL_DIFF = 0.01

QWEN_1_5B_BLOCK = dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2)
TINY_BLOCK = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _codes(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (codes, scales)}`` of every int-format module, unpacked on the CPU."""
    from hf_babai.formats import BabaiLinear, unpack_weight

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, BabaiLinear):
            buffers = {k: v.cpu() for k, v in mod.packed_buffers().items()}
            codes, scales, _zeros = unpack_weight(buffers, mod.bits, mod.group_size, mod.in_features)
            out[name] = (codes, scales)
    return out


def _compare(ref: dict, other: dict) -> list[dict]:
    rows = []
    for name, (codes, scales) in ref.items():
        c2, s2 = other[name]
        rows.append({
            "layer": name,
            "codes_equal": round(float((codes == c2).double().mean()), 6),
            "max_code_diff": int((codes.long() - c2.long()).abs().max()),
            "scales_equal": round(float((scales == s2).double().mean()), 6),
        })  # fmt: skip
    return rows


def tiny_part(device: str, ref_device: str = "cpu") -> dict:
    """Quantize-on-load of a tiny random Llama on ``device`` and on ``ref_device``, then a reload on ``device``."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from hf_babai import BabaiConfig

    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    ids = torch.randint(0, 256, (16, 64), generator=torch.Generator().manual_seed(0))
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(f"{tmp}/float")
        runs = {}
        for label, dev in (("reference", ref_device), ("device", device)):
            t = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(
                f"{tmp}/float", quantization_config=BabaiConfig(bits=4, group_size=32, dataset=ids),
                dtype=torch.float32, device_map=dev,
            )  # fmt: skip
            _sync(dev)
            seconds = time.perf_counter() - t
            with torch.no_grad():
                logits = model(x.to(dev)).logits.float().cpu()
            runs[label] = (model, logits, seconds)
        model, logits, _ = runs["device"]
        model.save_pretrained(f"{tmp}/q")
        reloaded = AutoModelForCausalLM.from_pretrained(f"{tmp}/q", device_map=device)
        with torch.no_grad():
            logits_reloaded = reloaded(x.to(device)).logits.float().cpu()
    ref_logits = runs["reference"][1]
    layers = _compare(_codes(runs["reference"][0]), _codes(model))
    return {
        "part": "tiny",
        "devices": {"reference": ref_device, "device": device},
        "quantize_on_load_s": {label: round(r[2], 3) for label, r in runs.items()},
        "logits_rel_diff_vs_ref_device": float((logits - ref_logits).norm() / ref_logits.norm()),
        "reload_logits_equal": bool(torch.equal(logits, logits_reloaded)),
        "min_codes_equal": min(r["codes_equal"] for r in layers),
        "layers": layers,
    }


def stack_part(device: str, ref_device: str = "cpu", tiny: bool = False) -> dict:
    """Two random blocks of Qwen2.5-1.5B's shapes through ``quantize_model`` on both devices."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from hf_babai.engine import QuantSpec, quantize_model

    shape = TINY_BLOCK if tiny else QWEN_1_5B_BLOCK
    cfg = Qwen2Config(**shape, num_hidden_layers=2, vocab_size=2048, max_position_embeddings=512)
    n, t = (4, 32) if tiny else (16, 256)
    ids = torch.randint(0, cfg.vocab_size, (n, t), generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(bits=4, group_size=128 if not tiny else 32)
    runs = {}
    for label, dev in (("reference", ref_device), ("device", device)):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval().to(dev)
        _sync(dev)
        start = time.perf_counter()
        records = quantize_model(model, spec, ids, progress=False)
        _sync(dev)
        stats = {f"model.layers.{r.block}.{r.name}": r.stats for r in records}
        runs[label] = (model, stats, time.perf_counter() - start)
    ref_model, ref_stats, ref_s = runs["reference"]
    model, stats, seconds = runs["device"]
    layers = _compare(_codes(ref_model), _codes(model))
    for row in layers:
        a, b = ref_stats[row["layer"]], stats[row["layer"]]
        row.update(
            loss_ref=a["loss"], loss=b["loss"], loss_rel_diff=abs(b["loss"] - a["loss"]) / max(a["loss"], 1e-30),
            solve_s_ref=round(a["seconds"], 4), solve_s=round(b["seconds"], 4),
        )  # fmt: skip
    return {
        "part": "stack",
        "shape": {**shape, "blocks": 2, "calibration": [n, t], "bits": spec.bits, "group_size": spec.group_size},
        "devices": {"reference": ref_device, "device": device},
        "total_s": {"reference": round(ref_s, 3), "device": round(seconds, 3)},
        "min_codes_equal": min(r["codes_equal"] for r in layers),
        "max_loss_rel_diff": max(r["loss_rel_diff"] for r in layers),
        "layers": layers,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU against CPU on tiny shapes (checks the script's logic)")
    p.add_argument("--out", default=None, help="write the JSON here too")
    args = p.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("the engine check needs a CUDA GPU; use --tiny to check the script on CPU")
    device = "cpu" if args.tiny else "cuda"
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    parts = []
    for label, run in (("tiny", lambda: tiny_part(device)), ("stack", lambda: stack_part(device, tiny=args.tiny))):
        try:
            parts.append(run())
        except Exception as exc:  # one part failing on the GPU must not hide the other's result
            parts.append({"part": label, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
    ok = all(
        "error" not in p
        and p["min_codes_equal"] >= MIN_CODES_EQUAL
        and p.get("max_loss_rel_diff", 0.0) <= MAX_LOSS_REL_DIFF
        and p.get("reload_logits_equal", True)
        for p in parts
    )
    result = {"device": name, "torch": torch.__version__, "passed": ok, "min_codes_equal": MIN_CODES_EQUAL,
              "max_loss_rel_diff": MAX_LOSS_REL_DIFF, "parts": parts}  # fmt: skip
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
