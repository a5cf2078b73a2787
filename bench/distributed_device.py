"""The distributed engine on the machine's own backend: NCCL on a GPU (gloo on the CPU), one rank.

Two or more NCCL ranks need a GPU each; a one-GPU machine can still run the NCCL code path with one rank: the
row-level all-reduce, the Hessian reduce, the owner's broadcast of its solutions (``broadcast_object_list`` on the
rank's GPU) and the agreement after each meeting point, with tensors placed where NCCL wants them. The same tiny
random Llama is quantized without a process group and under the one-rank group (both with the two-pass schedule a
distributed run uses); the record says whether the two models are the same bytes (a one-rank group changes no
arithmetic, so they must be, unless the GPU's own kernels are not deterministic between two runs) and what the
rank sent.

GPU:  python bench/distributed_device.py --out distributed.json
CPU:  python bench/distributed_device.py --out distributed.json   (gloo: checks the script's logic)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def _model(device: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(cfg).to(device).eval()


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bytes (so that "the same" means the same bytes, as in a checkpoint)."""
    return t.detach().cpu().contiguous().view(torch.uint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    import torch.distributed as dist

    from hf_babai.engine import Ranks, quantize_model
    from hf_babai.spec import QuantSpec

    cuda = torch.cuda.is_available()
    device, backend = ("cuda", "nccl") if cuda else ("cpu", "gloo")
    ids = torch.randint(0, 300, (6, 24), generator=torch.Generator().manual_seed(1)).to(device)
    spec = QuantSpec(bits=4, group_size=32, true_sequential=False)
    rec: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "backend": backend}
    t0 = time.perf_counter()
    alone = _model(device)
    quantize_model(alone, spec, ids, progress=False)
    rec["seconds_alone"] = round(time.perf_counter() - t0, 2)
    with tempfile.TemporaryDirectory() as tmp:
        if cuda:
            torch.cuda.set_device(0)
        dist.init_process_group(backend, init_method=f"file://{tmp}/rendezvous", rank=0, world_size=1)
        try:
            ranks = Ranks.current()
            rec["ranks_device"] = str(ranks.device)
            t0 = time.perf_counter()
            grouped = _model(device)
            quantize_model(grouped, spec, ids, progress=False, ranks=ranks)
            rec["seconds_group"] = round(time.perf_counter() - t0, 2)
            rec["bytes_sent"] = ranks.bytes_sent
        finally:
            dist.destroy_process_group()
    a, g = alone.state_dict(), grouped.state_dict()
    same = {k: k in g and v.dtype == g[k].dtype and v.shape == g[k].shape and torch.equal(_bytes(v), _bytes(g[k]))
            for k, v in a.items()}  # fmt: skip
    rec.update(identical=a.keys() == g.keys() and all(same.values()), tensors_equal=f"{sum(same.values())}/{len(same)}")
    with torch.no_grad():
        x = ids[:2, :16]
        rec["logits_equal"] = torch.equal(alone(x).logits, grouped(x).logits)
    args.out.write_text(json.dumps(rec, indent=1))
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
