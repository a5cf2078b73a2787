"""Kernel benchmark: the fused Triton dense kernel vs ``F.linear`` in BF16, measured in the same run.

Prints one JSON record per (shape, M, format) with ``device, format, bits, group_size, sym, N, K, M, us,
gbps, pct_copy_bw, bf16_us, speedup, ideal_speedup`` (and ``max_rel_err`` against the BF16 product of the
dequantized weight). Weights are random codes of the real shapes (real checkpoints do not travel to the GPU
machine; the kernel's speed does not depend on the values).

- Timer: ``triton.testing.do_bench`` (it zeroes a 256 MB buffer before each call, flushing L2), median.
- ``gbps`` = bytes the kernel must read (packed weight + scales/zeros + activations) + write / time;
  ``pct_copy_bw`` relates it to this device's measured device-to-device copy bandwidth.
- ``ideal_speedup`` = 16 / bits-per-weight (decode reads the weight once; kernels notes §5).

GPU:  python bench/kernels.py --out bench/results/kernels_<gpu>.json
CPU:  TRITON_INTERPRET=1 python bench/kernels.py --smoke   (checks the script's logic on tiny shapes;
      interpreter times mean nothing)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (12288, 4096)]  # (N out, K in)
MS = [1, 16, 128]
FORMATS = [(4, 128, True), (3, 128, True), (2, 128, True), (8, 128, True), (4, 128, False), (4, -1, True)]


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


def make_layer(n: int, k: int, bits: int, group: int, sym: bool, device: str):
    from hf_babai.formats.packing import pack_weight

    g = torch.Generator().manual_seed(0)
    groups = 1 if group == -1 else -(-k // group)
    codes = torch.randint(0, 2**bits, (n, k), generator=g)
    scales = (torch.rand(n, groups, generator=g) * 0.01 + 0.001).half().float()
    zeros = None if sym else torch.randint(0, 2**bits, (n, groups), generator=g)
    return {name: t.to(device) for name, t in pack_weight(codes, scales, zeros, bits, group).items()}


def run(shapes, ms, formats, device: str) -> list[dict]:
    from hf_babai.formats.kernel_ops import dense_matmul
    from hf_babai.formats.packing import dequantize_packed, format_bits_per_weight

    bench = _timer(device)
    copy_gbps = copy_bandwidth(device, bench)
    interp = os.environ.get("TRITON_INTERPRET")
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu (TRITON_INTERPRET={interp})"
    act = torch.bfloat16 if device == "cuda" else torch.float32  # bf16 math is broken in the interpreter
    records = []
    for n, k in shapes:
        for bits, group, sym in formats:
            buf = make_layer(n, k, bits, group, sym, device)
            w = dequantize_packed(buf, bits, group, k, act)
            weight_bytes = sum(t.numel() * t.element_size() for t in buf.values())
            grp = k if group == -1 else group
            for m in ms:
                x = torch.randn(m, k, device=device, dtype=act)
                planes = (buf["qweight"], buf.get("qweight_hi"), buf["scales"], buf.get("qzeros"), buf.get("qzeros_hi"))

                def fused(args=(x, *planes, bits, grp, n)):
                    return dense_matmul(*args)

                us = bench(fused)
                bf16_us = bench(lambda x=x, w=w: F.linear(x, w))
                ref = F.linear(x.float(), w.float())
                err = ((fused().float() - ref).norm() / ref.norm()).item()
                moved = weight_bytes + m * k * x.element_size() + m * n * x.element_size()
                bpw = format_bits_per_weight(k, n, bits, group, sym)
                records.append(
                    {
                        "device": name,
                        "format": f"int{bits}{'' if sym else '-asym'}",
                        "bits": bits,
                        "group_size": group,
                        "sym": sym,
                        "N": n,
                        "K": k,
                        "M": m,
                        "us": round(us, 3),
                        "gbps": round(moved / (us * 1e-6) / 1e9, 1),
                        "pct_copy_bw": round(100 * moved / (us * 1e-6) / 1e9 / copy_gbps, 1),
                        "bf16_us": round(bf16_us, 3),
                        "speedup": round(bf16_us / us, 3),
                        "ideal_speedup": round(16 / bpw, 3),
                        "bits_per_weight": round(bpw, 4),
                        "max_rel_err": err,
                        "copy_gbps": round(copy_gbps, 1),
                        "torch": torch.__version__,
                    }
                )
                print(json.dumps(records[-1]), flush=True)
    return records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1 (logic check)")
    p.add_argument("--out", default=None, help="also write all records to this JSON file")
    args = p.parse_args()
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
            sys.exit("--smoke on CPU needs TRITON_INTERPRET=1 in the environment (set before triton is imported)")
        records = run([(96, 256)], [1, 3], [(4, 128, True), (3, 64, False)], "cpu")
    else:
        if not torch.cuda.is_available():
            sys.exit("the kernel benchmark needs a CUDA GPU; use --smoke with TRITON_INTERPRET=1 to check it on CPU")
        records = run(SHAPES, MS, FORMATS, "cuda")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
