"""Kernels: Triton (under TRITON_INTERPRET=1 on the CPU) vs the torch reference, the reference vs a
dequantize-then-matmul oracle built from diffq.formats, conv via im2col vs F.conv2d, module wiring
(plans built once, no per-call validation), routes, repacking, shape errors, tile tables. CUDA-only
checks are marked ``cuda``: ``pytest -m cuda`` compiles the kernels (conftest sets
TRITON_INTERPRET=0) and they assert that they ran compiled; otherwise they skip.

Tolerances (stated, and why):
* integer kernels (w8a8, w4a8, w4a4 without low-rank) and the activation quantizers: bit-exact,
  because int32 sums are exact and the fp32 epilogue multiplies in the same order as the reference;
  outputs in fp16/bf16 are exact too (the kernels round to nearest-even explicitly);
* fp32 dot products whose summation order differs (w4a16's fp32 matmul, FP8's fp32 accumulation,
  the low-rank branch): |diff| <= 1e-5 * max|y| (+1 ulp of the output dtype when it is 16-bit);
* W4A4 on both routes (int8 and FP8 MMA) is bit-exact without the low-rank branch;
* reference vs oracle (different but equivalent fp32 formulas): |diff| <= 1e-5 * max|y|.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

import diffq.kernels as K
from diffq.errors import DiffqError, ShapeError
from diffq.formats import QuantSpec, dequantize, fake_quantize, pack_int4, quantize
from diffq.kernels import autotune, conv, layer_dispatch
from diffq.kernels import reference as ref
from diffq.modules import ActQuantizer, QuantConv2d, QuantLinear, conv_weight_rows

cuda = pytest.mark.cuda
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ULP = {torch.float32: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    """|a - b| <= rel * max|b| + one ulp of b's dtype at b's magnitude."""
    assert a.shape == b.shape and a.dtype == b.dtype
    a, bf = a.float(), b.float()
    scale = bf.abs().max().clamp_min(1e-12)
    tol = rel * scale + ULP[b.dtype] * bf.abs()
    err = (a - bf).abs()
    assert bool((err <= tol + 1e-12).all()), f"max err {float(err.max()):.3g} vs max|y| {float(scale):.3g}"


def _int4_weight(n: int, k: int, g: int, dtype=torch.float16, lo: int = -8):
    """Random int4 weight (codes in [lo, 7]: -8 is valid two's complement, the core's symmetric
    format uses [-7, 7])."""
    codes = torch.randint(lo, 8, (n, k), dtype=torch.int8)
    return codes, pack_int4(codes), (torch.rand(n, k // g) * 0.05 + 0.01).to(dtype)


def _x(shape, dtype):
    return torch.randn(*shape).to(dtype)


# ------------------------------------------------------------------ Triton vs reference (interpreter)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,g", [(128, 64), (192, 64), (256, 128)], ids=["g64", "g64-odd-groups", "g128"])
def test_w4a16_triton_matches_reference(dtype, k, g):
    x = _x((2, 19, k), dtype)  # M = 38: partial row tile; K = 192: 3 groups (a zero padding group)
    _, qw, ws = _int4_weight(40, k, g)  # N = 40: partial column tile
    bias = torch.randn(40).to(dtype)
    y_t = K.w4a16_linear(x, qw, ws, g, bias, backend="triton")
    y_r = K.w4a16_linear(x, qw, ws, g, bias, backend="reference")
    assert y_t.shape == (2, 19, 40)
    _close(y_t, y_r)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_w8a8_triton_bit_exact(dtype, static):
    x = _x((37, 96), dtype)  # K = 96: not a multiple of BLOCK_K, exercises the K mask
    w = torch.randint(-127, 128, (24, 96), dtype=torch.int8)
    ws = torch.rand(24, 1) * 0.01
    smooth = torch.rand(96) + 0.5
    act = torch.tensor(0.02) if static else None
    args = {"act_scale": act, "smooth": smooth}
    b = torch.randn(24).to(dtype)
    y_t = K.w8a8_linear(x, w, ws, b, backend="triton", **args)
    y_r = K.w8a8_linear(x, w, ws, b, backend="reference", **args)
    assert torch.equal(y_t, y_r)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,g", [(128, 64), (320, 64), (256, 128)], ids=["g64", "g64-odd-groups", "g128"])
def test_w4a8_triton_bit_exact(dtype, k, g):
    x = _x((33, k), dtype)
    _, qw, ws = _int4_weight(48, k, g)
    smooth = torch.rand(k) + 0.5
    b = torch.randn(48).to(dtype)
    y_t = K.w4a8_linear(x, qw, ws, g, b, smooth=smooth, backend="triton")
    y_r = K.w4a8_linear(x, qw, ws, g, b, smooth=smooth, backend="reference")
    assert torch.equal(y_t, y_r)


def test_w4a8_static_scale_bit_exact():
    x = _x((21, 128), torch.bfloat16)
    _, qw, ws = _int4_weight(40, 128, 64)
    act = torch.tensor(0.03)
    y_t = K.w4a8_linear(x, qw, ws, 64, act_scale=act, backend="triton")
    y_r = K.w4a8_linear(x, qw, ws, 64, act_scale=act, backend="reference")
    assert torch.equal(y_t, y_r)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("k", [300, 700], ids=["one-pass", "two-pass"])
def test_per_token_quantizer_bit_exact(fmt, static, k):
    x = _x((21, k), torch.float32) * 3  # ragged last block; the interpreter keeps rows <= 512 in one pass
    x[3] = 0.0  # all-zero row: scale clamps at 2^-32, codes 0
    smooth = torch.rand(k) + 0.5
    act = torch.tensor(0.05) if static else None
    q_t, s_t = K.quantize_act_per_token(x, fmt=fmt, smooth=smooth, act_scale=act, backend="triton")
    q_r, s_r = K.quantize_act_per_token(x, fmt=fmt, smooth=smooth, act_scale=act, backend="reference")
    assert torch.equal(s_t, s_r)
    assert torch.equal(q_t.view(torch.uint8), q_r.view(torch.uint8))


@pytest.mark.parametrize("static", [None, "scalar", "group"])
def test_lowrank_input_stage_matches(static):
    x = _x((45, 128), torch.bfloat16)
    lr_down = (torch.randn(128, 8) * 0.1).to(torch.bfloat16)
    smooth = torch.rand(128) + 0.5
    act = {None: None, "scalar": torch.tensor(0.3), "group": torch.tensor([0.2, 0.4])}[static]
    out_t = K.quantize_act_lowrank(x, 64, lr_down=lr_down, smooth=smooth, act_scale=act, backend="triton")
    out_r = K.quantize_act_lowrank(x, 64, lr_down=lr_down, smooth=smooth, act_scale=act, backend="reference")
    assert torch.equal(out_t[0], out_r[0])  # packed codes
    assert torch.equal(out_t[1], out_r[1])  # group scales
    _close(out_t[2], out_r[2])  # down-projection: fp32 dot, order differs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rank", [0, 8], ids=["no-lr", "lr8"])
@pytest.mark.parametrize("route", ["int8", "fp8"])
@pytest.mark.parametrize("k", [128, 192], ids=["even", "odd-groups"])
def test_w4a4_lowrank_triton_matches(dtype, rank, route, k):
    x = _x((3, 13, k), dtype)
    _, qw, ws = _int4_weight(72, k, 64, lo=-7)
    bias = torch.randn(72).to(dtype)
    lr = {}
    if rank:
        lr = {"lr_down": (torch.randn(k, rank) * 0.1).to(dtype), "lr_up": (torch.randn(rank, 72) * 0.1).to(dtype)}
    smooth = torch.rand(k) + 0.5
    y_t = K.w4a4_linear(x, qw, ws, 64, bias, smooth=smooth, backend="triton", route=route, **lr)
    y_r = K.w4a4_linear(x, qw, ws, 64, bias, smooth=smooth, backend="reference", **lr)
    if rank == 0:
        assert torch.equal(y_t, y_r)
    else:
        _close(y_t, y_r)


def test_w4a4_codes_outside_the_format_take_the_int8_route():
    """A -8 code has no sign-magnitude nibble: the FP8 route is refused at plan build (once) and
    the int8 route computes it exactly."""
    x = _x((9, 128), torch.float32)
    codes, qw, ws = _int4_weight(24, 128, 64)
    codes[0, 0] = -8
    qw = pack_int4(codes)
    plan = K.plan_for("w4a4", qw, ws, 64, route="fp8", codes_in_range=None)
    assert plan.route == "int8-mma"
    y_t = K.w4a4_linear(x, qw, ws, 64, backend="triton", route="fp8")
    assert torch.equal(y_t, K.w4a4_linear(x, qw, ws, 64, backend="reference"))


def test_w4a4_gemm_entry_point_matches():
    x = _x((17, 128), torch.bfloat16)
    _, qw, ws = _int4_weight(40, 128, 64)
    lr_down, lr_up = torch.randn(128, 8) * 0.1, torch.randn(8, 40) * 0.1
    xq, xs, down = K.quantize_act_lowrank(x, 64, lr_down=lr_down, backend="reference")
    y_t = K.w4a4_gemm(xq, xs, qw, ws, 64, out_dtype=torch.bfloat16, down=down, lr_up=lr_up, backend="triton")
    y_r = K.w4a4_gemm(xq, xs, qw, ws, 64, out_dtype=torch.bfloat16, down=down, lr_up=lr_up, backend="reference")
    _close(y_t, y_r)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fp8_triton_matches_reference(dtype):
    x = _x((29, 160), dtype)
    w = (torch.randn(36, 160) * 60).clamp(-448, 448).to(torch.float8_e4m3fn)
    ws = torch.rand(36, 1) * 0.01
    y_t = K.fp8_linear(x, w, ws, torch.ones(36).to(dtype), backend="triton")
    y_r = K.fp8_linear(x, w, ws, torch.ones(36).to(dtype), backend="reference")
    _close(y_t, y_r)


def test_empty_batch_gives_empty_output():
    _, qw, ws = _int4_weight(16, 64, 64)
    y = K.w4a4_linear(torch.zeros(0, 64), qw, ws, 64, backend="triton")
    assert y.shape == (0, 16)
    assert K.w4a16_linear(torch.zeros(0, 64), qw, ws, 64, backend="triton").shape == (0, 16)


# ------------------------------------------------------------------ reference vs format oracle


def _oracle(x, wq, aspec, bias=None, lr=None, smooth=None):
    """Dequantize-then-matmul in fp32 with diffq.formats: Q_a(x / s) @ deq(W)^T + ((x/s) L1) L2 + b."""
    xs = x if smooth is None else x / smooth
    xa = xs if aspec is None else fake_quantize(xs, aspec)
    y = xa @ dequantize(wq).t()
    if lr is not None:
        y = y + (xs @ lr[0]) @ lr[1]
    return y if bias is None else y + bias


def test_references_match_format_oracle():
    torch.manual_seed(3)
    x = torch.randn(17, 128)
    w = torch.randn(40, 128)
    b = torch.randn(40)
    s = torch.rand(128) + 0.5
    g64 = QuantSpec("int4", "group", 64, "fp16")
    q4 = quantize(w, g64)
    q8 = quantize(w, QuantSpec("int8", "channel"))
    qf = quantize(w, QuantSpec("fp8_e4m3", "channel"))
    lr = (torch.randn(128, 4) * 0.1, torch.randn(4, 40) * 0.1)
    p4 = pack_int4(q4.codes)
    cases = {
        "w4a16": (K.w4a16_linear(x, p4, q4.scale_stored, 64, b, backend="reference"), _oracle(x, q4, None, b)),
        "w8a8": (
            K.w8a8_linear(x, q8.codes, q8.scale, b, smooth=s, backend="reference"),
            _oracle(x, q8, QuantSpec("int8", "token"), b, smooth=s),
        ),
        "w4a8": (
            K.w4a8_linear(x, p4, q4.scale_stored, 64, b, backend="reference"),
            _oracle(x, q4, QuantSpec("int8", "token"), b),
        ),
        "w4a4": (
            K.w4a4_linear(x, p4, q4.scale_stored, 64, b, lr_down=lr[0], lr_up=lr[1], smooth=s, backend="reference"),
            _oracle(x, q4, QuantSpec("int4", "group", 64), b, lr, s),
        ),
        "fp8": (
            K.fp8_linear(x, qf.codes, qf.scale, b, backend="reference"),
            _oracle(x, qf, QuantSpec("fp8_e4m3", "token"), b),
        ),
    }
    for name, (got, want) in cases.items():
        err = float((got - want).abs().max() / want.abs().max())
        assert err <= 1e-5, f"{name}: rel err {err:.2e}"


def test_static_scale_matches_core_rule():
    """act_scale = amax / qmax reproduces the core's static fake-quantization exactly."""
    x = torch.randn(9, 64) * 4
    amax = torch.tensor(3.0)
    codes, scale = ref.quantize_act_int(x, 8, None, act_scale=amax / 127)
    fq = fake_quantize(x, QuantSpec("int8", "tensor"), amax=amax)
    assert torch.equal(codes.float() * scale, fq)


