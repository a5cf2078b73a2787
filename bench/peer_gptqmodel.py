"""Peer baseline: GPTQModel's GPTQ (optionally its GPTAQ mode) on a plain HF model folder, scored in memory.

Run with GPTQModel's own interpreter (``.venv-gptqmodel``, which ``scripts/setup_loaders.sh`` builds), never with
hf_babai's venv:

    .venv-gptqmodel/bin/python bench/peer_gptqmodel.py --model DIR --calib calib.pt --eval eval.pt \\
        --bits 3 --group-size 128 --preset best --out peer.json

Same inputs and the same JSON fields as ``bench/peer_llmcompressor.py`` (``ppl``, ``seconds``, ``bpw``, ...), so
``bench/quality.py`` can put both peers beside every hf_babai row. This file must not import hf_babai.

Presets (``--preset``): ``default`` is what ``GPTQConfig(bits, group_size)`` gives a user who switches to
GPTQModel (its own defaults for activation order, damping and scale search); ``best`` is its documented best
configuration for quality: activation order on (``desc_act``), MSE scale search (``mse=2.4``, the norm of the
GPTQ paper's grid search, as in hf_babai's ``mse`` scales). ``--gptaq`` adds GPTQModel's GPTAQ (asymmetric
calibration against the float model's inputs) to either preset. Its RTN fallback for modules that see few
calibration tokens (meant for MoE experts) is switched off, so that every module is solved by the method named.
The quantized checkpoint is saved and reloaded, and perplexity is scored on the float32 model with GPTQModel's
dequantized weights (see :func:`with_dequantized_weights`), with the same formula as the other runners:
``exp(Σ NLL(logits[:-1], ids[1:]) / Σ predicted tokens)``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from peer_common import load_windows, peak_rss_gb, perplexity, write_result

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", required=True, help="plain HF folder (config.json, safetensors, tokenizer)")
    p.add_argument("--calib", required=True, help="torch-saved int64 tensor [n_samples, seqlen]")
    p.add_argument("--eval", required=True, dest="eval_path", help="torch-saved int64 tensor [windows, seqlen]")
    p.add_argument("--bits", type=int, choices=(2, 3, 4, 8), required=True)
    p.add_argument("--group-size", type=int, default=128, help="-1 = per output channel")
    p.add_argument("--preset", choices=("default", "best"), default="best")
    p.add_argument("--gptaq", action="store_true", help="GPTQModel's GPTAQ mode (asymmetric calibration)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--out", required=True, help="JSON result file")
    args = p.parse_args(argv)
    if args.group_size == 0 or args.group_size < -1:
        p.error("--group-size must be positive or -1")
    return args


def quantize_config(args: argparse.Namespace):
    """The ``GPTQConfig`` of the preset: symmetric int, the group size asked, fallback to RTN off."""
    from gptqmodel.quantization.config import GPTAQConfig, GPTQConfig

    kw: dict = {"bits": args.bits, "group_size": args.group_size, "sym": True, "fallback": None}
    if args.preset == "best":
        kw.update(desc_act=True, mse=2.4)
    if args.gptaq:
        kw["gptaq"] = GPTAQConfig()
    return GPTQConfig(**kw)


def packed_bits(model: torch.nn.Module) -> dict:
    """Bits per weight of GPTQModel's packed modules, from the tensors they hold: ``qweight`` codes, ``scales``,
    ``qzeros`` and ``g_idx`` (the GPTQ checkpoint layout, which stores a zero point even when symmetric)."""
    n_weights = total = layers = 0
    for m in model.modules():
        if not hasattr(m, "qweight") or not hasattr(m, "in_features"):
            continue
        layers += 1
        n_weights += m.in_features * m.out_features
        for name in ("qweight", "scales", "qzeros", "g_idx"):
            t = getattr(m, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size() * 8
    if not layers:
        raise RuntimeError("no packed GPTQModel module found after quantize()")
    return {"bpw": total / n_weights, "quantized_layers": layers, "quantized_weights": n_weights}


def with_dequantized_weights(float_dir: str, packed: torch.nn.Module) -> torch.nn.Module:
    """The float32 model of ``float_dir`` with every quantized Linear's weight replaced by GPTQModel's codes times
    its scales, computed in float32: the same fake-quantized evaluation as the llm-compressor runner and hf_babai.
    GPTQModel's in-memory model after ``quantize()`` is not usable on CPU in float32 (its torch kernel supports
    float16/bfloat16 only and returns NaN or overflows otherwise), hence the save and reload, in float16 so that
    the checkpoint's float16 scales load exactly (bfloat16 would round them)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32)
    for name, m in packed.named_modules():
        if not hasattr(m, "qweight") or not hasattr(m, "dequantize_weight"):
            continue
        m.scales = m.scales.float()
        weight = m.dequantize_weight().T.float()
        target = model.get_submodule(name)
        if tuple(target.weight.shape) != tuple(weight.shape):
            raise RuntimeError(f"{name}: dequantized {tuple(weight.shape)} vs float {tuple(target.weight.shape)}")
        target.weight.data.copy_(weight)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for name in ("model", "calib", "eval_path", "out"):
        setattr(args, name, os.path.abspath(getattr(args, name)))
    os.chdir(tempfile.mkdtemp(prefix="hf_babai_gptqmodel_"))  # GPTQModel writes its logs/ into the working dir
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    import gptqmodel
    import transformers
    from gptqmodel import BACKEND, GPTQModel

    calib = load_windows(args.calib)
    evalw = load_windows(args.eval_path)
    qcfg = quantize_config(args)
    model = GPTQModel.load(args.model, qcfg, device="cpu", dtype=torch.float32)
    data = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in calib]
    t0 = time.perf_counter()
    model.quantize(data, batch_size=1, calibration_sort=None)
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="hf_babai_gptqmodel_") as tmp:
        model.save(tmp)
        del model
        packed = GPTQModel.load(tmp, device="cpu", backend=BACKEND.TORCH, dtype=torch.float16).model
    fmt = packed_bits(packed)
    hf_model = with_dequantized_weights(args.model, packed)
    ppl = perplexity(hf_model, evalw)
    result = {
        "tool": "gptqmodel",
        "tool_version": gptqmodel.__version__,
        "method": "gptaq" if args.gptaq else "gptq",
        "preset": args.preset,
        "bits": args.bits,
        "group_size": args.group_size,
        "sym": True,
        "ppl": ppl,
        "seconds": seconds,
        "peak_rss_gb": peak_rss_gb(),
        "bpw": fmt["bpw"],
        "n_calib": int(calib.shape[0]),
        "seqlen": int(calib.shape[1]),
        "windows": int(evalw.shape[0]),
        "details": {
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "desc_act": bool(qcfg.desc_act),
            "act_group_aware": bool(getattr(qcfg, "act_group_aware", False)),
            "mse": float(qcfg.mse),
            "damp_percent": float(qcfg.damp_percent),
            "eval_seqlen": int(evalw.shape[1]),
            "threads": torch.get_num_threads(),
            **{k: v for k, v in fmt.items() if k != "bpw"},
        },
    }
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
