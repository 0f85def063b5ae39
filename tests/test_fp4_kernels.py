"""FP4 (NVFP4 / MXFP4) W4A4 + low-rank kernels: Triton under TRITON_INTERPRET=1 vs the torch
reference (:mod:`diffq.kernels.fp4_reference`), the reference vs a dequantize-then-matmul oracle
built from ``diffq.formats``, the activation quantizer vs the core's fake quantization, module
wiring and routes. CUDA-only checks are marked ``cuda`` (``pytest -m cuda``).

Tolerances (stated, and why):
* the activation quantizer (codes, block scales, NVFP4 tensor scale): bit-exact, against the
  kernels' reference and against ``diffq.formats.fake_quantize`` (the module's semantics);
* the GEMM without the low-rank branch: bit-exact in every output dtype. The interpreter tile has
  BLOCK_K = one scale block, so every ``dot_scaled`` partial is an exact fp32 sum (at most 12
  significant bits per product, 13 per block) and the blocks are added in the reference's order;
* with the low-rank branch: |diff| <= 1e-5 * max|y| + one ulp of the output dtype (an fp32 dot
  whose summation order differs);
* interpreter tiles of 128-deep K (what GPU tiles do: several blocks per dot): the same tolerance;
* reference vs oracle (the oracle rounds ``code * scale * g`` per element): 1e-5 * max|y|.
"""

from __future__ import annotations

import pytest
import torch

import diffq.kernels as K
from diffq.errors import ShapeError
from diffq.formats import MXFP4, NVFP4, dequantize, fake_quantize, pack_bits, quantize
from diffq.formats.floating import e8m0_scale
from diffq.kernels import fp4_dispatch, fp4_launch, layer_dispatch
from diffq.kernels import fp4_reference as ref4
from diffq.kernels.autotune import Tile
from diffq.modules import ActQuantizer, QuantConv2d, QuantLinear

