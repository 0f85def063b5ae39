"""Tile tables per GPU generation, the cached per-shape tile choice, and the launch helper.

Why per generation: shared memory per SM (A100 164 KB, RTX 30xx/40xx ~100 KB, H100 228 KB),
the MMA instruction (Hopper wgmma vs mma.sync) and the register budget differ, so each family
gets its own list. Every tile a table offers is compiled for its target by the compile gate
(``tests/test_kernel_compile.py``): it must compile, spill nothing and fit the family's shared
memory; :mod:`benchmarks/kernel_static.py` reports its predicted main-loop budget.

Tile choice (:func:`pick_tile`) is a rule on the shape, computed once per (kind, family, M
bucket, N, K, G) and cached: no per-call Python work beyond a dict lookup, no benchmarking
(autotuning inside a CUDA-graph capture or the first denoising step is avoided). Set
``DIFFQ_KERNEL_AUTOTUNE=1`` to benchmark the table's fitting tiles instead (Triton's
autotuner, once per shape bucket, outside graph capture only).

Tiles of the int4 GEMMs (w4a16, w4a8, w4a4) are in the swapped orientation: BLOCK_M is the
token tile (the MMA's N), BLOCK_N the weight-row tile (the MMA's M: 64 rows per warpgroup) and
BLOCK_K the K per loop iteration (a multiple of 128 and of the group size).

Under ``TRITON_INTERPRET=1`` :data:`INTERPRETER_TILES` gives big tiles so that the numpy
interpreter runs few programs.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import torch
import triton

#: kernel kinds that have a tile list
KINDS = ("w4a16", "w8a8", "w4a8", "w4a4", "fp8")
#: kinds in the swapped int4 layout (BLOCK_K a multiple of 128 and of G)
INT4_KINDS = ("w4a16", "w4a8", "w4a4")
#: group sizes the int4 Triton GEMMs take (others run the reference path)
INT4_GROUPS = (64, 128)
#: shared memory a CTA may use per family (bytes): sm_86/sm_89 allow 99 KB, A100 163 KB, H100 227 KB
SMEM_LIMIT = {"hopper": 227 * 1024, "ada": 99 * 1024, "ampere": 99 * 1024}
#: compute capability each family's tiles are compiled and checked for
FAMILY_CAP = {"hopper": 90, "ada": 89, "ampere": 80}


@dataclass(frozen=True)
class Tile:
    """One GEMM tiling: block sizes, GROUP_M swizzle width, warps and pipeline stages."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def meta(self) -> dict[str, int]:
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k, "GROUP_M": self.group_m}

    def launch_meta(self) -> dict[str, int]:
        return {**self.meta(), "num_warps": self.num_warps, "num_stages": self.num_stages}

    def to_config(self) -> triton.Config:
        return triton.Config(self.meta(), num_warps=self.num_warps, num_stages=self.num_stages)

    def name(self) -> str:
        return f"{self.block_m}x{self.block_n}x{self.block_k}-w{self.num_warps}s{self.num_stages}"


def _t(bm: int, bn: int, bk: int, gm: int, w: int, s: int) -> Tile:
    return Tile(bm, bn, bk, gm, w, s)


# Tables: large-M tiles first; pick_tile takes the first that fits the shape.
# 8-bit x 8-bit (int8 / fp8), standard orientation: BLOCK_M tokens, BLOCK_N outputs, K 128 deep
_EIGHT_BIT = {
    "hopper": [
        _t(128, 256, 128, 8, 8, 3), _t(128, 128, 128, 8, 4, 4), _t(64, 128, 128, 8, 4, 4),
        _t(64, 64, 128, 8, 4, 4), _t(32, 128, 128, 4, 4, 4), _t(16, 128, 128, 1, 4, 4),
    ],
    "ada": [
        _t(128, 128, 64, 8, 4, 4), _t(64, 128, 128, 8, 4, 3), _t(64, 64, 128, 8, 4, 4),
        _t(32, 128, 128, 4, 4, 3), _t(16, 128, 128, 1, 4, 3),
    ],
    "ampere": [
        _t(128, 128, 64, 8, 4, 4), _t(64, 128, 128, 8, 4, 3), _t(64, 64, 128, 8, 4, 4),
        _t(32, 128, 128, 4, 4, 3), _t(16, 128, 128, 1, 4, 3),
    ],
}
# int4 weights, swapped orientation: BLOCK_M tokens (MMA N), BLOCK_N weight rows (MMA M)
_INT4 = {
    "hopper": [
        _t(128, 64, 128, 8, 4, 3), _t(64, 64, 128, 8, 4, 4), _t(32, 64, 128, 4, 4, 4), _t(16, 64, 128, 1, 4, 4),
    ],
    "ada": [_t(64, 64, 128, 8, 4, 3), _t(32, 64, 128, 4, 4, 3), _t(16, 64, 128, 1, 4, 3)],
    "ampere": [_t(64, 64, 128, 8, 4, 3), _t(32, 64, 128, 4, 4, 3), _t(16, 64, 128, 1, 4, 3)],
}
# W4A8 on mma.sync keeps 128x128 tiles without spilling (int32 partials, no second fp32 copy)
_W4A8 = {
    **_INT4,
    "ada": [_t(128, 128, 128, 8, 8, 3), *_INT4["ada"]],
    "ampere": [_t(128, 128, 128, 8, 8, 3), *_INT4["ampere"]],
}
# FP8 promotes every BLOCK_K products into a second fp32 accumulator: 128x256 would spill
_FP8 = {**_EIGHT_BIT, "hopper": _EIGHT_BIT["hopper"][1:]}
_W4A4 = _INT4  # (on sm_80, 64 x 128 tiles predict 1.64 instead of 1.78 but spill in the bias / fp32 variants)
_TABLES: dict[str, dict[str, list[Tile]]] = {
    "w4a16": _INT4, "w8a8": _EIGHT_BIT, "fp8": _FP8, "w4a8": _W4A8, "w4a4": _W4A4,
}  # fmt: skip
#: fp32 activations on the w4a16 kernel use an IEEE fp32 dot (FMA units, not tensor cores)
F32_TILES = {"hopper": [_t(32, 64, 128, 4, 4, 2)], "ada": [_t(16, 64, 128, 1, 4, 2)], "ampere": [_t(16, 64, 128, 1, 4, 2)]}

