"""Quantizing on one process against N torch.distributed ranks (gloo, one CPU thread each), on a real model.

Both runs use the two-pass schedule (what a distributed run uses) on the same calibration windows. One JSON record:
wall time of each (quantization only, model already loaded), their ratio, the tensor bytes each rank sent (Hessian
bins to owners, solutions to the others) in all and per block, each rank's peak RSS and private memory at the end,
whether every rank's quantized model equals the single-process one byte for byte, and the rates the cost model in
``docs/distributed.md`` uses: solve seconds per block by Hessian width (with the output rows solved against it)
and the backend's reduce rate on a 64 MiB tensor.

    .venv/bin/python bench/distributed.py --model smollm2-135m --ranks 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _anon_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cpu() -> str:
    """The CPU model and core count (timings are of this machine)."""
    import os

    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "unknown CPU")
    return f"{model}, {os.cpu_count()} cores"


def rank_main(rank: int, world: int, folder: str, args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_babai import assets
    from hf_babai.engine import Ranks, find_blocks, quantize_model
    from hf_babai.perplexity import calibration_windows
    from hf_babai.spec import QuantSpec

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    src = assets.ensure_model(args.model)
    tok = AutoTokenizer.from_pretrained(src)
    ids = calibration_windows(tok, assets.calibration_text(), n=args.nsamples, seqlen=args.seqlen)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    blocks = len(find_blocks(model)[1])
    spec = QuantSpec(bits=args.bits, group_size=args.group_size, true_sequential=False)
    ranks = Ranks.current()
    start = time.perf_counter()
    records = quantize_model(model, spec, ids, progress=False, ranks=ranks)
    seconds = time.perf_counter() - start
    by_width: dict[int, list[float]] = {}  # solve seconds and output rows per block, by Hessian width
    for r in records:
        entry = by_width.setdefault(r.in_features, [0.0, 0])
        entry[0] += float(r.stats["seconds"]) / blocks
        entry[1] += r.out_features / blocks
    reduce_gib_s = None
    if world > 1:  # the backend's reduce rate on a Hessian-sized tensor (64 MiB of float64)
        t = torch.ones(2**23, dtype=torch.float64)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(5):
            dist.reduce(t, dst=0)
        reduce_gib_s = round(5 * t.numel() * 8 / 2**30 / (time.perf_counter() - t0), 2)
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.contiguous().view(torch.uint8).numpy().tobytes())
    sent = 0 if ranks is None else ranks.bytes_sent
    record = {
        "rank": rank,
        "seconds": round(seconds, 1),
        "sent_mib": round(sent / 2**20, 1),
        "sent_mib_per_block": round(sent / 2**20 / blocks, 2),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "private_mib_at_end": round(_anon_mib()),
        "digest": h.hexdigest(),
        "blocks": blocks,
        "solve_seconds_per_block_by_width": {k: round(v[0], 3) for k, v in sorted(by_width.items())},
        "out_rows_per_block_by_width": {k: round(v[1]) for k, v in sorted(by_width.items())},
        "reduce_gib_per_s": reduce_gib_s,
    }
    (Path(folder) / f"{world}-{rank}.json").write_text(json.dumps(record))
    if world > 1:
        dist.destroy_process_group()


def run(world: int, folder: str, args: argparse.Namespace) -> tuple[float, list[dict]]:
    start = time.perf_counter()
    mp.spawn(rank_main, args=(world, folder, args), nprocs=world, join=True)
    wall = time.perf_counter() - start
    return wall, [json.loads((Path(folder) / f"{world}-{r}.json").read_text()) for r in range(world)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        _, one = run(1, folder, args)
        _, many = run(args.ranks, folder, args)
    slowest = max(r["seconds"] for r in many)
    print(
        json.dumps(
            {
                "bench": "distributed",
                "model": args.model,
                "settings": {"bits": args.bits, "group_size": args.group_size, "schedule": "two passes"},
                "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen},
                "device": _cpu(),
                "threads_per_process": 1,
                "ranks": args.ranks,
                "seconds_one_process": one[0]["seconds"],
                "seconds_ranks": slowest,
                "speedup": round(one[0]["seconds"] / slowest, 2),
                "identical_to_one_process": all(r["digest"] == one[0]["digest"] for r in many),
                "one_process": {k: v for k, v in one[0].items() if k != "digest"},
                "per_rank": [{k: v for k, v in r.items() if k != "digest"} for r in many],
            }
        )
    )


if __name__ == "__main__":
    main()
