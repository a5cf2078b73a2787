"""Is the GPTQModel column measured on the weights its checkpoint holds? A check of the evaluation path.

``bench/peer_gptqmodel.py`` scores GPTQModel with the weights its own torch kernel dequantizes from the saved
checkpoint. Its 3-bit figures are far behind the other tools' (docs/benchmarks.md), so this script checks that
dequantization against an independent decode of the files: a tiny random Llama (SmolLM2's tokenizer, 2 layers of
width 256) is quantized by GPTQModel at 3 and 4 bits (its ``best`` preset), saved, reloaded, and every Linear's
dequantized weight is compared with ``scales[g_idx] * (q - (z + 1))`` read straight from the GPTQ v1 tensors
(LSB-first bit streams along the input dimension; v1 stores each zero point minus one). Prints JSON.

    .venv-gptqmodel/bin/python bench/peer_gptqmodel_decode.py --tokenizer DIR > result.json

Runs with GPTQModel's interpreter; does not import hf_babai (the decoder below is written out on purpose).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import torch

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))


def unpack(words: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """int32 ``[length·bits/32, M]`` → int64 ``[length, M]``: value ``i`` of a column is bits ``i·bits`` onwards of
    the column's LSB-first bit stream (3-bit values cross word boundaries)."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.zeros(length, words.shape[1], dtype=torch.int64)
    pos0 = torch.arange(length, dtype=torch.int64) * bits
    for b in range(bits):
        pos = pos0 + b
        out |= ((w[pos // 32] >> (pos % 32)[:, None]) & 1) << b
    return out


def check(bits: int, tokenizer: str, work: str) -> dict:
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.quantization.config import GPTQConfig
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    src, out = f"{work}/float", f"{work}/q{bits}"
    LlamaForCausalLM(cfg).save_pretrained(src)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{tokenizer}/{f}", f"{src}/{f}")
    qcfg = GPTQConfig(bits=bits, group_size=128, sym=True, desc_act=True, mse=2.4, fallback=None)
    model = GPTQModel.load(src, qcfg, device="cpu", dtype=torch.float32)
    data = [{"input_ids": torch.randint(0, 49152, (64,)).tolist(), "attention_mask": [1] * 64} for _ in range(8)]
    model.quantize(data, batch_size=1, calibration_sort=None)
    model.save(out)
    packed = GPTQModel.load(out, device="cpu", backend=BACKEND.TORCH, dtype=torch.float16).model
    tensors = load_file(f"{out}/model.safetensors")
    worst, layers = 0.0, 0
    for name, mod in packed.named_modules():
        if not hasattr(mod, "qweight") or not hasattr(mod, "dequantize_weight"):
            continue
        mod.scales = mod.scales.float()
        theirs = mod.dequantize_weight().T.float()  # what bench/peer_gptqmodel.py scores
        qw, qz, sc, gi = (tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx"))
        n, k = theirs.shape
        q = unpack(qw, bits, k)  # [in, out]
        z = unpack(qz.t().contiguous(), bits, n).t() + 1  # [groups, out]
        g = gi.long()
        ours = (sc.float()[g] * (q - z[g]).float()).t()
        worst = max(worst, float((ours - theirs).abs().max()))
        layers += 1
    return {"bits": bits, "layers": layers, "max_abs_difference": worst}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--tokenizer", required=True, help="a folder with tokenizer.json (SmolLM2's)")
    args = p.parse_args(argv)
    import gptqmodel

    tokenizer = os.path.abspath(args.tokenizer)  # before the chdir below
    with tempfile.TemporaryDirectory(prefix="hf_babai_gptqmodel_decode_") as work:
        os.chdir(work)  # GPTQModel writes its logs/ into the working directory
        results = [check(bits, tokenizer, work) for bits in (3, 4)]
    json.dump({"tool_version": gptqmodel.__version__, "torch_version": torch.__version__, "results": results},
              sys.stdout)  # fmt: skip
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
