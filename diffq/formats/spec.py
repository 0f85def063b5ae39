"""What a quantized number looks like: element format, scale granularity, scale storage.

A ``QuantSpec`` is pure description; the math lives in :mod:`diffq.formats.core`. Every recipe,
module and kernel in diffq speaks in these specs, so "W4 with group 64" means one thing everywhere.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Literal

from diffq.errors import FormatError

Granularity = Literal["tensor", "channel", "group", "token"]
ScaleDtype = Literal["fp32", "fp16", "e4m3", "e8m0"]

INT_DTYPES = {f"int{b}": b for b in range(2, 9)} | {f"uint{b}": b for b in range(2, 9)}
FP_DTYPES = {"fp8_e4m3": 8, "fp8_e5m2": 8, "fp4_e2m1": 4}
GRANULARITIES = ("tensor", "channel", "group", "token")
SCALE_DTYPES = ("fp32", "fp16", "e4m3", "e8m0")


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    dtype: ``int2``..``int8`` (symmetric, signed codes), ``uint2``..``uint8`` (asymmetric, unsigned
        codes with a zero point), ``fp8_e4m3``, ``fp8_e5m2``, ``fp4_e2m1``.
    granularity: ``tensor`` (one scale), ``channel`` (one per row of a weight [N, K]), ``token`` (one
        per row of an activation [M, K], computed at run time), ``group`` (one per ``group_size``
        consecutive elements of a row).
    scale_dtype: how scales are stored. ``fp16``/``fp32`` plain; ``e4m3`` is the NVFP4 flavour (FP8
        block scales under one fp32 tensor scale); ``e8m0`` the MXFP4 flavour (power-of-two scales).
    """

    dtype: str = "int8"
    granularity: Granularity = "channel"
    group_size: int | None = None
    scale_dtype: ScaleDtype = "fp32"

    def __post_init__(self) -> None:
        if self.dtype not in INT_DTYPES and self.dtype not in FP_DTYPES:
            raise FormatError(
                f"unknown number format {self.dtype!r}; use one of "
                f"{sorted(INT_DTYPES) + sorted(FP_DTYPES)}"
            )
        if self.granularity not in GRANULARITIES:
            raise FormatError(
                f"unknown granularity {self.granularity!r}; use one of {list(GRANULARITIES)}"
            )
        if self.scale_dtype not in SCALE_DTYPES:
            raise FormatError(
                f"unknown scale dtype {self.scale_dtype!r}; use one of {list(SCALE_DTYPES)}"
            )
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise FormatError(
                    f"granularity 'group' needs a positive integer group_size, got {self.group_size!r}"
                )
        elif self.group_size is not None:
            raise FormatError(
                f"group_size={self.group_size} only applies to granularity 'group', "
                f"not {self.granularity!r}; drop it or set granularity='group'"
            )
        if self.scale_dtype in ("e4m3", "e8m0") and self.dtype != "fp4_e2m1":
            raise FormatError(
                f"scale dtype {self.scale_dtype!r} is only defined for fp4_e2m1 block formats"
            )

    @property
    def bits(self) -> int:
        return INT_DTYPES.get(self.dtype) or FP_DTYPES[self.dtype]

    @property
    def is_int(self) -> bool:
        return self.dtype in INT_DTYPES

    @property
    def is_fp(self) -> bool:
        return self.dtype in FP_DTYPES

    @property
    def symmetric(self) -> bool:
        return not self.dtype.startswith("uint")

    @property
    def packed(self) -> bool:
        """Codes narrower than a byte are bit-packed (see :mod:`diffq.formats.packing`): 4-bit two
        per byte, 3-bit eight per three bytes, and so on."""
        return self.bits < 8

    def stored_bytes(self, rows: int, cols: int) -> int:
        """Bytes of a ``[rows, cols]`` weight in this format as a 16-bit deployment counts them
        (:func:`diffq.sizes.module_bytes` with ``float_bits=16``): the codes; per scale 2 bytes
        (fp16/fp32) or 1 (FP8/E8M0 block scales); a 1-byte zero point per scale for the ``uint``
        formats; NVFP4's tensor scale. Assumes ``group_size`` divides ``cols``."""
        per_row = {"channel": 1, "token": 1, "group": -(-cols // (self.group_size or cols))}
        scales = 1 if self.granularity == "tensor" else rows * per_row[self.granularity]
        scale_b = 1 if self.scale_dtype in ("e4m3", "e8m0") else 2
        return (rows * -(-cols * self.bits // 8) + scales * (scale_b + (0 if self.symmetric else 1))
                + (2 if self.scale_dtype == "e4m3" else 0))

    def with_group(self, group_size: int) -> QuantSpec:
        return replace(self, granularity="group", group_size=group_size)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QuantSpec:
        unknown = set(d) - {"dtype", "granularity", "group_size", "scale_dtype"}
        if unknown:
            raise FormatError(f"unknown QuantSpec fields {sorted(unknown)}")
        return cls(**d)

    def describe(self) -> str:
        g = {"group": f"g{self.group_size}", "channel": "ch", "token": "tok", "tensor": "t"}[self.granularity]
        s = "" if self.scale_dtype in ("fp32", "fp16") else f"/{self.scale_dtype}"
        return f"{self.dtype}[{g}{s}]"


# Named specs used by presets and tests.
NVFP4 = QuantSpec("fp4_e2m1", "group", 16, "e4m3")
MXFP4 = QuantSpec("fp4_e2m1", "group", 32, "e8m0")
