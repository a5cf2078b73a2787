"""Do our GPTQ-style group scales equal llm-compressor's? Weight-only, so no calibration is needed.

``peer_equivalence.py`` shows the two solvers return the same codes given the same W, H and scales, and that
our per-channel MSE scales match the peer's observer. This checks the grouped case on a real model's layers:
our ``compute_scales(w, grid, "mse")`` against llm-compressor's ``memoryless_mse`` observer (its defaults:
max shrink 0.8, grid 100, norm 2.4) with ``strategy="group"``, run in the peer's virtual environment.
One JSON record per (layer, group size) with the relative scale differences.

    .venv/bin/python bench/peer_scales.py --model qwen2.5-0.5b --block 5 --bits 3 --groups 64 128
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from peer_equivalence import require_peer, run_peer_side  # bench/ is on sys.path when run as a script

PEER_SIDE = r"""
import json, sys, torch
from compressed_tensors.quantization import QuantizationArgs
from llmcompressor.observers.base import Observer
d = torch.load(sys.argv[1])
for rec, w, s in d:
    qa = QuantizationArgs(num_bits=rec["bits"], type="int", symmetric=True, strategy="group",
                          group_size=rec["group_size"], observer="memoryless_mse",
                          observer_kwargs={"maxshrink": 0.8, "grid": 100.0, "norm": 2.4, "patience": 80})
    obs = Observer.load_from_registry("memoryless_mse", base_name="weight", args=qa)
    obs(w)
    ps = obs.get_qparams()["scale"].float().reshape(s.shape)
    rel = (ps - s).abs() / s
    rec.update(scale_rel_diff_median=rel.median().item(), scale_rel_diff_max=rel.max().item(),
               frac_groups_rel_diff_gt_1e3=(rel > 1e-3).float().mean().item(),
               mean_ratio_peer_over_ours=(ps / s).mean().item())
    print(json.dumps(rec))
"""


def main() -> None:
    from safetensors import safe_open

    from hf_babai import assets
    from hf_babai.solver import Grid
    from hf_babai.solver.grid import compute_scales

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--block", type=int, default=5)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--groups", type=int, nargs="+", default=[64, 128])
    args = ap.parse_args()
    require_peer()
    path = Path(assets.ensure_model(args.model))
    key = f"layers.{args.block}."
    weights = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            names = [n for n in st.keys() if key in n and n.endswith("proj.weight")]  # noqa: SIM118 (not a dict)
            weights.update({n: st.get_tensor(n).float() for n in names})
    if not weights:
        sys.exit(f"no '*proj.weight' tensors of block {args.block} in {path}")
    dump = []
    for g in args.groups:
        for name, w in sorted(weights.items()):
            rec = {"model": args.model, "layer": name, "bits": args.bits, "group_size": g}
            dump.append((rec, w, compute_scales(w, Grid(bits=args.bits, sym=True, group_size=g), "mse")[0]))
    out = run_peer_side(PEER_SIDE, dump)
    print("\n".join(line for line in out.splitlines() if line.startswith("{")))


if __name__ == "__main__":
    main()
