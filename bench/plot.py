"""Perplexity vs bits per weight from ``bench/quality.py`` JSON lines: one PNG per model (the frontier plots).

    .venv/bin/python bench/plot.py bench/results/quality_smollm2-135m.jsonl bench/results/nonclip_smollm2-135m.jsonl \\
        --out bench/results/frontier_smollm2-135m.png

Each series is one method (tool, method, order, outlier rate); points are joined in bpw order. The int-format
Babai and GPTQ series show only records of today's defaults (``paired.is_default_ours`` / ``is_default_peer``),
the same selection as the paired table of docs/benchmarks.md. The float model,
when present, is a horizontal line. Only one calibration seed (``--seed``, default 0) and one evaluation size
(4 windows) are drawn, and where a file holds several records of the same series at the same bits (re-runs under
older defaults), the last one — today's — is drawn. Needs the ``bench`` extra (matplotlib).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from paired import is_default_ours, is_default_peer  # bench/ is on sys.path when this runs as a script


def series_name(rec: dict) -> str:
    """Legend label of a record."""
    if rec.get("tool") == "llm-compressor":
        return "GPTQ (llm-compressor)"
    method = rec["method"]
    if method == "babai":
        extra = f" +{rec['refine_sweeps']} CD sweeps" if rec.get("refine_sweeps") else ""
        return f"Babai int ({rec.get('order')}){extra}"
    if method == "ssqr":
        return f"SSQR ({rec['outlier_rate']:.1%} outliers)"
    return {"rtn": "RTN", "hptq": "HPTQ", "hrtn": "HRTN"}.get(method, method)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-ppl", type=float, default=None, help="clip the y axis (very bad points go off-chart)")
    p.add_argument("--seed", type=int, default=0, help="calibration seed to draw")
    args = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for f in args.files for line in f.read_text().splitlines() if line.strip()]
    models = {r["model"] for r in recs}
    if len(models) != 1:
        raise SystemExit(f"one model per plot, got {sorted(models)}")
    fp = [r["ppl"] for r in recs if r["method"] == "fp"]
    latest: dict[tuple[str, float], float] = {}
    for r in recs:  # file order: a later record of the same point replaces an earlier one
        same_eval = r.get("calib_seed", 0) == args.seed and r.get("windows", 4) == 4
        if r.get("tool") == "llm-compressor" and not is_default_peer(r):
            continue
        if r.get("tool") == "hf_babai" and r["method"] == "babai" and not is_default_ours(r):
            continue
        if r["method"] != "fp" and r.get("bpw") is not None and same_eval:
            latest[(series_name(r), round(r["bpw"], 4))] = r["ppl"]
    groups: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for (name, bpw), ppl in latest.items():
        groups[name].append((bpw, ppl))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in sorted(groups.items()):
        pts.sort()
        ax.plot([b for b, _ in pts], [q for _, q in pts], marker="o", label=name)
    if fp:
        ax.axhline(fp[0], color="gray", linestyle="--", label=f"float ({fp[0]:.2f})")
    ax.set_yscale("log")
    if args.max_ppl:
        ax.set_ylim(top=args.max_ppl)
    ax.set_xlabel("stored bits per weight (quantized layers, all metadata)")
    ax.set_ylabel("perplexity (Pride and Prejudice, 4×2048)")
    ax.set_title(f"{models.pop()}: perplexity vs bits per weight")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(args.out)


if __name__ == "__main__":
    main()
