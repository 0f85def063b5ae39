"""``calibrate``: run the real pipeline (its scheduler, CFG batch, added conditioning, packed
latents) with forward hooks on every quantizable layer and fold each layer's input into
per-step statistics."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from diffq.attention.error import default_probe_formats, probe_attention
from diffq.calibration.container import CalibrationStats
from diffq.calibration.operands import attention_operands as find_attention_operands
from diffq.calibration.reservoir import InputReservoir
from diffq.calibration.stats import LayerStats
from diffq.errors import CalibrationError
from diffq.fingerprint import weights_fingerprint
from diffq.generation import generate
from diffq.io import remove_stale_temps
from diffq.modules.layers import quantizable_layers, structure_fingerprint
from diffq.modules.timestep import TimestepTracker, register_timestep_hook
from diffq.pipelines.adapters import adapter_for
from diffq.progress import progress_enabled


def uniform_steps(num_steps: int, k: int | None) -> list[int]:
    """``k`` step indices spread uniformly over the trajectory (Q-Diffusion); all when k is None."""
    if k is None or k >= num_steps:
        return list(range(num_steps))
    if k < 1:
        raise CalibrationError(f"record_steps={k} must be >= 1")
    return sorted({round(i * (num_steps - 1) / max(k - 1, 1)) for i in range(k)})


def _rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Conv2d):
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def calibrate(
    pipe,
    prompts: Sequence[str],
    *,
    num_inference_steps: int = 20,
    guidance_scale: float | None = None,
    seed: int = 0,
    images_per_prompt: int = 1,
    batch_size: int = 8,
    record_steps: int | None = None,
    height: int | None = None,
    width: int | None = None,
    progress: bool = True,
    checkpoint: str | Path | None = None,
    reservoir: int = 0,
    attention_operands: bool = False,
) -> CalibrationStats:
    """Collect per-timestep input statistics of every quantizable layer of ``pipe``'s denoiser.

    prompts: calibration prompts (class names or ids for class-conditional pipelines).
    record_steps: record only this many steps, uniformly spread (None = all steps).
    Image i of prompt p uses seed ``seed + p * images_per_prompt + i``, so runs are deterministic.
    checkpoint: a .safetensors path; the statistics are saved there (atomically) after every batch
        and an interrupted run with the same arguments resumes after the last finished batch.
    reservoir: also keep up to this many real input rows per layer and step, a uniform random
        sample (seeded by ``seed``; :mod:`diffq.calibration.reservoir`) for methods that need real
        activations; 0 (default) keeps statistics only.
    attention_operands: also record Q, K and V of every attention module (the operands of Q·Kᵀ and
        P·V; :mod:`diffq.calibration.operands`) into ``stats.operands``, per step, like layer inputs,
        and the relative L2 error of each attention module's output under every quantized attention
        format, with and without K smoothing, into ``stats.attention_error`` (per step; the pipeline
        itself runs in full precision: :func:`diffq.attention.probe_attention`).
    Raises CalibrationError on an empty prompt list or a NaN/Inf input (naming layer and step).
    """
    prompts = list(prompts)
    if not prompts:
        raise CalibrationError("calibration needs at least one prompt; pass prompts=[...]")
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise CalibrationError(f"num_inference_steps={num_inference_steps!r} must be an integer >= 1")
    for label, v in (("batch_size", batch_size), ("images_per_prompt", images_per_prompt)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise CalibrationError(f"{label}={v!r} must be an integer >= 1")
    if isinstance(reservoir, bool) or not isinstance(reservoir, int) or reservoir < 0:
        raise CalibrationError(f"reservoir={reservoir!r} must be an integer >= 0 (rows kept per layer and step)")
    adapter = adapter_for(pipe)
    denoiser = adapter.denoiser(pipe)
    layers = quantizable_layers(denoiser)
    tracker = TimestepTracker()  # this run's own: removed with the other hooks at the end
    recorded = set(uniform_steps(num_inference_steps, record_steps))
    stats: dict[str, LayerStats] = {}
    step_buckets = [-1] * num_inference_steps
    all_prompts = [p for p in prompts for _ in range(images_per_prompt)]
    # the base weights are part of the identity: stats of another fine-tune must never be mixed in
    run_id = _run_id(all_prompts, num_inference_steps, guidance_scale, seed, batch_size, record_steps, height,
                     width, weights_fingerprint(denoiser), reservoir, attention_operands)
    operand_mods = find_attention_operands(denoiser) if attention_operands else {}
    operand_stats: dict[str, LayerStats] = {}
    probe_formats = default_probe_formats() if attention_operands else {}
    attn_error: dict[str, torch.Tensor] = {}
    reservoirs: dict[str, InputReservoir] = {}
    sampler = torch.Generator().manual_seed(seed)
    done = 0
    if checkpoint is not None:
        remove_stale_temps(checkpoint)  # a killed run's half-written snapshot
    if checkpoint is not None and Path(checkpoint).is_file():
        prev = CalibrationStats.load(checkpoint)
        if prev.meta.get("run_id") != run_id or prev.structure != structure_fingerprint(denoiser):
            # refuse rather than overwrite: that file may be hours of another run's work
            raise CalibrationError(
                f"checkpoint {str(checkpoint)!r} belongs to a different calibration run (other model, prompts or "
                f"settings); pass another checkpoint path, or delete the file to start this run from scratch"
            )
        stats, step_buckets, done = prev.layers, prev.step_buckets, int(prev.meta.get("done", 0))
        reservoirs = prev.reservoirs
        operand_stats = prev.operands
        attn_error = prev.attention_error
        if "sampler_state" in prev.meta:  # continue the same random stream as an uninterrupted run
            sampler.set_state(torch.tensor(prev.meta["sampler_state"], dtype=torch.uint8))
    state = {"calls_at_start": 0}

    def recorded_step() -> int | None:
        """Step index of the denoiser call in progress, or None when this step is not recorded."""
        step = tracker.calls - 1 - state["calls_at_start"]
        return step if 0 <= step < num_inference_steps and step in recorded else None

    def record(table: dict[str, LayerStats], name: str, step: int, rows: torch.Tensor, what: str) -> None:
        """Fold ``rows`` [R, C] into ``table[name]`` at ``step``, refusing NaN/Inf where it starts."""
        if not torch.isfinite(rows).all():
            raise CalibrationError(
                f"NaN/Inf in the {what} {name!r} at step {step} (timestep bucket {tracker.bucket}); "
                f"the full-precision pipeline itself is producing non-finite values - check its dtype "
                f"(fp16 overflow: use bf16/fp32) and inputs"
            )
        st = table.get(name)
        if st is None:
            st = table[name] = LayerStats.empty(num_inference_steps, rows.shape[-1])
        st.update(step, rows)

    def make_hook(name: str, module: nn.Module):
        def hook(mod, args):
            step = recorded_step()
            if step is None:
                return
            rows = _rows(mod, args[0])
            record(stats, name, step, rows, "input of layer")
            if reservoir:
                res = reservoirs.get(name)
                if res is None:
                    res = reservoirs[name] = InputReservoir.empty(num_inference_steps, reservoir, rows.shape[-1])
                res.update(step, rows, sampler)
            step_buckets[step] = tracker.bucket

        return hook

    def make_operand_hook(name: str):
        def hook(mod, args, output):
            step = recorded_step()
            if step is not None and torch.is_tensor(output):
                record(operand_stats, name, step, output.reshape(-1, output.shape[-1]), "attention operand")

        return hook

    def record_attention_error(name: str, label: str, err_sq: torch.Tensor, ref_sq: torch.Tensor) -> None:
        step = recorded_step()
        if step is None:
            return
        sums = attn_error.get(name)
        if sums is None:
            sums = attn_error[name] = torch.zeros(num_inference_steps, len(probe_formats), 2, dtype=torch.float64)
        j = list(probe_formats).index(label)
        sums[step, j, 0] += float(err_sq)
        sums[step, j, 1] += float(ref_sq)

    handles = [register_timestep_hook(denoiser, adapter.timestep_of, lambda _m: tracker)]
    handles += [m.register_forward_pre_hook(make_hook(n, m)) for n, m in layers.items()]
    handles += [m.register_forward_hook(make_operand_hook(n)) for n, m in operand_mods.items()]
    seeds = [seed + i for i in range(len(all_prompts))]
    bar = tqdm(total=len(all_prompts), initial=done, desc="calibrate", disable=not progress_enabled(progress))

    def snapshot(n_done: int) -> CalibrationStats:
        missing = [n for n in layers if n not in stats]
        return CalibrationStats(
            family=adapter.name,
            structure=structure_fingerprint(denoiser),
            num_steps=num_inference_steps,
            step_buckets=list(step_buckets),
            layers=stats,
            splits={k: v for k, v in adapter.skip_splits(denoiser).items() if k in stats},
            meta={
                "prompts": len(prompts),
                "images_per_prompt": images_per_prompt,
                "seed": seed,
                "guidance_scale": guidance_scale,
                "record_steps": sorted(recorded),
                "unobserved_layers": missing,
                "run_id": run_id,
                "done": n_done,
                **({"sampler_state": sampler.get_state().tolist()} if reservoir else {}),
            },
            reservoirs=reservoirs,
            operands=operand_stats,
            attention_error=attn_error,
            attention_formats=list(probe_formats),
        )

    probes = probe_attention(denoiser, probe_formats, record_attention_error) if probe_formats else nullcontext()
    try:
        with probes:
            # one pipeline call per batch; step index = denoiser calls since the batch started
            for i in range(done, len(all_prompts), batch_size):
                state["calls_at_start"] = tracker.calls
                generate(
                    pipe, all_prompts[i : i + batch_size], seeds[i : i + batch_size],
                    num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                    height=height, width=width, batch_size=batch_size,
                )
                bar.update(len(all_prompts[i : i + batch_size]))
                if checkpoint is not None:
                    snapshot(min(i + batch_size, len(all_prompts))).save(checkpoint)
    finally:
        for h in handles:
            h.remove()
        bar.close()
    result = snapshot(len(all_prompts))
    if len(result.meta["unobserved_layers"]) == len(layers):
        raise CalibrationError("no layer saw any input during calibration; is this the pipeline's denoiser?")
    return result


def _run_id(*parts) -> str:
    """Identity of a calibration run's arguments: a checkpoint only resumes the same run."""
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:16]
