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
from diffq.calibration.steps import StepMap
from diffq.errors import CalibrationError
from diffq.fingerprint import weights_fingerprint
from diffq.generation import generate
from diffq.io import remove_stale_temps
from diffq.modules.layers import quantizable_layers, structure_fingerprint
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
    pipeline_kwargs: dict | None = None,
    weights_id: str | None = None,
) -> CalibrationStats:
    """Collect per-timestep input statistics of every quantizable layer of ``pipe``'s denoiser.

    prompts: calibration prompts (class names or ids for class-conditional pipelines).
    A *step* is one distinct timestep of the scheduler's schedule, and every denoiser call is
        attributed to the step of its timestep (:mod:`diffq.calibration.steps`): correct for
        schedulers that call the denoiser twice per step (Heun, DPM2) and for two-call CFG. So
        ``stats.num_steps`` is the number of distinct timesteps (Heun: num_inference_steps; DPM2:
        2·num_inference_steps - 1), and ``stats.step_buckets`` their timesteps on the 0..1000 scale.
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
        P·V; :mod:`diffq.calibration.operands`) into ``stats.operands``, per step, like layer inputs,
        and the relative L2 error of each attention module's output under every quantized attention
        format, with and without K smoothing, into ``stats.attention_error`` (per step; the pipeline
        itself runs in full precision: :func:`diffq.attention.probe_attention`).
    pipeline_kwargs: more ``pipe(...)`` arguments for every batch, e.g. FLUX's true CFG
        ``{"true_cfg_scale": 4.0, "negative_prompt": "blurry"}`` (two denoiser calls per step).
    weights_id: the fingerprint of the denoiser's weights when they are not all in memory
        (:func:`diffq.calibrate_streamed` passes the one of the file it streams them from); default:
        computed from the weights.
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
    uniform_steps(num_inference_steps, record_steps)  # a bad record_steps fails before any work
    adapter = adapter_for(pipe)
    denoiser = adapter.denoiser(pipe)
    layers = quantizable_layers(denoiser)
    all_prompts = [p for p in prompts for _ in range(images_per_prompt)]
    # the base weights are part of the identity: stats of another fine-tune must never be mixed in
    extra_id = [sorted(pipeline_kwargs.items())] if pipeline_kwargs else []  # older run ids stay valid
    run_id = _run_id(all_prompts, num_inference_steps, guidance_scale, seed, batch_size, record_steps, height,
                     width, weights_id or weights_fingerprint(denoiser), reservoir, attention_operands,
                     *(["conv-patches"] if reservoir else []), *extra_id)
    operand_mods = find_attention_operands(denoiser) if attention_operands else {}
    probe_formats = default_probe_formats() if attention_operands else {}
    run = _Run(record_steps)
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
        run.resume(prev)
        done = int(prev.meta.get("done", 0))
        if "sampler_state" in prev.meta:  # continue the same random stream as an uninterrupted run
            sampler.set_state(torch.tensor(prev.meta["sampler_state"], dtype=torch.uint8))

    def on_denoiser_call(module, args, kwargs):
        """Which step this call is (by its timestep: :mod:`diffq.calibration.steps`); runs before the layers."""
        t = adapter.timestep_of(args, kwargs)
        run.enter(None if t is None else float(t), pipe.scheduler)

    def record(table: dict[str, LayerStats], name: str, rows: torch.Tensor, what: str) -> None:
        """Fold ``rows`` [R, C] into ``table[name]`` at the current step, refusing NaN/Inf where it starts."""
        if not torch.isfinite(rows).all():
            raise CalibrationError(
                f"NaN/Inf in the {what} {name!r} at step {run.step} (timestep bucket {run.bucket}); "
                f"the full-precision pipeline itself is producing non-finite values - check its dtype "
                f"(fp16 overflow: use bf16/fp32) and inputs"
            )
        st = table.get(name)
        if st is None:
            st = table[name] = LayerStats.empty(len(run.steps), rows.shape[-1])
        st.update(run.step, rows)

    def make_hook(name: str):
        def hook(mod, args):
            if run.step is None:
                return
            rows = _rows(mod, args[0])
            record(run.stats, name, rows, "input of layer")
            if reservoir:
                res = run.reservoirs.get(name)
                if res is None:
                    res = run.reservoirs[name] = InputReservoir.empty(len(run.steps), reservoir, rows.shape[-1])
                res.update(run.step, rows, sampler)
                if _has_patches(mod):
                    pres = run.patches.get(name)
                    if pres is None:
                        pres = run.patches[name] = InputReservoir.empty(
                            len(run.steps), patch_capacity(reservoir, len(run.steps), mod), _patch_width(mod))
                    pres.update_patches(run.step, args[0], mod, sampler)

        return hook

    def make_operand_hook(name: str):
        def hook(mod, args, output):
            if run.step is not None and torch.is_tensor(output):
                record(run.operands, name, output.reshape(-1, output.shape[-1]), "attention operand")

        return hook

    def record_attention_error(name: str, label: str, err_sq: torch.Tensor, ref_sq: torch.Tensor) -> None:
        if run.step is None:
            return
        sums = run.attention_error.get(name)
        if sums is None:
            sums = run.attention_error[name] = torch.zeros(len(run.steps), len(probe_formats), 2, dtype=torch.float64)
        j = list(probe_formats).index(label)
        sums[run.step, j, 0] += float(err_sq)
        sums[run.step, j, 1] += float(ref_sq)

    handles = [denoiser.register_forward_pre_hook(on_denoiser_call, with_kwargs=True)]
    handles += [m.register_forward_pre_hook(make_hook(n)) for n, m in layers.items()]
    handles += [m.register_forward_hook(make_operand_hook(n)) for n, m in operand_mods.items()]
    seeds = [seed + i for i in range(len(all_prompts))]
    bar = tqdm(total=len(all_prompts), initial=done, desc="calibrate", disable=not progress_enabled(progress))

    def snapshot(n_done: int) -> CalibrationStats:
        if run.steps is None:
            raise CalibrationError("the pipeline never called its denoiser with a timestep; nothing was calibrated")
        missing = [n for n in layers if n not in run.stats]
        return CalibrationStats(
            family=adapter.name,
            structure=structure_fingerprint(denoiser),
            num_steps=len(run.steps),
            step_buckets=list(run.step_buckets),
            layers=run.stats,
            splits={k: v for k, v in adapter.skip_splits(denoiser).items() if k in run.stats},
            meta={
                "prompts": len(prompts),
                "images_per_prompt": images_per_prompt,
                "seed": seed,
                "guidance_scale": guidance_scale,
                "num_inference_steps": num_inference_steps,
                "step_timesteps": list(run.steps.timesteps),
                "record_steps": sorted(run.recorded),
                "unobserved_layers": missing,
                "run_id": run_id,
                "done": n_done,
                **({"sampler_state": sampler.get_state().tolist()} if reservoir else {}),
            },
            reservoirs=run.reservoirs,
            patches=run.patches,
            operands=run.operands,
            attention_error=run.attention_error,
            attention_formats=list(probe_formats),
        )

    probes = probe_attention(denoiser, probe_formats, record_attention_error) if probe_formats else nullcontext()
    try:
        with probes:
            # one pipeline call per batch; each denoiser call is mapped to its step by its timestep
            for i in range(done, len(all_prompts), batch_size):
                run.new_batch()
                generate(
                    pipe, all_prompts[i : i + batch_size], seeds[i : i + batch_size],
                    num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                    height=height, width=width, batch_size=batch_size, extra_kwargs=pipeline_kwargs,
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


class _Run:
    """The state of one calibration run: its steps (from the first batch's schedule), the statistics
    so far, and the step of the denoiser call in progress (``step`` None: not recorded)."""

    def __init__(self, record_steps: int | None) -> None:
        self.record_steps = record_steps
        self.steps: StepMap | None = None
        self.recorded: set[int] = set()
        self.step_buckets: list[int] = []
        self.stats: dict[str, LayerStats] = {}
        self.reservoirs: dict[str, InputReservoir] = {}
        self.patches: dict[str, InputReservoir] = {}
        self.operands: dict[str, LayerStats] = {}
        self.attention_error: dict[str, torch.Tensor] = {}  # [steps, formats, (err², ref²)] per module
        self.step: int | None = None
        self.bucket = -1
        self._check_schedule = True

    def resume(self, prev: CalibrationStats) -> None:
        self.stats, self.reservoirs, self.operands = prev.layers, prev.reservoirs, prev.operands
        self.attention_error, self.patches = prev.attention_error, prev.patches
        self.step_buckets = list(prev.step_buckets)
        if "step_timesteps" in prev.meta:
            self._set_steps(StepMap(tuple(prev.meta["step_timesteps"])))

    def new_batch(self) -> None:
        self._check_schedule = True  # each pipeline call sets its scheduler's timesteps anew

    def _set_steps(self, steps: StepMap) -> None:
        self.steps = steps
        self.recorded = set(uniform_steps(len(steps), self.record_steps))
        if len(self.step_buckets) != len(steps):
            self.step_buckets = [-1] * len(steps)

    def enter(self, t: float | None, scheduler) -> None:
        """A denoiser call at timestep ``t`` (0..1000 scale) begins."""
        if t is None:
            self.step = None
            return
        if self._check_schedule:
            steps = StepMap.from_scheduler(scheduler)
            if self.steps is None:
                self._set_steps(steps)
            elif len(steps) != len(self.steps) or any(
                abs(a - b) > 0.5 + 0.005 * abs(a) for a, b in zip(self.steps.timesteps, steps.timesteps)
            ):
                raise CalibrationError(
                    f"the scheduler's timesteps changed between calibration batches ({len(self.steps)} -> "
                    f"{len(steps)} steps); calibrate with one resolution and one scheduler setting per run"
                )
            self._check_schedule = False
        step = self.steps.step_of(t)
        self.bucket = self.steps.buckets()[step]
        self.step = step if step in self.recorded else None
        if self.step is not None:
            self.step_buckets[step] = self.bucket


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