#: interpreter tiles (one per kind; BLOCK_K 128 for the int4 kinds)
INTERPRETER_TILES = {
    "w4a16": Tile(64, 64, 128, 8),
    "w8a8": Tile(64, 64, 64, 8),
    "w4a8": Tile(64, 64, 128, 8),
    "w4a4": Tile(64, 64, 128, 8),
    "fp8": Tile(64, 64, 64, 8),
}


@functools.lru_cache(maxsize=16)
def gpu_family(device: torch.device | int | None = None) -> str:
    """'hopper' (sm_90+), 'ada' (sm_89), 'ampere' (sm_80/86/87) or 'older' (no int8/bf16 MMA path)."""
    major, minor = torch.cuda.get_device_capability(device)
    return family_of((major, minor))


def family_of(cap: tuple[int, int]) -> str:
    major, minor = cap
    if major >= 9:
        return "hopper"
    if (major, minor) == (8, 9):
        return "ada"
    if major == 8:
        return "ampere"
    return "older"


def m_bucket(m: int) -> int:
    """Power-of-two bucket of M (shapes in one bucket share a tile)."""
    return min(triton.next_power_of_2(max(int(m), 1)), 16384)


def table(kind: str, family: str, f32: bool = False) -> list[Tile]:
    if f32:
        return F32_TILES.get(family, F32_TILES["ampere"])
    return _TABLES[kind].get(family, _TABLES[kind]["ampere"])


def shape_ok(tile: Tile, kind: str, m: int, n: int, k: int, group_size: int | None) -> bool:
    """Whether ``tile`` fits an [m, k] x [k, n] GEMM of ``kind`` (tokens m)."""
    if kind in INT4_KINDS and group_size is not None and tile.block_k % group_size:
        return False
    if kind not in INT4_KINDS and tile.block_k > max(triton.next_power_of_2(k), 32):
        return False
    if tile.block_m > max(triton.next_power_of_2(max(m, 16)), 16):
        return False
    if m >= 512 and tile.block_m < 64:  # big M: small token tiles only re-read the weights
        return False
    return tile.block_n <= max(triton.next_power_of_2(n), 64)


@functools.lru_cache(maxsize=4096)
def pick_tile(kind: str, family: str, mb: int, n: int, k: int, group_size: int | None, f32: bool = False) -> Tile:
    """The tile for ``kind`` on ``family`` at M bucket ``mb`` (cached: one rule evaluation per shape)."""
    tiles = table(kind, family, f32)
    for t in tiles:
        if shape_ok(t, kind, mb, n, k, group_size):
            return t
    return tiles[-1]


def candidate_tiles(kind: str, family: str, m: int, n: int, k: int, group_size: int | None) -> list[Tile]:
    """Every tile of the table that fits the shape (what the opt-in autotuner benchmarks)."""
    keep = [t for t in table(kind, family) if shape_ok(t, kind, m, n, k, group_size)]
    return keep or [table(kind, family)[-1]]


def is_interpreted(kernel: Any) -> bool:
    """True when ``kernel`` was decorated under ``TRITON_INTERPRET=1`` (runs in numpy on the CPU)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def autotune_enabled() -> bool:
    return os.environ.get("DIFFQ_KERNEL_AUTOTUNE") == "1"


_TUNED: dict[tuple[int, str, str], Any] = {}


def _autotuned(kernel: Any, kind: str, family: str) -> Any:
    key = (id(kernel), kind, family)
    if key not in _TUNED:

        def prune(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
            args = {**named_args, **kwargs}
            tiles = candidate_tiles(kind, family, int(args["M"]), int(args["N"]), int(args["K"]), args.get("G"))
            return [t.to_config() for t in tiles]

        _TUNED[key] = triton.autotune(
            configs=[t.to_config() for t in table(kind, family)], key=["M", "N", "K"],
            prune_configs_by={"early_config_prune": prune},
        )(kernel)  # fmt: skip
    return _TUNED[key]


def launch(kernel: Any, kind: str, tile: Tile | None, family: str, **args: Any) -> None:
    """Run a GEMM ``kernel`` of ``kind`` on ``tile`` (None: interpreter tile), one program per
    (BLOCK_M x BLOCK_N) output tile on a 1-D grid (the kernels swizzle it with ``tile_ids``).

    ``args`` holds every kernel argument by name, including ``M`` and ``N``."""
    m, n = args["M"], args["N"]
    if tile is None:
        tile = INTERPRETER_TILES[kind]
    if autotune_enabled() and not is_interpreted(kernel) and not torch.cuda.is_current_stream_capturing():
        _autotuned(kernel, kind, family)[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)](
            **args
        )
        return
    grid = (triton.cdiv(m, tile.block_m) * triton.cdiv(n, tile.block_n),)
    kernel[grid](**args, **tile.launch_meta())
