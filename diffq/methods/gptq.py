"""GPTQ: error-compensating rounding of a weight matrix with the Hessian of its layer's inputs.

For ``y = x · Wᵀ`` the output error of a rounding ``Q`` over calibration rows ``X`` is
``Σ_n (w_n - q_n) H (w_n - q_n)ᵀ`` with ``H = XᵀX``, the same for every output row ``n``. GPTQ
(Frantar et al., 2023) rounds the columns one at a time onto the format's grid and moves each
column's rounding error onto the columns not rounded yet, weighted by the upper Cholesky factor of
``H⁻¹``. Here:

- the grid (scales, zero points, NVFP4 global scale) is fixed beforehand by round-to-nearest with
  the recipe's clipping, so every integer and FP4 format works and the codes are stored exactly as
  :mod:`diffq.formats` defines them (:func:`diffq.formats.requantize`); act-order permutes the
  columns together with their grid ("static groups");
- lazy batches: blocks of ``block`` columns, inside a block sub-blocks of ``SUB_BLOCK`` columns get
  rank-1 updates and everything after them one matrix product;
- damping: ``damp · mean(diag H)`` on the diagonal, multiplied by 10 until the Cholesky factorisation
  succeeds; channels that never saw input get ``H_kk = 1``; if nothing works the layer falls back
  to round-to-nearest, never a crash;
- memory is bounded per layer: input channels are split into independent blocks of at most
  ``max_columns`` (block-diagonal Hessian; ``None`` = the whole layer), so ``H`` never exceeds
  ``max_columns²`` floats;
- kh x kw convs: with im2col patches of the input (``calibrate(reservoir=N)`` keeps them,
  :attr:`CalibrationStats.patches`) the Hessian is the exact ``[kh·kw·Cin]²`` one. With per-pixel
  rows only (older statistics) it is per tap: the same channel Hessian for every tap and no
  cross-tap terms (block-diagonal over taps), i.e. the weight is processed as ``[N·kh·kw, Cin]``
  rows; on the digits UNet's 3x3 convs the exact Hessian leaves 2-4x less output error than that.
  1x1 convs and linears are exact either way.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import torch

from diffq.formats import QTensor, QuantSpec, expand_grid, grid_values, range_grid, requantize
from diffq.methods.threads import one_thread

DAMP = 0.01
BLOCK = 128
SUB_BLOCK = 16
MAX_COLUMNS = 4096


def hessian(xw: torch.Tensor) -> torch.Tensor:
    """``XᵀX`` [C, C] of weighted input rows ``xw`` [n, C] (weights folded in as their square roots)."""
    return xw.t() @ xw


def upper_inverse_cholesky(h: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` [C, C], λ = ``damp · mean(diag H)`` raised tenfold
    until the factorisations succeed (a singular or indefinite H is damped, never an error); after
    six tries the diagonal of H alone (no error propagation: round-to-nearest)."""
    with one_thread(h.device):
        return _upper_inverse_cholesky(h, damp)


def _upper_inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    fixed = h.clone()  # the mean over the strided diagonal view, as always (a contiguous copy sums in another order)
    view = fixed.diagonal()
    view[view <= 0] = 1.0
    mean = float(view.mean())
    diag = view.clone()
    del view, fixed
    lam = damp * mean
    for _ in range(6):
        # one [C, C] buffer besides H: H + λI is factored, inverted and factored again in place, through
        # its column-major view (LAPACK's layout: a symmetric matrix is its own transpose), so torch
        # makes no column-major copies; bit for bit the results of the out-of-place calls
        work = _damped(h, diag, lam)
        lapack = work.mT
        info = torch.empty((), dtype=torch.int32, device=h.device)
        torch.linalg.cholesky_ex(lapack, out=(lapack, info))
        if int(info) == 0:
            torch.cholesky_inverse(lapack, out=lapack)
            torch.linalg.cholesky_ex(lapack, upper=True, out=(lapack, info))
            if int(info) == 0 and _all_finite(work):
                return _transpose_in_place(work)  # row-major memory of the upper factor
        del work, lapack
        lam *= 10.0
    return torch.diag((diag + damp * mean).rsqrt())


