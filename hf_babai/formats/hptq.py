"""The ``hptq`` format: one scale per matrix, unbounded integer codes entropy-coded to a bit budget (paper §5.2).

A layer is solved by :func:`hf_babai.solver.entropy.entropy_quantize` (HPTQ: Babai without clipping, the scale
searched so the stored size meets ``target_bpw``; with ``method="rtn"`` HRTN). ``HuffmanLinear`` stores
``W = scale · Z`` with the codes of :mod:`hf_babai.formats.huffman`.

The buffers are those of :mod:`hf_babai.formats.huffman` plus the float16 ``scale``. Their sizes depend on
the data (stream length, alphabet size), so a loader must be told them before it can allocate the module:
:meth:`HuffmanLinear.buffer_sizes` returns them and the constructor takes them back (the checkpoint's
quantization config records them per module).

``forward`` on CUDA inputs runs the Triton kernels (``hf_babai::huffman_matmul``: a fused decode + GEMV for
at most 4 rows, decode-to-buffer + ``F.linear`` above); elsewhere it decodes to a dense weight with torch
(vectorised over chunks) and runs ``F.linear``: a correctness path, one pass over the stream per call. The
kernels' data is derived from the checkpoint on first use and cached, never stored: the one-lookup table
(``symbol << 8 | length``) and bit offsets for chunks of ``kernel_chunk`` symbols (default 128, one lock-step
decode finds them), because a stored chunk of 1024 symbols would leave a GPU with too few lanes per matrix
(4096² codes = 16384 chunks of 1024 steps each; at 128 symbols: 131072 lanes of 128 steps, +0.25 bits/weight
read). Set ``cache_dense = True`` to decode once and keep the dense weight (evaluation on CPU).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..solver.babai import HessianFactor
from ..solver.entropy import EntropyResult, entropy_quantize
from .huffman import DEFAULT_CHUNK, DEFAULT_MAX_LEN, coded_bits, decode_buffers, encode, huffman_lut, split_offsets
from .kernel_ops import huffman_matmul, select_backend
from .registry import QuantFormat, QuantizedLinear, register_format

if TYPE_CHECKING:
    from ..spec import QuantSpec

__all__ = ["HPTQFormat", "HuffmanLinear"]

_BUFFERS = ("stream", "offsets", "symbols", "lengths", "scale")


class HuffmanLinear(QuantizedLinear):
    """Linear layer with an entropy-coded weight ``W = scale · Z`` (``Z`` int32, unbounded).

    Attributes: ``in_features``, ``out_features``, ``chunk`` and ``max_len`` (coder parameters),
    ``compute_dtype`` (dtype of the original weight), ``cache_dense`` and ``backend`` (``"auto"``: Triton for
    CUDA inputs, torch otherwise; ``"torch"`` / ``"triton"`` force one).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        stream_bytes: int,
        alphabet: int,
        chunk: int = DEFAULT_CHUNK,
        max_len: int = DEFAULT_MAX_LEN,
        bias: bool = True,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_features", in_features),
            ("out_features", out_features),
            ("stream_bytes", stream_bytes),
            ("alphabet", alphabet),
            ("chunk", chunk),
            ("max_len", max_len),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if alphabet > 2**max_len:
            raise ValueError(f"alphabet={alphabet} symbols cannot have codes of at most max_len={max_len} bits")
        self.in_features = in_features
        self.out_features = out_features
        self.chunk = chunk
        self.max_len = max_len
        self.compute_dtype = dtype
        self.cache_dense = False
        self.backend = "auto"
        self.kernel_chunk = math.gcd(chunk, 128)
        self._dense: Tensor | None = None
        self._kernel_data: tuple[Tensor, Tensor] | None = None
        n_chunks = math.ceil(in_features * out_features / chunk)
        for name, shape, buf_dtype in (
            ("stream", (stream_bytes,), torch.uint8),
            ("offsets", (n_chunks,), torch.int32),
            ("symbols", (alphabet,), torch.int32),
            ("lengths", (alphabet,), torch.uint8),
            ("scale", (1,), torch.float16),
        ):
            self.register_buffer(name, torch.zeros(shape, dtype=buf_dtype, device=device), persistent=True)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        codes: Tensor,
        scale: float,
        chunk: int = DEFAULT_CHUNK,
        max_len: int = DEFAULT_MAX_LEN,
    ) -> HuffmanLinear:
        """Encodes the solver's integer ``codes [N, K]`` (``W ≈ scale · codes``) for ``linear``'s shape."""
        n, k = linear.out_features, linear.in_features
        if tuple(codes.shape) != (n, k):
            raise ValueError(f"codes shape {list(codes.shape)} does not match the linear's weight [out, in] = {[n, k]}")
        s16 = torch.tensor([scale], dtype=torch.float16, device=linear.weight.device)
        if not torch.isfinite(s16).all() or float(s16) <= 0:
            raise ValueError(f"scale={scale} must be positive and representable in float16")
        enc = encode(codes, max_len, chunk)
        weight = linear.weight
        module = cls(
            k,
            n,
            enc.stream.numel(),
            enc.symbols.numel(),
            chunk,
            max_len,
            bias=linear.bias is not None,
            dtype=weight.dtype,
            device=weight.device,
        )
        with torch.no_grad():
            for name in ("stream", "offsets", "symbols", "lengths"):
                getattr(module, name).copy_(getattr(enc, name))
            module.scale.copy_(s16)
            if module.bias is not None:
                module.bias.copy_(linear.bias.detach())
        return module

    def buffer_sizes(self) -> dict[str, int]:
        """What a loader needs to allocate this module before reading its buffers."""
        return {
            "stream_bytes": self.stream.numel(),
            "alphabet": self.symbols.numel(),
            "chunk": self.chunk,
            "max_len": self.max_len,
        }

    def packed_buffers(self) -> dict[str, Tensor]:
        """The quantization buffers by name (no bias); every stored bit of the weight."""
        return {name: getattr(self, name) for name in _BUFFERS}

    def storage_bits(self) -> int:
        """Stored bits of the weight: stream, offsets, codebook and scale."""
        return sum(t.numel() * t.element_size() * 8 for t in self.packed_buffers().values())

    def codes(self) -> Tensor:
        """The decoded integer codes ``Z [N, K]`` (int32)."""
        shape = (self.out_features, self.in_features)
        return decode_buffers(self.stream, self.offsets, self.symbols, self.lengths, shape, self.chunk, self.max_len)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """Dense weight ``[N, K]`` in ``dtype`` (default ``compute_dtype``): ``scale · Z`` computed in float32."""
        w = self.codes().float() * self.scale.float()
        return w.to(self.compute_dtype if dtype is None else dtype)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected last input dim {self.in_features}, got shape {tuple(x.shape)}")
        if select_backend(x, self.backend) == "triton":
            return self._forward_triton(x)
        return self._forward_torch(x)

    def kernel_data(self) -> tuple[Tensor, Tensor]:
        """(lookup table, bit offsets of ``kernel_chunk``-symbol chunks) on the buffers' device, cached."""
        dev = self.stream.device
        if self._kernel_data is None or self._kernel_data[0].device != dev:
            lut = huffman_lut(self.symbols, self.lengths, self.max_len).to(dev)
            n = self.in_features * self.out_features
            offsets = split_offsets(
                self.stream, self.offsets, self.symbols, self.lengths, n, self.chunk, self.max_len, self.kernel_chunk
            )
            self._kernel_data = (lut, offsets.to(dev))
        return self._kernel_data

    def _forward_triton(self, x: Tensor) -> Tensor:
        lut, offsets = self.kernel_data()
        y = huffman_matmul(x, self.stream, offsets, lut, self.scale, self.out_features, self.kernel_chunk, self.max_len)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _forward_torch(self, x: Tensor) -> Tensor:
        if self.cache_dense:
            if self._dense is None or self._dense.dtype != x.dtype or self._dense.device != x.device:
                self._dense = self.dequantize(x.dtype).to(x.device)
            w = self._dense
        else:
            self._dense = None
            w = self.dequantize(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._dense = None  # new buffers invalidate a cached dense weight and the kernel data
        self._kernel_data = None
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bpw={self.storage_bits() / (self.in_features * self.out_features):.3f}, chunk={self.chunk}, "
            f"max_len={self.max_len}, bias={self.bias is not None}"
        )