cuda = pytest.mark.cuda
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SPECS = {"nvfp4": NVFP4, "mxfp4": MXFP4}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ULP = {torch.float32: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    a, bf = a.float(), b.float()
    scale = bf.abs().max().clamp_min(1e-12)
    err = (a - bf).abs()
    assert bool((err <= rel * scale + ULP[b.dtype] * bf.abs() + 1e-12).all()), f"max err {float(err.max()):.3g}"


def _weight(fmt: str, n: int, k: int):
    q = quantize(torch.randn(n, k), SPECS[fmt])
    return q, pack_bits(q.codes, 4), q.scale_stored, q.global_scale


def _args(fmt: str, k: int, n: int, dtype, rank: int):
    q, qw, ws, wg = _weight(fmt, n, k)
    kw = {"wscale_global": wg, "smooth": torch.rand(k) + 0.5}
    if rank:
        kw |= {"lr_down": (torch.randn(k, rank) * 0.1).to(dtype), "lr_up": (torch.randn(rank, n) * 0.1).to(dtype)}
    return q, qw, ws, torch.randn(n).to(dtype), kw


# ------------------------------------------------------------------ reference vs the format oracle


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_reference_matches_format_oracle(fmt):
    """fp4_reference.fp4_linear == Q_a(x / s) @ deq(W)^T + ((x / s) L1) L2 + b with diffq.formats."""
    torch.manual_seed(3)
    x = torch.randn(17, 128) * 3
    q, qw, ws, b, kw = _args(fmt, 128, 40, torch.float32, 4)
    got = ref4.fp4_linear(x, qw, ws, fmt, b, **kw)
    xs = x / kw["smooth"]
    want = fake_quantize(xs, SPECS[fmt]) @ dequantize(q).t() + (xs @ kw["lr_down"]) @ kw["lr_up"] + b
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_activation_quantizer_bit_exact(fmt, dtype):
    """Codes, block scales and the NVFP4 tensor scale: Triton == reference, and both dequantize to
    exactly the core's fake quantization of the module's smoothed input ``x / smooth.to(x.dtype)``."""
    x = (torch.randn(37, 160) * 4).to(dtype)  # odd M; K = 160: a ragged last 64-column chunk
    x[5] = 0.0  # an all-zero row: the smallest block scale, codes 0
    x[6, :32] = 1e-30  # underflowing blocks
    smooth = torch.rand(160) + 0.5
    q_t, s_t, g_t = K.quantize_act_fp4(x, fmt, smooth=smooth, backend="triton")
    q_r, s_r, g_r = K.quantize_act_fp4(x, fmt, smooth=smooth, backend="reference")
    assert torch.equal(q_t, q_r)
    assert torch.equal(s_t.view(torch.uint8), s_r.view(torch.uint8))
    assert (g_t is None and g_r is None) or torch.equal(g_t, g_r)
    b = SPECS[fmt].group_size
    scale = ref4.decode_block_scales(s_r, fmt) * (1.0 if g_r is None else g_r)
    deq = ref4.unpack_e2m1(q_r) * scale.repeat_interleave(b, 1)
    assert torch.equal(deq.to(dtype), fake_quantize(x / smooth.to(dtype), SPECS[fmt]))


def test_e8m0_exponent_is_the_exact_ceil_log2():
    """The core's E8M0 exponent is read from the bits: values a few ulps above a power of two get
    the next power (torch.log2 would round them down, so the block would saturate), and the kernel
    agrees on blocks built at those values."""
    k = torch.arange(-20, 21, dtype=torch.float32)
    s = torch.exp2(k).repeat_interleave(4) * (1 + torch.arange(4).repeat(41) * 2.0**-23)
    _, val = e8m0_scale(s)
    assert bool((val >= s).all()) and bool((val < 2 * s).all())
    x = torch.zeros(len(s), 32)
    x[:, 0] = s * 6  # block amax / 6 within an ulp or two of s
    x[:, 1] = -s * 5.9
    q_t, s_t, _ = K.quantize_act_fp4(x, "mxfp4", backend="triton")
    q_r, s_r, _ = K.quantize_act_fp4(x, "mxfp4", backend="reference")
    assert torch.equal(q_t, q_r) and torch.equal(s_t, s_r)


# ------------------------------------------------------------------ the GEMM (interpreter)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rank", [0, 8], ids=["no-lr", "lr8"])
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fp4_linear_triton_matches_reference(fmt, rank, dtype):
    k = 192 if fmt == "nvfp4" else 160  # 12 / 5 blocks
    x = (torch.randn(3, 13, k) * 2).to(dtype)  # M = 39: partial row tile
    _, qw, ws, b, kw = _args(fmt, k, 72, dtype, rank)  # N = 72: partial column tile
    y_t = K.fp4_linear(x, qw, ws, fmt, b, backend="triton", **kw)
    y_r = K.fp4_linear(x, qw, ws, fmt, b, backend="reference", **kw)
    assert y_t.shape == (3, 13, 72) and y_t.dtype == dtype
    if rank == 0:
        assert torch.equal(y_t, y_r)
    else:
        _close(y_t, y_r)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_multi_block_k_tiles_within_fp32_tolerance(fmt, monkeypatch):
    """GPU tiles put several scale blocks into one dot_scaled (BLOCK_K 128 / 256) and a ragged K
    takes the masked loads: same result up to fp32 summation order."""
    monkeypatch.setitem(fp4_dispatch.INTERPRETER_TILES, fmt, Tile(32, 64, 128, 8))
    k = 320  # 2.5 tiles of 128
    x = torch.randn(21, k, dtype=torch.bfloat16)
    _, qw, ws, b, kw = _args(fmt, k, 40, torch.bfloat16, 0)
    _close(K.fp4_linear(x, qw, ws, fmt, b, backend="triton", **kw), K.fp4_linear(x, qw, ws, fmt, b, backend="reference", **kw))


def test_interpreter_decodes_e4m3_dot_scaled_scales():
    """Triton 3.8's interpreter decodes every dot_scaled scale as E8M0; fp4_interp.install (done by
    fp4_launch under the interpreter) decodes float8e4nv scales as E4M3. One block: exact."""
    from diffq.kernels import fp4_interp
    from diffq.kernels.fp4_gemm import _fp4_gemm_kernel

    assert fp4_interp.install() and fp4_interp.install()  # idempotent
    x = torch.randn(16, 16)
    _, qw, ws, _ = _weight("nvfp4", 16, 16)
    xq, xs, _ = ref4.quantize_act(x, "nvfp4")
    y = torch.empty(16, 16)
    zero = torch.zeros(1)
    _fp4_gemm_kernel[(1,)](
        xq, xs, qw, ws, zero, zero, zero, zero, zero, y, 16, 16, 16, 0, 8, 1, 8, 1, 0, 0, 0, 16,
        B=16, NV=False, EVEN_K=True, HAS_LR=False, LR_F32=True, R_PAD=16, SPLITS=1, HAS_BIAS=False,
        BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=1,
    )  # fmt: skip
    assert fp4_launch.INTERP
    assert torch.equal(y, ref4.blockwise_gemm(xq, xs, qw, ws, "nvfp4"))


def test_empty_batch_and_bad_shapes():
    _, qw, ws, wg = _weight("nvfp4", 16, 64)
    assert K.fp4_linear(torch.zeros(0, 64), qw, ws, "nvfp4", wscale_global=wg, backend="triton").shape == (0, 16)
    with pytest.raises(ShapeError, match="multiple of the nvfp4 block"):
        K.fp4_linear(torch.randn(2, 56), qw, ws, "nvfp4", wscale_global=wg)
    with pytest.raises(ShapeError, match="wscale_global"):
        K.fp4_linear(torch.randn(2, 64), qw, ws, "nvfp4")
    with pytest.raises(ShapeError, match="wscale must be"):
        K.fp4_linear(torch.randn(2, 64), qw, ws.view(torch.uint8), "nvfp4", wscale_global=wg)
    with pytest.raises(ShapeError, match="fmt"):
        K.fp4_linear(torch.randn(2, 64), qw, ws, "fp4", wscale_global=wg)


# ------------------------------------------------------------------ modules


def _module(fmt: str, *, conv_k: int | None = None, rank: int = 8, splits=None):
    torch.manual_seed(2)
    cin, n = 64, 48
    k = cin * (conv_k or 1) ** 2
    spec = SPECS[fmt]
    common = {"bias": torch.randn(n), "act": ActQuantizer(spec, splits=splits), "smooth": torch.rand(cin if conv_k else k) + 0.5}
    if rank:
        common |= {"lr_down": torch.randn(k, rank) * 0.1, "lr_up": torch.randn(rank, n) * 0.1}
    q = quantize(torch.randn(n, k), spec)
    if conv_k:
        return QuantConv2d(q, in_channels=cin, kernel_size=(conv_k, conv_k), stride=(1, 1), padding=(conv_k // 2,) * 2,
                           dilation=(1, 1), **common)  # fmt: skip
    return QuantLinear(q, **common)


@pytest.mark.parametrize("conv_k", [None, 1, 3], ids=["linear", "conv1x1", "conv3x3"])
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fused_module_matches_module_reference(fmt, conv_k):
    """The Triton forward computes the module's own quantization (an NVFP4 conv takes its tensor
    scale from the whole input, not the im2col rows): equal up to fp32 summation order."""
    m = _module(fmt, conv_k=conv_k)
    assert layer_dispatch.kernel_kind(m) == fmt
    x = torch.randn(2, 64, 5, 4) if conv_k else torch.randn(3, 7, 64)
    want = m(x)  # CPU: the module's torch reference
    assert layer_dispatch.module_kernel(m, x) is None
    got = layer_dispatch.fused_forward(m, backend="triton")(m, x)
    ref = layer_dispatch.fused_forward(m, backend="reference")(m, x)
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= 2e-5 * float(want.abs().max())
    assert float((got - ref).abs().max()) <= 2e-5 * float(want.abs().max())


def test_routes_by_capability():
    nv, mx = _module("nvfp4"), _module("mxfp4")
    for cap in ((10, 0), (10, 3), (12, 0)):
        assert layer_dispatch.kernel_route(nv, cap) == "triton nvfp4 fp4-mma"
        assert layer_dispatch.kernel_route(mx, cap) == "triton mxfp4 fp4-mma"
    assert layer_dispatch.kernel_route(nv, (9, 0)) == "triton nvfp4 bf16-mma"
    assert layer_dispatch.kernel_route(nv, (8, 0)) == "reference (nvfp4 needs sm_89+)"  # no E4M3 scales
    assert layer_dispatch.kernel_route(mx, (8, 0)) == "triton mxfp4 bf16-mma"
    # NVFP4 split-shortcut segments have a tensor scale each: not one GEMM epilogue factor
    assert layer_dispatch.kernel_kind(_module("nvfp4", splits=(32, 32))) is None
    assert layer_dispatch.kernel_route(_module("nvfp4", splits=(32, 32)), (10, 0)).startswith("reference (NVFP4 split")
    assert layer_dispatch.kernel_kind(_module("mxfp4", splits=(48, 16))) is None  # a block would straddle
    assert layer_dispatch.kernel_kind(_module("mxfp4", splits=(32, 32))) == "mxfp4"


def test_mxfp4_split_segments_in_whole_blocks_equal_one_quantizer():
    m = _module("mxfp4", splits=(32, 32))
    x = torch.randn(5, 64)
    got = layer_dispatch.fused_forward(m, backend="triton")(m, x)
    want = m(x)
    assert float((got - want).abs().max()) <= 2e-5 * float(want.abs().max())


def test_module_plan_is_built_once_and_the_hot_path_does_not_sync(monkeypatch):
    m = _module("nvfp4")
    fn = layer_dispatch.fused_forward(m, backend="triton")
    x = torch.randn(3, 64)
    built = []
    real = fp4_dispatch.plan_for_fp4
    monkeypatch.setattr(fp4_dispatch, "plan_for_fp4", lambda *a, **k: built.append(1) or real(*a, **k))
    y0 = fn(m, x)

    def boom(*a, **k):
        raise AssertionError("host sync in the hot path")

    monkeypatch.setattr(torch.Tensor, "item", boom)
    monkeypatch.setattr(fp4_dispatch, "_check", boom)
    y1 = fn(m, x)
    assert len(built) == 1 and torch.equal(y0, y1)
    monkeypatch.undo()
    m.set_lowrank(m.lr_down * 2, m.lr_up)  # a replaced tensor: the plan is rebuilt
    assert not torch.equal(fn(m, x), y0)


def test_fp4_presets_route_to_the_kernel():
    """The fp4 (NVFP4) and mxfp4 presets build modules the FP4 kernels compute."""
    from diffq.quantization.presets import get_preset

    for name, fmt in (("fp4", "nvfp4"), ("mxfp4", "mxfp4")):
        r = get_preset(name)
        q = quantize(torch.randn(32, 64), r.weight)
        assert layer_dispatch.kernel_kind(QuantLinear(q, act=ActQuantizer(r.act))) == fmt


def test_tile_tables_fit_the_kernels():
    for family, tiles in fp4_dispatch.FP4_TILES.items():
        for t in tiles:
            assert t.block_k % 64 == 0 and t.block_k >= 64
            if family == "sm100":
                assert t.block_m == 128  # tcgen05 MMA: 128 rows per CTA
        assert fp4_dispatch.pick_fp4_tile(family, 4608, 3072) == tiles[0]
        assert fp4_dispatch.pick_fp4_tile(family, 1, 16) in tiles


# ------------------------------------------------------------------ CUDA (compiled: pytest -m cuda)


@cuda
@needs_gpu
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_cuda_fp4_matches_reference(fmt):
    from diffq.kernels.autotune import is_interpreted
    from diffq.kernels.fp4_gemm import _fp4_gemm_kernel

    if K.fp4_unavailable_reason(fmt, "cuda") is not None:
        pytest.skip(K.fp4_unavailable_reason(fmt, "cuda"))
    assert not is_interpreted(_fp4_gemm_kernel)
    dev, dt = "cuda", torch.bfloat16
    m, k, n = 300, 1024, 768
    _, qw, ws, b, kw = _args(fmt, k, n, dt, 32)
    kw = {key: None if v is None else v.to(dev) for key, v in kw.items()}
    x = torch.randn(m, k, device=dev, dtype=dt)
    got = K.fp4_linear(x, qw.to(dev), ws.to(dev), fmt, b.to(dev), backend="triton", **kw).float()
    want = K.fp4_linear(x, qw.to(dev), ws.to(dev), fmt, b.to(dev), backend="reference", **kw).float()
    assert float((got - want).abs().max()) <= 1e-2 * float(want.abs().max())


@cuda
@needs_gpu
def test_cuda_fp4_graph_replay_matches_eager():
    m = _module("nvfp4").to("cuda")
    x = torch.randn(64, 64, device="cuda")
    fn = layer_dispatch.module_kernel(m, x)
    if fn is None:
        pytest.skip("nvfp4 does not run on this GPU")
    eager = fn(m, x)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn(m, x)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
