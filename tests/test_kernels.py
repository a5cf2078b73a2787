"""The Triton dense kernel against a float64 reference built from the same packed integers.

On CPU the kernel runs in Triton's interpreter (``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before
triton is imported) with fp32 math. Exact tests use small-integer activations and power-of-two scales, so
every partial sum is an integer-valued float below 2^24 and ``torch.equal`` holds exactly: any packing,
shift, mask or group-index bug shows up as an O(1) error, not a tolerance question. Shapes are kept small
(the interpreter costs milliseconds per program iteration) and deliberately not multiples of the tiles.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hf_babai.formats import BabaiLinear
from hf_babai.formats.kernel_ops import dense_matmul, kernel_config, select_backend, triton_on_cuda
from hf_babai.formats.packing import pack_weight, unpack_weight

pytest.importorskip("triton", reason="the kernel tests need triton (installed by scripts/setup.sh)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _layer(n: int, k: int, bits: int, group: int, sym: bool, exact: bool, seed: int = 0):
    """Random codes/scales/zeros packed canonically; power-of-two scales when ``exact``."""
    g = torch.Generator().manual_seed(seed)
    groups = 1 if group == -1 else -(-k // group)
    codes = torch.randint(0, 2**bits, (n, k), generator=g)
    if exact:
        scales = 2.0 ** torch.randint(-3, 2, (n, groups), generator=g).float()
    else:
        scales = (torch.rand(n, groups, generator=g) * 0.02 + 0.001).half().float()
    zeros = None if sym else torch.randint(0, 2**bits, (n, groups), generator=g)
    return pack_weight(codes, scales, zeros, bits, group)


def _reference(x: torch.Tensor, buffers: dict, bits: int, group: int, k: int) -> torch.Tensor:
    codes, scales, zeros = unpack_weight(buffers, bits, group, k)
    cols = torch.arange(k) // (k if group == -1 else group)
    z = torch.full_like(scales, 2 ** (bits - 1)) if zeros is None else zeros.double()
    w = (codes.double() - z.double()[:, cols]) * scales.double()[:, cols]
    return x.double() @ w.T


def _run(x: torch.Tensor, buffers: dict, bits: int, group: int, n: int) -> torch.Tensor:
    b = {name: t.to(DEVICE) for name, t in buffers.items()}
    return dense_matmul(
        x.to(DEVICE),
        b["qweight"],
        b.get("qweight_hi"),
        b["scales"],
        b.get("qzeros"),
        b.get("qzeros_hi"),
        bits,
        x.shape[-1] if group == -1 else group,
        n,
    ).cpu()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(("group", "sym"), [(32, True), (64, False), (-1, True), (-1, False)])
def test_exact_on_integer_inputs(bits, group, sym):
    n, k, m = 72, 200, 3  # K, N not multiples of the tiles; the last group of 64 is partial
    buffers = _layer(n, k, bits, group, sym, exact=True, seed=bits)
    x = torch.randint(-3, 4, (m, k), generator=torch.Generator().manual_seed(1)).float()
    ref = _reference(x, buffers, bits, group, k)
    assert ref.abs().max() < 2**24  # every partial sum exact in fp32
    assert torch.equal(_run(x, buffers, bits, group, n).double(), ref)


@pytest.mark.parametrize("m", [1, 3, 16, 33])
def test_tolerance_on_random_data_and_batch_shapes(m):
    n, k, bits, group = 80, 320, 4, 128
    buffers = _layer(n, k, bits, group, sym=False, exact=False, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    ref = _reference(x, buffers, bits, group, k)
    out = _run(x, buffers, bits, group, n)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    assert (out.double() - ref).norm() / ref.norm() < 1e-5


def test_fp16_and_bf16_activations_keep_their_dtype():
    n, k, bits, group = 64, 128, 3, 64
    buffers = _layer(n, k, bits, group, sym=True, exact=False)
    x = torch.randn(2, 5, k, generator=torch.Generator().manual_seed(0))  # a leading batch dimension too
    ref = _reference(x.reshape(-1, k), buffers, bits, group, k).reshape(2, 5, n)
    for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 1e-2)):
        xd = x.to(dtype)
        out = _run(xd, buffers, bits, group, n)
        assert out.dtype == dtype and out.shape == (2, 5, n)
        ref_d = _reference(xd.float().reshape(-1, k), buffers, bits, group, k).reshape(2, 5, n)
        assert (out.double() - ref_d).norm() / ref_d.norm() < tol
    assert ref.norm() > 0


def test_split_k_accumulates_like_one_pass(monkeypatch):
    """Split-K (used on GPUs at small M) sums partial tiles into an fp32 workspace: same result."""
    import hf_babai.formats.kernel_ops as ops

    n, k, bits, group = 48, 256, 4, 32
    buffers = _layer(n, k, bits, group, sym=True, exact=True)
    x = torch.randint(-2, 3, (1, k), generator=torch.Generator().manual_seed(3)).float()
    ref = _reference(x, buffers, bits, group, k)
    monkeypatch.setattr(ops, "kernel_config", lambda m, n, k, on_gpu: (16, 32, 32, 4))
    assert torch.equal(_run(x, buffers, bits, group, n).double(), ref)


def test_babai_linear_dispatch_and_equality_with_the_torch_path():
    lin = torch.nn.Linear(100, 40, bias=True)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (40, 100), generator=g)
    scales = (torch.rand(40, 2, generator=g) * 0.01 + 0.001).half().float()
    layer = BabaiLinear.from_linear(lin, codes, scales, None, 4, 64, True).to(DEVICE)
    x = torch.randn(3, 100, generator=g).to(DEVICE)
    assert select_backend(x) == ("triton" if x.is_cuda and triton_on_cuda() else "torch")  # CPU: always torch
    layer.backend = "triton"
    fused = layer(x)
    layer.backend = "torch"
    plain = layer(x)
    assert torch.allclose(fused, plain, rtol=1e-5, atol=1e-6)
    layer.backend = "fast"
    with pytest.raises(ValueError, match="backend='fast' is unknown"):
        layer(x)


def test_auto_keeps_cuda_on_the_torch_path_until_a_gpu_run_passed(monkeypatch, caplog):
    """``backend="auto"`` never hands CUDA users kernels that have not passed a GPU run: the torch path and one
    notice saying how to opt in; Triton once the run is recorded (or on opt-in)."""
    import hf_babai.formats.kernel_ops as ops

    cuda_input = SimpleNamespace(is_cuda=True)  # select_backend reads only .is_cuda; no GPU needed to test it
    monkeypatch.setattr(ops, "TRITON_GPU_VERIFIED", False)
    monkeypatch.setattr(ops, "TRITON_OPT_IN", False)
    monkeypatch.setattr(ops, "_notified", False)
    with caplog.at_level("WARNING", logger=ops.__name__):
        assert select_backend(cuda_input) == "torch"
        assert select_backend(cuda_input) == "torch"
    notices = [r.getMessage() for r in caplog.records]
    assert len(notices) == 1 and "HF_BABAI_TRITON=1" in notices[0] and "set_backend" in notices[0]
    assert select_backend(cuda_input, "triton") == "triton"  # a module's explicit choice is kept
    monkeypatch.setattr(ops, "TRITON_OPT_IN", True)
    assert select_backend(cuda_input) == "triton"
    monkeypatch.setattr(ops, "TRITON_OPT_IN", False)
    monkeypatch.setattr(ops, "TRITON_GPU_VERIFIED", True)
    assert select_backend(cuda_input) == "triton"
    assert select_backend(torch.zeros(1, 8)) == "torch"  # CPU inputs: the torch path whatever was verified


def test_set_backend_switches_every_quantized_module():
    from hf_babai import set_backend

    lin = torch.nn.Linear(64, 8, bias=False)
    codes = torch.randint(0, 16, (8, 64), generator=torch.Generator().manual_seed(0))
    model = torch.nn.Sequential(
        BabaiLinear.from_linear(lin, codes, torch.full((8, 1), 2.0**-7), None, 4, -1, True), torch.nn.ReLU(), lin
    )
    assert set_backend(model, "triton") == 1 and model[0].backend == "triton"
    with pytest.raises(ValueError, match=r"backend='gpu' is unknown; use one of \('auto', 'torch', 'triton'\)"):
        set_backend(model, "gpu")
    with pytest.raises(ValueError, match="no quantized layers"):
        set_backend(torch.nn.Sequential(lin), "torch")


def test_forced_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        select_backend(torch.zeros(1, 8), "triton")


def test_fake_implementation_for_compile():
    from torch._subclasses.fake_tensor import FakeTensorMode

    buffers = _layer(40, 96, 4, 32, sym=True, exact=True)
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.zeros(2, 7, 96))
        b = {name: mode.from_tensor(t) for name, t in buffers.items()}
        y = torch.ops.hf_babai.dense_matmul(x, b["qweight"], None, b["scales"], None, None, 4, 32, 40)
    assert y.shape == (2, 7, 40) and y.dtype == torch.float32
    torch.library.opcheck(
        torch.ops.hf_babai.dense_matmul.default,
        (
            torch.randn(3, 96, device=DEVICE),
            buffers["qweight"].to(DEVICE),
            None,
            buffers["scales"].to(DEVICE),
            None,
            None,
            4,
            32,
            40,
        ),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_gpu_config_splits_k_for_decode():
    bm, bn, _bk, split = kernel_config(1, 4096, 4096, on_gpu=True)
    assert bm == 16 and split > 1 and (-(-4096 // bn)) * split >= 132  # enough programs for an H100/H200
    assert kernel_config(128, 4096, 4096, on_gpu=True)[3] == 1