@register_format
class HPTQFormat(QuantFormat):
    """``W = scale · Z``: one float16 scale per matrix, Huffman-coded codes; ``bits``/``group_size``/``sym`` and the
    scale search do not apply."""

    name = "hptq"
    module = HuffmanLinear
    primary = "stream"
    own_settings = ("target_bpw",)
    sized_by_data = True
    no_export = (
        "its entropy-coded codes are unbounded, and GPTQ checkpoints hold fixed-width codes on a clipped grid; "
        "export a format='int' model instead"
    )
    kernel_ops = ("hf_babai::huffman_matmul", "hf_babai::huffman_decode")

    def solve(self, w: Tensor, factor: HessianFactor, spec: QuantSpec, hessian: Callable[[], Tensor]) -> EntropyResult:
        return entropy_quantize(w, factor, spec.target_bpw, code_bits=coded_bits, block_size=spec.block_size)

    def round(self, w: Tensor, spec: QuantSpec) -> EntropyResult:
        return entropy_quantize(w.float(), None, spec.target_bpw, code_bits=coded_bits)

    def dense(self, solution: EntropyResult, spec: QuantSpec) -> Tensor:
        return solution.codes.float() * solution.scale

    def build(self, linear: nn.Linear, solution: EntropyResult, spec: QuantSpec) -> HuffmanLinear:
        return HuffmanLinear.from_linear(linear, solution.codes, solution.scale)

    def empty(self, in_features, out_features, spec, sizes, *, bias, dtype, device) -> HuffmanLinear:
        return HuffmanLinear(in_features, out_features, **sizes, bias=bias, dtype=dtype, device=device)

    def describe(self, spec: QuantSpec) -> dict[str, Any]:
        t = spec.target_bpw
        return {
            "format": f"hptq, entropy-coded codes, one scale per matrix, {t} bpw",
            "headline": f"{t}-bpw entropy-coded (HPTQ)",
            "layout": "entropy-coded integers, one float16 scale per matrix (no clipping)",
            "tags": ["hptq"],
            "card": {"format": self.name, "target_bpw": t},
        }
