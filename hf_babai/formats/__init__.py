"""Storage formats for quantized weights: canonical packing and the ``BabaiLinear`` module.

Pure torch on purpose: checkpoints must load (and be inspected) without transformers or the
solver installed.
"""

from .entropy_linear import HuffmanLinear
from .linear import DEFAULT_CHUNK_SIZE, BabaiLinear
from .packing import (
    SUPPORTED_BITS,
    Plane,
    bit_planes,
    bits_per_weight,
    dequantize_packed,
    format_bits_per_weight,
    num_groups,
    pack_codes,
    pack_weight,
    packed_buffer_specs,
    unpack_codes,
    unpack_weight,
)
from .ssqr_linear import SSQRLinear

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "SUPPORTED_BITS",
    "BabaiLinear",
    "HuffmanLinear",
    "Plane",
    "SSQRLinear",
    "bit_planes",
    "bits_per_weight",
    "dequantize_packed",
    "format_bits_per_weight",
    "num_groups",
    "pack_codes",
    "pack_weight",
    "packed_buffer_specs",
    "unpack_codes",
    "unpack_weight",
]
