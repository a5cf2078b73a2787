"""Does a layer's proxy loss generalize? Train-draw vs held-out-draw Hessians of one block, per damping.

The solver minimizes ``tr(E H Eᵀ)`` for the Hessian of the calibration draw; what the model meets later is other
text. This captures the input Hessians of every Linear of one block from two disjoint calibration draws of the same
size (full-precision model, ``--calib`` windows of 512 tokens each), solves on the first at each ``--damps`` value
(act-order, GPTQ-style MSE scales), and prints one JSON record per (layer, damp) with the proxy loss on both.
A large held-out/train ratio means the Hessian was estimated from too few tokens for that layer's width.

``--scales mse hmse+refit`` instead solves once per scale rule at the library's per-layer damping
(``layer_damp``) and prints both losses per (layer, rule): does a rule that lowers the calibration loss also lower
the loss on other text?

    .venv/bin/python bench/heldout_loss.py --model qwen2.5-0.5b --block 3 --bits 3 --group-size 64
    .venv/bin/python bench/heldout_loss.py --model qwen2.5-0.5b --block 3 --bits 3 --scales mse hmse+refit
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_babai import assets
    from hf_babai.engine import capture_hessians, find_blocks, target_linears
    from hf_babai.perplexity import calibration_windows
    from hf_babai.solver import Grid, babai_quantize, dequantize, factor_hessian, layer_damp, proxy_loss
    from hf_babai.solver.refine import refine_result

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--block", type=int, default=3)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--calib", type=int, default=32, help="windows of 512 tokens per draw")
    ap.add_argument("--seeds", type=int, nargs=2, default=(0, 5), help="calibration seeds: train, held-out")
    ap.add_argument("--damps", type=float, nargs="+", default=(0.01, 0.03, 0.1, 0.3))
    ap.add_argument(
        "--scales",
        nargs="+",
        choices=("mse", "hmse", "mse+refit", "hmse+refit"),
        help="compare these scale rules at the library's layer damping instead of sweeping --damps",
    )
    args = ap.parse_args()
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
    for name, lin in linears.items():
        w = lin.weight.detach().float()
        if args.scales:
            runs = [(layer_damp(w.shape[1], tokens), rule) for rule in args.scales]
        else:
            runs = [(d, "mse") for d in args.damps]
        for damp, rule in runs:
            factor = factor_hessian(h_train[name], "act-order", damp)
            method, refit = rule.removesuffix("+refit"), rule.endswith("+refit")
            res = babai_quantize(w, factor, grid, scale_method=method)
            if refit:
                res = refine_result(w, h_train[name], factor.damping, res, grid, 0, rescale=True)
            w_hat = dequantize(res.codes, res.scales, res.zeros, grid)
            train, test = proxy_loss(w, w_hat, h_train[name]), proxy_loss(w, w_hat, h_test[name])
            rec = {"model": args.model, "block": args.block, "layer": name, "in_features": w.shape[1]}
            rec |= {"bits": args.bits, "group_size": args.group_size, "tokens": tokens, "seeds": args.seeds}
            rec |= {"damp": damp, "scales": rule, "train_loss": train, "heldout_loss": test}
            rec["heldout_over_train"] = test / train
            print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