def _damped(h: torch.Tensor, diag: torch.Tensor, lam: float) -> torch.Tensor:
    """``H' + λ·I`` [C, C] where H' is ``h`` with the diagonal ``diag``, without an identity matrix."""
    if not (math.isfinite(lam) and lam >= 0):  # λ·0 is NaN or -0.0 off the diagonal: the literal formula
        fixed = h.clone()
        fixed.diagonal().copy_(diag)
        return fixed + lam * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    out = h + 0.0  # λ·I is +0.0 off the diagonal (λ >= 0): -0.0 entries become +0.0 as in H + λ·I
    out.diagonal().copy_(diag + lam)
    return out


def _all_finite(a: torch.Tensor, rows: int = 512) -> bool:
    """``isfinite(a).all()`` of a matrix, a block of rows at a time (no [C, C] boolean temporaries)."""
    return all(bool(torch.isfinite(a[i : i + rows]).all()) for i in range(0, a.shape[0], rows))


def _transpose_in_place(a: torch.Tensor, block: int = 512) -> torch.Tensor:
    """``a`` [C, C] overwritten by its transpose, block by block (a copy, exact), with one
    ``block x block`` temporary instead of a second [C, C] matrix."""
    n = a.shape[0]
    for i in range(0, n, block):
        rows = slice(i, min(i + block, n))
        a[rows, rows] = a[rows, rows].t().clone()
        for j in range(i + block, n, block):
            cols = slice(j, min(j + block, n))
            upper = a[rows, cols].clone()
            a[rows, cols] = a[cols, rows].t()
            a[cols, rows] = upper.t()
    return a


def dynamic_groups(spec: QuantSpec, act_order: bool, block: int = BLOCK) -> bool:
    """Whether :func:`gptq_quantize` recomputes each group's scales when it reaches the group."""
    g = spec.group_size if spec.granularity == "group" else 0
    return g > 0 and not act_order and g % SUB_BLOCK == 0 and block % g == 0


def gptq_round(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    spec: QuantSpec,
    h: torch.Tensor,
    *,
    block: int = BLOCK,
    damp: float = DAMP,
    act_order: bool = False,
    regroup: Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]] | None = None,
    group: int = 0,
) -> torch.Tensor:
    """Error-compensated rounding of ``w`` [R, K] onto the grid ``scale`` / ``zero`` (each [R, K], per
    element, e.g. from :func:`diffq.formats.expand_grid`) with input Hessian ``h`` [K, K].

    regroup(j, columns) -> (scale, zero) each [R, 1]: called when column ``j`` starts a scale group
    of ``group`` columns, with the group's current (error-compensated) columns [R, group]; its grid
    replaces the given one for those columns (dynamic groups). Not with act-order.
    Returns the rounded values [R, K] fp32 (each on its element's grid point).

    Works on the transposed weight, so that every column GPTQ touches is contiguous in memory.
    """
    k = w.shape[1]
    if regroup is not None and (act_order or group % SUB_BLOCK or block % group):
        raise ValueError(f"dynamic groups need group % {SUB_BLOCK} == 0, block % group == 0 and no act-order")
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else None
    if perm is not None:
        w, scale, h = w[:, perm], scale[:, perm], h[perm][:, perm]
        zero = None if zero is None else zero[:, perm]
    wt = w.float().t().contiguous()  # [K, R]: row j is column j
    st = scale.t().contiguous()
    zt = None if zero is None else zero.t().contiguous()
    u = upper_inverse_cholesky(h, damp)
    out = torch.empty_like(wt)
    err = torch.empty(block, wt.shape[1], dtype=wt.dtype, device=wt.device)
    for b1 in range(0, k, block):
        b2 = min(b1 + block, k)
        ub = u[b1:b2, b1:b2]
        inv_diag = (1.0 / ub.diagonal()).tolist()
        with one_thread(wt.device):  # small ops: serial (see diffq.methods.threads)
            for s1 in range(b1, b2, SUB_BLOCK):
                s2 = min(s1 + SUB_BLOCK, b2)
                if regroup is not None and s1 % group == 0:
                    sc, z = regroup(s1, wt[s1 : s1 + group].t())
                    st[s1 : s1 + group] = sc.reshape(1, -1)
                    if zt is not None:
                        zt[s1 : s1 + group] = z.reshape(1, -1)
                for j in range(s1, s2):
                    q = grid_values(wt[j], st[j], spec, None if zt is None else zt[j])
                    out[j] = q
                    e = err[j - b1]
                    torch.sub(wt[j], q, out=e).mul_(inv_diag[j - b1])
                    if j + 1 < s2:
                        wt[j + 1 : s2].sub_(ub[j - b1, j + 1 - b1 : s2 - b1, None] * e)
                if s2 < b2:
                    wt[s2:b2].sub_(ub[s1 - b1 : s2 - b1, s2 - b1 :].t() @ err[s1 - b1 : s2 - b1])
        if b2 < k:
            wt[b2:].sub_(u[b1:b2, b2:].t() @ err[: b2 - b1])
    out = out.t()
    if perm is not None:
        out = out[:, torch.argsort(perm)]
    return out


