"""K-best nearest plane against Babai on real layers: proxy loss on the calibration draw and on a held-out draw.

Captures the input Hessians of every Linear of one block from two disjoint calibration draws (full-precision
model, ``--calib`` windows of 512 tokens), solves each layer on the first at the library's layer damping with
GPTQ-style MSE scales, by Babai and by K-best for each ``--beams`` × ``--candidates``, all on the same scales, and
prints one JSON record per (layer, beams, candidates): both losses, their ratio to Babai's and the solve time.
A search that lowers the calibration loss but not the held-out one is fitting the draw, not the model.

    .venv/bin/python bench/kbest_layers.py --model smollm2-135m --block 3 --bits 3 --group-size 128
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_babai import assets
    from hf_babai.engine import capture_hessians, find_blocks, target_linears
    from hf_babai.perplexity import calibration_windows
    from hf_babai.solver import Grid, babai_quantize, dequantize, factor_hessian, layer_damp, proxy_loss
    from hf_babai.solver.babai import factor_scales
    from hf_babai.solver.kbest import kbest_quantize

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--block", type=int, default=3)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--calib", type=int, default=32, help="windows of 512 tokens per draw")
    ap.add_argument("--seeds", type=int, nargs=2, default=(0, 5), help="calibration seeds: train, held-out")
    ap.add_argument("--beams", type=int, nargs="+", default=(2, 4, 8, 16))
    ap.add_argument("--candidates", type=int, nargs="+", default=(2, 3))
    args = ap.parse_args()
    torch.manual_seed(0)
    path = assets.ensure_model(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    _, blocks = find_blocks(model)
    block = blocks[args.block]
    draws = [calibration_windows(tok, assets.calibration_text(), args.calib, 512, seed=s) for s in args.seeds]
    linears = target_linears(block, ())
    h_train, h_test = (capture_hessians(model, block, linears, ids) for ids in draws)
    grid = Grid(args.bits, True, args.group_size)
    tokens = args.calib * 512
    base = {"model": args.model, "block": args.block, "bits": args.bits, "group_size": args.group_size}
    base |= {"tokens": tokens, "seeds": list(args.seeds)}
    for name, lin in linears.items():
        w = lin.weight.detach().float()
        factor = factor_hessian(h_train[name], "act-order", layer_damp(w.shape[1], tokens))
        scales = factor_scales(w, factor, grid, "mse")

        def losses(res, w=w, name=name) -> tuple[float, float]:
            w_hat = dequantize(res.codes, res.scales, res.zeros, grid)
            return proxy_loss(w, w_hat, h_train[name]), proxy_loss(w, w_hat, h_test[name])

        t0 = time.perf_counter()
        babai = babai_quantize(w, factor, grid, scales=scales)
        t_babai = time.perf_counter() - t0
        b_train, b_test = losses(babai)
        for beams in args.beams:
            for cands in args.candidates:
                t0 = time.perf_counter()
                res = kbest_quantize(w, factor, grid, beams=beams, candidates=cands, scales=scales)
                sec = time.perf_counter() - t0
                train, test = losses(res)
                rec = base | {"layer": name, "shape": list(w.shape), "beams": beams, "candidates": cands}
                rec |= {"babai_train": b_train, "babai_heldout": b_test, "train": train, "heldout": test}
                rec |= {"train_vs_babai": train / b_train, "heldout_vs_babai": test / b_test}
                rec |= {"seconds": sec, "babai_seconds": t_babai}
                print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
