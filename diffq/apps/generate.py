"""Generate a prompt set's images into a :class:`GenerationCache`, data-parallel under ``accelerate``.

Why a module of its own: the generation step is what costs GPU hours in an evaluation (thousands of
images per recipe), it is embarrassingly parallel (one image per key), and it must survive
interruption.  This module is that step and nothing else; scoring reads the filled cache afterwards.

Commands
--------
One process (resumable: rerun the same command after an interruption)::

    diffq generate --model digits-sd --prompts digits --num-prompts 1000 --cache runs/cache

Data-parallel over the GPUs of one machine (process ``i`` of ``N`` takes jobs ``i, i+N, ...``; all
processes write into the same cache folder, which must be shared storage across machines)::

    accelerate launch --multi_gpu --num_processes 4 -m diffq.cli generate \\
        --model digits-sd --prompts digits --num-prompts 1000 --cache runs/cache

Several machines: add ``--num_machines M --machine_rank R --main_process_ip HOST`` as usual for
accelerate.  CPU-only machines (e.g. to check a setup) use the same ``--multi_gpu`` launcher
(torchrun); the processes detect that there is no CUDA and join with the gloo backend.  Note that
``accelerate launch --cpu --num_processes N`` starts a *single* process unless MPI is set up
(``--mpirun_hostfile``), so it does not shard.

Outputs, besides the images in the cache: ``<out>/shard-<i>-of-<N>.json`` per process (its job keys
and how many it generated vs. found cached) and, once every process has finished, ``<out>/jobs.json``
(every job with its key, in order) written by the main process after checking the cache holds all
of them.  ``<out>`` defaults to ``<cache>/runs/<hash of the job list>``.

A quantized checkpoint (``--checkpoint DIR`` from ``diffq quantize``) is keyed by its recipe name plus
a hash of its manifest, so two different checkpoints never share cache entries; the full-precision
model is keyed ``fp``.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from diffq.errors import DiffqError
from diffq.eval.cache import (
    GenerateFn,
    GenerationCache,
    GenerationJob,
    distributed_state,
    generate_cached,
    shard_jobs,
)
from diffq.eval.features import EvalInputError
from diffq.io import write_json_atomic

FP_RECIPE = "fp"


@dataclass
class ShardedGenerationConfig:
    """One generation run.  ``num_prompts=None`` takes the whole prompt set; ``height``/``width``
    ``None`` use the pipeline's default size (stored as 0 in the cache key)."""

    model: str = "digits-sd"
    cache: str = "runs/cache"
    prompts: str = "digits"
    num_prompts: int | None = None
    images_per_prompt: int = 1
    seed: int = 0
    steps: int = 20
    guidance: float | None = None
    height: int | None = None
    width: int | None = None
    checkpoint: str | None = None
    batch_size: int = 8
    out: str | None = None
    progress: bool = True


@dataclass
class ShardReport:
    """What one process did: ``keys`` it was assigned, how many it ``generated`` (the rest were cached)."""

    rank: int
    world_size: int
    keys: list[str]
    generated: int
    cached: int
    seconds: float
    out: str
    complete: bool | None = None  # main process only: every job of the run is in the cache
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def make_jobs(model: str, recipe: str, prompts: Sequence[str], *, images_per_prompt: int = 1, seed: int = 0,
              steps: int = 20, guidance: float | None = None, height: int | None = None,
              width: int | None = None) -> list[GenerationJob]:
    """The run's job list: each prompt ``images_per_prompt`` times, image ``i`` with seed ``seed + i``
    (the convention of ``diffq bench``, so FP and quantized runs pair up image by image)."""
    if images_per_prompt < 1:
        raise EvalInputError(f"images_per_prompt must be >= 1, got {images_per_prompt}")
    expanded = [p for p in prompts for _ in range(images_per_prompt)]
    if not expanded:
        raise EvalInputError("no prompts to generate; pass a prompt file or built-in set with at least one prompt")
    return [GenerationJob(model, recipe, p, seed + i, steps, guidance, height or 0, width or 0)
            for i, p in enumerate(expanded)]


def checkpoint_recipe_id(checkpoint: str | None) -> str:
    """``fp`` for the full-precision model, else ``<recipe name>@<sha256(manifest)[:16]>``."""
    if checkpoint is None:
        return FP_RECIPE
    from diffq.checkpoint import MANIFEST_FILE, read_manifest

    manifest = read_manifest(checkpoint)  # raises CheckpointError naming the problem
    digest = hashlib.sha256((Path(checkpoint) / MANIFEST_FILE).read_bytes()).hexdigest()[:16]
    return f"{manifest['recipe'].get('name', 'recipe')}@{digest}"


def pipeline_generate_fn(pipe) -> GenerateFn:
    """A :data:`GenerateFn` over a diffusers pipeline: one pipeline call per batch of jobs (which
    :func:`generate_cached` groups so they share steps, guidance and size)."""
    from diffq.generation import generate

    def fn(batch: list[GenerationJob]):
        j = batch[0]
        return generate(pipe, [b.prompt for b in batch], [b.seed for b in batch], num_inference_steps=j.steps,
                        guidance_scale=j.guidance, height=j.height or None, width=j.width or None,
                        batch_size=len(batch))

    return fn


