"""Serves hf_babai's exports with vLLM and compares its greedy tokens with transformers (GPU machines only).

The CPU tests prove that the exports decompress to exactly hf_babai's weights in every loader that installs on
CPU; this script checks the last step, the serving kernels (Marlin, Machete, Humming), on a lent GPU. The model is
a random-weight Llama with SmolLM2-135M's layer shapes (4 blocks; random weights, since no real weights travel to
the GPU machine), quantized here on the CPU, so that the check does not depend on hf_babai's own GPU path.

    python bench/serve_check.py prepare WORK           # model, quantization, exports, transformers' reference
    python bench/serve_check.py serve WORK NAME        # vLLM on WORK/NAME (run once per export, a fresh process)
    python bench/serve_check.py compare WORK           # one JSON object: per export, tokens and logprobs vs reference

Random weights give flat next-token distributions, so greedy tokens may part at a near-tie; each divergence is
reported with the reference's top-1/top-2 logit margin there, and the prompt log-probabilities (no sampling
involved) are compared as numbers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

PROMPTS = 4
PROMPT_LEN = 48
NEW_TOKENS = 32
# name -> (bits, group_size, export format); each is served by a different vLLM kernel family
EXPORTS = {
    "ct-w4g128": (4, 128, "compressed-tensors"),  # Machete (Hopper) / Marlin; 576 columns: written at group 64
    "gptq-w4g64": (4, 64, "gptq"),  # gptq_marlin (GPTQ has no partial groups, so 64: it divides 576 and 1536)
    "ct-w3g64": (3, 64, "compressed-tensors"),  # Humming
}


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(100, vocab, (PROMPTS, PROMPT_LEN), generator=g).tolist()


def prepare(work: Path) -> None:
    """Writes WORK/float (the random model), WORK/<name> (each export) and WORK/reference.json."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    import hf_babai
    from hf_babai.formats import quantized_modules

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=2048,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        initializer_range=0.1,  # sharper next-token distributions than 0.02: fewer near-ties in greedy decoding
    )
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(work / "float")
    calib = torch.randint(0, cfg.vocab_size, (16, 256), generator=torch.Generator().manual_seed(1))
    prompts = _prompts(cfg.vocab_size)
    reference = {"prompts": prompts, "exports": {}}
    for name, (bits, group, fmt) in EXPORTS.items():
        q = hf_babai.BabaiConfig(bits=bits, group_size=group, scale_dtype="bfloat16", dataset=calib)
        qmodel = AutoModelForCausalLM.from_pretrained(work / "float", dtype=torch.float32, quantization_config=q)
        hf_babai.export(qmodel, work / name, format=fmt, dtype=torch.bfloat16)
        dense = AutoModelForCausalLM.from_pretrained(work / "float", dtype=torch.bfloat16)
        for mod_name, mod, _ in quantized_modules(qmodel):
            dense.get_submodule(mod_name).weight.data.copy_(mod.dequantize(torch.float32).to(torch.bfloat16))
        reference["exports"][name] = _transformers_run(dense, prompts)
        del qmodel, dense
    (work / "reference.json").write_text(json.dumps(reference))


def _transformers_run(model: torch.nn.Module, prompts: list[list[int]]) -> dict:
    """Greedy tokens, the top-1/top-2 margin at each step and the prompt log-probabilities, in bfloat16 (CUDA when
    present: what vLLM runs)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()
    out = {"device": device, "tokens": [], "margins": [], "prompt_logprobs": []}
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids], device=device)
            logp = torch.log_softmax(model(x).logits[0].float(), -1)
            out["prompt_logprobs"].append(logp[:-1].gather(1, x[0, 1:, None])[:, 0].tolist())
            gen = model.generate(
                x,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=0,
            )
            out["tokens"].append(gen.sequences[0, len(ids) :].tolist())
            top2 = torch.stack([step[0].float().topk(2).values for step in gen.logits])
            out["margins"].append((top2[:, 0] - top2[:, 1]).tolist())
    return out


def serve(work: Path, name: str) -> None:
    """Loads WORK/NAME in vLLM (its own choice of kernel) and writes WORK/<NAME>.vllm.json."""
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = json.loads((work / "reference.json").read_text())["prompts"]
    llm = LLM(
        model=str(work / name),
        skip_tokenizer_init=True,
        dtype="bfloat16",
        enforce_eager=True,
        gpu_memory_utilization=0.3,
        max_model_len=512,
    )
    params = SamplingParams(
        temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, prompt_logprobs=0, detokenize=False
    )
    results = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    out = {"vllm": vllm.__version__, "tokens": [], "prompt_logprobs": []}
    for p, r in zip(prompts, results, strict=True):
        out["tokens"].append(list(r.outputs[0].token_ids))
        out["prompt_logprobs"].append([r.prompt_logprobs[i][tok].logprob for i, tok in enumerate(p) if i > 0])
    (work / f"{name}.vllm.json").write_text(json.dumps(out))


def compare(work: Path) -> dict:
    """Per export: tokens equal before the first divergence, the reference's margin there, and the largest
    prompt log-probability difference."""
    ref = json.loads((work / "reference.json").read_text())["exports"]
    summary: dict = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "exports": {}}
    for name in EXPORTS:
        got_path = work / f"{name}.vllm.json"
        if not got_path.exists():
            summary["exports"][name] = {"error": "vLLM did not produce output (see the log above)"}
            continue
        got, want = json.loads(got_path.read_text()), ref[name]
        rows = []
        for toks, ref_toks, margins in zip(got["tokens"], want["tokens"], want["margins"], strict=True):
            same = next((i for i, (a, b) in enumerate(zip(toks, ref_toks, strict=True)) if a != b), len(ref_toks))
            rows.append({"equal_prefix": same, "margin_at_divergence": margins[same] if same < len(margins) else None})
        diffs = [
            abs(a - b)
            for g, w in zip(got["prompt_logprobs"], want["prompt_logprobs"], strict=True)
            for a, b in zip(g, w, strict=True)
        ]
        summary["exports"][name] = {
            "vllm": got["vllm"],
            "format": EXPORTS[name],
            "prompts": rows,
            "tokens_equal": sum(r["equal_prefix"] == NEW_TOKENS for r in rows),
            "prompt_logprob_max_abs_diff": max(diffs),
            "prompt_logprob_mean_abs_diff": sum(diffs) / len(diffs),
        }
    return summary


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[0] not in ("prepare", "serve", "compare"):
        sys.exit(__doc__)
    work = Path(argv[1])
    if argv[0] == "prepare":
        work.mkdir(parents=True, exist_ok=True)
        prepare(work)
    elif argv[0] == "serve":
        serve(work, argv[2])
    else:
        print(json.dumps(compare(work), indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
