"""Attention output error per timestep on a FLUX-width slice (random weights, CPU), with and
without K smoothing.

    python -m benchmarks.attention_flux_slice [--image-tokens 1024 --text-tokens 512] [--steps 4]
        [--threads 2] [--json benchmarks/results/attention_flux_slice.json]

A ``FluxTransformer2DModel`` from the real FLUX.1-dev config (``benchmarks/model_configs.py``: width
3072, 24 heads of 128, rotary axes 16/56/56) cut to 1 double-stream + 2 single-stream blocks, random
weights (seed 0, diffusers' default init), fp32. Inputs: 1,024 image tokens (a 512 px image: 64x64
latent, 2x2 packed) and 512 text tokens, flow-matching ``x_t = (1 - σ) x0 + σ ε`` with random ``x0``
and ``ε`` at ``--steps`` σ values spread over (0, 1] after FLUX's dynamic time shift, guidance 3.5.
Every attention call runs in full precision (the trajectory is FP) and, beside it, every attention
format of diffq with and without K smoothing (:func:`diffq.attention.probe_attention`); recorded per
module and timestep: relative L2 of the attention output and ``‖mean_t K‖ / rms_t(K - mean)`` (how
much of K is an offset shared by all tokens, which smoothing removes). Random weights give K
almost no such offset (ratio ~0.15; trained models: 0.2-0.9 in self-attention, 2-6 in the
cross-attention of digits-sd), so ``--k-offset S`` plants one in the key projections' biases
(synthetic, reported as such).
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import torch

from benchmarks.model_configs import FLUX_DIT

RESULTS = Path(__file__).resolve().parent / "results"


def shifted_sigmas(steps: int, image_tokens: int) -> list[float]:
    """FLUX's schedule: ``steps`` sigmas from 1 down (linear in t), time-shifted by mu(image tokens)."""
    mu = 0.5 + (1.15 - 0.5) * (image_tokens - 256) / (4096 - 256)  # FluxPipeline's calculate_shift
    ts = [1.0 - i / steps for i in range(steps)]
    return [math.exp(mu) / (math.exp(mu) + (1 / t - 1)) for t in ts]


def plant_k_offset(model, scale: float, seed: int) -> None:
    """Add ``scale`` x (the std of a to_k output element at init) x N(0, 1) to the bias of every key
    projection (to_k, add_k_proj): a key offset shared by all tokens, as trained models have and
    random ones do not. Synthetic: only used with ``--k-offset``, and labelled so."""
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, m in model.named_modules():
            if name.endswith(("attn.to_k", "attn.add_k_proj")):
                # kaiming-uniform init: weight std 1/sqrt(3 fan_in); LayerNorm'd inputs have unit variance
                m.bias += scale * (1 / 3) ** 0.5 * torch.randn(m.bias.shape, generator=g)


def build(image_tokens: int, text_tokens: int, seed: int, k_offset: float = 0.0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**(FLUX_DIT | {"num_layers": 1, "num_single_layers": 2})).eval()
    if k_offset:
        plant_k_offset(model, k_offset, seed)
    side = math.isqrt(image_tokens)
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(side).float(), torch.arange(side).float(),
                                     indexing="ij"), -1).reshape(-1, 3)
    inputs = {
        "x0": torch.randn(1, side * side, FLUX_DIT["in_channels"], generator=g),
        "noise": torch.randn(1, side * side, FLUX_DIT["in_channels"], generator=g),
        "encoder_hidden_states": torch.randn(1, text_tokens, FLUX_DIT["joint_attention_dim"], generator=g),
        "pooled_projections": torch.randn(1, FLUX_DIT["pooled_projection_dim"], generator=g),
        "img_ids": ids, "txt_ids": torch.zeros(text_tokens, 3),
    }
    return model, inputs


