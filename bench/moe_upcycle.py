"""MoE quality on real weights: an upcycled SmolLM2-135M, full precision vs round to nearest vs hf_babai.

No MoE small enough for this CPU ships offline, so one is built from SmolLM2-135M the way sparse upcycling does:
a Mixtral model with the same attention, norms and embeddings, whose every layer's MLP is copied into ``--experts``
experts, each perturbed by ``1 + sigma·N(0, 1)`` elementwise (so the experts differ and each one's quantization
matters), and a random router (so tokens spread over the experts; top-2 with renormalised weights, as Mixtral
routes). Its perplexity stays close to the dense model's. Then, on the same calibration and evaluation windows:
FP, RTN, and hf_babai with expert Hessians from the routed tokens and from all tokens (``expert_calibration``).

Prints one JSON record per configuration and appends it to ``--out``.

    .venv/bin/python bench/moe_upcycle.py --bits 3 4 --out bench/results/moe_upcycle_smollm2-135m.jsonl
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path


def upcycle(dense_dir: Path, out: Path, experts: int, sigma: float, seed: int = 0) -> None:
    """Writes the upcycled Mixtral checkpoint of the Llama-architecture model in ``dense_dir`` to ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig, MixtralForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    c = dense.config
    cfg = MixtralConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.hidden_size // c.num_attention_heads,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters=c.rope_parameters,
        tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        num_local_experts=experts,
        num_experts_per_tok=2,
        sliding_window=None,
    )
    with torch.device("meta"):
        moe = MixtralForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in dense.state_dict().items():
        if ".mlp." not in k:
            state[k] = v
    h = c.hidden_size
    for i, layer in enumerate(dense.model.layers):
        mlp = layer.mlp
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()  # [2I, H]
        down = mlp.down_proj.weight.detach()  # [H, I]

        def jitter(w: torch.Tensor) -> torch.Tensor:
            return w * (1 + sigma * torch.randn(w.shape, generator=g))

        state[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack([jitter(gate_up) for _ in range(experts)])
        state[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack([jitter(down) for _ in range(experts)])
        state[f"model.layers.{i}.mlp.gate.weight"] = torch.randn(experts, h, generator=g) / h**0.5
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = moe.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise SystemExit(f"upcycling left tensors unset: missing {missing[:5]}, unexpected {unexpected[:5]}")
    moe.tie_weights()
    moe.save_pretrained(out)
    AutoTokenizer.from_pretrained(dense_dir).save_pretrained(out)  # the peer's oneshot loads one from the folder


def run(args: argparse.Namespace, model_dir: Path, calib, evalw, method: str, bits: int, mode: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from hf_babai.engine import QuantSpec, UnfusedExperts, quantize_model, weight_report
    from hf_babai.perplexity import perplexity

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rec = {"model": f"smollm2-135m-upcycled-{args.experts}x", "method": method, "bits": bits, "group_size": None}
    rec.update(sigma=args.sigma, n_calib=int(calib.shape[0]), calib_seqlen=int(calib.shape[1]))
    rec.update(seqlen=int(evalw.shape[1]), windows=int(evalw.shape[0]))
    if method != "fp":
        spec = QuantSpec(bits=bits, group_size=args.group_size, method=method, expert_calibration=mode)
        t0 = time.perf_counter()
        records = quantize_model(model, spec, calib if method == "babai" else None, progress=False)
        rec.update(group_size=args.group_size, seconds=round(time.perf_counter() - t0, 1))
        if method == "babai":
            rec["expert_calibration"] = mode
            experts = [r for r in records if ".experts." in r.name]
            rec["expert_tokens_min"] = min(r.tokens for r in experts)
            rec["experts_without_tokens"] = sum(r.tokens == 0 for r in experts) // 3  # 3 Linears per expert
        rec.update(weight_report(model, spec.skip))
        rec["quantized_experts"] = sum(m.num_experts for m in model.modules() if isinstance(m, UnfusedExperts))
    rec["ppl"] = perplexity(model, evalw)
    rec["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return rec


def run_peer(args: argparse.Namespace, model_dir: Path, calib, evalw, bits: int) -> dict:
    """llm-compressor's GPTQ on the same upcycled folder and windows, in its own environment (``.venv-peer``):
    its best configuration here (MSE scale observer, static activation order), routers float as in hf_babai."""
    import subprocess
    import sys

    import torch

    root = Path(__file__).resolve().parents[1]
    peer_py = root / ".venv-peer" / "bin" / "python"
    if not peer_py.is_file():
        raise SystemExit(f"{peer_py} is missing: run scripts/setup_peer.sh first (or leave llm-compressor out)")
    with tempfile.TemporaryDirectory(prefix="hf_babai_moe_peer_") as tmp:
        torch.save(calib, f"{tmp}/calib.pt")
        torch.save(evalw, f"{tmp}/eval.pt")
        cmd = [str(peer_py), str(root / "bench" / "peer_llmcompressor.py"), "--model", str(model_dir)]
        cmd += ["--calib", f"{tmp}/calib.pt", "--eval", f"{tmp}/eval.pt", "--bits", str(bits)]
        cmd += ["--group-size", str(args.group_size), "--actorder", "static", "--observer", "mse"]
        cmd += ["--out", f"{tmp}/peer.json"]
        subprocess.run(cmd, check=True, stdout=sys.stderr)
        peer = json.loads(Path(f"{tmp}/peer.json").read_text())
    rec = {"model": f"smollm2-135m-upcycled-{args.experts}x", "tool": "llm-compressor", "method": "gptq"}
    rec.update(bits=bits, group_size=args.group_size, sigma=args.sigma, n_calib=int(calib.shape[0]))
    rec.update(calib_seqlen=int(calib.shape[1]), seqlen=int(evalw.shape[1]), windows=int(evalw.shape[0]))
    details = peer["details"]
    rec.update(tool_version=peer["tool_version"], actorder=peer["actorder"], observer=details["observer_preset"])
    rec.update(seconds=round(peer["seconds"], 1), bits_per_weight=peer["bpw"])
    rec.update(quantized_layers=details["quantized_layers"], ppl=peer["ppl"], peak_rss_gb=round(peer["peak_rss_gb"], 2))
    return rec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="a Llama-architecture offline model to upcycle")
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--sigma", type=float, default=0.05, help="relative perturbation of each expert's weights")
    p.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--calib", type=int, default=64)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument(
        "--methods",
        nargs="+",
        default=["fp", "rtn", "babai-routed", "babai-all"],
        choices=["fp", "rtn", "babai-routed", "babai-all", "llm-compressor"],
        help="configurations to run (llm-compressor needs scripts/setup_peer.sh)",
    )
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    from transformers import AutoTokenizer

    from hf_babai import assets
    from hf_babai.perplexity import calibration_windows, eval_windows

    dense_dir = assets.ensure_model(args.model)
    tok = AutoTokenizer.from_pretrained(dense_dir)
    calib = calibration_windows(tok, assets.calibration_text(), args.calib, args.calib_seqlen, seed=0)
    evalw = eval_windows(tok, assets.eval_text(), args.seqlen, args.windows)
    import torch
    from transformers import AutoModelForCausalLM

    from hf_babai.perplexity import perplexity

    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    if "fp" in args.methods:
        rec = {"model": args.model, "method": "fp (dense original)", "bits": 16, "ppl": perplexity(dense, evalw)}
        print(json.dumps(rec), flush=True)
        if args.out is not None:
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")
    del dense
    with tempfile.TemporaryDirectory(prefix="hf_babai_moe_") as tmp:
        moe_dir = Path(tmp) / "moe"
        upcycle(Path(dense_dir), moe_dir, args.experts, args.sigma)
        jobs = [("fp", 16, "routed")] if "fp" in args.methods else []
        for bits in args.bits:
            every = [("rtn", bits, "routed"), ("babai", bits, "routed"), ("babai", bits, "all"), ("peer", bits, "")]
            names = ["rtn", "babai-routed", "babai-all", "llm-compressor"]
            jobs += [job for job, name in zip(every, names, strict=True) if name in args.methods]
        for method, bits, mode in jobs:
            if method == "peer":
                rec = run_peer(args, moe_dir, calib, evalw, bits)
            else:
                rec = run(args, moe_dir, calib, evalw, method, bits, mode)
            print(json.dumps(rec), flush=True)
            if args.out is not None:
                with open(args.out, "a") as f:
                    f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
