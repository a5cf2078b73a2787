"""The Triton kernels as torch ops, and the one function that chooses a backend.

``hf_babai::dense_matmul`` is a ``torch.library.custom_op`` with a fake (meta) implementation, so
``torch.compile`` and CUDA graphs see an opaque op of known output shape instead of tracing into Triton.
The Triton source lives in the repository's top-level ``kernels/`` folder, installed as ``hf_babai.kernels``
(a namespace package on purpose: a folder named ``kernels`` without ``__init__.py`` can never shadow Hugging
Face's own ``kernels`` distribution).

Backend choice (:func:`select_backend`): CUDA tensors and an importable triton → Triton; anything else →
the torch path (dequantize + ``F.linear``). ``backend="torch"`` forces the torch path for debugging;
``backend="triton"`` on CPU tensors runs the kernel in Triton's interpreter, which needs
``TRITON_INTERPRET=1`` in the environment before triton is first imported (that is how the tests run it).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["BACKENDS", "dense_matmul", "kernel_config", "select_backend", "triton_available"]

BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _dense_kernels():
    """The Triton source module: ``hf_babai.kernels.dense`` in an installed wheel; in a source checkout
    (editable install, where setuptools cannot map a nested namespace package) ``kernels/dense.py`` itself."""
    try:
        from hf_babai.kernels import dense
    except ModuleNotFoundError:
        name = "hf_babai.kernels.dense"
        if name not in sys.modules:
            path = Path(__file__).resolve().parents[2] / "kernels" / "dense.py"
            if not path.is_file():
                raise ImportError(f"the Triton kernels are missing: neither hf_babai.kernels nor {path}") from None
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        dense = sys.modules[name]
    return dense


def select_backend(x: Tensor, backend: str = "auto") -> str:
    """``"triton"`` or ``"torch"`` for input ``x``; a clear error when a forced backend cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown; use one of {BACKENDS}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if x.is_cuda and triton_available() else "torch"
    if not triton_available():
        raise ValueError("backend='triton' needs triton: pip install 'hf-babai[triton]' (or use backend='torch')")
    if not x.is_cuda and not _interpreting():
        raise ValueError(
            "backend='triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 before triton is "
            "imported (slow; for tests), or use backend='torch'"
        )
    return "triton"


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
) -> Tensor:
    """``x [..., K] @ Wᵀ`` from the packed buffers with the Triton kernel; output in ``x.dtype``.

    ``group`` is the group size in columns (``K`` for per-channel scales).
    """
    dense = _dense_kernels()
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    on_gpu = x.is_cuda
    config = kernel_config(m, out_features, k, on_gpu)
    split = config[3] > 1
    out = torch.zeros if split else torch.empty
    y = out((m, out_features), dtype=torch.float32 if split else x.dtype, device=x.device)
    if m > 0:
        dense.launch(
            x2,
            qweight,
            qweight_hi,
            scales,
            qzeros,
            qzeros_hi,
            y,
            bits=bits,
            group=group,
            config=config,
            dot_fp32=not on_gpu or x.dtype == torch.float32,
        )
    return y.to(x.dtype).reshape(*lead, out_features)


@dense_matmul.register_fake
def _(x, qweight, qweight_hi, scales, qzeros, qzeros_hi, bits, group, out_features):
    return x.new_empty((*x.shape[:-1], out_features))
