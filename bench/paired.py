"""hf_babai's defaults against the peers, paired by calibration seed, from ``bench/quality.py`` JSON lines.

One calibration draw moves either tool's perplexity by 1-2 % (Qwen2.5-0.5B 3-bit g64: the peer 40.42-41.56 over
seeds 0-3), as much as the difference between the tools, so a single-seed comparison cannot say "better". This
pairs the two tools on each seed (both quantize from the same saved windows) and reports the mean relative
difference with its standard error. Only records of today's defaults count on our side (act-order, the library's
default damping, scale rule and schedule, no refinements), so older runs with other settings in the same file do
not mix in; the peer's records are its default ``actorder=static`` with the MSE observer. Round-to-nearest on the
same grid (no calibration, so one figure per setting) stands beside them when the files hold it. The second peer,
GPTQModel, is paired with us on whichever seeds it ran, in its better configuration for the setting: the ``best``
preset (act-order, MSE scales) or that preset with its GPTAQ mode (``best+gptaq``), whichever has the lower mean
perplexity on the seeds both ran (``best`` where they share none); the cell names the one taken.

.venv/bin/python bench/paired.py bench/results/quality_qwen2.5-0.5b.jsonl [--markdown] [--ours asym_alpha=0]

``--ours SETTING=VALUE`` pairs an option instead of the defaults: the records that ran with the defaults plus that
setting (``asym_alpha=0``: the plain GPTQ/Babai target; a record without the field ran before the option existed,
so with 0; ``true_sequential=false``: two passes).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from hf_babai.engine import QuantSpec, uses_one_pass


def is_default_ours(rec: dict, settings: dict | None = None) -> bool:
    """Whether an hf_babai record ran with every library default for its bits and group size, less ``settings``
    (``--ours asym_alpha=0``: the defaults plus that option, and whatever the defaults imply for it)."""
    if rec.get("tool") != "hf_babai" or rec.get("method") != "babai" or rec.get("order") != "act-order":
        return False
    spec = QuantSpec(bits=rec["bits"], group_size=rec["group_size"], **(settings or {}))
    return (
        rec.get("sym", True)
        and rec.get("damp_width") is not None
        and math.isclose(rec["damp_width"], spec.damp_width)
        and rec.get("scale_method") == spec.scale_method
        and bool(rec.get("rescale")) == spec.rescale
        and (rec.get("refine_sweeps") or 0) == spec.refine_sweeps
        and rec.get("beams", 1) == spec.beams
        and math.isclose(rec.get("asym_alpha") or 0.0, spec.asym_alpha)
        and not rec.get("skip_first_tokens")
        and rec.get("calib_batch") is None
        and rec.get("true_sequential") == uses_one_pass(spec, rec["n_calib"])
    )


def is_default_peer(rec: dict) -> bool:
    """Whether a peer record is llm-compressor GPTQ with its default act-order and the MSE observer."""
    details = rec.get("details", {})
    return (
        rec.get("tool") == "llm-compressor"
        and rec.get("actorder") == "static"
        and rec.get("sym", True)
        and details.get("observer_preset", "mse") == "mse"
    )


def gptqmodel_preset(rec: dict) -> str | None:
    """The preset of a GPTQModel record (``best``, ``default``, ``best+gptaq``, ...), or None for other tools."""
    if rec.get("tool") != "gptqmodel":
        return None
    return rec.get("preset", "default") + ("+gptaq" if rec.get("method") == "gptaq" else "")


#: GPTQModel's configurations the second peer's column may take, the first where the seeds cannot choose
GPTQMODEL = ("best", "best+gptaq")


def better_preset(sides: dict[str, dict[int, float]]) -> str:
    """The GPTQModel preset with the lower mean perplexity over the seeds every preset ran (``GPTQMODEL[0]`` where
    no seed is shared)."""
    ran = [p for p in GPTQMODEL if sides[p]]
    shared = set.intersection(*(set(sides[p]) for p in ran)) if ran else set()
    if len(ran) < 2 or not shared:
        return ran[0] if len(ran) == 1 else GPTQMODEL[0]
    return min(ran, key=lambda p: (statistics.fmean(sides[p][s] for s in shared), GPTQMODEL.index(p)))


def pair(records: list[dict], settings: dict | None = None) -> list[dict]:
    """One summary per (model, bits, group size, calibration size, evaluation windows) with both tools on at least
    one seed; our side is the defaults, or the defaults with ``settings`` (:func:`is_default_ours`). Perplexities
    over different numbers of evaluation windows are different measurements (4 windows are
    the first 5 % of the book), so they are never paired with each other or with another size's RTN."""
    runs: dict[tuple, dict[str, dict[int, float]]] = defaultdict(
        lambda: {"ours": {}, "peer": {}, **{p: {} for p in GPTQMODEL}}
    )
    rtn: dict[tuple, float] = {}
    for rec in records:
        if rec.get("tool") == "hf_babai" and rec.get("method") == "rtn":
            if rec.get("sym", True) and rec.get("scale_method") in (None, "mse"):  # RTN's default grid and scales
                rtn[rec["model"], rec["bits"], rec["group_size"], rec.get("windows")] = rec["ppl"]  # any seed
            continue
        side = "ours" if is_default_ours(rec, settings) else "peer" if is_default_peer(rec) else None
        if gptqmodel_preset(rec) in GPTQMODEL:  # the second peer in its documented best configurations
            side = gptqmodel_preset(rec)
        if side is None:
            continue
        calib_len = rec.get("calib_seqlen", rec.get("seqlen"))
        key = (rec["model"], rec["bits"], rec["group_size"], rec["n_calib"], calib_len, rec.get("windows"))
        runs[key][side][rec.get("calib_seed", 0)] = rec["ppl"]  # a later record of the same seed wins
    out = []
    for key, sides in sorted(runs.items(), key=lambda kv: (*kv[0][:5], kv[0][5] or 0)):
        model, bits, group, n_calib, calib_len, windows = key
        seeds = sorted(set(sides["ours"]) & set(sides["peer"]))
        if not seeds:
            continue
        ours = [sides["ours"][s] for s in seeds]
        peer = [sides["peer"][s] for s in seeds]
        diffs = [o / p - 1 for o, p in zip(ours, peer, strict=True)]
        se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
        preset = better_preset(sides)
        second = {s: v for s, v in sides[preset].items() if s in sides["ours"]}
        diffs2 = [sides["ours"][s] / v - 1 for s, v in sorted(second.items())]
        out.append({
            "model": model, "bits": bits, "group_size": group, "calib": f"{n_calib}x{calib_len}", "windows": windows,
            "seeds": seeds, "rtn": rtn.get((model, bits, group, windows)),
            "ours": ours, "peer": peer, "ours_mean": statistics.fmean(ours), "peer_mean": statistics.fmean(peer),
            "rel_diff": diffs, "rel_diff_mean": statistics.fmean(diffs), "rel_diff_se": se,
            "gptqmodel": dict(sorted(second.items())), "gptqmodel_preset": preset,
            "gptqmodel_rel_diff_mean": statistics.fmean(diffs2) if diffs2 else None,
            "gptqmodel_rel_diff_se": statistics.stdev(diffs2) / math.sqrt(len(diffs2)) if len(diffs2) > 1 else None,
        })  # fmt: skip
    return out


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | bits | group | calibration | eval windows | RTN | seeds | hf_babai (per seed) | "
        "llm-compressor (per seed) | vs llm-compressor, mean ± s.e. | GPTQModel, better preset (seed: ppl) | "
        "vs GPTQModel |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        group = "per-channel" if r["group_size"] == -1 else str(r["group_size"])
        se = f" ± {100 * r['rel_diff_se']:.1f}" if r["rel_diff_se"] is not None else ""
        rtn = "–" if r.get("rtn") is None else f"{r['rtn']:.4g}"
        lines.append(
            f"| {r['model']} | {r['bits']} | {group} | {r['calib']} | {r['windows']} | {rtn} | "
            f"{', '.join(map(str, r['seeds']))} | "
            f"{' / '.join(f'{v:.2f}' for v in r['ours'])} | {' / '.join(f'{v:.2f}' for v in r['peer'])} | "
            f"{100 * r['rel_diff_mean']:+.1f}{se} % | {_second(r)} |"
        )
    return "\n".join(lines)


