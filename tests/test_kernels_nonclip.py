"""Triton kernels of the no-clipping formats (SSQR outliers, HPTQ entropy-coded codes), the dense large-M path,
the custom-op registrations, and GPU-only checks.

As in ``tests/test_kernels.py`` the kernels run in Triton's interpreter on CPU (fp32 math) and are compared
against a float64 reference built from the same stored integers. Integer activations and power-of-two scales
make every fp32 sum exact, so ``torch.equal`` catches indexing bugs (a misplaced outlier or a misdecoded
symbol is an O(1) error). Shapes are small and not multiples of the tiles or chunks.
"""

from __future__ import annotations

import pytest
import torch

import hf_babai.formats.kernel_ops as ops
from hf_babai.formats import BabaiLinear, HuffmanLinear, SSQRLinear
from hf_babai.formats.huffman import huffman_lut, split_offsets
from hf_babai.formats.kernel_ops import dense_dequantize, dense_matmul, huffman_decode, huffman_matmul

pytest.importorskip("triton", reason="the kernel tests need triton (installed by scripts/setup.sh)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _ssqr(n: int, k: int, bits: int, density: float, seed: int = 0, sym: bool = True) -> SSQRLinear:
    """SSQR layer with power-of-two scales, integer outliers, one dense outlier row (5) and one empty row (6)."""
    g = torch.Generator().manual_seed(seed)
    groups = -(-k // 64)
    codes = torch.randint(0, 2**bits, (n, k), generator=g)
    scales = 2.0 ** torch.randint(-3, 2, (n, groups), generator=g).float()
    zeros = None if sym else torch.randint(0, 2**bits, (n, groups), generator=g)
    mask = torch.rand(n, k, generator=g) < density
    if density > 0:
        mask[5] = True
        mask[6] = False
    zero_code = 2 ** (bits - 1) if sym else zeros.repeat_interleave(64, dim=1)[:, :k]
    codes = torch.where(mask, zero_code, codes)  # outlier slots dequantize to exactly 0, as the solver stores them
    outliers = torch.zeros(n, k)
    outliers[mask] = torch.randint(-40, 40, (int(mask.sum()),), generator=g).float()
    lin = torch.nn.Linear(k, n, bias=False)
    return SSQRLinear.from_linear(lin, codes, scales, zeros, bits, 64, sym, outliers=outliers.to_sparse()).to(DEVICE)


def _ints(m: int, k: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(-3, 4, (m, k), generator=torch.Generator().manual_seed(seed)).float().to(DEVICE)


def _dense_args(layer: BabaiLinear) -> tuple:
    return (*layer.kernel_planes(), layer.bits, layer.group_size)


def _assert_backends_agree(module: torch.nn.Module, x: torch.Tensor, tol: float) -> None:
    """The module's Triton forward equals its torch forward (same dtype, relative error below ``tol``)."""
    module.backend = "triton"
    fused = module(x)
    module.backend = "torch"
    plain = module(x)
    assert fused.dtype == plain.dtype == x.dtype
    assert (fused.double() - plain.double()).norm() / plain.double().norm() < tol


@pytest.mark.parametrize(("bits", "density", "m", "fuse", "sym"), [
    (3, 0.02, 1, True, True),
    (3, 0.02, 33, False, True),
    (4, 0.005, 3, True, False),
    (2, 0.0, 16, True, True),     # no outliers at all: an empty CSR
    (3, 0.3, 3, True, True),      # dense outliers: many BLOCK_S steps per tile
])  # fmt: skip
def test_ssqr_exact_fused_and_separate(bits, density, m, fuse, sym):
    n, k = 70, 200
    layer = _ssqr(n, k, bits, density, seed=bits, sym=sym)
    assert (layer.nnz > 0) == (density > 0)
    x = _ints(m, k)
    ref = x.double().cpu() @ layer.dequantize(torch.float64).cpu().T
    y = dense_matmul(x, *_dense_args(layer), n, *layer._kernel_outliers(), fuse)
    assert torch.equal(y.double().cpu(), ref)


def test_ssqr_split_k_shares_the_outlier_segment(monkeypatch):
    """With split-K each K-share program walks every SPLIT_K-th outlier step: the sum is unchanged."""
    monkeypatch.setattr(ops, "kernel_config", lambda m, n, k, on_gpu: (16, 32, 32, 4))
    layer = _ssqr(48, 160, 3, 0.1)
    x = _ints(1, 160)
    ref = x.double().cpu() @ layer.dequantize(torch.float64).cpu().T
    assert torch.equal(dense_matmul(x, *_dense_args(layer), 48, *layer._kernel_outliers()).double().cpu(), ref)


@pytest.mark.parametrize(("bits", "sym"), [(3, True), (4, False), (8, True), (2, False)])
def test_dequantize_kernel_equals_the_torch_dequantization(bits, sym):
    layer = _ssqr(40, 136, bits, 0.02, sym=sym)
    for outliers in ((None, None, None), layer._kernel_outliers()):
        w = dense_dequantize(*_dense_args(layer), 136, torch.float32, *outliers)
        want = (
            layer.dequantize(torch.float32) if outliers[0] is not None else BabaiLinear.dequantize(layer, torch.float32)
        )
        assert torch.equal(w, want)


def test_large_m_dequant_path_equals_the_fused_kernel(monkeypatch):
    layer = _ssqr(40, 136, 4, 0.02)
    x = _ints(9, 136)
    fused = dense_matmul(x, *_dense_args(layer), 40, *layer._kernel_outliers())
    monkeypatch.setattr(ops, "matmul_path", lambda m, on_gpu: "dequant")
    assert torch.equal(dense_matmul(x, *_dense_args(layer), 40, *layer._kernel_outliers()), fused)


def test_path_choice_by_batch_rows():
    assert ops.matmul_path(ops.DEQUANT_MIN_M, on_gpu=True) == "fused"
    assert ops.matmul_path(ops.DEQUANT_MIN_M + 1, on_gpu=True) == "dequant"
    assert ops.matmul_path(4096, on_gpu=False) == "fused"  # the interpreter has no cuBLAS to hand off to


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_ssqr_linear_triton_backend_equals_torch_backend(dtype, tol):
    layer = _ssqr(70, 200, 3, 0.02)
    layer.bias = torch.nn.Parameter(torch.randn(70, device=DEVICE))
    _assert_backends_agree(
        layer, torch.randn(2, 3, 200, generator=torch.Generator().manual_seed(4)).to(DEVICE, dtype), tol
    )


def _huffman(n: int, k: int, chunk: int, max_len: int = 12, codes: torch.Tensor | None = None) -> HuffmanLinear:
    if codes is None:
        g = torch.Generator().manual_seed(n + k + chunk)
        codes = torch.round(torch.randn(n, k, generator=g) * 3).to(torch.int64)
        codes[0, :3] = torch.tensor([400, -400, 401])  # rare symbols get the longest codewords
    lin = torch.nn.Linear(k, n, bias=False)
    return HuffmanLinear.from_linear(lin, codes, 0.5, chunk=chunk, max_len=max_len).to(DEVICE)


def _h_args(h: HuffmanLinear) -> tuple:
    return h.stream, h.offsets, huffman_lut(h.symbols, h.lengths, h.max_len).to(DEVICE), h.scale


@pytest.mark.parametrize(
    ("n", "k", "chunk", "max_len"),
    [
        (30, 50, 64, 12),  # chunks straddle rows
        (20, 64, 64, 12),  # chunk = row
        (9, 12, 128, 12),  # one chunk longer than the tensor
        (24, 37, 16, 6),  # max_len 6 with a wide alphabet: many codewords of the maximum length
    ],
)
def test_huffman_decode_and_gemv_exact(n, k, chunk, max_len):
    codes = None
    if max_len == 6:
        g = torch.Generator().manual_seed(0)
        codes = torch.randint(-14, 15, (n, k), generator=g) * (torch.rand(n, k, generator=g) < 0.5)
    h = _huffman(n, k, chunk, max_len, codes)
    assert max_len > 6 or int(h.lengths.max()) == 6  # the maximum length is exercised
    w = huffman_decode(*_h_args(h), n, k, chunk, max_len, torch.float32)
    assert torch.equal(w.cpu(), h.dequantize(torch.float32).cpu())
    ref_w = h.dequantize(torch.float64).cpu()
    for m in (1, 3, 4, 6):  # 6 > HUFFMAN_GEMV_MAX_M takes decode + F.linear
        x = _ints(m, k, seed=m)
        y = huffman_matmul(x, *_h_args(h), n, chunk, max_len)
        assert torch.equal(y.double().cpu(), x.double().cpu() @ ref_w.T), m


def test_huffman_single_symbol_alphabet():
    h = _huffman(12, 40, 32, codes=torch.full((12, 40), -3))
    assert h.symbols.numel() == 1
    x = _ints(2, 40)
    ref = x.double().cpu() @ h.dequantize(torch.float64).cpu().T
    assert torch.equal(huffman_matmul(x, *_h_args(h), 12, 32, h.max_len).double().cpu(), ref)


def test_split_offsets_decode_like_the_stored_chunks():
    """Load-time sub-chunk offsets (the GPU decoder's lanes) decode to the same codes, incl. a partial tail."""
    h = _huffman(30, 50, 256)  # 1500 codes: 6 stored chunks, the last partial
    lut = huffman_lut(h.symbols, h.lengths, h.max_len).to(DEVICE)
    sub = split_offsets(h.stream, h.offsets, h.symbols, h.lengths, 1500, 256, h.max_len, 64)
    assert sub.numel() == 24 and torch.equal(sub[::4], h.offsets)
    w = huffman_decode(h.stream, sub.to(DEVICE), lut, h.scale, 30, 50, 64, h.max_len, torch.float32)
    assert torch.equal(w.cpu(), h.dequantize(torch.float32).cpu())
    with pytest.raises(ValueError, match="must divide"):
        split_offsets(h.stream, h.offsets, h.symbols, h.lengths, 1500, 256, h.max_len, 100)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_huffman_linear_triton_backend_equals_torch_backend(dtype, tol):
    h = _huffman(30, 50, 256)
    assert h.kernel_chunk == 128 and h.kernel_data()[1].numel() == 12
    h.bias = torch.nn.Parameter(torch.randn(30, device=DEVICE))
    x = torch.randn(1, 2, 50, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    _assert_backends_agree(h, x, tol)
    h.backend = "fast"
    with pytest.raises(ValueError, match="backend='fast' is unknown"):
        h(x)


def test_huffman_lut_rejects_symbols_that_do_not_fit():
    with pytest.raises(ValueError, match="2\\^23"):
        huffman_lut(torch.tensor([1 << 23], dtype=torch.int32), torch.tensor([1], dtype=torch.uint8), 4)


def test_every_op_has_a_schema_and_a_fake_implementation():
    """``torch.compile`` / CUDA graphs need each op's schema and meta function (opcheck verifies both)."""
    layer = _ssqr(40, 96, 4, 0.05)
    h = _huffman(20, 48, 32)
    x = torch.randn(3, 96, device=DEVICE)
    checks = [
        (ops.dense_matmul, (x, *_dense_args(layer), 40, *layer._kernel_outliers(), False)),
        (ops.dense_dequantize, (*_dense_args(layer), 96, torch.float16, *layer._kernel_outliers())),
        (ops.huffman_decode, (*_h_args(h), 20, 48, 32, h.max_len, torch.float32)),
        (ops.huffman_matmul, (torch.randn(2, 48, device=DEVICE), *_h_args(h), 20, 32, h.max_len)),
    ]
    for op, args in checks:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_compiled_graph_keeps_the_ops_opaque():
    """A ``fullgraph`` compile traces through the fake implementations without graph breaks."""
    h = _huffman(20, 48, 32)
    args = _h_args(h)

    def f(x):
        return huffman_matmul(x, *args, 20, 32, h.max_len) * 2

    x = _ints(1, 48)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), f(x))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_native_half_precision_paths(dtype):
    """Native fp16/bf16 tensor-core dots (the interpreter cannot run bf16 math) against float64 references."""
    layer = _ssqr(512, 1024, 3, 0.01)
    h = _huffman(256, 512, 256)
    for m in (1, 16, 128):
        x = torch.randn(m, 1024, device="cuda", dtype=dtype)
        ref = x.double() @ layer.dequantize(torch.float64).T
        y = dense_matmul(x, *_dense_args(layer), 512, *layer._kernel_outliers())
        assert y.dtype == dtype and (y.double() - ref).norm() / ref.norm() < 1e-2
        xh = x[:, :512].contiguous()
        ref_h = xh.double() @ h.dequantize(torch.float64).T
        yh = huffman_matmul(xh, *_h_args(h), 256, 256, h.max_len)
        assert (yh.double() - ref_h).norm() / ref_h.norm() < 1e-2


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_of_a_quantized_linear():
    layer = _ssqr(256, 512, 4, 0.01)
    layer.backend = "triton"  # the kernels under capture, whatever "auto" would pick
    x = torch.randn(1, 512, device="cuda", dtype=torch.float16)
    layer(x)  # compile the kernels before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert torch.allclose(y, layer(x), rtol=1e-3, atol=1e-3)
