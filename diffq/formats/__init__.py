"""Number formats: integer 2-8 bit (symmetric/asymmetric), FP8 E4M3/E5M2, FP4 E2M1 with block scales."""

from diffq.formats.core import (
    SCALE_MIN,
    QTensor,
    abs_max,
    decode_scale,
    dequantize,
    dequantize_parts,
    encode,
    expand_grid,
    fake_quantize,
    grid_values,
    int_range,
    quantize,
    range_grid,
    requantize,
    rtn_values,
    store_scale,
)
from diffq.formats.packing import pack_bits, pack_int4, pack_multiple, unpack_bits, unpack_int4
from diffq.formats.spec import MXFP4, NVFP4, QuantSpec

__all__ = [
    "MXFP4",
    "NVFP4",
    "SCALE_MIN",
    "QTensor",
    "QuantSpec",
    "abs_max",
    "decode_scale",
    "dequantize",
    "dequantize_parts",
    "encode",
    "expand_grid",
    "fake_quantize",
    "grid_values",
    "int_range",
    "pack_bits",
    "pack_int4",
    "pack_multiple",
    "quantize",
    "range_grid",
    "requantize",
    "rtn_values",
    "store_scale",
    "unpack_bits",
    "unpack_int4",
]
