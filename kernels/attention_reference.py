"""Quantized attention (SageAttention2-style): the exact math, in torch. The Triton kernel of
:mod:`diffq.kernels.attention` computes the same thing; this is its oracle and the CPU path.

``O = softmax(Q Kᵀ · scale + mask) V`` for ``q [B, H, M, D]``, ``k, v [B, H, N, D]``, with

* **K smoothing** (``smooth_k``): ``K ← K - mean_tokens(K)`` per (batch, head) before quantizing.
  It subtracts ``q_i · mean(K)`` from every logit of query row ``i``, which softmax ignores, and
  removes the channel offsets K shares across tokens, so its codes spend their range on what varies.
* **Q, K codes**: symmetric ``qk_bits`` integers (``qmax`` 127 or 7), one scale ``amax / qmax``
  (at least ``SCALE_MIN``) per ``block`` query rows / key rows of each (batch, head) -- the kernel's
  tiles -- or one per (batch, head) (``granularity="head"``). Rounding: half to even.
* **logits** in base 2, fp32: ``S = (codes_q · codes_k) · ((s_q · s_k) · scale · log2 e) + mask · log2 e``
  (the integer dot is exact); key columns past N are ``-inf``.
* **P codes** per (query row, key block of ``block`` keys): ``round(PMAX · 2^(S - m_blk))``, where
  ``m_blk`` is the row's max over that block (at least ``M_FLOOR``), so every code lies in
  ``[0, PMAX]``; E4M3 (``PMAX`` 448, nearest even on the E4M3 grid), INT8 (``PMAX`` 127) or fp16
  (``PMAX`` 1, P rounded to fp16: SageAttention1's 16-bit P·V, which isolates the Q·Kᵀ error).
  Because the codes are taken against the block's own max, they do not depend on the order in
  which the online softmax visits the blocks; the block's scale ``2^(m_blk - m)`` is exact in fp32.
* **V codes** per (batch, head, channel): ``round(V / s_v)``, ``s_v = amax_tokens / VMAX``, E4M3 or
  INT8 like P (``pv``); for fp16, V itself rounded to fp16 (``s_v = 1``, saturating at 65504).
* **output**: ``O = (Σ_blk w_blk (P_blk · V_blk) / Σ_blk w_blk rowsum(P_blk)) · s_v`` with
  ``w_blk = 2^(m_blk - m)``, ``m`` the row max over all keys. P is normalised by the sum of its own
  codes, so the quantized weights of a row sum to one. A row whose every key is masked out
  (``-inf``) gives 0 (where SDPA gives NaN).

The only difference to the kernel is fp32 summation order (the kernel rescales its accumulator
block by block, FlashAttention's online softmax; this sums the blocks against the final max) and
``exp2`` rounding, which can move a P code across a rounding boundary; tests/test_attention.py
states the tolerance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from diffq.errors import ShapeError
from diffq.formats import SCALE_MIN

LOG2E = math.log2(math.e)
#: floor of a block's row max: keeps 2^(S - m) finite when a whole block is masked with -inf
M_FLOOR = -1.0e30
FP8_MAX = 448.0
FP16_MAX = 65504.0
#: the largest P code of each P / V format
PV_MAX = {"fp8": FP8_MAX, "int8": 127.0, "fp16": 1.0}
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: bytes of fp32 logits one chunk of query rows may hold in the reference
_CHUNK_BYTES = 1 << 26


@dataclass(frozen=True)
class AttnFormat:
    """How attention's two matmuls are quantized.

    qk_bits: 8 (INT8) or 4 (INT4 codes, computed on the INT8 MMA: an accuracy experiment, no speed-up).
    pv: ``"fp8"`` (E4M3 P and V, fp32 accumulation), ``"int8"`` or ``"fp16"`` (16-bit P and V).
    block: tokens per Q / K scale and kernel tile (a power of two, 16..128).
    granularity: ``"block"`` (one Q / K scale per ``block`` tokens) or ``"head"`` (one per batch and head).
    smooth_k: subtract K's mean over tokens before quantizing (leaves softmax unchanged).
    """

    qk_bits: int = 8
    pv: str = "fp8"
    block: int = 64
    granularity: str = "block"
    smooth_k: bool = True

    def __post_init__(self) -> None:
        if self.qk_bits not in (4, 8):
            raise ShapeError(f"attention qk_bits must be 8 or 4, got {self.qk_bits!r}")
        if self.pv not in PV_MAX:
            raise ShapeError(f"attention pv format must be one of {sorted(PV_MAX)}, got {self.pv!r}")
        if self.block not in (16, 32, 64, 128):
            raise ShapeError(f"attention block must be 16, 32, 64 or 128 tokens, got {self.block!r}")
        if self.granularity not in ("block", "head"):
            raise ShapeError(f"attention granularity must be 'block' or 'head', got {self.granularity!r}")

    @property
    def qmax(self) -> float:
        return float(2 ** (self.qk_bits - 1) - 1)

    @property
    def pmax(self) -> float:
        return PV_MAX[self.pv]

    def describe(self) -> str:
        """E.g. ``int8 QK (block 64, smoothed K) x fp8 PV``."""
        scale = f"block {self.block}" if self.granularity == "block" else "per head"
        smooth = ", smoothed K" if self.smooth_k else ""
        return f"int{self.qk_bits} QK ({scale}{smooth}) x {self.pv} PV"


# ----------------------------------------------------------------------------- validation, shared prologue


def check_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> None:
    """q [B, H, M, D], k / v [B, H, N, D] (one float dtype, one device); mask broadcastable to
    [B, H, M, N], boolean (True = attend) or additive float."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.dtype not in FLOAT_DTYPES:
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ShapeError(f"quantized attention: {name} must be float16/bfloat16/float32 [B, H, tokens, D], "
                             f"got {got}")
    b, h, m, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, h) or k.shape[3] != d:
        raise ShapeError(f"quantized attention: k and v must be [B, H, N, D] = [{b}, {h}, N, {d}] like q "
                         f"{tuple(q.shape)}, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype or k.device != q.device or v.device != q.device:
        raise ShapeError("quantized attention: q, k and v must share one dtype and device")
    if m == 0 or k.shape[2] == 0 or d == 0:
        raise ShapeError(f"quantized attention needs at least one query, key and channel; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    if mask is not None:
        try:
            torch.broadcast_shapes(mask.shape, (b, h, m, k.shape[2]))
        except RuntimeError as e:
            raise ShapeError(f"attention mask {tuple(mask.shape)} does not broadcast to [B, H, M, N] = "
                             f"{[b, h, m, k.shape[2]]}") from e


def additive_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Boolean (True = attend) -> fp32 0 / -inf; a float mask -> fp32 (added to the logits)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.float()


def _scale_of(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    return (amax / qmax).clamp_min(SCALE_MIN)


@dataclass
class Prologue:
    """What the kernel gets precomputed (one pass over K and V, done in torch for both paths).

    k_mean: fp32 [B, H, D] (None without smoothing); v_scale: fp32 [B, H, D];
    q_scale / k_scale: fp32 [B, H] for ``granularity="head"``, else None (per block, in the kernel).
    """

    k_mean: torch.Tensor | None
    v_scale: torch.Tensor
    q_scale: torch.Tensor | None
    k_scale: torch.Tensor | None


def prologue(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fmt: AttnFormat) -> Prologue:
    k_mean = k.float().mean(dim=2) if fmt.smooth_k else None
    if fmt.pv == "fp16":
        v_scale = torch.ones(v.shape[0], v.shape[1], v.shape[3], device=v.device)
    else:
        v_scale = _scale_of(v.float().abs().amax(dim=2), fmt.pmax).contiguous()
    q_scale = k_scale = None
    if fmt.granularity == "head":
        ks = k.float() if k_mean is None else k.float() - k_mean.unsqueeze(2)
        q_scale = _scale_of(q.float().abs().amax(dim=(2, 3)), fmt.qmax).contiguous()
        k_scale = _scale_of(ks.abs().amax(dim=(2, 3)), fmt.qmax).contiguous()
    return Prologue(None if k_mean is None else k_mean.contiguous(), v_scale, q_scale, k_scale)


# ----------------------------------------------------------------------------- the reference


def _round_int(x: torch.Tensor, qmax: float) -> torch.Tensor:
    return torch.round(x.clamp(-qmax, qmax))


def _round_fp8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()


def _round_pv(x: torch.Tensor, fmt: AttnFormat) -> torch.Tensor:
    """P or V (already divided by its scale) onto the P·V format's grid, as fp32."""
    if fmt.pv == "fp8":
        return _round_fp8(x)
    if fmt.pv == "fp16":
        return x.clamp(-FP16_MAX, FP16_MAX).half().float()
    return _round_int(x, fmt.pmax)


def _qk_codes(x: torch.Tensor, fmt: AttnFormat, head_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 x [B, H, T, D] -> (codes as fp32 [B, H, Tp, D] zero-padded to whole blocks, scale
    [B, H, Tp, 1]: each row's block scale)."""
    b, h, t, d = x.shape
    blocks = -(-t // fmt.block)
    xp = torch.nn.functional.pad(x, (0, 0, 0, blocks * fmt.block - t))
    if head_scale is not None:
        scale = head_scale.reshape(b, h, 1, 1).expand(b, h, blocks * fmt.block, 1)
    else:
        amax = xp.reshape(b, h, blocks, fmt.block * d).abs().amax(-1)
        scale = _scale_of(amax, fmt.qmax).repeat_interleave(fmt.block, dim=2).unsqueeze(-1)
    return _round_int(xp / scale, fmt.qmax), scale


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fmt: AttnFormat,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Quantized ``softmax(q kᵀ · scale + mask) v`` (module docstring) -> [B, H, M, D] in q.dtype.

    scale: the logit scale (default ``D ** -0.5``, SDPA's). Runs on any device; query rows are
    processed in chunks of whole blocks so that the fp32 logits stay under ~64 MiB.
    """
    check_operands(q, k, v, mask)
    b, h, m, d = q.shape
    n = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    pro = prologue(q, k, v, fmt)
    kf = k.float() if pro.k_mean is None else k.float() - pro.k_mean.unsqueeze(2)
    qc, sq = _qk_codes(q.float(), fmt, pro.q_scale)
    kc, sk = _qk_codes(kf, fmt, pro.k_scale)
    nb = kc.shape[2] // fmt.block
    n_pad = nb * fmt.block
    vs = pro.v_scale.unsqueeze(2)  # [B, H, 1, D]
    vq = _round_pv(torch.nn.functional.pad(v.float() / vs, (0, 0, 0, n_pad - n)), fmt)
    add = additive_mask(mask)
    valid = torch.arange(n_pad, device=q.device) < n
    kt = kc.transpose(-1, -2)
    skt = sk.transpose(-1, -2)
    qk_scale = scale * LOG2E
    rows = max(fmt.block, (_CHUNK_BYTES // max(4 * b * h * n_pad, 1)) // fmt.block * fmt.block)
    outs = []
    for r0 in range(0, m, rows):
        r1 = min(r0 + rows, m)
        s = torch.matmul(qc[:, :, r0:r1], kt) * ((sq[:, :, r0:r1] * skt) * qk_scale)
        if add is not None:
            chunk = torch.broadcast_to(add, (b, h, m, n))[:, :, r0:r1]
            s = s + torch.nn.functional.pad(chunk, (0, n_pad - n)) * LOG2E
        s = s.masked_fill(~valid, float("-inf")).reshape(b, h, r1 - r0, nb, fmt.block)
        m_blk = s.amax(-1).clamp_min(M_FLOOR)  # [B, H, rows, nb]
        p = _round_pv(fmt.pmax * torch.exp2(s - m_blk.unsqueeze(-1)), fmt)
        w = torch.exp2(m_blk - m_blk.amax(-1, keepdim=True))  # each block's weight 2^(m_blk - m)
        pw = (p * w.unsqueeze(-1)).reshape(b, h, r1 - r0, n_pad)
        denom = pw.sum(-1, keepdim=True)
        denom = torch.where(denom > 0, denom, torch.ones_like(denom))
        outs.append((torch.matmul(pw, vq) / denom) * vs)
    return torch.cat(outs, dim=2).to(q.dtype)
