"""``calibrate``: run the real pipeline (its scheduler, CFG batch, added conditioning, packed
latents) with forward hooks on every quantizable layer and fold each layer's input into
per-step statistics."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

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
        activations (GPTQ, the smoothing search); for kh x kw convs also their im2col patches
        (``stats.patches``, at most :data:`PATCH_BUDGET` values per layer: GPTQ's exact conv Hessian);
        0 (default) keeps statistics only.
    attention_operands: also record Q, K and V of every attention module (the operands of Q·Kᵀ and
        P·V; :mod:`diffq.calibration.operands`) into ``stats.operands``, per step, like layer inputs.
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
                     width, weights_fingerprint(denoiser), reservoir, attention_operands,
                     "conv-patches" if reservoir else "")
    operand_mods = find_attention_operands(denoiser) if attention_operands else {}
    operand_stats: dict[str, LayerStats] = {}
    reservoirs: dict[str, InputReservoir] = {}
    patches: dict[str, InputReservoir] = {}
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
        patches = prev.patches
        operand_stats = prev.operands
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
                if _has_patches(mod):
                    pres = patches.get(name)
                    if pres is None:
                        pres = patches[name] = InputReservoir.empty(
                            num_inference_steps, patch_capacity(reservoir, num_inference_steps, mod), _patch_width(mod))
                    pres.update_patches(step, args[0], mod, sampler)
            step_buckets[step] = tracker.bucket

        return hook

    def make_operand_hook(name: str):
        def hook(mod, args, output):
            step = recorded_step()
            if step is not None and torch.is_tensor(output):
                record(operand_stats, name, step, output.reshape(-1, output.shape[-1]), "attention operand")

        return hook

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
            patches=patches,
            operands=operand_stats,
        )

    try:
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


#: values (rows x width x steps) a kh x kw conv's patch sample may hold: 64 MiB in float16
PATCH_BUDGET = 32 * 2**20


def _has_patches(mod: nn.Module) -> bool:
    return (isinstance(mod, nn.Conv2d) and tuple(mod.kernel_size) != (1, 1) and mod.groups == 1
            and isinstance(mod.padding, tuple) and mod.padding_mode == "zeros")


def _patch_width(mod: nn.Conv2d) -> int:
    return mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels


def patch_capacity(reservoir: int, steps: int, mod: nn.Conv2d) -> int:
    """Patches kept per step: ``reservoir``, fewer for wide convs so the sample stays within PATCH_BUDGET."""
    return max(8, min(reservoir, PATCH_BUDGET // max(1, steps * _patch_width(mod))))


def _run_id(*parts) -> str:
    """Identity of a calibration run's arguments: a checkpoint only resumes the same run."""
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:16]
