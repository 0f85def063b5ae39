"""Tile configurations per GPU generation, pruned by GEMM shape, and the one launch helper.

Why per generation: shared memory per SM differs (A100 164 KB, RTX 30xx/40xx ~100 KB, H100
228 KB) and so does the best K depth for 8-bit MMA, so each family gets its own candidate list;
``early_config_prune`` then drops tiles that do not fit the shape (BLOCK_K must divide the
quantization group; tiny M (decode-like batches, cross-attention on 77 text tokens) wants
16/32-row tiles). The autotuner keys on a power-of-two bucket of M, so a denoiser that runs the
same shapes every step tunes once per layer shape.

Under ``TRITON_INTERPRET=1`` nothing is tuned: :data:`INTERPRETER_TILES` gives big tiles so that
the numpy interpreter runs few programs.

Set ``DIFFQ_KERNEL_NO_AUTOTUNE=1`` to skip benchmarking and take the first surviving config
(fast start-up when timing does not matter, e.g. in CUDA tests).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import triton

#: kernel kinds that have a tile list (the names used by the kernel modules)
KINDS = ("w4a16", "w8a8", "w4a8", "w4a4", "fp8")
#: kinds whose K loop runs inside one quantization group (BLOCK_K must divide the group size)
GROUPED_KINDS = ("w4a16", "w4a8", "w4a4")


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

    def to_config(self) -> triton.Config:
        return triton.Config(self.meta(), num_warps=self.num_warps, num_stages=self.num_stages)


def _t(bm: int, bn: int, bk: int, gm: int, w: int, s: int) -> Tile:
    return Tile(bm, bn, bk, gm, w, s)


# 8-bit x 8-bit (int8 / fp8): deep K (128 bytes = one 128B smem row per tile row)
_EIGHT_BIT = {
    "hopper": [
        _t(128, 256, 128, 8, 8, 3), _t(256, 128, 128, 8, 8, 3), _t(128, 128, 128, 8, 8, 4),
        _t(128, 128, 128, 8, 4, 3), _t(64, 128, 128, 8, 4, 4), _t(128, 64, 128, 8, 4, 4),
        _t(64, 64, 128, 8, 4, 4), _t(32, 128, 128, 4, 4, 4), _t(16, 128, 128, 1, 4, 4),
        _t(16, 64, 256, 1, 4, 3), _t(32, 64, 256, 4, 4, 3),
    ],
    "ada": [
        _t(128, 128, 128, 8, 8, 3), _t(128, 128, 64, 8, 4, 4), _t(64, 128, 128, 8, 4, 3),
        _t(128, 64, 128, 8, 4, 3), _t(64, 64, 128, 8, 4, 4), _t(32, 128, 128, 4, 4, 3),
        _t(16, 128, 128, 1, 4, 3), _t(16, 64, 256, 1, 4, 3),
    ],
    "ampere": [
        _t(128, 256, 64, 8, 8, 3), _t(128, 128, 64, 8, 4, 4), _t(128, 128, 128, 8, 8, 3),
        _t(64, 128, 64, 8, 4, 4), _t(128, 64, 64, 8, 4, 4), _t(64, 64, 128, 8, 4, 3),
        _t(32, 128, 64, 4, 4, 4), _t(16, 128, 128, 1, 4, 3), _t(16, 64, 128, 1, 4, 4),
    ],
}
# int4 weights unpacked in registers (w4a8, w4a4): BLOCK_K capped by the group (32..128)
_INT4_INT = {
    "hopper": [
        _t(128, 256, 64, 8, 8, 3), _t(128, 128, 128, 8, 8, 3), _t(128, 128, 64, 8, 8, 4),
        _t(128, 128, 64, 8, 4, 3), _t(64, 128, 128, 8, 4, 4), _t(128, 64, 64, 8, 4, 4),
        _t(64, 64, 64, 8, 4, 4), _t(32, 128, 128, 4, 4, 4), _t(16, 128, 64, 1, 4, 4),
        _t(16, 64, 128, 1, 4, 4), _t(64, 128, 32, 8, 4, 5),
    ],
    "ada": [
        _t(128, 128, 64, 8, 4, 3), _t(128, 128, 128, 8, 8, 3), _t(64, 128, 64, 8, 4, 4),
        _t(128, 64, 64, 8, 4, 4), _t(64, 64, 128, 8, 4, 3), _t(32, 128, 64, 4, 4, 4),
        _t(16, 128, 64, 1, 4, 4), _t(64, 128, 32, 8, 4, 5),
    ],
    "ampere": [
        _t(128, 256, 64, 8, 8, 3), _t(128, 128, 64, 8, 4, 4), _t(64, 128, 64, 8, 4, 4),
        _t(128, 64, 64, 8, 4, 4), _t(64, 64, 64, 8, 4, 4), _t(32, 128, 64, 4, 4, 4),
        _t(16, 128, 64, 1, 4, 4), _t(64, 128, 32, 8, 4, 5),
    ],
}
# int4 weights dequantized to bf16/fp16 in the main loop (w4a16): 16-bit MMA, K 32..128
_W4A16 = {
    "hopper": [
        _t(128, 256, 64, 8, 8, 3), _t(128, 128, 64, 8, 8, 4), _t(128, 128, 64, 8, 4, 3),
        _t(64, 128, 64, 8, 4, 4), _t(128, 64, 64, 8, 4, 4), _t(64, 64, 128, 8, 4, 3),
        _t(32, 128, 128, 4, 4, 4), _t(16, 128, 128, 1, 4, 4), _t(16, 64, 128, 1, 4, 5),
        _t(16, 256, 64, 1, 8, 3), _t(64, 128, 32, 8, 4, 5),
    ],
    "ada": [
        _t(128, 128, 64, 8, 4, 3), _t(64, 128, 64, 8, 4, 4), _t(128, 64, 64, 8, 4, 4),
        _t(64, 64, 64, 8, 4, 4), _t(32, 128, 64, 4, 4, 4), _t(16, 128, 128, 1, 4, 3),
        _t(16, 64, 128, 1, 4, 4), _t(64, 128, 32, 8, 4, 5),
    ],
    "ampere": [
        _t(128, 256, 64, 8, 8, 3), _t(128, 128, 64, 8, 4, 3), _t(64, 128, 64, 8, 4, 4),
        _t(128, 64, 64, 8, 4, 4), _t(64, 64, 64, 8, 4, 4), _t(32, 128, 64, 4, 4, 4),
        _t(16, 128, 128, 1, 4, 3), _t(16, 64, 128, 1, 4, 4), _t(64, 128, 32, 8, 4, 5),
    ],
}
_TABLES = {"w4a16": _W4A16, "w8a8": _EIGHT_BIT, "fp8": _EIGHT_BIT, "w4a8": _INT4_INT, "w4a4": _INT4_INT}

#: interpreter tiles (BLOCK_K is further capped by the group size)
INTERPRETER_TILES = {
    "w4a16": Tile(64, 64, 64, 8),
    "w8a8": Tile(64, 64, 64, 8),
    "w4a8": Tile(64, 64, 64, 8),
    "w4a4": Tile(64, 64, 64, 8),
    "fp8": Tile(64, 64, 64, 8),
}


def gpu_family(device: torch.device | int | None = None) -> str:
    """'hopper' (sm_90+), 'ada' (sm_89), 'ampere' (sm_80/86/87) or 'older' (no int8/bf16 MMA path)."""
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 9:
        return "hopper"
    if (major, minor) == (8, 9):
        return "ada"
    if major == 8:
        return "ampere"
    return "older"


def m_bucket(m: int) -> int:
    """Power-of-two bucket of M used as autotune key (shapes in one bucket share a tile)."""
    return min(triton.next_power_of_2(max(int(m), 1)), 16384)


def shape_ok(tile: Tile, kind: str, m: int, n: int, k: int, group_size: int | None) -> bool:
    """Whether ``tile`` is worth trying for an [m, k] x [k, n] GEMM of ``kind``."""
    if kind in GROUPED_KINDS and group_size is not None and group_size % tile.block_k:
        return False
    if tile.block_k > max(triton.next_power_of_2(k), 32):
        return False
    mb = triton.next_power_of_2(max(m, 16))
    if tile.block_m > max(mb, 16):
        return False
    if m >= 512 and tile.block_m < 64:  # big M: small row tiles only re-read the weights
        return False
    return tile.block_n <= max(triton.next_power_of_2(n), 32)


def candidate_tiles(kind: str, family: str, m: int, n: int, k: int, group_size: int | None) -> list[Tile]:
    """Tiles for ``kind`` on ``family`` that fit the shape (never empty: falls back to the smallest)."""
    table = _TABLES[kind].get(family, _TABLES[kind]["ampere"])
    keep = [t for t in table if shape_ok(t, kind, m, n, k, group_size)]
    if keep:
        return keep
    bk = 32 if group_size is None else max(d for d in (16, 32, 64, 128) if group_size % d == 0)
    return [Tile(16, 64, bk, 1, 4, 3)]


def _prune(kind: str, family: str) -> Callable[..., list[triton.Config]]:
    def prune(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
        args = {**named_args, **kwargs}
        tiles = candidate_tiles(kind, family, int(args["M"]), int(args["N"]), int(args["K"]), args.get("G"))
        return [t.to_config() for t in tiles]

    return prune


_TUNED: dict[tuple[int, str, str], Any] = {}


def _autotuned(kernel: Any, kind: str, family: str) -> Any:
    key = (id(kernel), kind, family)
    if key not in _TUNED:
        table = _TABLES[kind].get(family, _TABLES[kind]["ampere"])
        configs = [t.to_config() for t in table]
        if os.environ.get("DIFFQ_KERNEL_NO_AUTOTUNE") == "1":
            _TUNED[key] = None  # resolved per call by the prune rule
        else:
            _TUNED[key] = triton.autotune(
                configs=configs,
                key=["M_BUCKET", "N", "K", "G"],
                prune_configs_by={"early_config_prune": _prune(kind, family)},
            )(kernel)
    return _TUNED[key]


def is_interpreted(kernel: Any) -> bool:
    """True when ``kernel`` was decorated under ``TRITON_INTERPRET=1`` (runs in numpy on the CPU)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def launch(kernel: Any, kind: str, **args: Any) -> None:
    """Run a GEMM ``kernel`` of ``kind`` with tuned tiles (CUDA) or interpreter tiles, one program
    per (BLOCK_M x BLOCK_N) output tile on a 1-D grid (the kernels swizzle it with ``tile_ids``).

    ``args`` must hold every kernel argument by name, including ``M``, ``N``, ``K``, ``G``
    (group size, 0 when the kernel has none) and ``M_BUCKET``.
    """
    m, n = int(args["M"]), int(args["N"])

    def grid(meta: dict[str, Any]) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    if is_interpreted(kernel):
        tile = INTERPRETER_TILES[kind]
        g = args.get("G") or 0
        bk = tile.block_k
        if kind in GROUPED_KINDS and g:
            bk = max(d for d in (16, 32, 64) if d <= bk and g % d == 0)
        meta = {**tile.meta(), "BLOCK_K": bk}
        kernel[grid](**args, **meta)
        return
    family = gpu_family(args["x_ptr"].device if "x_ptr" in args else None)
    tuned = _autotuned(kernel, kind, family)
    if tuned is None:
        tile = candidate_tiles(kind, family, int(args["M"]), int(args["N"]), int(args["K"]), args.get("G"))[0]
        kernel[grid](**args, **tile.meta(), num_warps=tile.num_warps, num_stages=tile.num_stages)
        return
    tuned[grid](**args)
