"""Small ``@triton.jit`` building blocks shared by every kernel in this package.

They are written once so that the int4 nibble layout, the rounding rule and the FP8 grid are
defined in exactly one place on the Triton side (the torch side is :mod:`diffq.formats`).
Everything here works both compiled on CUDA and under ``TRITON_INTERPRET=1`` (numpy), which
is why rounding and FP8 conversion avoid ``libdevice`` (not available in the interpreter) and
the interpreter's fp32->fp8 cast (it does not round to nearest-even).

Nibble decoders (``ASM`` constexpr): the GEMMs read int4 weights in the *split-half* layout of
:mod:`diffq.kernels.repack` (byte j of every 32-byte block holds element j of the 64-element
block in its low nibble and element 32 + j in its high nibble), so the low and the high nibbles
of a loaded ``[R, 32]`` byte tile are two ``[R, 32]`` operand tiles, each an elementwise
function of the bytes: no interleave, no layout change. Compiled, the decoders are a few PTX
instructions per 32-bit register (4 bytes = 8 nibbles), written with ``inline_asm_elementwise``
because LLVM would otherwise split byte shifts into per-byte operations; under the interpreter
(which has no inline assembly) the same values come from plain Triton integer ops.
:data:`ASM_SNIPPETS` holds the PTX so that the tests can execute it with a small emulator.
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


# ----------------------------------------------------------------------------- int4 decoders

#: PTX of the nibble decoders (one 32-bit input register = 4 packed bytes), checked on the CPU by
#: tests/test_kernel_compile.py with a PTX emulator against the pure-Triton formulas below
ASM_SNIPPETS = {
    # low nibbles -> int8 16*v (the x16 is exact and folded into a scale): (b << 4) & 0xF0
    "lo16": "{ .reg .b32 t; shl.b32 t, $1, 4; and.b32 $0, t, 0xF0F0F0F0; }",
    # sign-magnitude byte [s_lo m_hi s_hi m_lo] -> E4M3 byte of the high code * 2^-9 (a subnormal):
    # magnitude (b >> 4) & 7, sign (b << 4) & 0x80
    "hi_e4m3": (
        "{ .reg .b32 t, u; shr.b32 t, $1, 4; and.b32 t, t, 0x07070707; shl.b32 u, $1, 4; "
        "and.b32 u, u, 0x80808080; or.b32 $0, t, u; }"
    ),
    # both nibbles -> bf16 v: (128 + (t ^ 8)) - 136 via the 0x4300 magic exponent, 2 values per op
    "bf16": (
        "{ .reg .b32 a, b, c, d, one, off; mov.b32 one, 0x3F803F80; mov.b32 off, 0xC308C308; "
        "prmt.b32 a, $4, 0, 0x4140; prmt.b32 b, $4, 0, 0x4342; "
        "shr.b32 c, a, 4; shr.b32 d, b, 4; "
        "lop3.b32 a, a, 0x000F000F, 0x43084308, 0x6a; lop3.b32 b, b, 0x000F000F, 0x43084308, 0x6a; "
        "lop3.b32 c, c, 0x000F000F, 0x43084308, 0x6a; lop3.b32 d, d, 0x000F000F, 0x43084308, 0x6a; "
        "fma.rn.bf16x2 $0, a, one, off; fma.rn.bf16x2 $1, b, one, off; "
        "fma.rn.bf16x2 $2, c, one, off; fma.rn.bf16x2 $3, d, one, off; }"
    ),
    # both nibbles -> fp16 v: (1024 + (t ^ 8)) - 1032 via the 0x6400 magic exponent
    "f16": (
        "{ .reg .b32 a, b, c, d, one, off; mov.b32 one, 0x3C003C00; mov.b32 off, 0xE408E408; "
        "prmt.b32 a, $4, 0, 0x4140; prmt.b32 b, $4, 0, 0x4342; "
        "shr.b32 c, a, 4; shr.b32 d, b, 4; "
        "lop3.b32 a, a, 0x000F000F, 0x64086408, 0x6a; lop3.b32 b, b, 0x000F000F, 0x64086408, 0x6a; "
        "lop3.b32 c, c, 0x000F000F, 0x64086408, 0x6a; lop3.b32 d, d, 0x000F000F, 0x64086408, 0x6a; "
        "fma.rn.f16x2 $0, a, one, off; fma.rn.f16x2 $1, b, one, off; "
        "fma.rn.f16x2 $2, c, one, off; fma.rn.f16x2 $3, d, one, off; }"
    ),
}
_ASM_LO16 = tl.constexpr(ASM_SNIPPETS["lo16"])
_ASM_HI_E4M3 = tl.constexpr(ASM_SNIPPETS["hi_e4m3"])
_ASM_BF16 = tl.constexpr(ASM_SNIPPETS["bf16"])
_ASM_F16 = tl.constexpr(ASM_SNIPPETS["f16"])


@triton.jit
def nib_int8x16(p, ASM: tl.constexpr):
    """uint8 ``[R, C]`` split-half bytes -> (lo, hi) int8 ``[R, C]`` holding 16 * code (exact:
    |16 * code| <= 128 fits int8 for codes in [-8, 7]; the factor 16 goes into a scale)."""
    if ASM:
        lo = tl.inline_asm_elementwise(_ASM_LO16, "=r,r", [p], dtype=tl.int8, is_pure=True, pack=4)
    else:
        lo = (p << 4).to(tl.int8, bitcast=True)
    hi = (p & 0xF0).to(tl.int8, bitcast=True)
    return lo, hi


@triton.jit
def nib_e4m3(p, ASM: tl.constexpr):
    """uint8 ``[R, C]`` sign-magnitude split-half bytes (bit 7 sign and bits 0-2 magnitude of the
    low element, bit 3 sign and bits 4-6 magnitude of the high one; codes in [-7, 7]) -> (lo, hi)
    float8e4nv ``[R, C]`` holding code * 2^-9 exactly (E4M3 bytes with exponent 0 are m * 2^-9,
    so the low element is one mask: ``b & 0x87``)."""
    lo = (p & 0x87).to(tl.float8e4nv, bitcast=True)
    if ASM:
        hi = tl.inline_asm_elementwise(_ASM_HI_E4M3, "=r,r", [p], dtype=tl.uint8, is_pure=True, pack=4)
    else:
        hi = ((p >> 4) & 0x07) | ((p << 4) & 0x80)
    return lo, hi.to(tl.float8e4nv, bitcast=True)


@triton.jit
def nib_float(p, dtype: tl.constexpr, ASM: tl.constexpr):
    """uint8 ``[R, C]`` split-half bytes -> (lo, hi) ``[R, C]`` codes as exact ``dtype`` values
    (bf16 / fp16 / fp32). Compiled bf16/fp16: magic-exponent conversion, 4 values per LOP3+FMA
    pair, no int->float conversion instruction."""
    if ASM and (dtype == tl.bfloat16 or dtype == tl.float16):
        if dtype == tl.bfloat16:
            lo, hi = tl.inline_asm_elementwise(
                _ASM_BF16, "=r,=r,=r,=r,r", [p], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4
            )
        else:
            lo, hi = tl.inline_asm_elementwise(
                _ASM_F16, "=r,=r,=r,=r,r", [p], dtype=(tl.float16, tl.float16), is_pure=True, pack=4
            )
    else:
        q = p.to(tl.int32)
        lo = (((q & 0xF) ^ 8) - 8).to(dtype)
        hi = ((((q >> 4) & 0xF) ^ 8) - 8).to(dtype)
    return lo, hi


@triton.jit
def int_to_f32(v, MAGIC: tl.constexpr):
    """int32 -> fp32, exact for |v| < 2^22. MAGIC: through the 1.5 * 2^23 exponent trick (an
    integer add and a float add, full-rate pipes; sm_80's I2F is quarter-rate), else ``cvt``
    (``I2FP`` on sm_90)."""
    if MAGIC:
        out = (v + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
    else:
        out = v.to(tl.float32)
    return out


@triton.jit
def store_tile_t(
    y_ptr, acc_t, b_ptr, rn, pid_m, pid_n, M, N, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Epilogue of the swapped-operand GEMMs: fp32 ``acc_t`` [BLOCK_N, BLOCK_M] holds y^T of the
    tile (rows = output columns n, columns = tokens m); (+ ``bias[rn]``) -> y [M, N], masked."""
    if HAS_BIAS:
        acc_t = acc_t + tl.load(b_ptr + rn).to(tl.float32)[:, None]
    om = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    on = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (on[:, None] < N) & (om[None, :] < M)
    out = to_output(acc_t, y_ptr.dtype.element_ty)
    tl.store(y_ptr + om.to(tl.int64)[None, :] * stride_ym + on[:, None], out, mask=mask)
