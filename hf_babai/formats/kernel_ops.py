"""The Triton kernels as torch ops, and the one function that chooses a backend.

Ops (``torch.library.custom_op``, each with a fake (meta) implementation, so ``torch.compile`` and CUDA graphs
see an opaque op of known output shape instead of tracing into Triton):

- ``hf_babai::dense_matmul``: ``x @ Wᵀ`` from the packed dense buffers, optionally plus SSQR's CSR outliers
  (fused into the same program, or, with ``fuse_outliers=False``, a separate kernel adding into the same fp32
  accumulator). Small M runs the fused kernel (split-K so M = 1 fills the GPU); large M
  (:func:`matmul_path`) dequantizes once into a dense buffer and calls ``F.linear`` (cuBLAS).
- ``hf_babai::dense_dequantize``: the dense weight from the packed buffers (the large-M path's first half).
- ``hf_babai::huffman_decode`` / ``hf_babai::huffman_matmul``: entropy-coded (HPTQ) weights decoded to a
  buffer, or for M ≤ 4 a fused decode + GEMV that never materialises the weight.

The Triton source lives in the repository's top-level ``kernels/`` folder, installed as ``hf_babai.kernels``
(a namespace package on purpose: a folder named ``kernels`` without ``__init__.py`` can never shadow Hugging
Face's own ``kernels`` distribution).

Backend choice (:func:`select_backend`, called by every quantized module's ``forward``): ``backend="auto"``
sends CUDA tensors to Triton only once the kernels have passed a run on a real GPU (:data:`TRITON_GPU_VERIFIED`,
set from the results of ``scripts/gpu_check.sh``); until then CUDA inputs take the torch path with a one-line
notice, and Triton on CUDA is opt-in (``HF_BABAI_TRITON=1`` before import, ``backend="triton"`` on a module, or
``hf_babai.set_backend(model, "triton")``). Code that never ran on a GPU is not what a CUDA user gets by
default. CPU tensors always take the torch path (dequantize/decode + ``F.linear``). ``backend="torch"`` forces
the torch path for debugging; ``backend="triton"`` on CPU tensors runs the kernels in Triton's interpreter,
which needs ``TRITON_INTERPRET=1`` in the environment before triton is first imported (that is how the tests
run them).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "BACKENDS",
    "TRITON_GPU_VERIFIED",
    "dense_dequantize",
    "dense_matmul",
    "fused_matmul",
    "huffman_decode",
    "huffman_matmul",
    "kernel_config",
    "matmul_path",
    "select_backend",
    "triton_available",
    "triton_on_cuda",
]

BACKENDS = ("auto", "torch", "triton")

# True once scripts/gpu_check.sh has passed on a GPU with the kernels (its JSON committed under bench/results/).
# No GPU run has happened yet, so "auto" keeps CUDA inputs on the torch path: set this to True in the commit that
# records the passing run.
TRITON_GPU_VERIFIED = False
# The opt-in for code that has not passed a GPU run: HF_BABAI_TRITON=1 in the environment before hf_babai is
# imported (read once, so that compiled and captured forwards see a constant).
TRITON_OPT_IN = os.environ.get("HF_BABAI_TRITON") == "1"

log = logging.getLogger(__name__)
_notified = False


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _kernel_module(name: str):
    """The Triton source module ``name``: ``hf_babai.kernels.<name>`` in an installed wheel; in a source checkout
    (editable install, where setuptools cannot map a nested namespace package) ``kernels/<name>.py`` itself."""
    full = f"hf_babai.kernels.{name}"
    try:
        return importlib.import_module(full)
    except ModuleNotFoundError:
        if full not in sys.modules:
            path = Path(__file__).resolve().parents[2] / "kernels" / f"{name}.py"
            if not path.is_file():
                raise ImportError(f"the Triton kernels are missing: neither {full} nor {path}") from None
            spec = importlib.util.spec_from_file_location(full, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[full] = module
            spec.loader.exec_module(module)
        return sys.modules[full]


def select_backend(x: Tensor, backend: str = "auto") -> str:
    """``"triton"`` or ``"torch"`` for input ``x``; a clear error when a forced backend cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown; use one of {BACKENDS}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        if not x.is_cuda or not triton_available():
            return "torch"
        if triton_on_cuda():
            return "triton"
        _notify_torch_on_cuda()
        return "torch"
    if not triton_available():
        raise ValueError("backend='triton' needs triton: pip install 'hf-babai[triton]' (or use backend='torch')")
    if not x.is_cuda and not _interpreting():
        raise ValueError(
            "backend='triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 before triton is "
            "imported (slow; for tests), or use backend='torch'"
        )
    return "triton"


