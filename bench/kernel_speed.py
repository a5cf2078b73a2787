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
- ``--part decode``: greedy decode tokens/s of a Qwen2.5-1.5B-shaped model (random weights, HF ``generate``,
  static cache, eager) in BF16 vs with every decoder Linear replaced by a quantized module, and the time per
  token of the Linears alone, replayed from a CUDA graph (eager decode at batch 1 is bound by the host).

GPU:  python bench/kernel_speed.py --part all --out bench/results/kernels_<gpu>.json
CPU:  TRITON_INTERPRET=1 python bench/kernel_speed.py --smoke --part all   (checks the script's logic on tiny
      shapes; interpreter times mean nothing)
"""

from __future__ import annotations

import argparse
import copy
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
# HPTQ is Huffman-coded on the host (about 10 s per 58 M weights): the larger shapes are measured only for the
# target shape, so the whole GPU check stays within its minutes.
TARGET_SHAPE = (4096, 14336)  # (N, K) of the speed targets
HPTQ_MAX_WEIGHTS = 1 << 25
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


# The decode runs: each format through the Triton kernels; int4 also through the torch path (what "auto" runs on
# CUDA until the kernels have passed a GPU run), to show what opting in buys.
DECODE_RUNS = [
    ("int", 4, 128, "triton"),
    ("int", 4, 128, "torch"),
    ("int", 3, 128, "triton"),
    ("ssqr", 3, 128, "triton"),
    ("hptq", 0, -1, "triton"),
]
SMOKE_FORMATS = [("int", 4, 128, True), ("int", 3, 64, False), ("ssqr", 3, 64, True), ("hptq", 0, -1, True)]
SMOKE_DECODE_RUNS = [("int", 4, 32, "triton"), ("int", 4, 32, "torch"), ("hptq", 0, -1, "torch")]
SMOKE_QWEN = dict(QWEN_1_5B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256)  # fmt: skip


def _timer(device: str):
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3  # ms → µs

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
    """A quantized module of shape ``[n, k]`` with random stored values, drawn and packed on ``device`` (packing
    hundreds of millions of weights on the host would eat the GPU run's minutes; HPTQ's Huffman coding stays on
    the host, as in the library)."""
    from hf_babai.formats import BabaiLinear, HuffmanLinear, SSQRLinear

    g = torch.Generator(device=device).manual_seed(seed)
    rand = dict(generator=g, device=device)
    lin = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16, device=device)
    if fmt == "hptq":
        codes = torch.round(torch.randn(n, k, **rand) * HPTQ_SIGMA).to(torch.int64)
        return HuffmanLinear.from_linear(lin, codes, 0.01)
    groups = 1 if group == -1 else -(-k // group)
    codes = torch.randint(0, 2**bits, (n, k), **rand)
    scales = (torch.rand(n, groups, **rand) * 0.01 + 0.001).half().float()
    zeros = None if sym else torch.randint(0, 2**bits, (n, groups), **rand)
    if fmt == "int":
        return BabaiLinear.from_linear(lin, codes, scales, zeros, bits, group, sym)
    mask = torch.rand(n, k, **rand) < OUTLIER_RATE
    codes[mask] = 2 ** (bits - 1)
    rows, cols = mask.nonzero(as_tuple=True)
    values = torch.randn(rows.numel(), **rand) * 0.1
    outliers = torch.sparse_coo_tensor(torch.stack([rows, cols]), values, (n, k), check_invariants=True)
    return SSQRLinear.from_linear(lin, codes, scales, zeros, bits, group, sym, outliers=outliers)


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


def _label(fmt: str, bits: int, sym: bool) -> str:
    return fmt if fmt != "int" else f"int{bits}{'' if sym else '-asym'}"


def run(shapes, ms, formats, device: str) -> list[dict]:
    """One record per (shape, format, M); a format that fails (a compile error on a new GPU, say) gets an
    ``error`` record and the others still run."""
    bench = _timer(device)
    copy_gbps = copy_bandwidth(device, bench)
    interp = os.environ.get("TRITON_INTERPRET")
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu (TRITON_INTERPRET={interp})"
    act = torch.bfloat16 if device == "cuda" else torch.float32  # bf16 math is broken in the interpreter
    records = []
    bf16_times: dict[tuple[int, int, int], float] = {}  # F.linear's time depends on the shape, not the values
    for n, k in shapes:
        for fmt, bits, group, sym in formats:
            if fmt == "hptq" and n * k > HPTQ_MAX_WEIGHTS and (n, k) != TARGET_SHAPE:
                continue
            base = {"device": name, "format": _label(fmt, bits, sym), "group_size": group, "sym": sym, "N": n, "K": k}
            try:
                for rec in _measure(fmt, bits, group, sym, n, k, ms, device, act, bench, bf16_times):
                    records.append({**base, **rec, "copy_gbps": round(copy_gbps, 1), "torch": torch.__version__})
                    records[-1]["pct_copy_bw"] = round(100 * rec["gbps"] / copy_gbps, 1)
                    print(json.dumps(records[-1]), flush=True)
            except Exception as exc:
                records.append({**base, "error": f"{type(exc).__name__}: {exc}"[:2000]})
                print(json.dumps(records[-1]), flush=True)
    return records


def _measure(fmt, bits, group, sym, n, k, ms, device, act, bench, bf16_times) -> list[dict]:
    from hf_babai.formats.kernel_ops import HUFFMAN_GEMV_MAX_M, matmul_path

    module = make_module(fmt, n, k, bits, group, sym, device)
    w = module.dequantize(act)
    bpw = 8 * stored_bytes(module) / (n * k)
    out = []
    for m in ms:
        x = torch.randn(m, k, device=device, dtype=act)
        auto, strategies = _calls(fmt, module, x)
        us = bench(auto)
        if (n, k, m) not in bf16_times:
            bf16_times[n, k, m] = bench(lambda x=x, w=w: F.linear(x, w))
        bf16_us = bf16_times[n, k, m]
        ref = F.linear(x.float(), w.float())
        err = ((auto().float() - ref).norm() / ref.norm()).item()
        moved = read_bytes(module) + m * k * x.element_size() + m * n * x.element_size()
        if fmt == "hptq":
            path = "fused-gemv" if m <= HUFFMAN_GEMV_MAX_M else "decode+F.linear"
        else:
            path = matmul_path(m, x.is_cuda) + ("" if fmt != "ssqr-separate" else "+outlier-kernel")
        rec = {
            "bits": bits if fmt != "hptq" else round(bpw, 3),
            "M": m,
            "path": path,
            "us": round(us, 3),
            "gbps": round(moved / (us * 1e-6) / 1e9, 1),
            "bf16_us": round(bf16_us, 3),
            "speedup": round(bf16_us / us, 3),
            "ideal_speedup": round(16 / bpw, 3),
            "bits_per_weight": round(bpw, 4),
            "read_bits_per_weight": round(8 * read_bytes(module) / (n * k), 4),
            "max_rel_err": err,
        }
        for label, call in strategies.items():
            rec[f"{label}_us"] = round(bench(call), 3)
        out.append(rec)
    return out


def _decoder_linears(model) -> list[tuple[torch.nn.Module, str, torch.nn.Linear]]:
    """``(parent, attribute, Linear)`` of every Linear inside the decoder blocks, in order."""
    out = []
    for layer in model.model.layers:
        for name, mod in layer.named_modules():
            if isinstance(mod, torch.nn.Linear):
                parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
                out.append((parent, name.rsplit(".", 1)[-1], mod))
    return out


def _swap_in(linears, fmt: str, bits: int, group: int, backend: str, device: str) -> None:
    """Puts a random-valued quantized module in place of each Linear. One module is built per distinct shape
    (Huffman coding of 1.3 B weights would take minutes) and each layer gets its own copy of it, so every layer
    still streams its own weights from memory as in a real model."""
    built: dict[tuple[int, int], torch.nn.Module] = {}
    for parent, attr, lin in linears:
        key = (lin.out_features, lin.in_features)
        if key not in built:
            built[key] = make_module(fmt, *key, bits, group, True, device)
        new = copy.deepcopy(built[key])
        if lin.bias is not None:
            new.bias = torch.nn.Parameter(lin.bias.detach().clone())
        new.compute_dtype = lin.weight.dtype
        new.backend = backend
        setattr(parent, attr, new)


def _restore(linears) -> None:
    for parent, attr, lin in linears:
        setattr(parent, attr, lin)


def _graph_linear_us(model, device: str, bench) -> float | None:
    """µs per token spent in the decoder's Linears alone: every one of them at M = 1, captured in one CUDA graph
    and replayed (no Python or launch overhead), so the weight-streaming cost per token shows even where eager
    ``generate`` is bound by the host. ``None`` off CUDA."""
    if device != "cuda":
        return None
    mods = [getattr(parent, attr) for parent, attr, _ in _decoder_linears(model)]
    dtype = next(model.parameters()).dtype
    xs = [torch.randn(1, m.in_features, device=device, dtype=dtype) for m in mods]

    def step() -> None:
        for m, x in zip(mods, xs, strict=True):
            m(x)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.inference_mode():
        for _ in range(2):  # compiles every kernel before capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        step()
    return bench(graph.replay)


def decode_tokens_per_s(config: dict, runs, device: str, new_tokens: int = 128) -> list[dict]:
    """Greedy decode tokens/s (HF ``generate``, static cache, eager: compilation disabled) in BF16 vs each
    ``(format, bits, group, backend)`` of ``runs``, one model in one process; on CUDA also the Linears' time per
    token (:func:`_graph_linear_us`)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    bench = _timer(device)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**config), dtype=dtype).eval()
    linears = _decoder_linears(model)
    prompt = torch.randint(0, config["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(0)).to(device)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              cache_implementation="static", disable_compile=True, pad_token_id=0)  # fmt: skip
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    records = []
    for fmt, bits, group, backend in [("bf16", 16, -1, "-"), *runs]:
        rec = {"e2e": "decode", "device": name, "format": fmt, "bits": bits, "group_size": group, "backend": backend}
        try:  # a run that fails (on a GPU never seen before) is recorded and the next one still runs
            if fmt != "bf16":
                _swap_in(linears, fmt, bits, group, backend, device)
            with torch.inference_mode():
                tokens = model.generate(prompt, **kw)  # warm-up: kernels compiled, cache allocated
                _sync(device)
                t = time.perf_counter()
                again = model.generate(prompt, **kw)
                _sync(device)
                dt = time.perf_counter() - t
            rec.update(tokens_per_s=round(new_tokens / dt, 2), new_tokens=new_tokens,
                       deterministic=bool(torch.equal(tokens, again)))  # fmt: skip
            linear_us = _graph_linear_us(model, device, bench)
            rec["linear_us_per_token"] = None if linear_us is None else round(linear_us, 2)
        except Exception as exc:
            rec["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        records.append(rec)
        print(json.dumps(rec), flush=True)
        _restore(linears)
    base = records[0]
    for rec in records:
        if "tokens_per_s" in rec and "tokens_per_s" in base:
            rec["speedup"] = round(rec["tokens_per_s"] / base["tokens_per_s"], 3)
        if rec.get("linear_us_per_token") and base.get("linear_us_per_token"):
            rec["linear_speedup"] = round(base["linear_us_per_token"] / rec["linear_us_per_token"], 3)
    return records


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1 (logic check)")
    p.add_argument(
        "--part",
        choices=("kernels", "decode", "all"),
        default="kernels",
        help="kernels: every format's op vs BF16; decode: tokens/s of a Qwen2.5-1.5B-shaped model",
    )
    p.add_argument("--out", default=None, help="also write all records to this JSON file")
    args = p.parse_args()
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
            sys.exit("--smoke on CPU needs TRITON_INTERPRET=1 in the environment (set before triton is imported)")
        device, shapes, ms, formats = "cpu", [(96, 256)], [1, 3], SMOKE_FORMATS
        config, runs, tokens = SMOKE_QWEN, SMOKE_DECODE_RUNS, 2
    else:
        if not torch.cuda.is_available():
            sys.exit("the kernel benchmark needs a CUDA GPU; use --smoke with TRITON_INTERPRET=1 to check it on CPU")
        device, shapes, ms, formats = "cuda", SHAPES, MS, FORMATS
        config, runs, tokens = QWEN_1_5B, DECODE_RUNS, 64
    records = []
    if args.part in ("kernels", "all"):
        records += run(shapes, ms, formats, device)
    if args.part in ("decode", "all"):
        records += decode_tokens_per_s(config, runs, device, new_tokens=tokens)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)
    failed = [r for r in records if "error" in r or not math.isfinite(r.get("max_rel_err", 0.0))]
    print(f"{len(records)} records, {len(failed)} failed", file=sys.stderr)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
