"""Study: W4A8 with integer group scales (QServe-style), the weight format that would let the W4A8
kernel drop its per-group rescale (issue 18); a quality bound, not a diffq format.

Each int4 group-64 weight of the ``w4a8`` preset is re-expressed as ``s_ch[n] * s_int[n, g] * q`` with
one float scale per output channel, integer group scales ``s_int`` in ``1..SMAX`` (``SMAX * 7 <= 127``,
so ``s_int * q`` is an int8 operand) rounded up from the float group scale (no group clips more than
before), and codes re-rounded onto the coarser grid. GPTQ does not see the integer scales here, so this
is a pessimistic bound of the format's quality (a GPTQ that chose codes on the integer grid would do
better). Rows: the preset, and the same quantization with integer group scales, on the same seeds.

    python -m benchmarks.int_group_scales --model digits-sd --seed-offset 1000 --json out.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.ablation import run
from diffq.formats import pack_bits
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
        new = torch.round(grouped * (scale / s_eff.float()).unsqueeze(-1)).clamp(-7, 7)
        m.qweight = pack_bits(new.reshape(codes.shape).to(torch.int8), 4)
        m.wscale = s_eff
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="digits-sd")
    ap.add_argument("--num-prompts", type=int, default=200)
    ap.add_argument("--seed-offset", type=int, default=1000)
    ap.add_argument("--smax", type=int, default=SMAX)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default="runs/ablation-cache")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    label = f"w4a8, integer group scales 1..{args.smax} (post hoc)"
    result = run(args.model, {"w4a8": "w4a8", label: "w4a8"}, num_prompts=args.num_prompts, calib_prompts=32,
                 reservoir=256, steps=20, guidance=5.0, cache=Path(args.cache), seed_offset=args.seed_offset,
                 post={label: lambda p: integer_group_scales(p, args.smax)})
    result["table"] = "int_group_scales"
    if args.json:
        write_json_atomic(args.json, result)


if __name__ == "__main__":
    main()
