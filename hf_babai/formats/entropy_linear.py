"""``HuffmanLinear``: a Linear whose weight is ``scale · Z`` with entropy-coded integer codes (HPTQ/HRTN).

The buffers are those of :mod:`hf_babai.formats.huffman` plus the float16 ``scale``. Their sizes depend on
the data (stream length, alphabet size), so a loader must be told them before it can allocate the module:
:meth:`HuffmanLinear.buffer_sizes` returns them and the constructor takes them back (the checkpoint's
quantization config records them per module).

``forward`` decodes the codes to a dense weight with torch (vectorised over chunks) and runs ``F.linear``.
That is a correctness path: memory is saved on disk and at rest, and decoding costs one pass over the stream
per call. Set ``cache_dense = True`` to decode once and keep the dense weight (evaluation on CPU).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .huffman import DEFAULT_CHUNK, DEFAULT_MAX_LEN, decode_buffers, encode

__all__ = ["HuffmanLinear"]

_BUFFERS = ("stream", "offsets", "symbols", "lengths", "scale")


class HuffmanLinear(nn.Module):
    """Linear layer with an entropy-coded weight ``W = scale · Z`` (``Z`` int32, unbounded).

    Attributes: ``in_features``, ``out_features``, ``chunk`` and ``max_len`` (coder parameters),
    ``compute_dtype`` (dtype of the original weight) and ``cache_dense``.
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
        self._dense: Tensor | None = None
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
        s16 = torch.tensor([scale], dtype=torch.float16)
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
        if self.cache_dense:
            if self._dense is None or self._dense.dtype != x.dtype or self._dense.device != x.device:
                self._dense = self.dequantize(x.dtype).to(x.device)
            w = self._dense
        else:
            self._dense = None
            w = self.dequantize(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._dense = None  # new buffers invalidate a cached dense weight
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bpw={self.storage_bits() / (self.in_features * self.out_features):.3f}, chunk={self.chunk}, "
            f"max_len={self.max_len}, bias={self.bias is not None}"
        )
