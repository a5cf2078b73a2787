"""Peer baseline: llm-compressor's GPTQModifier on a plain HF model folder, evaluated in memory.

Run with the peer interpreter (``scripts/setup_peer.sh`` builds it), never with hf_babai's venv:

    .venv-peer/bin/python bench/peer_llmcompressor.py --model DIR --calib calib.pt --eval eval.pt \
        --bits 4 --group-size 128 --out peer.json

This file must not import hf_babai: llm-compressor pins an older transformers than hf_babai needs.

What it does:

* loads ``--model`` in float32 on CPU; an MoE's fused 3-D experts are unfused by llm-compressor's own
  ``linearize_moe`` (one Linear per expert matrix) and its routers (``mlp.gate``) are left float;
* runs ``llmcompressor.oneshot`` with one ``GPTQModifier`` (targets ``Linear``, ignore ``lm_head``) whose
  scheme is int{bits} weights only (no activation quantization), group or per-channel strategy, symmetric
  or not, static scales from an MSE-shrink observer; the calibration windows go in as an already
  tokenized ``datasets.Dataset`` (``input_ids`` + ``attention_mask``; llm-compressor then skips its own
  tokenization and data loading), unshuffled, batch size 1;
* times only the ``oneshot`` call;
* scores perplexity on the evaluation windows with the fake-quantized in-memory model:
  ``exp(Σ NLL(logits[:-1], ids[1:]) / Σ predicted tokens)``;
* computes the true bits per weight of llm-compressor's packed format from the tensors it attached.

Observer choices (``--observer``): ``mse`` (default) = ``memoryless_mse`` with the same search as
hf_babai's ``compute_scales(method="mse")``: shrink factors ``1 - i/100`` for ``i < 80``, error
``Σ|w - q|^2.4`` per group, no early stop. ``mse-llmc`` = llm-compressor's own MSE defaults (shrink at most
20 %, stop after 5 steps without any group improving). ``minmax`` = ``memoryless_minmax`` (llm-compressor's
default for weights).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

import torch
from peer_common import load_windows, peak_rss_gb, perplexity, write_result

# Observer presets: name -> (llm-compressor observer, observer_kwargs).
OBSERVERS: dict[str, tuple[str, dict[str, Any]]] = {
    # Matches hf_babai.solver.grid.compute_scales(method="mse"): 80 shrink steps of 1 %, norm 2.4, and a
    # patience equal to the number of steps, i.e. never stop early.
    "mse": ("memoryless_mse", {"maxshrink": 0.8, "grid": 100.0, "norm": 2.4, "patience": 80}),
    "mse-llmc": ("memoryless_mse", {}),
    "minmax": ("memoryless_minmax", {}),
}
ACTORDER_CHOICES = ("default", "none", "static", "group", "weight")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", required=True, help="plain HF folder (config.json, safetensors, tokenizer)")
    p.add_argument("--calib", required=True, help="torch-saved int64 tensor [n_samples, seqlen]")
    p.add_argument("--eval", required=True, dest="eval_path", help="torch-saved int64 tensor [windows, seqlen]")
    p.add_argument("--bits", type=int, choices=(2, 3, 4, 8), required=True)
    p.add_argument("--group-size", type=int, default=128, help="-1 = per output channel")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True)
    sym.add_argument("--asym", dest="sym", action="store_false")
    p.add_argument(
        "--actorder",
        choices=ACTORDER_CHOICES,
        default="default",
        help="GPTQ column order; 'default' leaves GPTQModifier's own default (static). "
        "'group' was removed from llm-compressor/compressed-tensors and is rejected by them.",
    )
    p.add_argument("--dampening-frac", type=float, default=0.01)
    p.add_argument("--block-size", type=int, default=128, help="GPTQ lazy-batch block size")
    p.add_argument("--observer", choices=tuple(OBSERVERS), default="mse")
    p.add_argument("--eval-batch", type=int, default=1, help="evaluation windows per forward")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--out", required=True, help="JSON result file")
    fp = p.add_mutually_exclusive_group()
    fp.add_argument(
        "--skip-fp",
        dest="eval_fp",
        action="store_false",
        default=False,
        help="do not evaluate the unquantized model (default)",
    )
    fp.add_argument(
        "--eval-fp", dest="eval_fp", action="store_true", help="evaluate the unquantized model first (fp_ppl)"
    )
    args = p.parse_args(argv)
    if args.group_size == 0 or args.group_size < -1:
        p.error("--group-size must be positive or -1")
    return args


def build_scheme(args: argparse.Namespace) -> Any:
    """The weight-only int ``QuantizationScheme`` (no activation quantization) for ``Linear`` targets."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    observer, observer_kwargs = OBSERVERS[args.observer]
    weights = QuantizationArgs(
        num_bits=args.bits,
        type="int",
        symmetric=args.sym,
        strategy="channel" if args.group_size == -1 else "group",
        group_size=None if args.group_size == -1 else args.group_size,
        observer=observer,
        observer_kwargs=observer_kwargs,
    )
    return QuantizationScheme(targets=["Linear"], weights=weights)


