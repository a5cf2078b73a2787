"""Quality benchmark: perplexity vs bits per weight for hf_babai and its peer, in one run.

Every configuration runs in its own subprocess (so ``peak_rss_gb`` is that configuration's own peak) on
the same model folder, the same calibration windows and the same evaluation windows, saved once per run.
The peers run from their own virtual environments: llm-compressor's GPTQ (``scripts/setup_peer.sh``; it pins
an older transformers) through ``bench/peer_llmcompressor.py``, GPTQModel's GPTQ and GPTAQ (``--peer-gptqmodel``,
``.venv-gptqmodel`` from ``scripts/setup_loaders.sh``) through ``bench/peer_gptqmodel.py``.

Prints one JSON record per (model, tool, method, bits, group, order) and appends it to ``--out``.

    .venv/bin/python bench/quality.py --model smollm2-135m --bits 3 4 --groups 128 --peer \\
        --out bench/results/quality_smollm2-135m.jsonl
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER_PY = ROOT / ".venv-peer" / "bin" / "python"
GPTQMODEL_PY = ROOT / ".venv-gptqmodel" / "bin" / "python"


ENTROPY_METHODS = ("hptq", "hrtn")


def entropy_target(bits: int, group_size: int) -> float:
    """The bit budget HPTQ/HRTN get at a (bits, group) setting: that of the b-bit format with 16-bit group
    scales, ``bits + 16/group`` (the paper's 4.125 / 3.125 / 2.125 at group 128); per-channel: ``bits``."""
    return bits + (16 / group_size if group_size > 0 else 0.0)


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_one(args: argparse.Namespace) -> dict:
    """One hf_babai configuration (or the fp baseline) in this process."""
    import torch
    from transformers import AutoModelForCausalLM

    from hf_babai.engine import QuantSpec, model_bits_per_weight, quantize_model, uses_one_pass
    from hf_babai.perplexity import perplexity

    torch.manual_seed(0)
    bits = args.bits[0]  # --bits takes a list in the driver; one value here
    calib = torch.load(args.calib_file)
    evalw = torch.load(args.eval_file)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    rec = {
        "model": args.model,
        "tool": "hf_babai",
        "method": args.method,
        "bits": bits,
        "group_size": args.group_size,
        "order": args.order if args.method == "babai" else None,
        "sym": True,
        "n_calib": int(calib.shape[0]),
        "calib_seqlen": int(calib.shape[1]),
        "seqlen": int(evalw.shape[1]),
        "windows": int(evalw.shape[0]),
    }
    if args.method == "fp":
        rec.update(bits=16, group_size=None, bpw=16.0, seconds=0.0, loss=None, bound=None)
    else:
        # calibration-schedule options, the same for every method (rtn ignores them: it runs no calibration)
        schedule = {"true_sequential": args.true_sequential}
        if args.damp_width is not None:
            schedule["damp_width"] = args.damp_width
        if args.method in ENTROPY_METHODS:  # no-clipping, entropy-coded: sized by a bit budget, not a grid
            target = entropy_target(bits, args.group_size)
            method = "babai" if args.method == "hptq" else "rtn"
            spec = QuantSpec(method=method, order=args.order, format="hptq", target_bpw=target, **schedule)
            rec.update(group_size=None, target_bpw=target, order=args.order if method == "babai" else None)
        elif args.method == "ssqr":  # fixed-width inliers + sparse exact outliers at a given rate
            method = "babai"
            spec = QuantSpec(
                bits=bits,
                group_size=args.group_size,
                order=args.order,
                format="ssqr",
                outlier_rate=args.outlier_rate,
                **schedule,
            )
            rec.update(outlier_rate=args.outlier_rate, order=args.order)
        else:
            method = args.method
            sweeps = args.refine_sweeps if method == "babai" else 0
            spec = QuantSpec(
                bits=bits,
                group_size=args.group_size,
                method=method,
                order=args.order,
                refine_sweeps=sweeps,
                beams=args.beams if method == "babai" else 1,
                asym_alpha=args.asym_alpha if method == "babai" else 0.0,
                **({"rescale": args.rescale} if method == "babai" and args.rescale is not None else {}),
                scale_method=args.scale_method if method == "babai" else None,
                **schedule,
            )
            if method == "babai":  # what was used, defaults resolved
                rec.update(scale_method=spec.scale_method, rescale=spec.rescale)
            if sweeps:
                rec["refine_sweeps"] = sweeps
            if spec.beams > 1:
                rec["beams"] = spec.beams
            if method == "babai":
                rec["asym_alpha"] = spec.asym_alpha
        t0 = time.perf_counter()
        ids = calib if method == "babai" else None
        records = quantize_model(model, spec, ids, batch_size=args.calib_batch, progress=False)
        rec["calib_batch"] = args.calib_batch
        if method == "babai":
            rec["true_sequential"] = uses_one_pass(spec, int(calib.shape[0]), args.calib_batch)  # auto resolved
            rec["damp_width"] = spec.damp_width
        rec["seconds"] = time.perf_counter() - t0
        rec["bpw"] = model_bits_per_weight(model)
        stats = [r.stats for r in records]
        rec["loss"] = sum(s["loss"] for s in stats) if method == "babai" else None
        rec["bound"] = sum(s["bound"] for s in stats) if method == "babai" else None
        rec["clipped_frac"] = sum(s["clipped"] for s in stats) / sum(s["weights"] for s in stats)
        if method == "babai" and spec.format == "int":  # which search each layer kept (scale_method auto)
            kept = [str(s["scales"]) for s in stats]
            rec["scales_kept"] = {k: kept.count(k) for k in sorted(set(kept))}
    for m in model.modules():  # decode entropy-coded weights once for the evaluation (same numbers, faster)
        if hasattr(m, "cache_dense"):
            m.cache_dense = True
    rec["ppl"] = perplexity(model, evalw)
    rec["peak_rss_gb"] = _rss_gb()
    return rec


def _sub(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"benchmark step failed ({' '.join(cmd)}):\n{out.stderr[-4000:]}")
    if "--out" in cmd:  # the peer writes its (pretty-printed) record to --out
        return json.loads(Path(cmd[cmd.index("--out") + 1]).read_text())
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--groups", type=int, nargs="+", default=[64, 128, -1])
    p.add_argument(
        "--methods",
        nargs="*",
        default=["rtn", "babai:act-order", "babai:min-pivot"],
        help="rtn, babai[:order], ssqr[:order] (sparse outliers, --outlier-rates), and the entropy-coded "
        "hptq[:order] / hrtn (budget bits + 16/group); none = only the peer (with --peer)",
    )
    p.add_argument("--peer", action="store_true", help="also run llm-compressor GPTQ (needs .venv-peer)")
    p.add_argument("--peer-actorder", default="static", help="llm-compressor actorder (none/static/group/weight)")
    p.add_argument("--peer-observer", default="mse", help="llm-compressor scale observer (mse/mse-llmc/minmax)")
    p.add_argument(
        "--peer-gptqmodel",
        nargs="+",
        default=[],
        choices=["default", "best", "default+gptaq", "best+gptaq"],
        help="also run GPTQModel 7.6.0 in these presets (needs .venv-gptqmodel: scripts/setup_loaders.sh)",
    )
    p.add_argument("--outlier-rates", type=float, nargs="+", default=[0.01], help="ssqr: outlier budgets to run")
    p.add_argument("--outlier-rate", type=float, help=argparse.SUPPRESS)
    p.add_argument(
        "--refine-sweeps", type=int, default=0, help="babai int format: coordinate-descent sweeps after the solve"
    )
    p.add_argument("--beams", type=int, default=1, help="babai int format: K-best nearest plane beams (1 = Babai)")
    p.add_argument(
        "--asym-alpha",
        type=float,
        default=None,
        help="babai: GPTAQ asymmetric calibration strength (0 = off; default: the library's)",
    )
    p.add_argument(
        "--scale-method",
        choices=["auto", "mse", "hmse", "minmax"],
        help="babai: scale search (hmse weighs it by diag H); default auto at >= 3 bits (engine.default_scale_method)",
    )
    p.add_argument(
        "--rescale",
        action=argparse.BooleanOptionalAction,
        help="babai int format: refit the scales to the codes under H after the solve (default off)",
    )
    p.add_argument("--calib", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--calib-seed", type=int, default=0, help="seed of the random calibration windows")
    p.add_argument(
        "--calib-batch",
        type=int,
        default=None,
        help="calibration windows per forward for hf_babai (default: all at once)",
    )
    p.add_argument(
        "--damp-width",
        type=float,
        default=None,
        help="hf_babai: damping per input feature per calibration token (default: the library's; 0 = fixed 0.01)",
    )
    p.add_argument(
        "--true-sequential",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="hf_babai: one forward per block (downstream Hessians from quantized upstream outputs); "
        "--no-true-sequential: two passes; default: the engine's auto rule",
    )
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--no-fp", action="store_true", help="skip the full-precision baseline")
    p.add_argument("--out", type=Path, default=None)
    # internal: run one configuration in this process
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--calib-file", help=argparse.SUPPRESS)
    p.add_argument("--eval-file", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--order", default="act-order", help=argparse.SUPPRESS)
    p.add_argument("--group-size", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return

    import torch
    from transformers import AutoTokenizer

    from hf_babai import assets
    from hf_babai.perplexity import calibration_windows, eval_windows

    model_dir = assets.ensure_model(args.model)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tmp = Path(tempfile.mkdtemp(prefix="hf_babai_bench_"))
    calib_file, eval_file = tmp / "calib.pt", tmp / "eval.pt"
    calib = calibration_windows(tok, assets.calibration_text(), args.calib, args.calib_seqlen, seed=args.calib_seed)
    torch.save(calib, calib_file)
    torch.save(eval_windows(tok, assets.eval_text(), args.seqlen, args.windows), eval_file)
    base = [
        sys.executable,
        __file__,
        "--one",
        "--model",
        args.model,
        "--model-dir",
        str(model_dir),
        "--calib-file",
        str(calib_file),
        "--eval-file",
        str(eval_file),
        *(["--calib-batch", str(args.calib_batch)] if args.calib_batch else []),
        *(["--refine-sweeps", str(args.refine_sweeps)] if args.refine_sweeps else []),
        *(["--beams", str(args.beams)] if args.beams > 1 else []),
        *(["--asym-alpha", str(args.asym_alpha)] if args.asym_alpha is not None else []),
        *([] if args.rescale is None else ["--rescale" if args.rescale else "--no-rescale"]),
        *(["--scale-method", args.scale_method] if args.scale_method else []),
        *({None: [], True: ["--true-sequential"], False: ["--no-true-sequential"]}[args.true_sequential]),
        *(["--damp-width", str(args.damp_width)] if args.damp_width is not None else []),
    ]
    if args.peer and not PEER_PY.exists():
        raise SystemExit(f"--peer needs {PEER_PY}: run `bash scripts/setup_peer.sh` first")
    if args.peer_gptqmodel and not GPTQMODEL_PY.exists():
        raise SystemExit(f"--peer-gptqmodel needs {GPTQMODEL_PY}: run `bash scripts/setup_loaders.sh` first")

    jobs: list[list[str]] = []
    if not args.no_fp:
        jobs.append([*base, "--method", "fp", "--bits", "16", "--group-size", "0"])
    for bits in args.bits:
        for group in args.groups:
            for m in args.methods:
                if m == "none":  # only the peers
                    continue
                method, _, order = m.partition(":")
                job = [*base, "--method", method, "--order", order or "act-order"]
                job += ["--bits", str(bits), "--group-size", str(group)]
                if method == "ssqr":
                    jobs += [[*job, "--outlier-rate", str(r)] for r in args.outlier_rates]
                else:
                    jobs.append(job)
            if args.peer:
                jobs.append(
                    [
                        str(PEER_PY),
                        str(ROOT / "bench" / "peer_llmcompressor.py"),
                        "--model",
                        str(model_dir),
                        "--calib",
                        str(calib_file),
                        "--eval",
                        str(eval_file),
                        "--bits",
                        str(bits),
                        "--group-size",
                        str(group),
                        "--actorder",
                        args.peer_actorder,
                        "--observer",
                        args.peer_observer,
                        "--out",
                        str(tmp / "peer.json"),
                    ]
                )
            for preset in args.peer_gptqmodel:
                name, _, gptaq = preset.partition("+")
                runner = [str(GPTQMODEL_PY), str(ROOT / "bench" / "peer_gptqmodel.py"), "--model", str(model_dir)]
                files = ["--calib", str(calib_file), "--eval", str(eval_file), "--out", str(tmp / "gptqmodel.json")]
                setting = ["--bits", str(bits), "--group-size", str(group), "--preset", name]
                jobs.append([*runner, *files, *setting, *(["--gptaq"] if gptaq else [])])
    for cmd in jobs:
        rec = _sub(cmd)
        rec.setdefault("model", args.model)
        rec["calib_seed"] = args.calib_seed
        if rec.get("tool") == "llm-compressor":
            rec.setdefault("order", f"actorder={rec.get('actorder')}")
            # compare at 16-bit scales like ours (the peer keeps scales in the model dtype, fp32 here)
            rec["bpw_as_stored"] = rec["bpw"]
            rec["bpw"] = rec.get("details", {}).get("bpw_16bit_scales", rec["bpw"])
            rec.setdefault("loss", None)
            rec.setdefault("bound", None)
        if rec.get("tool") == "gptqmodel":
            rec.setdefault("order", f"preset={rec.get('preset')}")
            rec.setdefault("loss", None)
            rec.setdefault("bound", None)
        line = json.dumps(rec)
        print(line, flush=True)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