def run(image_tokens: int, text_tokens: int, steps: int, seed: int, k_offset: float = 0.0,
        labels: list[str] | None = None) -> dict:  # fmt: skip
    from diffq.attention import default_probe_formats, probe_attention

    model, inp = build(image_tokens, text_tokens, seed, k_offset)
    formats = default_probe_formats()
    if labels:
        formats = {k: formats[k] for k in labels}
    sums: dict[str, dict[str, list[float]]] = {}
    k_offset: dict[str, list[float]] = {}
    state = {"step": 0}

    def record(name, label, err_sq, ref_sq):
        row = sums.setdefault(name, {}).setdefault(label, [0.0, 0.0] * steps)
        row[2 * state["step"]] += float(err_sq)
        row[2 * state["step"] + 1] += float(ref_sq)

    def measure_k(name, q, k, v, mask):
        kf = k.double()
        mean = kf.mean(dim=2, keepdim=True)
        ratio = mean.norm() / ((kf - mean).pow(2).sum() / kf.shape[2]).sqrt()
        k_offset.setdefault(name, [float("nan")] * steps)[state["step"]] = float(ratio)

    sigmas = shifted_sigmas(steps, image_tokens)
    times = []
    with torch.no_grad(), probe_attention(model, formats, record, backend="reference", observe=measure_k) as names:
        for i, sigma in enumerate(sigmas):
            state["step"] = i
            t0 = time.perf_counter()
            x = (1 - sigma) * inp["x0"] + sigma * inp["noise"]
            model(hidden_states=x, encoder_hidden_states=inp["encoder_hidden_states"],
                  pooled_projections=inp["pooled_projections"], timestep=torch.tensor([sigma]),
                  guidance=torch.tensor([3.5]), img_ids=inp["img_ids"], txt_ids=inp["txt_ids"], return_dict=False)
            times.append(time.perf_counter() - t0)
            print(f"sigma {sigma:.3f}: {times[-1]:.0f} s", flush=True)
    errors = {name: {label: [math.sqrt(row[2 * s] / row[2 * s + 1]) for s in range(steps)]
                     for label, row in rows.items()} for name, rows in sums.items()}
    return {"image_tokens": image_tokens, "text_tokens": text_tokens, "width": 3072, "heads": 24, "head_dim": 128,
            "blocks": "1 double + 2 single", "dtype": "fp32", "planted_k_offset": k_offset, "sigmas": sigmas, "modules": names,
            "relative_l2": errors, "k_offset_ratio": k_offset, "step_seconds": times}


def plot(result: dict, out_png: Path) -> None:
    """Per module: relative L2 per sigma of every format, smoothed (solid) and not (dashed)."""
    from diffq.plotting import new_figure, save_figure

    mods = result["modules"]
    fig = new_figure((5 * len(mods), 4))
    axes = fig.subplots(1, len(mods), sharey=True, squeeze=False)[0]
    bases = sorted({lab.split("/")[0] for m in result["relative_l2"].values() for lab in m})
    for ax, name in zip(axes, mods):
        for label, ys in sorted(result["relative_l2"][name].items()):
            ax.plot(result["sigmas"], ys, marker="o", ms=3, ls="--" if "no-smooth" in label else "-",
                    color=f"C{bases.index(label.split('/')[0])}", label=label)
        ax.set_title(f"{name} (K offset ratio {sum(result['k_offset_ratio'][name]) / len(result['sigmas']):.2f})",
                     fontsize=9)
        ax.set_xlabel("sigma (denoising runs right to left)")
        ax.invert_xaxis()
        ax.set_yscale("log")
    axes[0].set_ylabel("relative L2 of attention output vs FP")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out_png)


def markdown(result: dict) -> str:
    """One table: module x format (smoothed / not) at every sigma, and the K offset ratio."""
    labels = sorted({lab.split("/")[0] for m in result["relative_l2"].values() for lab in m})
    sig = result["sigmas"]
    out = ["| module | format | " + " | ".join(f"σ={s:.2f}" for s in sig) + " |",
           "|---|---|" + "---|" * len(sig)]
    for name in result["modules"]:
        rows = result["relative_l2"][name]
        for lab in labels:
            cells = [f"{a:.4f} / {b:.4f}" for a, b in zip(rows[lab], rows[f"{lab}/no-smooth"])]
            out.append(f"| {name} | {lab} smoothed / not | " + " | ".join(cells) + " |")
        out.append(f"| {name} | K offset ratio | " + " | ".join(f"{x:.2f}" for x in result["k_offset_ratio"][name])
                   + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    from diffq.io import write_json_atomic

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image-tokens", type=int, default=1024)
    ap.add_argument("--text-tokens", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--formats", default="int8-fp8,int8-fp8/no-smooth,int8-fp16,int8-fp16/no-smooth",
                    help="probe labels (diffq.attention.default_probe_formats), comma-separated, or 'all'")
    ap.add_argument("--k-offset", type=float, default=0.0,
                    help="plant a token-shared key offset of this size (synthetic; 0 = the random init as is)")
    ap.add_argument("--json", default=str(RESULTS / "attention_flux_slice.json"))
    ap.add_argument("--render", action="store_true", help="only print the table (and plot) of an existing --json")
    a = ap.parse_args(argv)
    if a.render:
        import json

        res = json.loads(Path(a.json).read_text())["result"]
        plot(res, Path(a.json).with_suffix(".png"))
        print(markdown(res))
        return
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    res = run(a.image_tokens, a.text_tokens, a.steps, a.seed, a.k_offset,
              None if a.formats == "all" else a.formats.split(","))
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    plot(res, Path(a.json).with_suffix(".png"))
    write_json_atomic(a.json, {"machine": f"{platform.machine()} CPU, {a.threads} torch threads (shared machine)",
                               "torch": torch.__version__, "args": vars(a) | {"json": Path(a.json).name}, "result": res})
    print(markdown(res))


if __name__ == "__main__":
    main()