# ------------------------------------------------------------------ convolutions


@pytest.mark.parametrize(
    "k,stride,pad,dil", [(3, 1, 1, 1), (3, 2, 1, 1), (3, 1, 2, 2), (1, 2, 0, 1), (3, 1, "same", 1), (2, 1, 0, 1)]
)
def test_conv_via_gemm_matches_conv2d(k, stride, pad, dil):
    x = torch.randn(2, 8, 9, 7)
    w = torch.randn(12, 8, k, k)
    b = torch.randn(12)
    rows = conv_weight_rows(w)
    y = K.conv2d_via_gemm(x, lambda a: a @ rows.t() + b, kernel_size=k, stride=stride, padding=pad, dilation=dil)
    want = F.conv2d(x, w, b, stride, pad, dil)
    assert y.shape == want.shape
    assert float((y - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_conv_w4a16_triton_matches_dequantized_conv():
    torch.manual_seed(1)
    x = torch.randn(1, 64, 5, 6)
    w = torch.randn(16, 64, 3, 3)
    q = quantize(conv_weight_rows(w), QuantSpec("int4", "group", 64, "fp16"))
    y = K.conv2d_via_gemm(
        x, lambda a: K.w4a16_linear(a, pack_int4(q.codes), q.scale_stored, 64, backend="triton"),
        kernel_size=3, padding=1,
    )  # fmt: skip
    wd = dequantize(q).reshape(16, 3, 3, 64).permute(0, 3, 1, 2)
    want = F.conv2d(x, wd, None, 1, 1)
    assert float((y - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_expand_channel_vector_matches_im2col_columns():
    x = torch.rand(1, 3, 4, 4) + 1
    s = torch.tensor([1.0, 2.0, 4.0])
    a = conv.im2col_nhwc(x, 3, padding=1) / conv.expand_channel_vector(s, 3)
    bexp = conv.im2col_nhwc(x / s.view(1, 3, 1, 1), 3, padding=1)
    assert torch.equal(a, bexp)


# ------------------------------------------------------------------ module wiring


def _module(kind: str, *, rank: int = 0, conv_k: int | None = None, static: bool = False):
    torch.manual_seed(2)
    cin, n = 64, 32
    k = cin * (conv_k or 1) ** 2
    w = torch.randn(n, k)
    wspec = {
        "w4a16": QuantSpec("int4", "group", 64, "fp16"),
        "w8a8": QuantSpec("int8", "channel"),
        "w4a8": QuantSpec("int4", "group", 64, "fp16"),
        "w4a4": QuantSpec("int4", "group", 64, "fp16"),
        "fp8": QuantSpec("fp8_e4m3", "channel"),
    }[kind]
    aspec = {
        "w4a16": None,
        "w8a8": QuantSpec("int8", "tensor" if static else "token"),
        "w4a8": QuantSpec("int8", "token"),
        "w4a4": QuantSpec("int4", "group", 64),
        "fp8": QuantSpec("fp8_e4m3", "token"),
    }[kind]
    act = None
    if aspec is not None:
        act = ActQuantizer(aspec, amax=torch.tensor([[2.5]]) if static else None)
    common = {"bias": torch.randn(n), "act": act, "smooth": torch.rand(cin if conv_k else k) + 0.5}
    if rank:
        common.update(lr_down=torch.randn(k, rank) * 0.1, lr_up=torch.randn(rank, n) * 0.1)
    q = quantize(w, wspec)
    if conv_k:
        return QuantConv2d(q, in_channels=cin, kernel_size=(conv_k, conv_k), stride=(1, 1), padding=(conv_k // 2,) * 2,
                           dilation=(1, 1), **common)  # fmt: skip
    return QuantLinear(q, **common)


@pytest.mark.parametrize(
    "kind,rank,static",
    [("w4a16", 0, False), ("w4a16", 4, False), ("w8a8", 0, False), ("w8a8", 0, True), ("w4a8", 0, False),
     ("w4a4", 8, False), ("fp8", 0, False)],
)  # fmt: skip
def test_fused_linear_matches_module_reference(kind, rank, static):
    m = _module(kind, rank=rank, static=static)
    assert layer_dispatch.kernel_kind(m) == kind
    x = torch.randn(2, 11, 64)
    want = m(x)  # CPU: torch reference path
    assert layer_dispatch.module_kernel(m, x) is None
    fn = layer_dispatch.fused_forward(m, backend="triton")
    assert fn is not None
    got = fn(m, x)
    # same quantization, int vs dequantized-fp32 sums: equal up to fp32 summation order
    assert float((got - want).abs().max()) <= 2e-5 * float(want.abs().max())


@pytest.mark.parametrize("kind,rank", [("w4a8", 0), ("w4a8", 4), ("w4a4", 8)])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_fused_centred_linear_matches_module_reference(kind, rank, backend):
    """act_center on the kernel path: kernel(x - c') plus the means through the W4A16 kernel equals
    the module's (Q(x_s - c) + c) · Wqᵀ; inputs with large per-sample channel offsets, where centring
    changes the result (checked against the uncentred layer), and 2-D inputs (not centred)."""
    m = _module(kind, rank=rank)
    m.act.center = True
    assert layer_dispatch.kernel_kind(m) == kind
    torch.manual_seed(3)
    x = torch.randn(3, 11, 64) + 4 * torch.randn(3, 1, 64)  # per-sample channel offsets
    fn = layer_dispatch.fused_forward(m, backend=backend)
    want = m(x)
    got = fn(m, x)
    assert float((got - want).abs().max()) <= 2e-5 * float(want.abs().max())
    m.act.center = False
    uncentred = m(x)
    assert float((uncentred - want).abs().max()) > 2e-3 * float(want.abs().max())
    m.act.center = True
    x2 = x[0]
    assert float((fn(m, x2) - m(x2)).abs().max()) <= 2e-5 * float(m(x2).abs().max())


@pytest.mark.parametrize("kind,k", [("w4a4", 3), ("w8a8", 1), ("w4a16", 3)])
def test_fused_conv_matches_module_reference(kind, k):
    m = _module(kind, conv_k=k, rank=4 if kind == "w4a4" else 0)
    x = torch.randn(1, 64, 5, 4)
    want = m(x)
    fn = layer_dispatch.fused_forward(m, backend="triton")
    got = fn(m, x)
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= 2e-5 * float(want.abs().max())


def test_fused_weight_only_strided_conv_with_branch_matches_module_reference():
    """What ``w4a4-svd`` gives SD1.5's / SDXL's resample convs: int4 g64 weights with a low-rank branch,
    16-bit activations, no smoothing, stride 2 (the downsamplers): the W4A16 kernel through im2col."""
    torch.manual_seed(3)
    cin, n = 64, 32
    q = quantize(torch.randn(n, cin * 9), QuantSpec("int4", "group", 64, "fp16"))
    m = QuantConv2d(q, in_channels=cin, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1),
                    bias=torch.randn(n), act=None, smooth=None, lr_down=torch.randn(cin * 9, 4) * 0.1,
                    lr_up=torch.randn(4, n) * 0.1)
    assert layer_dispatch.kernel_kind(m) == "w4a16"
    x = torch.randn(1, cin, 9, 8)
    want = m(x)
    got = layer_dispatch.fused_forward(m, backend="triton")(m, x)
    assert got.shape == want.shape == (1, n, 5, 4)
    assert float((got - want).abs().max()) <= 2e-5 * float(want.abs().max())


def test_unfusable_formats_keep_the_reference_path():
    # 3x3 conv with per-token activations: im2col would change the scale granularity
    assert layer_dispatch.kernel_kind(_module("w8a8", conv_k=3)) is None
    q = QuantLinear(quantize(torch.randn(8, 64), QuantSpec("uint4", "group", 32)))
    assert layer_dispatch.kernel_kind(q) is None
    # int4 groups the Triton GEMMs do not take: the reference path, and the route says so
    g32 = QuantLinear(quantize(torch.randn(8, 64), QuantSpec("int4", "group", 32, "fp16")))
    assert layer_dispatch.kernel_route(g32, (9, 0)).startswith("reference (group size 32")
    # auto backend on a CPU module: nothing to fuse
    assert layer_dispatch.fused_forward(_module("w8a8")) is None


# ------------------------------------------------------------------ errors


def test_bad_shapes_raise_shape_error():
    _, qw, ws = _int4_weight(16, 64, 32)
    x = torch.randn(4, 64)
    with pytest.raises(ShapeError, match="K//2"):
        K.w4a16_linear(torch.randn(4, 32), qw, ws, 32)
    with pytest.raises(ShapeError, match="not divisible"):
        K.w4a16_linear(x, qw, ws, 48)
    with pytest.raises(ShapeError, match="even"):
        K.w4a8_linear(x, qw, ws, 1)
    with pytest.raises(ShapeError, match="wscale"):
        K.w4a8_linear(x, qw, ws[:, :1], 32)
    with pytest.raises(ShapeError, match="float16/bfloat16/float32"):
        K.w8a8_linear(x.to(torch.int32), torch.zeros(8, 64, dtype=torch.int8), torch.ones(8, 1))
    with pytest.raises(ShapeError, match="qweight"):
        K.w8a8_linear(x, torch.zeros(8, 63, dtype=torch.int8), torch.ones(8, 1))
    with pytest.raises(ShapeError, match="bias"):
        K.fp8_linear(x, torch.zeros(8, 64, dtype=torch.float8_e4m3fn), torch.ones(8, 1), torch.ones(7))
    with pytest.raises(ShapeError):
        K.w4a4_linear(x, qw, ws, 32, lr_up=torch.ones(4, 16))
    with pytest.raises(ShapeError, match="act_scale"):
        K.w8a8_linear(x, torch.zeros(8, 64, dtype=torch.int8), torch.ones(8, 1), act_scale=torch.ones(3))
    with pytest.raises(ShapeError, match="smooth"):
        K.w8a8_linear(x, torch.zeros(8, 64, dtype=torch.int8), torch.ones(8, 1), smooth=torch.ones(63))
    with pytest.raises(ShapeError, match="B, Cin, H, W"):
        K.conv2d_via_gemm(torch.randn(3, 4, 5), lambda a: a, kernel_size=1)
    with pytest.raises(ShapeError, match="smaller than"):
        K.im2col_nhwc(torch.randn(1, 2, 2, 2), 3)
    # the Triton w4a4 tiling needs a power-of-two group that BLOCK_K divides
    _, qw48, ws48 = _int4_weight(16, 96, 48)
    with pytest.raises(ShapeError, match="group_size"):
        K.w4a4_linear(torch.randn(2, 96), qw48, ws48, 48, backend="triton")


def test_unknown_backend_is_a_diffq_error():
    with pytest.raises(DiffqError, match="unknown backend"):
        K.w8a8_linear(torch.randn(2, 8), torch.zeros(4, 8, dtype=torch.int8), torch.ones(4, 1), backend="cublas")


# ------------------------------------------------------------------ host path: plans, routes


def test_module_plan_is_built_once_and_the_hot_path_does_not_validate(monkeypatch):
    """The first call builds the launch plan (repacked weights, reordered scales, 1 / smooth);
    later calls only launch: no validation helper, no plan build, no host sync."""
    from diffq.kernels import dispatch

    m = _module("w4a4", rank=4)
    fn = layer_dispatch.fused_forward(m, backend="triton")
    x = torch.randn(3, 64)
    built = []
    real = dispatch.plan_for
    monkeypatch.setattr(dispatch, "plan_for", lambda *a, **k: built.append(1) or real(*a, **k))
    y0 = fn(m, x)
    assert len(built) == 1

    def boom(*a, **k):
        raise AssertionError("per-call validation in the hot path")

    for name in ("_check_x", "_check_int4_weight", "_check_bias", "_check_lowrank", "_check_smooth", "_resolve"):
        monkeypatch.setattr(dispatch, name, boom)
    monkeypatch.setattr(torch.Tensor, "item", boom)
    y1 = fn(m, x)
    assert len(built) == 1 and torch.equal(y0, y1)
    layer_dispatch.forget(m)
    monkeypatch.undo()
    assert layer_dispatch._CACHE not in m.__dict__


def test_module_plan_follows_replaced_tensors():
    """set_lowrank (LoRA fusion) replaces the branch tensors: the next call rebuilds the plan."""
    m = _module("w4a4", rank=4)
    fn = layer_dispatch.fused_forward(m, backend="triton")
    x = torch.randn(5, 64)
    y0 = fn(m, x)
    m.set_lowrank(m.lr_down * 2, m.lr_up)
    y1 = fn(m, x)
    want = layer_dispatch.fused_forward(m, backend="reference")(m, x)
    assert not torch.equal(y0, y1)
    assert float((y1 - want).abs().max()) <= 2e-5 * float(want.abs().max())


def test_functional_api_reuses_its_plan():
    from diffq.kernels import dispatch

    _, qw, ws = _int4_weight(16, 128, 64)
    x = torch.randn(4, 128)
    K.w4a8_linear(x, qw, ws, 64, backend="triton")
    n = len(dispatch._PLANS)
    K.w4a8_linear(x * 2, qw, ws, 64, backend="triton")
    assert len(dispatch._PLANS) == n
    qw.add_(0)  # in-place change bumps the version: a new plan
    K.w4a8_linear(x, qw, ws, 64, backend="triton")
    assert len(dispatch._PLANS) == n + 1


def test_routes_by_capability(monkeypatch):
    assert K.w4a4_route((9, 0)) == "fp8" and K.w4a4_route((8, 9)) == "fp8" and K.w4a4_route((8, 0)) == "int8"
    monkeypatch.setenv("DIFFQ_W4A4_ROUTE", "int8")
    assert K.w4a4_route((9, 0)) == "int8"
    monkeypatch.setenv("DIFFQ_W4A4_ROUTE", "fp8")
    assert K.w4a4_route((8, 0)) == "int8"  # never FP8 below sm_89
    monkeypatch.delenv("DIFFQ_W4A4_ROUTE")
    assert layer_dispatch.kernel_route(_module("w4a4"), (9, 0)) == "triton w4a4 fp8-mma"
    assert layer_dispatch.kernel_route(_module("w4a4"), (8, 0)) == "triton w4a4 int8-mma"
    assert layer_dispatch.kernel_route(_module("w4a8"), (9, 0)) == "triton w4a8 int8-mma"
    assert layer_dispatch.kernel_route(_module("fp8"), (8, 9)) == "triton fp8 fp8-mma"
    assert layer_dispatch.kernel_route(_module("fp8"), (8, 0)) == "reference (fp8 needs sm_89+)"
    m = _module("w8a8")
    m.act.splits = (40, 24)  # split-shortcut scales: no per-token kernel computes them
    assert layer_dispatch.kernel_route(m).startswith("reference")
    # w4a4-svd's asymmetric (zero-point) and act_unsigned's shifted activations: no kernel computes them
    m = _module("w4a4")
    m.act.spec = QuantSpec("uint4", "group", 64)
    assert layer_dispatch.kernel_route(m, (9, 0)) == "reference (no kernel computes this quantization)"
    m = _module("w4a4")
    m.act.register_buffer("shift", torch.ones(64))
    assert layer_dispatch.kernel_route(m, (9, 0)) == "reference (no kernel computes this quantization)"
    m = _module("w4a8")
    m.act.center = True  # act_center: the kernel on x - c, the means on the W4A16 kernel
    assert layer_dispatch.kernel_route(m, (9, 0)) == "triton w4a8 int8-mma centred (means on w4a16)"
    m = _module("w8a8")
    m.act.center = True  # int8 weights: no W8A16 kernel for the means
    assert layer_dispatch.kernel_route(m, (9, 0)) == "reference (no kernel computes this quantization)"
    m = _module("w4a4", conv_k=1)
    m.act.center = True  # convs are not centred by the recipes; a centred one keeps the reference
    assert layer_dispatch.kernel_route(m, (9, 0)) == "reference (no kernel computes this quantization)"


@pytest.mark.parametrize("cap,ok", [((8, 0), False), ((8, 6), False), ((8, 9), True), ((9, 0), True)])
def test_fp8_is_never_dispatched_below_sm89(monkeypatch, cap, ok):
    """On a (simulated) compiled-Triton CUDA device of capability ``cap``: FP8 kernels are refused
    below sm_89 by the availability check, the module dispatcher and the route, and W4A4 never
    takes its FP8 route there (Triton cannot compile E4M3 for sm_80: see the compile gate)."""
    from diffq.kernels import dispatch

    monkeypatch.setattr(dispatch, "_triton_state", lambda: (True, False, ""))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    why = K.triton_unavailable_reason("fp8", "cuda")
    assert (why is None) == ok
    assert (layer_dispatch.fused_forward(_module("fp8"), device="cuda") is not None) == ok
    assert layer_dispatch.kernel_route(_module("fp8"), cap).startswith("triton") == ok
    assert (K.w4a4_route(cap) == "fp8") == ok
    if not ok:  # forcing it is an error, not a silent fallback
        x = types.SimpleNamespace(device=torch.device("cuda"), is_cuda=True)  # a CUDA tensor's view for _resolve
        with pytest.raises(K.KernelUnavailableError, match="compute capability"):
            dispatch._resolve("fp8_linear", "fp8", "triton", x, None)


# ------------------------------------------------------------------ repacking, decoders


def test_split_half_layouts_hold_the_codes():
    from diffq.kernels import repack

    codes, qw, _ = _int4_weight(5, 192, 64)
    sh = repack.split_half(qw, 192)
    assert sh.shape == (5, 128)  # K padded to 256
    lo = ((sh.to(torch.int32) & 0xF) ^ 8) - 8
    hi = (((sh.to(torch.int32) >> 4) & 0xF) ^ 8) - 8
    back = torch.stack([lo.view(5, 2, 64), hi.view(5, 2, 64)], 2).reshape(5, 256)
    assert torch.equal(back[:, :192], codes.int()) and not back[:, 192:].any()
    codes7, qw7, _ = _int4_weight(5, 128, 64, lo=-7)
    assert bool(repack.fits_signmag(qw7)) and not bool(repack.fits_signmag(qw))
    sm = repack.split_half_signmag(qw7, 128).to(torch.int32)
    lo = torch.where((sm >> 7) & 1 == 1, -(sm & 7), sm & 7)
    hi = torch.where((sm >> 3) & 1 == 1, -((sm >> 4) & 7), (sm >> 4) & 7)
    assert torch.equal(torch.stack([lo.view(5, 1, 64), hi.view(5, 1, 64)], 2).reshape(5, 128), codes7.int())


def test_group_major_scales_pad_with_zero_groups():
    from diffq.kernels import repack

    ws = torch.rand(6, 3).half()
    gm = repack.group_major_scales(ws, 192, 64)
    assert gm.shape == (4, 6) and gm.dtype == torch.float32
    assert torch.equal(gm[:3], ws.float().t()) and not gm[3].any()


# ------------------------------------------------------------------ tile tables


@pytest.mark.parametrize("family", ["ampere", "ada", "hopper"])
def test_tile_choice_fits_shapes(family):
    for kind in autotune.KINDS:
        for t in autotune.table(kind, family):
            if kind in autotune.INT4_KINDS:
                assert t.block_k % 128 == 0 and t.block_n % 64 == 0
        for m, n, k in [(1, 3072, 3072), (77, 1280, 2048), (4608, 3072, 3072), (8192, 320, 320)]:
            g = 64 if kind in autotune.INT4_KINDS else None
            t = autotune.pick_tile(kind, family, autotune.m_bucket(m), n, k, g)
            assert t in autotune.table(kind, family)
            if m >= 512:
                assert t.block_m >= 64
            assert t.block_m <= max(16, 1 << (m - 1).bit_length())
    # cached: one rule evaluation per shape bucket
    info = autotune.pick_tile.cache_info()
    autotune.pick_tile("w4a8", family, 4096, 3072, 3072, 64)
    assert autotune.pick_tile.cache_info().hits >= info.hits


# ------------------------------------------------------------------ CUDA (compiled: pytest -m cuda)


def _compiled(kernel) -> int:
    """Number of compiled variants a JIT kernel holds (0 for the interpreter)."""
    from diffq.kernels.autotune import is_interpreted

    if is_interpreted(kernel):
        return 0
    return sum(len(c[0]) for c in kernel.device_caches.values())


@pytest.fixture
def compiled_kernels():
    """Asserts the CUDA test ran compiled kernels: not the interpreter, and each kernel it used
    compiled at least one variant."""
    from diffq.kernels import activation_kernels, row_scaled, w4a4_lowrank, w4a8, w4a16

    ks = {
        "w4a16": w4a16._w4a16_kernel, "w4a8": w4a8._w4a8_kernel, "w4a4": w4a4_lowrank._w4a4_kernel,
        "w8a8": row_scaled._row_scaled_kernel, "fp8": row_scaled._row_scaled_kernel,
        "rows": activation_kernels._act_rows_kernel, "groups": activation_kernels._act_groups_kernel,
    }  # fmt: skip
    assert not autotune.is_interpreted(ks["w4a16"]), "TRITON_INTERPRET is on: run `pytest -m cuda`"

    def check(*names):
        for name in names:
            assert _compiled(ks[name]) > 0, f"{name} kernel was not compiled"

    return check


@cuda
@needs_gpu
@pytest.mark.parametrize("kind", ["w4a16", "w8a8", "w4a8", "w4a4", "w4a4-int8", "fp8"])
def test_cuda_kernels_match_reference(kind, compiled_kernels):
    base = kind.split("-")[0]
    if K.triton_unavailable_reason(base, "cuda", 64) is not None:
        pytest.skip(K.triton_unavailable_reason(base, "cuda", 64))
    dev, dt = "cuda", torch.bfloat16
    m, k, n = 300, 1024, 768
    x = torch.randn(m, k, device=dev, dtype=dt)
    _, qw, ws = _int4_weight(n, k, 64, lo=-7)
    qw, ws = qw.to(dev), ws.to(dev)
    w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=dev)
    ws8 = torch.rand(n, 1, device=dev) * 0.01
    f8 = (torch.randn(n, k, device=dev) * 60).clamp(-448, 448).to(torch.float8_e4m3fn)
    lr = {"lr_down": torch.randn(k, 32, device=dev, dtype=dt) * 0.05, "lr_up": torch.randn(32, n, device=dev, dtype=dt) * 0.05}
    call = {
        "w4a16": lambda be: K.w4a16_linear(x, qw, ws, 64, backend=be),
        "w8a8": lambda be: K.w8a8_linear(x, w8, ws8, backend=be),
        "w4a8": lambda be: K.w4a8_linear(x, qw, ws, 64, backend=be),
        "w4a4": lambda be: K.w4a4_linear(x, qw, ws, 64, backend=be, **lr),
        "w4a4-int8": lambda be: K.w4a4_linear(x, qw, ws, 64, backend=be, route="int8" if be == "triton" else None, **lr),
        "fp8": lambda be: K.fp8_linear(x, f8, ws8, backend=be),
    }[kind]
    got, want = call("triton").float(), call("reference").float()
    # bf16 MMA inputs (the low-rank branch, FP8 chunks) round: 1% of max|y| on GPU
    assert float((got - want).abs().max()) <= 1e-2 * float(want.abs().max())
    compiled_kernels({"w4a4-int8": "w4a4"}.get(kind, kind))
    if kind.startswith("w4a4"):
        compiled_kernels("groups")
    elif kind != "w4a16":
        compiled_kernels("rows")


@cuda
@needs_gpu
def test_cuda_module_dispatches_to_kernel(compiled_kernels):
    m = _module("w8a8").to("cuda")
    x = torch.randn(4, 64, device="cuda")
    if K.triton_unavailable_reason("w8a8", "cuda") is not None:
        pytest.skip("GPU without int8 MMA")
    assert layer_dispatch.module_kernel(m, x) is not None
    want = layer_dispatch.fused_forward(m, backend="reference")(m, x)
    assert float((m(x) - want).abs().max()) <= 1e-4 * float(want.abs().max())
    compiled_kernels("w8a8", "rows")


@cuda
@needs_gpu
@pytest.mark.parametrize("kind", ["w4a16", "w4a8", "w4a4"])
def test_cuda_graph_replay_matches_eager(kind, compiled_kernels):
    """A module forward captured in a CUDA graph (no host sync, no allocation outside the caching
    allocator, no autotuning in the hot path) replays to the eager result."""
    m = _module(kind, rank=4 if kind == "w4a4" else 0).to("cuda")
    x = torch.randn(64, 64, device="cuda", dtype=torch.float32)
    fn = layer_dispatch.module_kernel(m, x)
    if fn is None:
        pytest.skip(f"{kind} does not run on this GPU")
    eager = fn(m, x)  # builds the plan and compiles outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn(m, x)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    compiled_kernels(kind)


@cuda
@needs_gpu
@pytest.mark.parametrize("decoder", ["int8x16", "e4m3", "bf16", "f16"])
def test_cuda_asm_decoders_match_triton_formulas(decoder):
    """The inline-PTX nibble decoders (compiled GEMM path) against the pure-Triton formulas the
    interpreter runs, over every byte value."""
    import triton
    import triton.language as tl

    from diffq.kernels import tl_helpers as th

    @triton.jit
    def probe(p_ptr, lo_ptr, hi_ptr, WHICH: tl.constexpr, ASM: tl.constexpr):
        r = tl.arange(0, 16)[:, None] * 16 + tl.arange(0, 16)[None, :]
        p = tl.load(p_ptr + r)
        if WHICH == 0:
            lo, hi = th.nib_int8x16(p, ASM)
        elif WHICH == 1:
            lo, hi = th.nib_e4m3(p, ASM)
        elif WHICH == 2:
            lo, hi = th.nib_float(p, tl.bfloat16, ASM)
        else:
            lo, hi = th.nib_float(p, tl.float16, ASM)
        tl.store(lo_ptr + r, lo)
        tl.store(hi_ptr + r, hi)

    which = ["int8x16", "e4m3", "bf16", "f16"].index(decoder)
    dt = [torch.int8, torch.float8_e4m3fn, torch.bfloat16, torch.float16][which]
    p = torch.arange(256, device="cuda", dtype=torch.int32).to(torch.uint8)
    outs = []
    for asm in (True, False):
        lo, hi = torch.empty(256, device="cuda", dtype=dt), torch.empty(256, device="cuda", dtype=dt)
        probe[(1,)](p, lo, hi, WHICH=which, ASM=asm)
        outs.append((lo.view(torch.uint8) if dt.itemsize == 1 else lo, hi.view(torch.uint8) if dt.itemsize == 1 else hi))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
