"""What llm-compressor writes for an MoE: the tensor names, shapes and dtypes of its compressed-tensors checkpoint of
a tiny random Qwen3-MoE, for ``tests/test_moe.py`` to compare hf_babai's export against.

Run with the peer interpreter (``scripts/setup_peer.sh``), never with hf_babai's venv:

    .venv-peer/bin/python bench/peer_moe_layout.py bench/results/llmcompressor_qwen3_moe_layout.json

llm-compressor unfuses transformers' 3-D experts into per-expert Linears (``linearize_moe``), runs GPTQ with its
W4A16 preset (int4, group 128, symmetric) on every Linear but the LM head and the routers, and saves compressed.
The model is built from :data:`CONFIG` with seed 0 (the test builds the same one); only names and shapes matter.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

CONFIG = {
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 256,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "max_position_embeddings": 256,
}


def main(out: Path) -> None:
    import llmcompressor
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from llmcompressor.modifiers.quantization import GPTQModifier
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    tensors: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(Qwen3MoeConfig(**CONFIG), dtype=torch.float32).save_pretrained(f"{tmp}/float")
        model = AutoModelForCausalLM.from_pretrained(f"{tmp}/float", dtype=torch.float32)  # oneshot wants a folder
        linearize_moe(model)  # what load_quantizable_moe does after loading a 3-D checkpoint
        ids = torch.randint(3, CONFIG["vocab_size"], (4, 32), generator=torch.Generator().manual_seed(0))
        data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * 32] * 4})
        recipe = GPTQModifier(targets="Linear", ignore=["lm_head", "re:.*mlp.gate$"], scheme="W4A16")
        oneshot(model=model, dataset=data, recipe=[recipe], num_calibration_samples=4, max_seq_length=32)
        model.save_pretrained(f"{tmp}/lc", save_compressed=True)
        for f in sorted(Path(f"{tmp}/lc").glob("*.safetensors")):
            with safe_open(str(f), "pt") as sf:
                for k in sf.keys():  # noqa: SIM118 (safe_open is not a dict)
                    sl = sf.get_slice(k)
                    tensors[k] = [list(sl.get_shape()), sl.get_dtype()]
    record = {"tool": f"llmcompressor {llmcompressor.__version__}", "config": CONFIG, "tensors": tensors}
    out.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"{len(tensors)} tensors -> {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
