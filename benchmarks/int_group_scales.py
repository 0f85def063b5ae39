"""Study: W4A8 with integer group scales (QServe-style), the weight format that would let the W4A8
kernel drop its per-group rescale (issue 18); a quality bound, not a diffq format.

Each int4 group-64 weight of the ``w4a8`` preset is re-expressed as ``s_ch[n] * s_int[n, g] * q`` with
one float scale per output channel, integer group scales ``s_int`` in ``1..SMAX`` (``SMAX * 7 <= 127``,
so ``s_int * q`` is an int8 operand) rounded up from the float group scale (no group clips more than
before), and codes re-rounded onto the coarser grid. GPTQ does not see the integer scales here, so this
is a pessimistic bound of the format's quality. ``--gptq-aware`` also runs GPTQ on the integer grid:
each group's scale, when GPTQ reaches the group, is rounded up to ``s_ch * s_int`` (``s_ch`` from the
row's abs-max with 6% headroom for the error feedback, ``s_int`` in ``1..SMAX``), so that the codes
compensate the coarser grid (the clip ratio is still searched for float scales). Rows: the preset, the
post-hoc conversion, and (with ``--gptq-aware``) the GPTQ-aware one, on the same seeds.

    python -m benchmarks.int_group_scales --model digits-sd --seed-offset 1000 [--gptq-aware] --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch

import diffq.methods.gptq as gptq_mod
import diffq.quantization.build as build_mod
from benchmarks.ablation import _mean_se, run
from diffq.formats import int_range, pack_bits
from diffq.io import write_json_atomic
from diffq.modules import quantized_modules
from diffq.modules.qweight import weight_codes, weight_scale
from diffq.pipelines.adapters import adapter_for

SMAX = 18  # 18 * 7 = 126: the product of an integer scale and an int4 code fits int8


def integer_group_scales(pipe, smax: int = SMAX) -> int:
    """Re-express every symmetric int4 group-scaled weight of ``pipe``'s denoiser with integer group
    scales in place (codes [N, K] -> codes on the grid ``s_ch * s_int``); returns the layer count."""
    n = 0
    for m in quantized_modules(adapter_for(pipe).denoiser(pipe)).values():
        sp = m.wspec
        if not (sp.is_int and sp.bits == 4 and sp.symmetric and sp.granularity == "group"):
            continue
        codes, scale = weight_codes(m).float(), weight_scale(m).float()  # [N, K], [N, G]
        s_ch = scale.amax(1, keepdim=True) / smax
        s_eff = (s_ch * torch.ceil(scale / s_ch).clamp(1, smax)).to(m.wscale.dtype)
        grouped = codes.reshape(codes.shape[0], -1, sp.group_size)
        qlo, qhi = int_range(sp)
        new = torch.round(grouped * (scale / s_eff.float()).unsqueeze(-1)).clamp(qlo, qhi)
        m.qweight = pack_bits(new.reshape(codes.shape).to(torch.int8), 4)
        m.wscale = s_eff
        n += 1
    return n


@contextlib.contextmanager
def gptq_on_integer_grid(smax: int = SMAX, headroom: float = 1.06):
    """While active, GPTQ (as ``build_layer`` calls it) rounds every symmetric int4 group scale up to the
    integer grid ``s_ch * s_int`` of its row (a study patch of diffq's GPTQ, restored on exit)."""
    orig_gptq, orig_grid = build_mod.gptq_quantize, gptq_mod.range_grid
    row_unit = {}

    def grid(spec, hi, lo=None, global_scale=None):
        unit = row_unit.get("unit")
        if unit is not None and spec.is_int and spec.symmetric and spec.bits == 4 and lo is None:
            t = unit.reshape(hi.shape[0], *([1] * (hi.dim() - 1))) * int_range(spec)[1]
            hi = torch.ceil(hi / t).clamp(1, smax) * t
        return orig_grid(spec, hi, lo, global_scale)

    def gptq(r, q, xw, **kw):
        spec = q.spec
        if spec.is_int and spec.symmetric and spec.bits == 4 and spec.granularity == "group":
            rows = r.float().reshape(-1, xw.shape[1])
            row_unit["unit"] = (rows.abs().amax(1) * headroom / (int_range(spec)[1] * smax)).clamp_min(1e-12)
        try:
            return orig_gptq(r, q, xw, **kw)
        finally:
            row_unit.pop("unit", None)

    build_mod.gptq_quantize, gptq_mod.range_grid = gptq, grid
    try:
        yield
    finally:
        build_mod.gptq_quantize, gptq_mod.range_grid = orig_gptq, orig_grid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="digits-sd")
    ap.add_argument("--num-prompts", type=int, default=200)
    ap.add_argument("--seed-offset", type=int, default=1000)
    ap.add_argument("--smax", type=int, default=SMAX)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default="runs/ablation-cache")
    ap.add_argument("--gptq-aware", action="store_true", help="also a row with GPTQ on the integer grid")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    label = f"w4a8, integer group scales 1..{args.smax} (post hoc)"
    kw = {"num_prompts": args.num_prompts, "calib_prompts": 32, "reservoir": 256, "steps": 20, "guidance": 5.0,
          "cache": Path(args.cache), "seed_offset": args.seed_offset}
    result = run(args.model, {"w4a8": "w4a8", label: "w4a8"}, **kw,
                 post={label: lambda p: integer_group_scales(p, args.smax)})
    if args.gptq_aware:
        aware = f"w4a8, integer group scales 1..{args.smax} (GPTQ on the integer grid)"
        with gptq_on_integer_grid(args.smax):
            extra = run(args.model, {aware: "w4a8"}, **kw)
        row = extra["rows"][0]
        base = torch.tensor(result["rows"][0]["per_image"]["psnr"])
        row["psnr_vs_first_row"] = list(_mean_se(torch.tensor(row["per_image"]["psnr"]) - base))
        print(f"{aware}: vs first row {row['psnr_vs_first_row'][0]:+.2f} ±{row['psnr_vs_first_row'][1]:.2f} dB", flush=True)
        result["rows"].append(row)
    result["table"] = "int_group_scales"
    if args.json:
        write_json_atomic(args.json, result)


if __name__ == "__main__":
    main()
