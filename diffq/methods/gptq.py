"""GPTQ: error-compensating rounding of a weight matrix with the Hessian of its layer's inputs.

For ``y = x · Wᵀ`` the output error of a rounding ``Q`` over calibration rows ``X`` is
``Σ_n (w_n - q_n) H (w_n - q_n)ᵀ`` with ``H = XᵀX``, the same for every output row ``n``. GPTQ
(Frantar et al., 2023) rounds the columns one at a time onto the format's grid and moves each
column's rounding error onto the columns not rounded yet, weighted by the upper Cholesky factor of
``H⁻¹``. Here:

- the feedback comes from one Cholesky factorisation of ``H`` itself (in reversed column order),
  not of ``H⁻¹`` (:func:`feedback_matrix`): the same rounding, a third of the floating-point work;
  each column's error is then taken against the column before any feedback, and a group's scales
  see the columns as the usual form has them (:func:`_group_columns`); tests/test_methods.py
  checks the codes against the textbook algorithm in float64;

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

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from diffq.formats import QTensor, QuantSpec, abs_max, expand_grid, grid_values, range_grid, requantize
from diffq.methods.layout import transposed
from diffq.methods.threads import one_thread

DAMP = 0.01
BLOCK = 128
SUB_BLOCK = 16
MAX_COLUMNS = 4096


def hessian(xw: torch.Tensor) -> torch.Tensor:
    """``XᵀX`` [C, C] of weighted input rows ``xw`` [n, C] (weights folded in as their square roots)."""
    return xw.t() @ xw


def feedback_matrix(h: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """Error-feedback coefficients ``M`` [C, C] of GPTQ for the Hessian ``h``: unit upper triangular,
    column ``j`` rounded to ``q_j`` moves ``M[j, k] · (w_j - q_j)`` onto every later column ``k``,
    where ``w_j`` is the column *before* any feedback (see :func:`gptq_round`).

    GPTQ's usual form rounds the *updated* column and scales its error by the upper Cholesky factor
    ``U`` of ``H⁻¹`` (``H⁻¹ = UᵀU``). The same rounding follows from the factorisation
    ``H = V·Vᵀ`` with ``V`` upper triangular (a Cholesky factorisation of ``H`` in reversed column
    order), with ``M = V · diag(V)⁻¹``: ``V = U⁻¹``, and accumulating the feedback of the updated
    errors through ``U / diag(U)`` equals applying ``(U / diag(U))⁻¹ = V / diag(V)`` to the errors
    against the original columns (GPTQ as Babai's nearest-plane algorithm). One Cholesky
    factorisation of ``H`` instead of a factorisation, an inverse and a second factorisation: no
    explicit ``H⁻¹``, a third of the floating-point work, and no loss of accuracy from the inverse.

    Damping: ``λ = damp · mean(diag H)`` on the diagonal, raised tenfold until the factorisation
    succeeds (a singular or indefinite H is damped, never an error); after six tries the identity
    (no error propagation: round-to-nearest). Channels that never saw input get ``H_kk = 1``."""
    with one_thread(h.device):
        return _feedback_matrix(h, damp)


def _reversed(a: torch.Tensor) -> torch.Tensor:
    """``a.flip(0, 1)`` of a [C, C] matrix, with ``a``'s layout (row- or column-major), bit for bit.

    On CPU a row-major matrix flipped in both axes is its memory reversed, which numpy copies 2.5-5x
    faster than ``torch.flip`` does the flip (52-107 ms -> 21-22 ms for [4096, 4096] fp32 on one
    thread of an AMD EPYC; GPTQ reverses two such matrices per column chunk). The copy goes into
    torch's memory, so its alignment is torch's."""
    if a.device.type != "cpu" or a.dtype not in (torch.float32, torch.float64) or a.requires_grad:
        return a.flip(0, 1)
    if a.is_contiguous():
        out = torch.empty_like(a, memory_format=torch.contiguous_format)  # torch's aligned memory (diffq.tensor_file)
        np.copyto(out.numpy().reshape(-1), a.numpy().reshape(-1)[::-1])
        return out
    if a.t().is_contiguous():  # column-major (LAPACK's factors): the transpose is row-major
        return _reversed(a.t()).t()
    return a.flip(0, 1)


def _feedback_matrix(h: torch.Tensor, damp: float) -> torch.Tensor:
    h = _reversed(h)  # a copy: reversed column order, so that a lower factor of it is V reversed
    diag = h.diagonal()
    diag[diag <= 0] = 1.0
    undamped = diag.clone()
    lam = damp * float(undamped.mean())
    for _ in range(6):
        torch.add(undamped, lam, out=diag)
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            m = _reversed(chol)  # upper triangular V, H + λ'I = V Vᵀ (a copy; the factor is dropped)
            del chol
            m.div_(m.diagonal().clone())  # M = V · diag(V)⁻¹ in place: three [C, C] matrices at most
            if bool(torch.isfinite(torch.stack(torch.aminmax(m))).all()):  # one pass, no [C, C] mask
                return m
            del m
        lam *= 10.0
    return torch.eye(h.shape[0], dtype=h.dtype, device=h.device)


def dynamic_groups(spec: QuantSpec, act_order: bool, block: int = BLOCK) -> bool:
    """Whether :func:`gptq_quantize` recomputes each group's scales when it reaches the group."""
    g = spec.group_size if spec.granularity == "group" else 0
    return g > 0 and not act_order and g % SUB_BLOCK == 0 and block % g == 0


def gptq_round(
    w: torch.Tensor,
    scale: torch.Tensor | None,
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
    replaces the given one for those columns (dynamic groups; ``scale`` / ``zero`` may then be None).
    Not with act-order. Returns the rounded values [R, K] fp32 (each on its element's grid point).
    """
    st = None if scale is None else transposed(scale)
    zt = None if zero is None else transposed(zero)
    out = round_columns(transposed(w.float()), st, zt, spec, h, block=block, damp=damp, act_order=act_order,
                        regroup=regroup, group=group)
    return transposed(out)


def round_columns(
    wt: torch.Tensor,
    st: torch.Tensor | None,
    zt: torch.Tensor | None,
    spec: QuantSpec,
    h: torch.Tensor,
    *,
    block: int = BLOCK,
    damp: float = DAMP,
    act_order: bool = False,
    regroup: Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]] | None = None,
    group: int = 0,
    original: Callable[[int, int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """:func:`gptq_round` on the transposed layout: ``wt`` [K, R] fp32 contiguous (row j = column j, so
    that every column GPTQ touches is contiguous in memory), grid ``st`` / ``zt`` [K, R] (None where
    ``regroup`` sets every group's). Returns the rounded values [K, R].

    Each column is rounded in place in an error-fed copy of ``wt``, which becomes the result, and
    ``wt`` is left unchanged; with ``original(b1, b2)`` -> ``wt[b1:b2]`` as it was before any feedback
    (e.g. transposed from the caller's row-major weight, a block at a time), ``wt`` itself is
    error-fed and rounded in place and returned: no second [K, R] copy (not with act-order)."""
    k = wt.shape[0]
    if original is not None and act_order:
        raise ValueError("rounding in place (original=...) needs the columns in their order: no act-order")
    if regroup is not None and (act_order or group % SUB_BLOCK or block % group):
        raise ValueError(f"dynamic groups need group % {SUB_BLOCK} == 0, block % group == 0 and no act-order")
    if regroup is None and st is None:
        raise ValueError("gptq_round needs a grid (scale) or a regroup callback that sets every group's")
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else None
    w0 = wt  # the columns before any feedback
    if perm is not None:
        w0, st, h = w0[perm], st[perm], h[perm][:, perm]
        zt = None if zt is None else zt[perm]
    # the columns with feedback; each becomes its rounded values once reached
    fed = w0.clone() if original is None else wt
    m = feedback_matrix(h, damp)
    err = torch.empty(block, fed.shape[1], dtype=fed.dtype, device=fed.device)
    sc = z = None
    for b1 in range(0, k, block):
        b2 = min(b1 + block, k)
        w0b = w0[b1:b2] if original is None else original(b1, b2)  # this block's columns before feedback
        with one_thread(fed.device):  # small ops: serial (see diffq.methods.threads)
            for s1 in range(b1, b2, SUB_BLOCK):
                s2 = min(s1 + SUB_BLOCK, b2)
                if regroup is not None and s1 % group == 0:
                    sc, z = regroup(s1, _group_columns(w0b, fed, m, s1, s1 + group, b1))
                    sc, z = sc.reshape(-1), None if z is None else z.reshape(-1)  # this group's grid [R]
                for j in range(s1, s2):
                    scale_j = sc if regroup is not None else st[j]
                    zero_j = z if regroup is not None else (None if zt is None else zt[j])
                    q = grid_values(fed[j], scale_j, spec, zero_j, out=fed[j])
                    e = torch.sub(w0b[j - b1], q, out=err[j - b1])
                    if j + 1 < s2:
                        fed[j + 1 : s2].addr_(m[j, j + 1 : s2], e)
                if s2 < b2:
                    fed[s2:b2].addmm_(m[s1:s2, s2:b2].t(), err[s1 - b1 : s2 - b1])
        if b2 < k:
            fed[b2:].addmm_(m[b1:b2, b2:].t(), err[: b2 - b1])
    return fed if perm is None else fed[torch.argsort(perm)]


def _group_columns(w0b: torch.Tensor, wt: torch.Tensor, m: torch.Tensor, g1: int, g2: int, b1: int) -> torch.Tensor:
    """Columns ``g1:g2`` as rows [R, g] (a contiguous copy) as GPTQ's usual form has them when their group
    starts: the original columns plus the optimal compensation of the error of every column rounded
    so far. ``wt`` holds them with the feedback of :func:`feedback_matrix`, which equals that
    compensation only once a column itself is reached; inside the group the two differ by the
    group's diagonal block of ``M``: compensation = feedback · ``M[g1:g2, g1:g2]⁻¹`` (row vectors).
    The inverse of that unit triangular [g, g] block is formed first and applied with one matrix
    product (on CPU 3-5x faster than a triangular solve with R right-hand sides; the same values up
    to fp32 rounding). ``w0b``: the original columns of the block starting at column ``b1`` (the
    group lies inside it)."""
    orig = w0b[g1 - b1 : g2 - b1]
    eye = torch.eye(g2 - g1, dtype=m.dtype, device=m.device)
    inv = torch.linalg.solve_triangular(m[g1:g2, g1:g2], eye, upper=True, unitriangular=True)  # M_gg⁻¹
    # [R, g] row-major: the clip search then reads each row's group contiguously
    return torch.addmm(orig.t(), (wt[g1:g2] - orig).t(), inv)


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
    weight sees: per-pixel rows [n, Cin] (per-tap Hessian) or im2col patches [n, kh·kw·Cin] (exact). ``grid`` is ``r``'s round-to-nearest quantization
    (:func:`~diffq.formats.quantize_grid` with dynamic groups, which read no codes): its format, its scales
    for per-tensor / per-channel formats and with act-order ("static groups"), its NVFP4 global scale.
    Without act-order, group scales are recomputed from the error-compensated columns when GPTQ
    reaches each group, as in the original GPTQ, with the clip ratio ``clip(columns, spec, importance)``
    (None = min-max; ``importance`` [group] is the Hessian diagonal of those columns, so a clip search
    can minimise the output error rather than the weight error).

    Returns a QTensor in ``grid``'s format with the error-compensated codes."""
    spec = grid.spec
    cin = xw.shape[1]
    n, kk = r.shape
    rows = r.float().reshape(-1, cin)  # [N·taps, Cin]: taps are independent (per-tap Hessian)
    g = spec.group_size if spec.granularity == "group" else 0
    dynamic = dynamic_groups(spec, act_order, block)
    if dynamic:  # every group's grid is set when GPTQ reaches it: [N·taps, Cin / g]
        scale = torch.empty(rows.shape[0], cin // g, dtype=torch.float32, device=rows.device)
        stored = grid.scale_stored.reshape(rows.shape[0], -1).clone()
        zero = None if grid.zero is None else torch.empty_like(scale)
        st = zt = None
    else:
        scale, zero = expand_grid(grid)
        st = transposed(scale.reshape(-1, cin))
        zt = None if zero is None else transposed(zero.reshape(-1, cin))

    diag = xw.float().square().sum(0) if clip is not None else None

    def regroup(j: int, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        ratio = None if clip is None else clip(cols, spec, diag[j : j + g])
        lo = cols.amin(1, keepdim=True).clamp(max=0) if not spec.symmetric and spec.is_int else None
        hi = cols.amax(1, keepdim=True).clamp(min=0) if lo is not None else abs_max(cols, 1, keepdim=True)
        if ratio is not None:
            hi, lo = hi * ratio, None if lo is None else lo * ratio
        sc, st, z, _ = range_grid(spec, hi, lo, grid.global_scale)
        scale[:, j // g] = sc[:, 0]
        stored[:, j // g] = st[:, 0]
        if zero is not None:
            zero[:, j // g] = z[:, 0]
        return sc, z

    width = cin if not max_columns else min(cin, max_columns)
    if dynamic:
        width = max(g, width // g * g)
    # [Cin, N·taps], error-fed and rounded in place; each block's original columns come transposed
    # from ``rows`` when it is reached (memory: one [Cin, N·taps] working copy besides the input)
    out_t = transposed(rows)
    for c1 in range(0, cin, width):
        c2 = min(c1 + width, cin)
        sub = (lambda j, cols, c1=c1: regroup(c1 + j, cols)) if dynamic else None
        orig = None if act_order else (lambda b1, b2, c1=c1: transposed(rows[:, c1 + b1 : c1 + b2]))
        done = round_columns(
            out_t[c1:c2], None if st is None else st[c1:c2], None if zt is None else zt[c1:c2], spec,
            hessian(xw[:, c1:c2]), block=block, damp=damp, act_order=act_order, regroup=sub, group=g,
            original=orig,
        )
        if orig is None:
            out_t[c1:c2] = done
    del st, zt  # the working copies go before the result is laid out and encoded (peak memory)
    if dynamic:
        groups = grid.scale.shape
        grid = replace(grid, scale=scale.reshape(groups), scale_stored=stored.reshape(groups),
                       zero=None if zero is None else zero.reshape(groups))
    values = transposed(out_t)
    del out_t
    return requantize(grid, values.reshape(n, kk))