def make_modifier(args: argparse.Namespace) -> tuple[Any, str]:
    """A ``GPTQModifier`` for every Linear but ``lm_head`` and MoE routers; returns it and the actorder it
    resolved to."""
    from llmcompressor.modifiers.quantization import GPTQModifier

    if args.actorder == "group":
        # compressed-tensors 0.19 rejects it in QuantizationArgs ("has been removed"); GPTQModifier would
        # accept it and fail only in the first layer's solve. Fail before loading anything.
        raise SystemExit("llm-compressor >= 0.14 removed actorder='group' (g_idx); use static/weight or none")
    kwargs: dict[str, Any] = {
        "config_groups": {"group_0": build_scheme(args)},
        "ignore": ["lm_head", "re:.*mlp.gate$"],  # MoE routers stay float, as in hf_babai by default
        "dampening_frac": args.dampening_frac,
        "block_size": args.block_size,
    }
    if args.actorder != "default":
        kwargs["actorder"] = None if args.actorder == "none" else args.actorder
    modifier = GPTQModifier(**kwargs)
    # resolved_config is cached on the modifier and is exactly what oneshot applies.
    resolved = modifier.resolved_config.config_groups["group_0"].weights.actorder
    return modifier, ("none" if resolved is None else str(getattr(resolved, "value", resolved)))


def check_group_divisibility(model: torch.nn.Module, group_size: int) -> None:
    """Exit early when a target Linear's in_features is not a multiple of the group size.

    llm-compressor 0.14 cannot quantize partial groups: its divisibility check raises, and with
    ``bypass_divisibility_checks=True`` the weight observer then crashes (``unflatten`` in
    ``observers/helpers.py::_flatten_weight``). hf_babai supports partial last groups; this peer does not.
    """
    if group_size == -1:
        return
    bad = sorted(
        {
            m.in_features
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.split(".")[-1] != "lm_head" and m.in_features % group_size
        }
    )
    if bad:
        raise SystemExit(
            f"llm-compressor cannot use group size {group_size}: in_features {bad} are not multiples of it "
            "(no partial groups in compressed-tensors); pick a divisor or -1"
        )


