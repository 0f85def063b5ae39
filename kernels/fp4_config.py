"""FP4 kernel configuration: the two block formats, the route per GPU and the tile tables.

Shared by the host side (:mod:`diffq.kernels.fp4_dispatch`), the launches
(:mod:`diffq.kernels.fp4_launch`) and the compile gate (:mod:`diffq.kernels.aot`), so that none of
them imports another in a cycle.
"""

from __future__ import annotations

import functools

import triton

from diffq.formats import QuantSpec
from diffq.kernels.autotune import Tile, m_bucket

#: block size and stored scale dtype of each FP4 flavour the kernels take
FP4_FORMATS = {"nvfp4": (16, "e4m3"), "mxfp4": (32, "e8m0")}
#: minimum CUDA capability (Triton emulates dot_scaled below sm_100; E4M3 scales need sm_89)
FP4_MIN_CAPABILITY = {"nvfp4": (8, 9), "mxfp4": (8, 0)}
#: interpreter tile: BLOCK_K = one scale block, so that every dot_scaled partial is an exact
#: fp32 sum and the accumulation order is the reference's (bit-exact CPU checks)
INTERPRETER_TILES = {"nvfp4": Tile(64, 64, 16, 8), "mxfp4": Tile(64, 64, 32, 8)}


def fp4_format(spec: QuantSpec | None) -> str | None:
    """"nvfp4" / "mxfp4" when ``spec`` is that block format (E2M1, group 16 / E4M3 or 32 / E8M0)."""
    if spec is None or spec.dtype != "fp4_e2m1" or spec.granularity != "group":
        return None
    for name, (b, sdt) in FP4_FORMATS.items():
        if spec.group_size == b and spec.scale_dtype == sdt:
            return name
    return None


def fp4_route(capability: tuple[int, int]) -> str:
    """"fp4-mma" where the GPU has block-scaled FP4 tensor cores (sm_10x, sm_12x), else "bf16-mma"."""
    return "fp4-mma" if capability[0] in (10, 12) else "bf16-mma"


def fp4_family(capability: tuple[int, int]) -> str:
    """Tile-table family: "sm100" (data-center Blackwell), "sm120" (RTX 50xx), "hopper", "ada", "ampere"."""
    major, minor = capability
    if major == 10:
        return "sm100"
    if major == 12:
        return "sm120"
    if major == 9:
        return "hopper"
    return "ada" if (major, minor) == (8, 9) else "ampere"


# Tables: the first tile that fits the shape wins (large M first), chosen from compiled figures
# (benchmarks/kernel_static.py; no spills, issue/MMA of the default tile <= 1 on sm_100 / sm_120).
# sm_100: tcgen05 M = 128 per CTA, accumulator in tensor memory, fewer warps issue less;
# sm_120 (~99 KB shared memory) and the emulated bf16 routes: register accumulators (sm_89's
# 64 x 128 tiles spill). Every tile is compiled by the gate (tests/test_kernel_compile.py).
FP4_TILES: dict[str, list[Tile]] = {
    "sm100": [Tile(128, 256, 256, 8, 8, 3), Tile(128, 128, 256, 8, 4, 3), Tile(128, 64, 256, 8, 4, 3)],
    "sm120": [Tile(128, 128, 128, 8, 8, 3), Tile(64, 128, 128, 8, 4, 3), Tile(32, 64, 128, 4, 4, 3)],
    "hopper": [Tile(128, 128, 128, 8, 8, 3), Tile(64, 64, 128, 8, 4, 3)],
    "ada": [Tile(64, 64, 64, 8, 4, 3), Tile(32, 64, 64, 4, 4, 3)],
    "ampere": [Tile(64, 128, 64, 8, 4, 3), Tile(32, 64, 64, 4, 4, 3)],
}
#: fp32 outputs where the 16-bit table's tiles spill in the epilogue (sm_100: a 128 x 256 fp32 tile)
FP4_F32_TILES: dict[str, list[Tile]] = {"sm100": [Tile(128, 128, 256, 8, 8, 3), Tile(128, 64, 256, 8, 4, 3)]}
#: compute capability each family's tiles are compiled and checked for by the gate
FP4_FAMILY_CAP = {"sm100": 100, "sm120": 120, "hopper": 90, "ada": 89, "ampere": 80}


def pick_fp4_tile(family: str, m: int, n: int, f32: bool = False) -> Tile:
    """The first tile of ``family``'s table (:data:`FP4_F32_TILES` for fp32 outputs where it has
    one) whose BLOCK_M / BLOCK_N fit M / N (powers of two up); one rule evaluation per (family,
    M bucket, N, f32), cached."""
    return _pick(family, m_bucket(m), n, f32)


@functools.lru_cache(maxsize=1024)
def _pick(family: str, mb: int, n: int, f32: bool) -> Tile:
    tiles = FP4_F32_TILES.get(family, FP4_TILES[family]) if f32 else FP4_TILES[family]
    nb = triton.next_power_of_2(max(n, 16))
    for t in tiles:
        if t.block_m <= max(mb, 16) and t.block_n <= nb:
            return t
    return tiles[-1]
