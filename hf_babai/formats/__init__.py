"""Storage formats: the registry, the built-in formats and the packing they share.

Each format is one module that registers a :class:`QuantFormat` (``int``: :mod:`.integer`, ``ssqr``: :mod:`.ssqr`,
``hptq``: :mod:`.hptq`); importing this package registers them. Pure torch plus the solver they are solved with:
no transformers, so checkpoints can be inspected and modules built without it.
"""

# the import order is the registration order, which is the order of the format choices
# isort: off
from .integer import DEFAULT_CHUNK_SIZE, BabaiLinear, IntFormat
from .ssqr import SSQRFormat, SSQRLinear
from .hptq import HPTQFormat, HuffmanLinear

# isort: on
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
from .registry import (
    QuantFormat,
    QuantizedLinear,
    format_names,
    format_of,
    get_format,
    model_bits_per_weight,
    quantized_modules,
    register_format,
    set_backend,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "SUPPORTED_BITS",
    "BabaiLinear",
    "HPTQFormat",
    "HuffmanLinear",
    "IntFormat",
    "Plane",
    "QuantFormat",
    "QuantizedLinear",
    "SSQRFormat",
    "SSQRLinear",
    "bit_planes",
    "bits_per_weight",
    "dequantize_packed",
    "format_bits_per_weight",
    "format_names",
    "format_of",
    "get_format",
    "model_bits_per_weight",
    "num_groups",
    "pack_codes",
    "pack_weight",
    "packed_buffer_specs",
    "quantized_modules",
    "register_format",
    "set_backend",
    "unpack_codes",
    "unpack_weight",
]