def _second(row: dict) -> str:
    """The GPTQModel cells: its figure per seed it ran, and hf_babai's paired difference on those seeds."""
    if not row["gptqmodel"]:
        return "not run | –"
    cells = f"{row['gptqmodel_preset']}: " + " / ".join(f"{s}: {v:.2f}" for s, v in row["gptqmodel"].items())
    se = "" if row["gptqmodel_rel_diff_se"] is None else f" ± {100 * row['gptqmodel_rel_diff_se']:.1f}"
    return f"{cells} | {100 * row['gptqmodel_rel_diff_mean']:+.1f}{se} %"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--markdown", action="store_true", help="a Markdown table instead of JSON lines")
    ap.add_argument(
        "--ours",
        nargs="+",
        default=[],
        metavar="SETTING=VALUE",
        help="pair the defaults with these settings changed instead (a JSON value each, e.g. asym_alpha=0)",
    )
    args = ap.parse_args()
    settings = {k: json.loads(v) for k, _, v in (a.partition("=") for a in args.ours)}
    records = [json.loads(ln) for path in args.files for ln in Path(path).read_text().splitlines() if ln.strip()]
    rows = pair(records, settings)
    if args.markdown:
        print(markdown(rows))
    else:
        for row in rows:
            print(json.dumps(row))


if __name__ == "__main__":
    main()
