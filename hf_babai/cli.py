"""Command line: ``hf-babai demo`` (the README's main job).

``demo`` installs the small offline model and texts if needed, measures the full-precision perplexity on
held-out text, quantizes a fresh copy of the model at each requested bit width with the default method
(Babai nearest-plane, min-pivot order, MSE group scales) and prints perplexity, true bits per weight and the
time taken.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

DEFAULTS = {"model": "smollm2-135m", "calib": 32, "calib_seqlen": 512, "seqlen": 2048, "windows": 4}


def _demo(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import assets
    from .engine import QuantSpec, model_bits_per_weight, quantize_model
    from .perplexity import calibration_windows, eval_windows, perplexity

    torch.manual_seed(0)
    path = assets.ensure_model(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    evalw = eval_windows(tok, assets.eval_text(), args.seqlen, args.windows)
    calib = calibration_windows(tok, assets.calibration_text(), args.calib, args.calib_seqlen)

    def load() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    t0 = time.perf_counter()
    fp = perplexity(load(), evalw)
    print(f"{args.model}: full precision  ppl {fp:8.3f}   ({evalw.numel()} tokens, {time.perf_counter() - t0:.0f}s)")
    results = [{"bits": 16, "ppl": fp}]
    for bits in args.bits:
        model = load()
        spec = QuantSpec(bits=bits, group_size=args.group_size, order=args.order, method=args.method)
        t0 = time.perf_counter()
        quantize_model(model, spec, calib, progress=not args.quiet)
        secs = time.perf_counter() - t0
        bpw = model_bits_per_weight(model)
        ppl = perplexity(model, evalw)
        print(
            f"{args.model}: {args.method} {bits}-bit g{args.group_size} {args.order}: ppl {ppl:8.3f} "
            f"(full precision {fp:.3f})  {bpw:.3f} bits/weight  quantized in {secs:.0f}s"
        )
        results.append({"bits": bits, "ppl": ppl, "bpw": bpw, "seconds": secs})
    if args.json:
        print(json.dumps(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-babai", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="quantize the small offline model and print perplexity before/after")
    demo.add_argument("--model", default=DEFAULTS["model"], help="offline model name (see hf_babai.assets.MODELS)")
    demo.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    demo.add_argument("--group-size", type=int, default=128)
    demo.add_argument("--order", default="min-pivot", choices=["natural", "act-order", "min-pivot"])
    demo.add_argument("--method", default="babai", choices=["babai", "rtn"])
    demo.add_argument("--calib", type=int, default=DEFAULTS["calib"], help="calibration windows")
    demo.add_argument("--calib-seqlen", type=int, default=DEFAULTS["calib_seqlen"])
    demo.add_argument("--seqlen", type=int, default=DEFAULTS["seqlen"], help="evaluation window length")
    demo.add_argument("--windows", type=int, default=DEFAULTS["windows"], help="evaluation windows")
    demo.add_argument("--json", action="store_true", help="also print the results as JSON")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "demo":
        return _demo(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
