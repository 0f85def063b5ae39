"""W4A4 + low-rank GEMM (Triton): the main GEMM of an SVDQuant layer.

Inputs come from :func:`diffq.kernels.activation_kernels.quantize_groups_lowrank`, which read x once to
produce packed int4 activation codes with per-(token, group) scales and the down-projection
``down = (x / smooth) @ lr_down`` [M, r]. This kernel unpacks both operands' nibbles to int8 in
registers (int8 MMA), scales each group's int32 dot by ``x_scale[m, g] * w_scale[n, g]`` into an
fp32 accumulator, and adds the rank-r up-projection ``down @ lr_up`` and the bias in the
epilogue, so the 16-bit branch costs one small [BLOCK_M, r] x [r, BLOCK_N] dot per output tile
instead of a second pass over the output:

y[m, n] = sum_g x_scale[m, g] * w_scale[n, g] * dot_g(xq[m], wq[n]) + (down @ lr_up)[m, n] + bias[n]
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from diffq.kernels.autotune import is_interpreted, launch, m_bucket
from diffq.kernels.tl_helpers import contiguous_range, store_tile, tile_ids, unpack_int4, wrapped_rows_cols


@triton.jit
def _w4a4_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, d_ptr, l2_ptr, b_ptr, y_ptr,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xsm, stride_wn, stride_sn, stride_dm, stride_l2r, stride_ym,
    G: tl.constexpr, HAS_LR: tl.constexpr, LR_F32: tl.constexpr, R_PAD: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """xq packed uint8 [M, K//2], xs fp32 [M, K//G], w packed uint8 [N, K//2], ws [N, K//G],
    down fp32 [M, R], l2 [R, N] (fp16/bf16/fp32) -> y [M, N]."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm, rn = wrapped_rows_cols(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    rkh = contiguous_range(BLOCK_K // 2)
    rows = rm.to(tl.int64)
    cols = rn.to(tl.int64)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + rkh[None, :]
    w_ptrs = w_ptr + cols[:, None] * stride_wn + rkh[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for g in range(K // G):
        part = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        for _kk in tl.static_range(G // BLOCK_K):
            a = unpack_int4(tl.load(x_ptrs))
            b = unpack_int4(tl.load(w_ptrs))
            part = tl.dot(a, tl.trans(b), part, out_dtype=tl.int32)
            x_ptrs += BLOCK_K // 2
            w_ptrs += BLOCK_K // 2
        sx = tl.load(xs_ptr + rows * stride_xsm + g)
        sw = tl.load(ws_ptr + cols * stride_sn + g).to(tl.float32)
        acc += part.to(tl.float32) * sx[:, None] * sw[None, :]
    if HAS_LR:
        rr = tl.arange(0, R_PAD)
        rmask = rr < R
        d = tl.load(d_ptr + rows[:, None] * stride_dm + rr[None, :], mask=rmask[None, :], other=0.0)
        up = tl.load(l2_ptr + rr[:, None].to(tl.int64) * stride_l2r + cols[None, :], mask=rmask[:, None], other=0.0)
        if LR_F32:
            acc = tl.dot(d, up.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(d.to(up.dtype), up, acc)
    store_tile(y_ptr, acc, b_ptr, rn, pid_m, pid_n, M, N, stride_ym, HAS_BIAS, BLOCK_M, BLOCK_N)


def w4a4_gemm_triton(
    xq: torch.Tensor,
    xscale: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    group_size: int,
    *,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    down: torch.Tensor | None = None,
    lr_up: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch on validated contiguous inputs (see the kernel docstring for shapes)."""
    m = xq.shape[0]
    k = xq.shape[1] * 2
    n = qweight.shape[0]
    y = torch.empty(m, n, device=xq.device, dtype=out_dtype)
    if m == 0:
        return y
    has_lr = down is not None
    r = down.shape[1] if has_lr else 0
    lr_f32 = is_interpreted(_w4a4_kernel) or (has_lr and lr_up.dtype == torch.float32)

    launch(
        _w4a4_kernel, "w4a4",
        x_ptr=xq, xs_ptr=xscale, w_ptr=qweight, ws_ptr=wscale,
        d_ptr=down if has_lr else xscale, l2_ptr=lr_up if has_lr else wscale,
        b_ptr=bias if bias is not None else wscale, y_ptr=y,
        M=m, N=n, K=k, R=r, M_BUCKET=m_bucket(m),
        stride_xm=xq.stride(0), stride_xsm=xscale.stride(0), stride_wn=qweight.stride(0),
        stride_sn=wscale.stride(0), stride_dm=down.stride(0) if has_lr else 0,
        stride_l2r=lr_up.stride(0) if has_lr else 0, stride_ym=y.stride(0),
        G=group_size, HAS_LR=has_lr, LR_F32=lr_f32, R_PAD=max(16, triton.next_power_of_2(max(r, 1))),
        HAS_BIAS=bias is not None,
    )  # fmt: skip
    return y
