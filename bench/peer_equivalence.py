"""Same inputs, same answer? hf_babai's solver and scales vs llm-compressor's on real SmolLM2 layers.

Captures the real input Hessians of two layers of block 3 (q_proj, down_proj) from calibration text, computes
our MSE scales and our act-order Babai codes (3-bit per-channel, the setting where the end-to-end perplexities
differ most), then runs llm-compressor's own ``quantize_weight`` and its ``memoryless_mse`` observer on the same
W and H in the peer's virtual environment, and prints how far apart the codes, proxy losses and scales are.
``--bits`` / ``--group-size`` pick another grid (groups use llm-compressor's ``strategy="group"``); ``--model`` /
``--block`` another layer set (``--all-linears``: every Linear of the block, not just the two). Each record also has
``peer_loss_own_scales``: the peer's solve with its *own* observer's scales, i.e. what its pipeline does to a block
whose input both tools see identically (block 0 of a two-pass run, where every Hessian comes from the float
model as here): the end-to-end comparison at one layer.

    .venv/bin/python bench/peer_equivalence.py [--bits 3 --group-size 64] [--model qwen2.5-0.5b --block 0 --all-linears]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from heldout_loss import block_hessians  # bench/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
PEER_PY = ROOT / ".venv-peer" / "bin" / "python"

PEER_SIDE = r"""
import json, sys, torch
from compressed_tensors.quantization import QuantizationArgs
from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
from llmcompressor.observers.base import Observer
d = torch.load(sys.argv[1])
out = {}
for name, v in d.items():
    W, H, s, bits, g = v["W"], v["H"].float(), v["scale"].float(), v["bits"], v["group_size"]
    grouped = dict(strategy="group", group_size=g) if g > 0 else dict(strategy="channel")
    qa = QuantizationArgs(num_bits=bits, type="int", symmetric=True, actorder="static", **grouped,
                          observer="memoryless_mse",
                          observer_kwargs={"maxshrink": 0.8, "grid": 100.0, "norm": 2.4, "patience": 80})
    zp = torch.zeros_like(s, dtype=torch.int8)
    cols = lambda t: t.repeat_interleave(g, dim=1)[:, : W.shape[1]] if g > 0 else t.reshape(-1, 1)  # per column
    Q, _, fallback = quantize_weight(W[None].clone(), H[None].clone(), s[None], zp[None], None, qa, 128, 0.01)
    s_cols = cols(s)
    half = 2 ** (bits - 1)
    codes = torch.round(Q[0] / s_cols).long() + half
    obs = Observer.load_from_registry("memoryless_mse", base_name="weight", args=qa)
    obs(W)
    ps = obs.get_qparams()["scale"].reshape(-1).float()
    rel = (ps - s.reshape(-1)).abs() / s.reshape(-1)
    dW = s_cols.double() * (codes.double() - half) - W.double()
    own = ps.reshape(s.shape)
    Q2, _, _ = quantize_weight(W[None].clone(), H[None].clone(), own[None], zp[None], None, qa, 128, 0.01)
    dW2 = Q2[0].double() - W.double()
    codes2 = torch.round(Q2[0] / cols(own)).long() + half
    out[name] = {
        "code_mismatch_own_scales": (codes2 != v["codes"].long()).float().mean().item(),
        "peer_loss_own_scales": torch.einsum("nk,kl,nl->", dW2, v["H"], dW2).item(),
        "code_mismatch": (codes != v["codes"].long()).float().mean().item(),
        "peer_loss": torch.einsum("nk,kl,nl->", dW, v["H"], dW).item(),
        "scale_rel_diff_median": rel.median().item(),
        "scale_rel_diff_max": rel.max().item(),
        "rtn_fallback": bool(fallback.any()),
    }
print(json.dumps(out))
"""


def require_peer() -> None:
    """Exits early, before any model work, when the peer's virtual environment is missing."""
    if not PEER_PY.exists():
        sys.exit(f"needs {PEER_PY}: run `bash scripts/setup_peer.sh` first")


def run_peer_side(script: str, payload: object) -> str:
    """Runs ``script`` with the peer's Python on ``payload`` (``torch.save``d; its path is ``sys.argv[1]``).

    The peer pins another transformers, so its side runs in ``.venv-peer`` and only tensors cross over.
    Returns the script's stdout; exits with the tail of its stderr if it failed.
    """
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "payload.pt"
        torch.save(payload, path)
        proc = subprocess.run([str(PEER_PY), "-c", script, str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    return proc.stdout


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_babai import assets
    from hf_babai.perplexity import calibration_windows
    from hf_babai.solver import Grid, babai_quantize, factor_hessian
    from hf_babai.solver.grid import compute_scales

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=-1, help="-1 = per-channel")
    ap.add_argument("--model", default="smollm2-135m", help="an offline model name (hf_babai.assets)")
    ap.add_argument("--block", type=int, default=3)
    ap.add_argument("--all-linears", action="store_true", help="every Linear of the block (default: q_proj, down_proj)")
    ap.add_argument("--calib", type=int, default=16, help="calibration windows of 512 tokens")
    args = ap.parse_args()
    require_peer()
    from hf_babai.engine import find_blocks, target_linears

    path = assets.ensure_model(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    calib = calibration_windows(tok, assets.calibration_text(), n=args.calib, seqlen=512)
    _, blocks = find_blocks(model)
    block = blocks[args.block]
    b = f"block{args.block}"
    if args.all_linears:
        targets = {f"{b}.{n.split('.')[-1]}": lin for n, lin in target_linears(block, ()).items()}
    else:
        targets = {f"{b}.q_proj": block.self_attn.q_proj, f"{b}.down_proj": block.mlp.down_proj}
    hessians = block_hessians(model, block, targets, calib)
    grid = Grid(bits=args.bits, sym=True, group_size=args.group_size)
    dump, ours = {}, {}
    for name, lin in targets.items():
        w, h = lin.weight.detach().float(), hessians[name]
        scales = compute_scales(w, grid, "mse")
        res = babai_quantize(w, factor_hessian(h, "act-order"), grid, scales=scales, dtype=torch.float64)
        grid_args = {"bits": args.bits, "group_size": args.group_size}
        dump[name] = {"W": w, "H": h, "scale": scales[0], "codes": res.codes, **grid_args}
        ours[name] = res.stats.loss
    peer = json.loads(run_peer_side(PEER_SIDE, dump).strip().splitlines()[-1])
    for name in targets:
        rec = {"model": args.model, "layer": name, "bits": args.bits, "group_size": args.group_size}
        rec |= {"order": "act-order", "n_calib": args.calib}
        rec["our_loss"] = ours[name]
        print(json.dumps({**rec, **peer[name]}))


if __name__ == "__main__":
    main()