def run_hash(jobs: Sequence[GenerationJob]) -> str:
    """Short hash of a job list (order included): names the run's record folder."""
    h = hashlib.sha256()
    for j in jobs:
        h.update(j.key.encode())
    return h.hexdigest()[:16]


def generate_sharded(generate_fn: GenerateFn, jobs: Sequence[GenerationJob], cache: GenerationCache, *,
                     out: str | Path | None = None, batch_size: int = 8, progress: bool = True,
                     num_shards: int | None = None, index: int | None = None) -> ShardReport:
    """Fill ``cache`` with this process's shard of ``jobs`` and write the shard record.

    Every process must pass the same ``jobs``.  Under accelerate (``num_shards``/``index`` not given)
    the processes meet at a barrier afterwards and the main one checks that the cache holds every
    job and writes ``jobs.json``; with explicit ``num_shards``/``index`` (e.g. a job-array scheduler)
    there is no barrier and no ``jobs.json``.
    """
    t0 = time.perf_counter()
    explicit = num_shards is not None and index is not None
    state = None if explicit else distributed_state()
    world, rank = (num_shards, index) if explicit else (state.num_processes, state.process_index)
    mine = shard_jobs(jobs, world, rank)
    out = Path(out) if out is not None else cache.root / "runs" / run_hash(jobs)
    todo = cache.missing(j.key for j in mine)
    if rank == 0:
        cache.clean_temp()  # leftovers of killed writers older than an hour
    generate_cached(generate_fn, mine, cache, progress=progress and rank == 0, batch_size=batch_size, load=False)
    report = ShardReport(rank, world, [j.key for j in mine], generated=len(todo),
                         cached=len({j.key for j in mine}) - len(todo), seconds=time.perf_counter() - t0,
                         out=str(out))
    write_json_atomic(out / f"shard-{rank:03d}-of-{world:03d}.json", report.to_dict())
    if state is not None:
        state.wait_for_everyone()
        if state.is_main_process:
            missing = cache.missing(j.key for j in jobs)
            if missing:
                raise DiffqError(f"{len(missing)} of {len(jobs)} images are missing from {cache.root} after all "
                                 f"processes finished (first: {missing[0]}); rerun the same command to fill them")
            write_json_atomic(out / "jobs.json", {"cache": str(cache.root),
                                                  "jobs": [asdict(j) | {"key": j.key} for j in jobs]})
            report.complete = True
    return report


def run(cfg: ShardedGenerationConfig) -> ShardReport:
    """Load the model (and checkpoint), build the jobs, generate this process's shard."""
    from diffq.apps.models import load_model
    from diffq.eval.prompts import prompt_list

    recipe = checkpoint_recipe_id(cfg.checkpoint)
    prompts = prompt_list(cfg.prompts, cfg.num_prompts)
    jobs = make_jobs(cfg.model, recipe, prompts, images_per_prompt=cfg.images_per_prompt, seed=cfg.seed,
                     steps=cfg.steps, guidance=cfg.guidance, height=cfg.height, width=cfg.width)
    state = distributed_state()
    pipe = load_model(cfg.model)
    if cfg.checkpoint is not None:
        from diffq.checkpoint import load

        pipe = load(cfg.checkpoint, pipe)
    if state.device.type != "cpu":
        pipe = pipe.to(state.device)
    return generate_sharded(pipeline_generate_fn(pipe), jobs, GenerationCache(cfg.cache), out=cfg.out,
                            batch_size=cfg.batch_size, progress=cfg.progress)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command-line options of :func:`run` (shared with a ``diffq`` subcommand)."""
    p.add_argument("--model", default="digits-sd", help="digits-sd | digits-dit | tiny-<family> | local folder")
    p.add_argument("--checkpoint", default=None, help="quantized checkpoint folder (default: full precision)")
    p.add_argument("--cache", default="runs/cache", help="image cache folder, shared by all processes")
    p.add_argument("--prompts", default="digits", help="prompt file (.txt/.csv/.jsonl) or built-in set")
    p.add_argument("--num-prompts", type=int, default=None, help="first N prompts, cycling (default: all)")
    p.add_argument("--images-per-prompt", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--steps", type=int, default=20, help="denoising steps")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8, help="images per pipeline call (and per cache flush)")
    p.add_argument("--out", default=None, help="folder for shard records and jobs.json "
                                               "(default: <cache>/runs/<hash of the job list>)")


def config_from_args(args: argparse.Namespace) -> ShardedGenerationConfig:
    return ShardedGenerationConfig(
        model=args.model, cache=args.cache, prompts=args.prompts, num_prompts=args.num_prompts,
        images_per_prompt=args.images_per_prompt, seed=args.seed, steps=args.steps, guidance=args.guidance,
        height=args.height, width=args.width, checkpoint=args.checkpoint, batch_size=args.batch_size,
        out=args.out, progress=not getattr(args, "quiet", False),
    )
