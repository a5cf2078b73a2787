"""Kernel benchmark: every hf_babai format's Triton kernel vs ``F.linear`` in BF16, measured in the same run.

Prints one JSON record per (shape, M, format) with ``device, format, bits, group_size, sym, N, K, M, us, gbps,
pct_copy_bw, bf16_us, speedup, ideal_speedup`` (plus ``path``, ``bits_per_weight``, ``max_rel_err`` against
the product of the dequantized weight, and for the dense and SSQR formats at M > 1 the two large-M strategies
``fused_us`` / ``dequant_us`` so the ``DEQUANT_MIN_M`` switch in ``hf_babai/formats/kernel_ops.py`` can be set
from data). Weights are random codes of the real shapes (real checkpoints do not travel to the GPU machine;
the kernels' speed does not depend on the values, except HPTQ's, whose codes are Gaussian integers at the
3.1-bit budget the quality bench reaches).

Formats: dense int2/3/4/8 (sym, and int4 asym and per-channel), SSQR int3 g128 + 0.5 % fp16 outliers (fused
and as a separate outlier kernel), HPTQ (one scale, length-limited Huffman, 1024-symbol chunks).

- Timer: ``triton.testing.do_bench`` (it zeroes a 256 MB buffer before each call, flushing L2), median.
- ``gbps`` = bytes the kernel must read (stored weight + activations) + write / time; ``pct_copy_bw``
  relates it to this device's measured device-to-device copy bandwidth.
- ``ideal_speedup`` = 16 / stored bits per weight (batch-1 decode reads the weight once; docs/kernels.md).
- ``--e2e``: decode tokens/s of a Qwen2.5-1.5B-shaped model (random weights, HF ``generate``, static cache,
  greedy) in BF16 vs with every decoder Linear replaced by a quantized module.

GPU:  python bench/kernel_speed.py --out bench/results/kernels_<gpu>.json [--e2e]
CPU:  TRITON_INTERPRET=1 python bench/kernel_speed.py --smoke   (checks the script's logic on tiny shapes;
      interpreter times mean nothing)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (12288, 4096)]  # (N out, K in)
MS = [1, 16, 128]
# (format, bits, group, sym): dense grids, then the no-clipping formats
FORMATS = [
    ("int", 4, 128, True),
    ("int", 3, 128, True),
    ("int", 2, 128, True),
    ("int", 8, 128, True),
    ("int", 4, 128, False),
    ("int", 4, -1, True),
    ("ssqr", 3, 128, True),
    ("ssqr-separate", 3, 128, True),
    ("hptq", 0, -1, True),
]
OUTLIER_RATE = 0.005
HPTQ_SIGMA = 2.0  # Gaussian integer codes: ~3.1 bits/weight after Huffman (docs/kernels.md)
QWEN_1_5B = dict(
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    vocab_size=151936,
    tie_word_embeddings=True,
    max_position_embeddings=4096,
)


def _timer(device: str):
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3  # ms → µs

    def cpu_bench(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e6

    return cpu_bench


def copy_bandwidth(device: str, bench) -> float:
    """GB/s of a device-to-device copy (read + write), the practical ceiling for a weight-streaming kernel."""
    n = (1 << 28) if device == "cuda" else (1 << 22)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us = bench(lambda: dst.copy_(src))
    return 2 * n / (us * 1e-6) / 1e9


def make_module(fmt: str, n: int, k: int, bits: int, group: int, sym: bool, device: str, seed: int = 0):
    """A quantized module of shape ``[n, k]`` with random stored values (built on CPU, moved to ``device``)."""
    from hf_babai.formats import BabaiLinear, HuffmanLinear, SSQRLinear

    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
    if fmt == "hptq":
        codes = torch.round(torch.randn(n, k, generator=g) * HPTQ_SIGMA).to(torch.int64)
        return HuffmanLinear.from_linear(lin, codes, 0.01).to(device)
    groups = 1 if group == -1 else -(-k // group)
    codes = torch.randint(0, 2**bits, (n, k), generator=g)
    scales = (torch.rand(n, groups, generator=g) * 0.01 + 0.001).half().float()
    zeros = None if sym else torch.randint(0, 2**bits, (n, groups), generator=g)
    if fmt == "int":
        return BabaiLinear.from_linear(lin, codes, scales, zeros, bits, group, sym).to(device)
    mask = torch.rand(n, k, generator=g) < OUTLIER_RATE
    codes[mask] = 2 ** (bits - 1)
    rows, cols = mask.nonzero(as_tuple=True)
    values = torch.randn(rows.numel(), generator=g) * 0.1
    outliers = torch.sparse_coo_tensor(torch.stack([rows, cols]), values, (n, k), check_invariants=True)
    return SSQRLinear.from_linear(lin, codes, scales, zeros, bits, group, sym, outliers=outliers).to(device)


def stored_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in module.packed_buffers().values())


def read_bytes(module) -> int:
    """Bytes the kernel reads for the weight: stored buffers, for HPTQ with its finer load-time offsets
    instead of the stored ones (the lookup table stays in cache)."""
    if not hasattr(module, "kernel_data"):
        return stored_bytes(module)
    return stored_bytes(module) - 4 * module.offsets.numel() + 4 * module.kernel_data()[1].numel()


def _calls(fmt: str, module, x):
    """(auto call, {strategy: call}) for one module and input; strategies only where there is a choice."""
    from hf_babai.formats.kernel_ops import dense_dequantize, dense_matmul, fused_matmul, huffman_matmul

    if fmt == "hptq":
        lut, offsets = module.kernel_data()
        args = (module.stream, offsets, lut, module.scale, module.out_features, module.kernel_chunk, module.max_len)
        return (lambda: huffman_matmul(x, *args)), {}
    n, k = module.out_features, module.in_features
    group = k if module.group_size == -1 else module.group_size
    planes = module.kernel_planes()
    outliers = module._kernel_outliers()
    fuse = fmt != "ssqr-separate"

    def auto():
        return dense_matmul(x, *planes, module.bits, group, n, *outliers, fuse)

    def dequant():
        w = dense_dequantize(*planes, module.bits, group, k, x.dtype, *outliers)
        return F.linear(x, w)

    def fused():  # the op's small-M path, forced at any M
        return fused_matmul(x, planes, None if outliers[0] is None else outliers, module.bits, group, n, fuse)

    strategies = {"fused": fused, "dequant": dequant} if x.shape[0] > 1 and fmt != "ssqr-separate" else {}
    return auto, strategies


def run(shapes, ms, formats, device: str) -> list[dict]:
    from hf_babai.formats.kernel_ops import HUFFMAN_GEMV_MAX_M, matmul_path

    bench = _timer(device)
    copy_gbps = copy_bandwidth(device, bench)
    interp = os.environ.get("TRITON_INTERPRET")
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu (TRITON_INTERPRET={interp})"
    act = torch.bfloat16 if device == "cuda" else torch.float32  # bf16 math is broken in the interpreter
    records = []
    for n, k in shapes:
        for fmt, bits, group, sym in formats:
            module = make_module(fmt, n, k, bits, group, sym, device)
            w = module.dequantize(act)
            bpw = 8 * stored_bytes(module) / (n * k)
            for m in ms:
                x = torch.randn(m, k, device=device, dtype=act)
                auto, strategies = _calls(fmt, module, x)
                us = bench(auto)
                bf16_us = bench(lambda x=x, w=w: F.linear(x, w))
                ref = F.linear(x.float(), w.float())
                err = ((auto().float() - ref).norm() / ref.norm()).item()
                moved = read_bytes(module) + m * k * x.element_size() + m * n * x.element_size()
                if fmt == "hptq":
                    path = "fused-gemv" if m <= HUFFMAN_GEMV_MAX_M else "decode+F.linear"
                else:
                    path = matmul_path(m, x.is_cuda) + ("" if fmt != "ssqr-separate" else "+outlier-kernel")
                rec = {
                    "device": name,
                    "format": fmt if fmt != "int" else f"int{bits}{'' if sym else '-asym'}",
                    "bits": bits if fmt != "hptq" else round(bpw, 3),
                    "group_size": group,
                    "sym": sym,
                    "N": n,
                    "K": k,
                    "M": m,
                    "path": path,
                    "us": round(us, 3),
                    "gbps": round(moved / (us * 1e-6) / 1e9, 1),
                    "pct_copy_bw": round(100 * moved / (us * 1e-6) / 1e9 / copy_gbps, 1),
                    "bf16_us": round(bf16_us, 3),
                    "speedup": round(bf16_us / us, 3),
                    "ideal_speedup": round(16 / bpw, 3),
                    "bits_per_weight": round(bpw, 4),
                    "read_bits_per_weight": round(8 * read_bytes(module) / (n * k), 4),
                    "max_rel_err": err,
                    "copy_gbps": round(copy_gbps, 1),
                    "torch": torch.__version__,
                }
                for label, call in strategies.items():
                    rec[f"{label}_us"] = round(bench(call), 3)
                records.append(rec)
                print(json.dumps(rec), flush=True)
            del module, w
    return records


def _quantize_decoder(model, fmt: str, bits: int, group: int, backend: str) -> None:
    """Replaces every decoder-layer Linear by a random-valued quantized module of the same shape."""
    layers = model.model.layers
    for li, layer in enumerate(layers):
        for name, mod in list(layer.named_modules()):
            if isinstance(mod, torch.nn.Linear):
                new = make_module(fmt, mod.out_features, mod.in_features, bits, group, True, "cpu", seed=li)
                if mod.bias is not None:
                    new.bias = torch.nn.Parameter(mod.bias.detach().cpu().clone())
                new = new.to(mod.weight.device)
                new.compute_dtype = mod.weight.dtype
                new.backend = backend
                parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
                setattr(parent, name.rsplit(".", 1)[-1], new)


def decode_tokens_per_s(config: dict, formats, device: str, new_tokens: int = 128, backend: str = "auto") -> list[dict]:
    """Greedy decode tokens/s (HF generate, static cache), BF16 vs each quantized format, same process."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    records = []
    for fmt, bits, group in [("bf16", 16, -1), *formats]:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(Qwen2Config(**config), dtype=dtype).to(device).eval()
        if fmt != "bf16":
            _quantize_decoder(model, fmt, bits, group, backend)
        prompt = torch.randint(0, config["vocab_size"], (1, 16), device=device)
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  cache_implementation="static", pad_token_id=0)  # fmt: skip
        with torch.inference_mode():
            model.generate(prompt, **kw)  # warm-up: kernels compiled, cache allocated
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            model.generate(prompt, **kw)
            if device == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t
        records.append({"e2e": "decode", "format": fmt, "bits": bits, "group_size": group,
                        "tokens_per_s": round(new_tokens / dt, 2), "new_tokens": new_tokens,
                        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"})  # fmt: skip
        print(json.dumps(records[-1]), flush=True)
        del model
    base = records[0]["tokens_per_s"]
    for rec in records:
        rec["speedup"] = round(rec["tokens_per_s"] / base, 3)
    return records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1 (logic check)")
    p.add_argument("--e2e", action="store_true", help="also measure decode tokens/s on a Qwen2.5-1.5B-shaped model")
    p.add_argument("--out", default=None, help="also write all records to this JSON file")
    args = p.parse_args()
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
            sys.exit("--smoke on CPU needs TRITON_INTERPRET=1 in the environment (set before triton is imported)")
        formats = [("int", 4, 128, True), ("int", 3, 64, False), ("ssqr", 3, 64, True), ("hptq", 0, -1, True)]
        records = run([(96, 256)], [1, 3], formats, "cpu")
    else:
        if not torch.cuda.is_available():
            sys.exit("the kernel benchmark needs a CUDA GPU; use --smoke with TRITON_INTERPRET=1 to check it on CPU")
        records = run(SHAPES, MS, FORMATS, "cuda")
        if args.e2e:
            records += decode_tokens_per_s(QWEN_1_5B, [("int", 4, 128), ("int", 3, 128), ("ssqr", 3, 128)], "cuda")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)
    if records and all(math.isfinite(r.get("max_rel_err", 0.0)) for r in records):
        print(f"{len(records)} records", file=sys.stderr)


if __name__ == "__main__":
    main()