def triton_on_cuda() -> bool:
    """Whether ``backend="auto"`` runs the Triton kernels for CUDA inputs: after a passing GPU run, or on opt-in."""
    return TRITON_GPU_VERIFIED or TRITON_OPT_IN


def _notify_torch_on_cuda() -> None:
    """Says once per process why CUDA inputs take the torch path, and how to opt in."""
    global _notified
    if _notified or torch.compiler.is_compiling():
        return
    _notified = True
    log.warning(
        "hf_babai: quantized layers run the torch path on CUDA (dequantize + F.linear) because the Triton kernels "
        "have not yet passed a GPU run; opt in with HF_BABAI_TRITON=1 or hf_babai.set_backend(model, 'triton')"
    )


def kernel_config(m: int, n: int, k: int, on_gpu: bool) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K)`` from a fixed table (autotuning cannot run in the interpreter).

    Decode (small M) splits K so that M = 1 still launches enough programs to occupy every SM; the
    interpreter runs programs one after another, so there big tiles and no split are fastest.
    """
    if not on_gpu:
        return 16, 64, 64, 1
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    bn = 64 if m <= 64 else 128
    bk = 128 if m <= 64 else 64
    tiles = -(-m // bm) * -(-n // bn)
    split_k = 1
    while m <= 64 and tiles * split_k < 264 and k // (bk * split_k * 2) >= 4 and split_k < 16:
        split_k *= 2
    return bm, bn, bk, split_k


# Above this many activation rows a GPU dequantizes once into a dense buffer and runs cuBLAS (the fused
# kernel's tile is sized for decode); docs/kernels.md. bench/kernel_speed.py measures both paths at M = 128.
DEQUANT_MIN_M = 64


def matmul_path(m: int, on_gpu: bool) -> str:
    """``"fused"`` (dequantize inside the matmul) or ``"dequant"`` (dense buffer + ``F.linear``) for ``m`` rows."""
    return "dequant" if on_gpu and m > DEQUANT_MIN_M else "fused"


def _outliers(rowptr: Tensor | None, cols: Tensor | None, values: Tensor | None) -> tuple | None:
    given = [t is not None for t in (rowptr, cols, values)]
    if any(given) and not all(given):
        raise ValueError("outliers need all three CSR buffers: outlier_rowptr, outlier_cols, outlier_values")
    return (rowptr, cols, values) if all(given) else None


def _scatter_outliers(w: Tensor, outliers: tuple) -> None:
    """Sets the CSR outliers into the dense weight ``w [N, K]`` (their slots dequantize to exactly 0)."""
    rowptr, cols, values = outliers
    if cols.numel() == 0:
        return
    rows = torch.repeat_interleave(
        torch.arange(w.shape[0], device=w.device), rowptr.diff().to(torch.int64), output_size=cols.numel()
    )
    w.index_put_((rows, cols.to(torch.int64)), values.to(w.dtype), accumulate=True)


@torch.library.custom_op("hf_babai::dense_dequantize", mutates_args=())
def dense_dequantize(
    qweight: Tensor,
    qweight_hi: Tensor | None,
    scales: Tensor,
    qzeros: Tensor | None,
    qzeros_hi: Tensor | None,
    bits: int,
    group: int,
    in_features: int,
    dtype: torch.dtype,
    outlier_rowptr: Tensor | None = None,
    outlier_cols: Tensor | None = None,
    outlier_values: Tensor | None = None,
) -> Tensor:
    """Dense weight ``[N, K]`` in ``dtype`` from the packed buffers (plus SSQR outliers) with the Triton kernel."""
    n = scales.shape[1]
    w = torch.empty((n, in_features), dtype=dtype, device=scales.device)
    _kernel_module("dense").launch_dequantize(
        (qweight, qweight_hi, scales, qzeros, qzeros_hi), w, bits=bits, group=group
    )
    outliers = _outliers(outlier_rowptr, outlier_cols, outlier_values)
    if outliers is not None:
        _scatter_outliers(w, outliers)
    return w


@dense_dequantize.register_fake
def _(qweight, qweight_hi, scales, qzeros, qzeros_hi, bits, group, in_features, dtype, *outliers):
    return scales.new_empty((scales.shape[1], in_features), dtype=dtype)


def fused_matmul(
    x2: Tensor, planes: tuple, outliers: tuple | None, bits: int, group: int, out_features: int, fuse_outliers: bool
) -> Tensor:
    """The fused path of :func:`dense_matmul` on a 2-D contiguous ``x2 [M, K]`` (``M ≥ 1``), whatever ``M``.

    ``planes`` = ``(qweight, qweight_hi, scales, qzeros, qzeros_hi)``; ``outliers`` = CSR buffers or ``None``,
    added inside the dense program or, with ``fuse_outliers=False``, by the separate kernel into the same fp32
    accumulator. Public for the benchmark, which times it against the dequantize path at every M."""
    dense = _kernel_module("dense")
    m, k = x2.shape
    on_gpu = x2.is_cuda
    config = kernel_config(m, out_features, k, on_gpu)
    separate = outliers is not None and not fuse_outliers
    fp32_out = config[3] > 1 or separate
    alloc = torch.zeros if config[3] > 1 else torch.empty
    y = alloc((m, out_features), dtype=torch.float32 if fp32_out else x2.dtype, device=x2.device)
    dot_fp32 = not on_gpu or x2.dtype == torch.float32
    dense.launch(
        x2, planes, None if separate else outliers, y, bits=bits, group=group, config=config, dot_fp32=dot_fp32
    )
    if separate:
        dense.launch_outliers(x2, outliers, y, block_m=config[0], block_n=config[1])
    return y.to(x2.dtype)


@torch.library.custom_op("hf_babai::dense_matmul", mutates_args=())
def dense_matmul(
    x: Tensor,
    qweight: Tensor,
    qweight_hi: Tensor | None,
    scales: Tensor,
    qzeros: Tensor | None,
    qzeros_hi: Tensor | None,
    bits: int,
    group: int,
    out_features: int,
    outlier_rowptr: Tensor | None = None,
    outlier_cols: Tensor | None = None,
    outlier_values: Tensor | None = None,
    fuse_outliers: bool = True,
) -> Tensor:
    """``x [..., K] @ Wᵀ`` from the packed buffers (+ CSR outliers) with the Triton kernels; output in ``x.dtype``.

    ``group`` is the group size in columns (``K`` for per-channel scales).
    """
    planes = (qweight, qweight_hi, scales, qzeros, qzeros_hi)
    outliers = _outliers(outlier_rowptr, outlier_cols, outlier_values)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    if m == 0:
        return x.new_empty((*lead, out_features))
    if matmul_path(m, x.is_cuda) == "dequant":
        w = dense_dequantize(*planes, bits, group, k, x.dtype, *(outliers or (None, None, None)))
        return F.linear(x2, w).reshape(*lead, out_features)
    y = fused_matmul(x2, planes, outliers, bits, group, out_features, fuse_outliers)
    return y.reshape(*lead, out_features)


@dense_matmul.register_fake
def _(x, qweight, qweight_hi, scales, qzeros, qzeros_hi, bits, group, out_features, *outliers):
    return x.new_empty((*x.shape[:-1], out_features))


# Fused decode + GEMV up to this many activation rows (each lane carries them all, BLOCK_M = 4 in
# kernels/huffman.py); above it the weight is decoded once per call into a buffer and multiplied with F.linear,
# where the decode's cost is shared by all rows.
HUFFMAN_GEMV_MAX_M = 4


@torch.library.custom_op("hf_babai::huffman_decode", mutates_args=())
def huffman_decode(
    stream: Tensor,
    offsets: Tensor,
    lut: Tensor,
    scale: Tensor,
    out_features: int,
    in_features: int,
    chunk: int,
    max_len: int,
    dtype: torch.dtype,
) -> Tensor:
    """Dense ``scale · Z [N, K]`` in ``dtype`` decoded with the Triton kernel (``lut``: :func:`huffman_lut`)."""
    w = torch.empty((out_features, in_features), dtype=dtype, device=stream.device)
    _kernel_module("huffman").launch_decode(stream, offsets, lut, scale, w, chunk=chunk, max_len=max_len)
    return w


@huffman_decode.register_fake
def _(stream, offsets, lut, scale, out_features, in_features, chunk, max_len, dtype):
    return stream.new_empty((out_features, in_features), dtype=dtype)


@torch.library.custom_op("hf_babai::huffman_matmul", mutates_args=())
def huffman_matmul(
    x: Tensor,
    stream: Tensor,
    offsets: Tensor,
    lut: Tensor,
    scale: Tensor,
    out_features: int,
    chunk: int,
    max_len: int,
) -> Tensor:
    """``x [..., K] @ (scale · Z)ᵀ``: fused decode + GEMV for at most 4 rows, decode + ``F.linear`` above."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    if m > HUFFMAN_GEMV_MAX_M:
        w = huffman_decode(stream, offsets, lut, scale, out_features, k, chunk, max_len, x.dtype)
        return F.linear(x2, w).reshape(*lead, out_features)
    y = torch.zeros((m, out_features), dtype=torch.float32, device=x.device)
    if m > 0:
        _kernel_module("huffman").launch_gemv(x2, stream, offsets, lut, scale, y, chunk=chunk, max_len=max_len)
    return y.to(x.dtype).reshape(*lead, out_features)


@huffman_matmul.register_fake
def _(x, stream, offsets, lut, scale, out_features, chunk, max_len):
    return x.new_empty((*x.shape[:-1], out_features))
