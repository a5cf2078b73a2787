"""A format added from outside the package: this one module is all it takes (``docs/adding-a-format.md``).

``toy8``: 8-bit codes with one float16 scale per output row, solved by Babai's nearest plane. Registered, it is a
value of ``format=`` everywhere: the settings and the command line accept it, quantize-on-load solves and stores
it, ``save_pretrained`` writes it, plain ``from_pretrained`` checks and reloads it, ``hf-babai info`` / the card
describe it and ``export`` refuses it by name.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoModelForCausalLM

import hf_babai
from hf_babai.formats import (
    QuantFormat,
    QuantizedLinear,
    format_names,
    format_of,
    model_bits_per_weight,
    register_format,
)
from hf_babai.formats import registry as format_registry
from hf_babai.solver import Grid, LayerStats, QuantResult, babai_quantize, compute_scales, dequantize, rtn_quantize
from hf_babai.spec import QuantSpec, settings

from .test_hf import IDS, X, tiny  # noqa: F401 - tiny is a fixture

GRID = Grid(8, True, -1)


class Toy8Linear(QuantizedLinear):
    """``W[n, k] = scale[n] · (codes[n, k] − 128)``."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype: torch.dtype, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.compute_dtype = in_features, out_features, dtype
        self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.zeros(out_features, 1, dtype=torch.float16, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    def packed_buffers(self) -> dict[str, Tensor]:
        return {"codes": self.codes, "scale": self.scale}

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        w = dequantize(self.codes, self.scale.float(), None, GRID)
        return w.to(dtype or self.compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class Toy8Format(QuantFormat):
    name = "toy8"
    module = Toy8Linear
    primary = "codes"

    def solve(self, w: Tensor, factor: Any, spec: QuantSpec, hessian: Callable[[], Tensor]) -> QuantResult:
        return babai_quantize(w, factor, GRID, scale_method=spec.scale_method, block_size=spec.block_size)

    def round(self, w: Tensor, spec: QuantSpec) -> QuantResult:
        scales, _ = compute_scales(w.float(), GRID, spec.scale_method)
        nan = float("nan")
        stats = LayerStats(nan, nan, nan, nan, nan, 0, w.numel(), 0.0, -1, 0, "rtn", 0.0)
        return QuantResult(rtn_quantize(w.float(), scales, None, GRID), scales, None, stats)

    def dense(self, solution: QuantResult, spec: QuantSpec) -> Tensor:
        return dequantize(solution.codes, solution.scales, None, GRID)

    def build(self, linear: nn.Linear, solution: QuantResult, spec: QuantSpec) -> Toy8Linear:
        w = linear.weight
        mod = Toy8Linear(w.shape[1], w.shape[0], bias=linear.bias is not None, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            mod.codes.copy_(solution.codes)
            mod.scale.copy_(solution.scales)
            if linear.bias is not None:
                mod.bias.copy_(linear.bias)
        return mod

    def empty(self, in_features, out_features, spec, sizes, *, bias, dtype, device) -> Toy8Linear:
        return Toy8Linear(in_features, out_features, bias=bias, dtype=dtype, device=device)

    def describe(self, spec: QuantSpec) -> dict[str, Any]:
        return {
            "format": "toy8, 8-bit codes, one scale per row",
            "headline": "8-bit toy",
            "layout": "8 / row",
            "tags": ["toy8"],
            "card": {"format": self.name},
        }


@pytest.fixture
def toy8():
    register_format(Toy8Format)
    yield format_registry.get_format("toy8")
    format_registry._REGISTRY.pop("toy8")


def test_a_registered_format_quantizes_saves_reloads_and_is_described(toy8, tiny, tmp_path):  # noqa: F811
    assert "toy8" in format_names() and "toy8" in settings()["format"].options()  # config and CLI choices
    cfg = hf_babai.BabaiConfig(format="toy8", dataset=IDS)
    model = AutoModelForCausalLM.from_pretrained(tiny, quantization_config=cfg, dtype=torch.float32)
    mods = [m for m in model.modules() if isinstance(m, Toy8Linear)]
    assert len(mods) == 4 * 7 and all(format_of(m) is toy8 for m in mods)
    # true bits per weight: 8-bit codes plus a 16-bit scale per row of K = 64 or 128 inputs
    assert 8 + 16 / 128 <= model_bits_per_weight(model) <= 8 + 16 / 64
    with torch.no_grad():
        logits = model(X).logits
    model.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved["format"] == "toy8" and saved["layers"] is None
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert isinstance(again.model.layers[1].mlp.down_proj, Toy8Linear)
    with torch.no_grad():
        assert torch.equal(again(X).logits, logits)
    from hf_babai.hf.summary import checkpoint_summary

    q = checkpoint_summary(tmp_path / "q")
    assert q["headline"] == "8-bit toy" and q["quantized_layers"] == 28 and q["tags"] == ["toy8"]
    with pytest.raises(ValueError, match="format='toy8' models cannot be exported to 'gptq'"):
        hf_babai.export(again, tmp_path / "gptq", "gptq")
    dense = again.dequantize()
    assert not any(isinstance(m, Toy8Linear) for m in dense.modules())
    # method="rtn" runs the format's own round to nearest, with no data
    rtn = AutoModelForCausalLM.from_pretrained(
        tiny, quantization_config=hf_babai.BabaiConfig(format="toy8", method="rtn"), dtype=torch.float32
    )
    w = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).model.layers[0].self_attn.q_proj.weight
    scales, _ = compute_scales(w.detach(), GRID, "mse")
    assert torch.equal(rtn.model.layers[0].self_attn.q_proj.codes, rtn_quantize(w.detach(), scales, None, GRID))


def test_registration_refuses_a_taken_name_or_module(toy8):
    class Other(Toy8Format):
        pass

    with pytest.raises(ValueError, match="'toy8' is already registered"):
        register_format(Other)

    class SameModule(Toy8Format):
        name = "toy8b"

    with pytest.raises(ValueError, match="Toy8Linear already belongs to another format"):
        register_format(SameModule)
