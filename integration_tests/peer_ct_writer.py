"""Writes a compressed-tensors checkpoint with llm-compressor (run by ``.venv-peer/bin/python``, not by pytest).

``python peer_ct_writer.py MODEL OUT BITS GROUP SYM|ASYM TOKENIZER``: GPTQ through ``llmcompressor.oneshot`` on
8 random windows of 32 tokens, every Linear but ``lm_head``, then ``save_pretrained(save_compressed=True)``; the
tokenizer is there only because ``oneshot`` asks for one. ``test_serving_loaders.py`` diffs the result against
hf_babai's export of the same model and settings.
"""

from __future__ import annotations

import sys

import torch


def main(model_dir: str, out: str, bits: int, group_size: int, sym: bool, tokenizer: str) -> None:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    weights = QuantizationArgs(
        num_bits=bits,
        type="int",
        symmetric=sym,
        strategy="channel" if group_size == -1 else "group",
        group_size=None if group_size == -1 else group_size,
    )
    modifier = GPTQModifier(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}, ignore=["lm_head"]
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    processor = AutoTokenizer.from_pretrained(tokenizer)  # unused on token ids, but oneshot requires one
    model = oneshot(
        model=model, processor=processor, dataset=ds, recipe=modifier, num_calibration_samples=8, max_seq_length=32
    )
    model.save_pretrained(out, save_compressed=True)


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], int(a[2]), int(a[3]), a[4].lower() == "sym", a[5])