def gptq_quantize(
    r: torch.Tensor,
    grid: QTensor,
    xw: torch.Tensor,
    *,
    clip: Callable[[torch.Tensor, QuantSpec, torch.Tensor], torch.Tensor | None] | None = None,
    block: int = BLOCK,
    damp: float = DAMP,
    act_order: bool = False,
    max_columns: int | None = MAX_COLUMNS,
) -> QTensor:
    """GPTQ of weight rows ``r`` [N, kh·kw·Cin] with weighted calibration rows ``xw`` of the input this
    weight sees: per-pixel rows [n, Cin] (per-tap Hessian) or im2col patches [n, kh·kw·Cin] (exact). ``grid`` is ``r``'s round-to-nearest quantization: its format, its scales
    for per-tensor / per-channel formats and with act-order ("static groups"), its NVFP4 global scale.
    Without act-order, group scales are recomputed from the error-compensated columns when GPTQ
    reaches each group, as in the original GPTQ, with the clip ratio ``clip(columns, spec, importance)``
    (None = min-max; ``importance`` [group] is the Hessian diagonal of those columns, so a clip search
    can minimise the output error rather than the weight error).

    Returns a QTensor in ``grid``'s format with the error-compensated codes."""
    spec = grid.spec
    cin = xw.shape[1]
    n, kk = r.shape
    scale, zero = expand_grid(grid)
    rows = r.float().reshape(-1, cin)  # [N·taps, Cin]: taps are independent (per-tap Hessian)
    scale = scale.reshape(-1, cin)
    zero = None if zero is None else zero.reshape(-1, cin)
    g = spec.group_size if spec.granularity == "group" else 0
    dynamic = dynamic_groups(spec, act_order, block)
    stored = grid.scale_stored.reshape(rows.shape[0], -1).clone() if dynamic else None

    diag = xw.float().square().sum(0) if clip is not None else None

    def regroup(j: int, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        ratio = None if clip is None else clip(cols, spec, diag[j : j + g])
        lo = cols.amin(1, keepdim=True).clamp(max=0) if not spec.symmetric and spec.is_int else None
        hi = cols.amax(1, keepdim=True).clamp(min=0) if lo is not None else cols.abs().amax(1, keepdim=True)
        if ratio is not None:
            hi, lo = hi * ratio, None if lo is None else lo * ratio
        sc, st, z, _ = range_grid(spec, hi, lo, grid.global_scale)
        scale[:, j : j + g] = sc
        stored[:, j // g] = st[:, 0]
        if zero is not None:
            zero[:, j : j + g] = z
        return sc, z

    width = cin if not max_columns else min(cin, max_columns)
    if dynamic:
        width = max(g, width // g * g)
    out = torch.empty_like(rows)
    for c1 in range(0, cin, width):
        c2 = min(c1 + width, cin)
        sub = (lambda j, cols, c1=c1: regroup(c1 + j, cols)) if dynamic else None
        out[:, c1:c2] = gptq_round(
            rows[:, c1:c2], scale[:, c1:c2], None if zero is None else zero[:, c1:c2], spec, hessian(xw[:, c1:c2]),
            block=block, damp=damp, act_order=act_order, regroup=sub, group=g,
        )
    if dynamic:
        grid = _regrid(grid, scale, zero, stored, n, g)
    return requantize(grid, out.reshape(n, kk))


def _regrid(grid: QTensor, scale: torch.Tensor, zero: torch.Tensor | None, stored: torch.Tensor, n: int,
            g: int) -> QTensor:
    """``grid`` with the per-group scales (and zero points) GPTQ chose; per-element [N·taps, Cin] in."""
    groups = grid.scale.shape
    return replace(
        grid, scale=scale[:, ::g].reshape(groups).contiguous(), scale_stored=stored.reshape(groups).contiguous(),
        zero=None if zero is None else zero[:, ::g].reshape(groups).contiguous(),
    )
