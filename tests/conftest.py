"""Test-session setup that must happen before any test module imports triton, and a loader for bench scripts.

Without a GPU, the Triton kernels run in Triton's interpreter, which is chosen by ``TRITON_INTERPRET=1``
at triton's first import (docs/kernels.md); a GPU session leaves it unset and runs them natively.
"""

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run only where CUDA is available (a lent GPU session runs them all)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """A test that runs the CLI in-process with ``--threads`` changes torch's process-wide thread count; every test
    starts from the session's own, so one test cannot slow the rest of the run."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def load_bench():
    """Imports ``bench/<name>.py`` (a script folder, not a package) so its logic can be tested on CPU."""

    def load(name: str) -> ModuleType:
        path = Path(__file__).parents[1] / "bench" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load


TINY_IDS = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))


def byte_tokenizer():
    """A byte-level tokenizer of 256 tokens (+ eos), so the CLI's text paths run without any download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens({"eos_token": "<eos>"})
    return fast


@pytest.fixture(scope="module")
def tiny_env(tmp_path_factory) -> dict[str, Path]:
    """A tiny random Llama folder (with a byte tokenizer) and a 4-bit babai checkpoint of it (the transformers
    imports are here, not at the top: triton must not be imported before ``TRITON_INTERPRET`` is set)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from hf_babai import BabaiConfig

    root = tmp_path_factory.mktemp("bad")
    cfg = LlamaConfig(
        vocab_size=260,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    src = root / "model"
    LlamaForCausalLM(cfg).save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    ckpt = root / "ckpt"
    model = AutoModelForCausalLM.from_pretrained(
        src, quantization_config=BabaiConfig(bits=4, group_size=32, dataset=TINY_IDS), dtype=torch.float32
    )
    model.save_pretrained(ckpt)
    return {"root": root, "src": src, "ckpt": ckpt}