def format_bits(model: torch.nn.Module, bits: int, sym: bool) -> dict[str, Any]:
    """Bits per weight of llm-compressor's serialized format, from the tensors it attached.

    Per quantized Linear ``[N, K]`` (``compressed_tensors`` ``pack-quantized``, the format it infers for
    int weight-only schemes): codes packed densely into int32, ``ceil(K·b/32)`` words per row; one
    ``weight_scale`` entry per group at its tensor dtype; for asymmetric schemes the ``weight_zero_point``
    ``[N, G]`` packed to ``b`` bits along N (``ceil(N·b/32)`` words per group column); ``weight_g_idx``
    (int32 per column) if present. Symmetric zero points are dropped on save and not counted. The 2-int
    ``weight_shape`` metadata is ignored. Also returns the same total with 16-bit scales, which is what an
    fp16/bf16 model would store (scales take the model dtype).
    """
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization.utils import is_module_quantized

    n_weights = 0
    code_bits = scale_bits = scale_bits16 = zp_bits = gidx_bits = 0
    formats: set[str] = set()
    scale_dtypes: set[str] = set()
    n_layers = 0
    for _, m in model.named_modules():
        if not (isinstance(m, torch.nn.Linear) and is_module_quantized(m)):
            continue
        n_layers += 1
        formats.add(str(getattr(infer_module_format(type(m), m.quantization_scheme), "value", "?")))
        rows, cols = m.weight.shape
        n_weights += rows * cols
        if bits == 8:
            code_bits += rows * cols * 8
        else:
            code_bits += rows * math.ceil(cols * bits / 32) * 32
        s = m.weight_scale
        scale_dtypes.add(str(s.dtype).removeprefix("torch."))
        scale_bits += s.numel() * s.element_size() * 8
        scale_bits16 += s.numel() * 16
        zp = getattr(m, "weight_zero_point", None)
        if not sym and zp is not None:
            zrows = zp.shape[0]
            zcols = zp.numel() // max(zrows, 1)
            zp_bits += zcols * math.ceil(zrows * bits / 32) * 32
        g_idx = getattr(m, "weight_g_idx", None)
        if g_idx is not None:
            gidx_bits += g_idx.numel() * 32
    if n_weights == 0:
        raise RuntimeError("no quantized Linear layers found after oneshot")
    other = code_bits + zp_bits + gidx_bits
    return {
        "bpw": (other + scale_bits) / n_weights,
        "bpw_16bit_scales": (other + scale_bits16) / n_weights,
        "quantized_layers": n_layers,
        "quantized_weights": n_weights,
        "formats": sorted(formats),
        "scale_dtypes": sorted(scale_dtypes),
        "has_g_idx": gidx_bits > 0,
    }


def main(argv: list[str] | None = None) -> int:
    """Quantize, evaluate, write the JSON result."""
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    import compressed_tensors
    import llmcompressor
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calib = load_windows(args.calib)
    evalw = load_windows(args.eval_path)
    n_calib, seqlen = calib.shape

    modifier, actorder = make_modifier(args)  # fails early on an invalid scheme

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, device_map=None)
    model.to("cpu")
    if any(p.dim() == 3 for p in model.parameters()):
        # transformers 5's fused 3-D experts: llm-compressor's own unfusing into one Linear per expert matrix
        # (what its load_quantizable_moe does after loading a 3-D checkpoint), so that GPTQ reaches the experts
        from llmcompressor.modeling.moe.linearize import linearize_moe

        linearize_moe(model)
    check_group_divisibility(model, args.group_size)
    if model.config.vocab_size <= int(max(calib.max(), evalw.max())):
        raise SystemExit("token ids exceed the model's vocabulary")

    fp_ppl = perplexity(model, evalw, args.eval_batch) if args.eval_fp else None
    if fp_ppl is not None:
        print(f"fp ppl {fp_ppl:.4f}", file=sys.stderr, flush=True)

    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    t0 = time.perf_counter()
    model = oneshot(
        model=model,
        processor=tokenizer,
        dataset=ds,
        recipe=modifier,
        num_calibration_samples=n_calib,
        max_seq_length=seqlen,
        shuffle_calibration_samples=False,
        batch_size=1,
    )
    seconds = time.perf_counter() - t0

    ppl = perplexity(model, evalw, args.eval_batch)
    fmt = format_bits(model, args.bits, args.sym)
    observer, observer_kwargs = OBSERVERS[args.observer]
    result = {
        "tool": "llm-compressor",
        "tool_version": llmcompressor.__version__,
        "method": "gptq",
        "bits": args.bits,
        "group_size": args.group_size,
        "sym": args.sym,
        "actorder": actorder,
        "ppl": ppl,
        "fp_ppl": fp_ppl,
        "seconds": seconds,
        "peak_rss_gb": peak_rss_gb(),
        "bpw": fmt["bpw"],
        "n_calib": int(n_calib),
        "seqlen": int(seqlen),
        "windows": int(evalw.shape[0]),
        "details": {
            "transformers_version": transformers.__version__,
            "compressed_tensors_version": compressed_tensors.__version__,
            "torch_version": torch.__version__,
            "observer": observer,
            "observer_kwargs": observer_kwargs,
            "observer_preset": args.observer,
            "dampening_frac": args.dampening_frac,
            "block_size": args.block_size,
            "eval_seqlen": int(evalw.shape[1]),
            "threads": torch.get_num_threads(),
            **{k: v for k, v in fmt.items() if k != "bpw"},
        },
    }
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
