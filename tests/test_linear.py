"""Tests for hf_babai.formats.integer.BabaiLinear: forward semantics, chunking, bias, (de)serialisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from hf_babai.formats import BabaiLinear, bits_per_weight, format_bits_per_weight, num_groups


def make_layer(
    k: int,
    n: int,
    bits: int,
    group_size: int,
    sym: bool,
    *,
    bias: bool = True,
    dtype: torch.dtype = torch.float32,
    dyadic: bool = False,
    seed: int = 0,
) -> tuple[nn.Linear, BabaiLinear]:
    """A float linear and its BabaiLinear from random solver output.

    With ``dyadic=True`` scales are powers of two and the bias is a small integer, so together with
    integer-valued inputs every product and partial sum is exact in fp32 and any summation order
    gives the same bits: this lets chunking be tested for exact equality without relying on BLAS
    blocking choices.
    """
    gen = torch.Generator().manual_seed(seed)
    top = (1 << bits) - 1
    groups = num_groups(k, group_size)
    linear = nn.Linear(k, n, bias=bias, dtype=dtype)
    codes = torch.randint(0, top + 1, (n, k), generator=gen)
    if dyadic:
        scales = 2.0 ** -torch.randint(2, 7, (n, groups), generator=gen).float()
        if bias:
            with torch.no_grad():
                linear.bias.copy_(torch.randint(-8, 9, (n,), generator=gen))
    else:
        scales = (torch.rand(n, groups, generator=gen) * 0.05 + 1e-3).half().float()
    zeros = None if sym else torch.randint(0, top + 1, (n, groups), generator=gen)
    return linear, BabaiLinear.from_linear(linear, codes, scales, zeros, bits, group_size, sym)


def test_init_registers_canonical_buffers_on_meta() -> None:
    layer = BabaiLinear(100, 7, bits=3, group_size=48, sym=False, dtype=torch.bfloat16, device="meta")
    state = layer.state_dict()
    expected = {
        "qweight": ((7, 7), torch.int32),  # ceil(100 / 16) words of 2-bit codes
        "qweight_hi": ((4, 7), torch.int32),  # ceil(100 / 32) words of 1-bit codes
        "scales": ((3, 7), torch.float16),
        "qzeros": ((1, 3), torch.int32),
        "qzeros_hi": ((1, 3), torch.int32),
        "bias": ((7,), torch.bfloat16),
    }
    assert {name: (tuple(t.shape), t.dtype) for name, t in state.items()} == expected
    assert all(t.is_meta for t in state.values())
    assert isinstance(layer.bias, nn.Parameter)
    assert layer.compute_dtype == torch.bfloat16
    sym_layer = BabaiLinear(64, 5, bits=4, group_size=-1, sym=True, bias=False)
    assert set(sym_layer.state_dict()) == {"qweight", "scales"}
    assert sym_layer.bias is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": 5}, "bits must be one of"),
        ({"group_size": 0}, "group_size"),
        ({"in_features": 0}, "in_features"),
        ({"out_features": -3}, "out_features"),
        ({"sym": 1}, "sym must be a bool"),
        ({"dtype": torch.int32}, "floating-point"),
    ],
)
def test_init_validates_arguments(kwargs: dict, match: str) -> None:
    args = {"in_features": 64, "out_features": 8, "bits": 4, "group_size": 32, "sym": True, **kwargs}
    with pytest.raises(ValueError, match=match):
        BabaiLinear(**args)


def test_from_linear_rejects_mismatches() -> None:
    linear = nn.Linear(64, 8)
    codes = torch.zeros(8, 64, dtype=torch.int64)
    scales = torch.ones(8, 2)
    with pytest.raises(ValueError, match="codes shape"):
        BabaiLinear.from_linear(linear, codes[:, :63], scales, None, 4, 32, True)
    with pytest.raises(ValueError, match="codes shape"):
        BabaiLinear.from_linear(linear, codes.t(), scales, None, 4, 32, True)
    with pytest.raises(ValueError, match="scales must have shape"):
        BabaiLinear.from_linear(linear, codes, scales[:, :1], None, 4, 32, True)
    with pytest.raises(ValueError, match="sym=True"):
        BabaiLinear.from_linear(linear, codes, scales, torch.zeros(8, 2, dtype=torch.int64), 4, 32, True)
    with pytest.raises(ValueError, match="sym=False"):
        BabaiLinear.from_linear(linear, codes, scales, None, 4, 32, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_from_linear_keeps_bias_dtype_and_device(dtype: torch.dtype) -> None:
    linear, layer = make_layer(96, 10, 4, 32, True, dtype=dtype)
    assert layer.compute_dtype == dtype
    assert layer.bias.dtype == dtype and layer.bias.device == linear.weight.device
    assert torch.equal(layer.bias, linear.bias)
    assert layer.dequantize().dtype == dtype
    _, no_bias = make_layer(96, 10, 4, 32, True, bias=False, dtype=dtype)
    assert no_bias.bias is None and "bias" not in no_bias.state_dict()


@pytest.mark.parametrize(
    ("bits", "group_size", "sym"), [(2, 32, False), (3, 48, True), (3, -1, False), (4, 64, False), (8, 128, True)]
)
@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float32, 1e-5), (torch.float16, 2e-2), (torch.bfloat16, 8e-2)], ids=str
)
def test_forward_matches_dense_linear(bits: int, group_size: int, sym: bool, dtype: torch.dtype, tol: float) -> None:
    k, n = 160, 40
    linear, layer = make_layer(k, n, bits, group_size, sym, seed=bits)
    layer.chunk_size = 16  # three chunks, the last one partial: exercises the chunked path
    x = torch.randn(2, 3, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = layer(x)
    assert out.shape == (2, 3, n) and out.dtype == dtype
    expected = F.linear(x, layer.dequantize(x.dtype), linear.bias.to(dtype))
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    # And against the real-number result, so a wrong-but-self-consistent dequant cannot pass.
    exact = x.double() @ layer.dequantize(torch.float64).t() + linear.bias.double()
    torch.testing.assert_close(out.double(), exact, rtol=tol, atol=tol * 4)


@pytest.mark.parametrize(("bits", "group_size", "sym"), [(3, 48, False), (4, 32, True), (2, -1, True)])
def test_chunked_forward_equals_unchunked_exactly(bits: int, group_size: int, sym: bool) -> None:
    k, n = 100, 37
    _, layer = make_layer(k, n, bits, group_size, sym, dyadic=True, seed=3)
    x = torch.randint(-4, 5, (2, 3, k), generator=torch.Generator().manual_seed(2)).float()
    layer.chunk_size = n
    full = layer(x)
    reference = (x.double() @ layer.dequantize(torch.float64).t() + layer.bias.double()).float()
    assert torch.equal(full, reference)
    for chunk in (1, 7, 16, n - 1):
        layer.chunk_size = chunk
        assert torch.equal(layer(x), full), chunk


def test_chunked_forward_close_on_random_data() -> None:
    _, layer = make_layer(256, 50, 4, 64, False, seed=5)
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(4))
    full = layer(x)
    layer.chunk_size = 8
    # BLAS may block the K-reduction differently per N, so only closeness holds on random data.
    torch.testing.assert_close(layer(x), full, rtol=1e-5, atol=1e-5)


def test_forward_rejects_wrong_inputs() -> None:
    _, layer = make_layer(64, 8, 4, 32, True)
    with pytest.raises(ValueError, match="last input dim 64"):
        layer(torch.randn(2, 63))
    with pytest.raises(ValueError, match="floating point"):
        layer(torch.ones(2, 64, dtype=torch.int64))
    layer.chunk_size = 0
    with pytest.raises(ValueError, match="chunk_size"):
        layer(torch.randn(2, 64))


@pytest.mark.parametrize(("bits", "group_size", "sym"), [(3, 48, False), (4, 128, True), (8, -1, False)])
def test_safetensors_round_trip_through_meta_device(tmp_path, bits: int, group_size: int, sym: bool) -> None:
    k, n = 200, 24
    _, layer = make_layer(k, n, bits, group_size, sym, dtype=torch.bfloat16, seed=7)
    path = tmp_path / "layer.safetensors"
    save_file(layer.state_dict(), str(path))

    loaded = BabaiLinear(k, n, bits, group_size, sym, dtype=torch.bfloat16, device="meta")
    loaded.load_state_dict(load_file(str(path)), assign=True)
    assert not any(t.is_meta for t in loaded.state_dict().values())
    assert isinstance(loaded.bias, nn.Parameter)
    for name, tensor in layer.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    x = torch.randn(2, 3, k, generator=torch.Generator().manual_seed(0), dtype=torch.bfloat16)
    assert torch.equal(loaded(x), layer(x))
    assert bits_per_weight(loaded.state_dict(), k, n) == format_bits_per_weight(k, n, bits, group_size, sym)

    # A layer declared with a different format must refuse the checkpoint instead of misreading it.
    wrong = BabaiLinear(k, n, bits, group_size, not sym, dtype=torch.bfloat16, device="meta")
    with pytest.raises(RuntimeError):
        wrong.load_state_dict(load_file(str(path)), assign=True)


def test_extra_repr() -> None:
    layer = BabaiLinear(64, 8, bits=3, group_size=32, sym=False, bias=False, device="meta")
    text = repr(layer)
    for part in ("in_features=64", "out_features=8", "bits=3", "group_size=32", "sym=False", "bias=False"):
        assert part in text


def test_weight_is_a_dense_copy_that_cannot_change_the_codes() -> None:
    """Model code written for nn.Linear touches ``.weight``: transformers re-initialises GPT-style ``c_proj.weight``
    on every load, Mamba multiplies by ``dt_proj.weight``. Reads get the dequantized values; init calls are skipped
    and writes land on a copy, so the stored codes never change."""
    from transformers import initialization as hf_init

    lin = nn.Linear(64, 8, bias=False, dtype=torch.bfloat16)
    codes = torch.randint(0, 16, (8, 64), generator=torch.Generator().manual_seed(0))
    layer = BabaiLinear.from_linear(lin, codes, torch.full((8, 2), 2.0**-6), None, 4, 32, True)
    before = {k: v.clone() for k, v in layer.packed_buffers().items()}
    w = layer.weight
    assert w.shape == (8, 64) and w.dtype == torch.bfloat16 and torch.equal(w, layer.dequantize(torch.bfloat16))
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert torch.equal(x @ layer.weight.T, F.linear(x, layer.dequantize(torch.bfloat16)))
    hf_init.normal_(layer.weight, std=1.0)  # what _init_weights does on reload
    layer.weight.data.normal_()  # and what older model code does directly
    assert all(torch.equal(before[k], v) for k, v in layer.packed_buffers().items())
    assert "weight" not in dict(layer.named_parameters()) and "weight" not in layer.state_dict()
