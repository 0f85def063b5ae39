"""Small ``@triton.jit`` building blocks shared by every kernel in this package.

They are written once so that the int4 nibble layout, the rounding rule and the FP8 grid are
defined in exactly one place on the Triton side (the torch side is :mod:`diffq.formats`).
Everything here works both compiled on CUDA and under ``TRITON_INTERPRET=1`` (numpy), which
is why rounding and FP8 conversion avoid ``libdevice`` (not available in the interpreter) and
the interpreter's fp32->fp8 cast (it does not round to nearest-even).
"""

from __future__ import annotations

import triton
import triton.language as tl

from diffq.formats import SCALE_MIN as _SCALE_MIN

#: smallest activation scale (fp32): the core's ``diffq.formats.SCALE_MIN``
SCALE_MIN = tl.constexpr(_SCALE_MIN)
#: 1.5 * 2^23: adding and subtracting it rounds an fp32 |v| < 2^22 to an integer, ties to even
_RNE_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def round_half_even(v):
    """fp32 -> fp32 integral value, ties to even (= torch.round), valid for |v| < 2^22.

    Callers clamp to [-qmax, qmax] first (clamp and round commute for integer qmax), so the
    precondition always holds. IEEE add/sub in round-to-nearest mode does the rounding; no
    fast-math reassociation is enabled in Triton, so the two adds are not folded away.
    """
    return (v + _RNE_MAGIC) - _RNE_MAGIC


@triton.jit
def unpack_int4(p):
    """uint8 ``[R, C]`` (two signed nibbles per byte) -> int8 ``[R, 2C]``.

    Byte j holds element 2j in its low nibble and 2j+1 in its high nibble (see
    ``diffq.formats.packing``); ``(v ^ 8) - 8`` sign-extends a 4-bit two's-complement value.
    """
    p = p.to(tl.int32)
    lo = ((p & 0xF) ^ 8) - 8
    hi = (((p >> 4) & 0xF) ^ 8) - 8
    return tl.interleave(lo, hi).to(tl.int8)


@triton.jit
def pack_int4(c, ROWS: tl.constexpr, COLS: tl.constexpr):
    """int32 codes ``[ROWS, COLS]`` in [-8, 7] -> uint8 ``[ROWS, COLS // 2]`` (inverse of unpack)."""
    pairs = tl.reshape(c, [ROWS, COLS // 2, 2])
    lo, hi = tl.split(pairs)
    return ((lo & 0xF) | ((hi & 0xF) << 4)).to(tl.uint8)


@triton.jit
def e4m3_grid(v):
    """fp32 ``v`` with |v| <= 448 -> the nearest E4M3 value (ties to even), still as fp32.

    The spacing of E4M3 numbers in the binade of v is 2^(e-3) (3 mantissa bits), and 2^-9 for
    subnormals (e < -6). Scaling by a power of two is exact, so rounding v / 2^(e-3) to an
    integer and scaling back is exactly round-to-nearest-even onto the E4M3 grid; the result
    then converts to ``tl.float8e4nv`` without further rounding on any backend.
    """
    bits = v.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127
    e = tl.maximum(e, -6)
    inv_step = ((3 - e + 127) << 23).to(tl.float32, bitcast=True)
    step = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
    return round_half_even(v * inv_step) * step


@triton.jit
def round_to_bf16(v):
    """fp32 -> the nearest bfloat16 value (ties to even), still as fp32.

    Done on the bits so that the final cast is exact everywhere: compiled Triton rounds
    fp32 -> bf16 to nearest-even, but the interpreter truncates, which would make the CPU
    tests disagree with torch by one bf16 ulp. Finite inputs only (NaN may turn into Inf).
    """
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def to_output(v, dtype: tl.constexpr):
    """fp32 accumulator -> ``dtype`` (fp16/bf16/fp32), rounding to nearest-even on every backend."""
    if dtype == tl.bfloat16:
        v = round_to_bf16(v)
    return v.to(dtype)


@triton.jit
def tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (pid_m, pid_n), grouping GROUP_M row tiles so that weight tiles stay in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    group_id = pid // width
    first_m = group_id * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def contiguous_range(BLOCK: tl.constexpr):
    """``tl.arange(0, BLOCK)`` with the contiguity and alignment hints that let loads vectorise."""
    return tl.max_contiguous(tl.multiple_of(tl.arange(0, BLOCK), BLOCK), BLOCK)


@triton.jit
def wrapped_rows_cols(pid_m, pid_n, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row [BLOCK_M] and column [BLOCK_N] indices of a tile, wrapped modulo M and N so that edge
    tiles read valid memory; their extra rows and columns are masked in :func:`store_tile`."""
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    return rm, rn


@triton.jit
def store_tile(
    y_ptr, acc, b_ptr, rn, pid_m, pid_n, M, N, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The epilogue of every GEMM here: fp32 ``acc`` [BLOCK_M, BLOCK_N] (+ ``bias[rn]``) -> the
    tile's rows and columns of y [M, N] in y's dtype; rows >= M and columns >= N are masked."""
    if HAS_BIAS:
        acc = acc + tl.load(b_ptr + rn).to(tl.float32)[None, :]
    om = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    on = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (om[:, None] < M) & (on[None, :] < N)
    out = to_output(acc, y_ptr.dtype.element_ty)
    tl.store(y_ptr + om.to(tl.int64)[:, None] * stride_ym + on[None, :], out, mask=mask)
