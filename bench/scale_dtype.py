"""What a bfloat16 server does to float16 scales, and what ``scale_dtype="bfloat16"`` costs instead.

vLLM and transformers + compressed-tensors cast a checkpoint's scales to the dtype they run the model in. A babai
model quantized with the default float16 scales and served in bfloat16 therefore runs with every scale rounded to
8 significant bits, which the solver never saw. ``scale_dtype="bfloat16"`` rounds the scales to bfloat16 values
before the solve instead, so the served weights are exactly the solved ones.

For each bit width this prints one JSON record with the perplexity of (a) float16 scales as solved, (b) the same
model with its scales rounded to bfloat16 (what a bfloat16 server computes with), (c) ``scale_dtype="bfloat16"``.
All three run in float32 on the same calibration and evaluation windows (the demo's: 32×512 Austen calibration
tokens, 4×2048 of *Pride and Prejudice*).

    .venv/bin/python bench/scale_dtype.py --bits 3 4 --out bench/results/scale_dtype_smollm2-135m.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_babai import assets
from hf_babai.data import calibration_text
from hf_babai.engine import QuantSpec, quantize_model
from hf_babai.formats import quantized_modules
from hf_babai.perplexity import calibration_windows, eval_windows, perplexity


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    path = assets.ensure_model(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    evalw = eval_windows(tok, assets.eval_text(), 2048, 4)
    calib = calibration_windows(tok, calibration_text(), 32, 512)

    def quantized(bits: int, scale_dtype: str) -> torch.nn.Module:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        spec = QuantSpec(bits=bits, group_size=args.group_size, scale_dtype=scale_dtype)
        quantize_model(model, spec, calib, progress=False)
        return model

    for bits in args.bits:
        t0 = time.perf_counter()
        model = quantized(bits, "float16")
        fp16 = perplexity(model, evalw)
        with torch.no_grad():  # what a bfloat16 server does to the stored float16 scales
            for _, m, _ in quantized_modules(model):
                m.scales.copy_(m.scales.to(torch.bfloat16).to(m.scales.dtype))
        served_bf16 = perplexity(model, evalw)
        bf16 = perplexity(quantized(bits, "bfloat16"), evalw)
        rec = {
            "model": args.model,
            "bits": bits,
            "group_size": args.group_size,
            "ppl_float16_scales": round(fp16, 4),
            "ppl_float16_scales_served_in_bf16": round(served_bf16, 4),
            "ppl_scale_dtype_bfloat16": round(bf16, 4),
            "calibration": "32x512 austen, seed 0",
            "eval": "4x2048 pride and prejudice",
            "seconds": round(time.perf_counter() - t0, 1),
            "torch": torch.__version__,
        }
        print(json.dumps(rec), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
