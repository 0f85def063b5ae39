"""Shared plumbing of the demo-model training scripts: seeding, threads, progress bars, checkpoints.

Why a separate module: the three scripts (digits-clip, digits-sd, digits-dit) must all be seeded,
resumable and write safetensors atomically; keeping that in one place keeps the scripts about the
model, not the bookkeeping.  Checkpoints are safetensors (model + optimizer tensors flattened) plus a
json sidecar holding the step and RNG-free bookkeeping -- never pickle.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "pipelines" / "assets"
RUNS = REPO / "runs"  # checkpoints live here (git-ignored), never under the shipped assets


def setup(seed: int, threads: int = 2) -> torch.Generator:
    """Seed python/numpy/torch, cap CPU threads (the machines these run on are small and shared)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    return torch.Generator().manual_seed(seed)


def progress(iterable=None, **kw):
    """tqdm, silenced when DIFFQ_NO_PROGRESS=1."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=os.environ.get("DIFFQ_NO_PROGRESS") == "1", dynamic_ncols=True, **kw)


def atomic_save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """safetensors write via a temp file in the same directory + os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def atomic_write_json(obj, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _flat_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def save_checkpoint(ckpt_dir: Path, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer,
                    step: int, extra: dict | None = None) -> None:
    """Everything needed to resume at ``step``: module weights, optimizer state, bookkeeping."""
    tensors = {}
    for name, m in modules.items():
        tensors.update({f"{name}.{k}": v for k, v in m.state_dict().items()})
    opt_t, opt_meta = _flat_optimizer(opt)
    tensors.update(opt_t)
    # the global torch RNG too: diffusers modules draw from it in train mode (DiT's label embedding drops
    # classes with torch.rand), so without it a resumed run would diverge from an uninterrupted one
    tensors["rng.torch"] = torch.get_rng_state()
    ckpt_dir = Path(ckpt_dir)
    atomic_save_file(tensors, ckpt_dir / "checkpoint.safetensors")
    atomic_write_json({"step": step, "optimizer": opt_meta, "extra": extra or {}}, ckpt_dir / "checkpoint.json")


def load_checkpoint(ckpt_dir: Path, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer) -> int:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns the step to continue from."""
    ckpt_dir = Path(ckpt_dir)
    tensors = load_file(str(ckpt_dir / "checkpoint.safetensors"))
    meta = json.loads((ckpt_dir / "checkpoint.json").read_text())
    for name, m in modules.items():
        pre = f"{name}."
        m.load_state_dict({k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)})
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, key = k.split(".", 2)
            state.setdefault(int(pid), {})[key] = v
    for k, v in meta["optimizer"]["scalars"].items():
        pid, key = k.split(".", 1)
        state.setdefault(int(pid), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    return int(meta["step"])


def cosine_lr(step: int, total: int, base: float, warmup: int = 100) -> float:
    """Linear warm-up then cosine decay to 5% of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * min(1.0, t))))


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image of ``[N, C, H, W]`` by up to ``max_shift`` pixels (zero fill = background).

    Background of the data in [-1, 1] is -1, so pad with -1.
    """
    n, _, h, w = x.shape
    p = max_shift
    xp = torch.nn.functional.pad(x, (p, p, p, p), value=-1.0)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None])  # [N, H]
    cols = (dx[:, None] + torch.arange(w)[None])  # [N, W]
    idx_n = torch.arange(n)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]]  # [N, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


def portable_weights(root: Path) -> None:
    """Make a saved model/pipeline directory small and loadable by older transformers/diffusers.

    * every ``*.safetensors`` under ``root`` is rewritten in float16 (halves the shipped size; the
      demo loaders pass ``torch_dtype=float32`` and each ``config.json``'s dtype says float32, so
      models compute in float32 -- rounding trained fp32 weights to fp16 changes outputs negligibly);
    * transformers 5 records its tokenizer class as ``TokenizersBackend``; the name
      ``PreTrainedTokenizerFast`` means the same class there and also exists in transformers 4.
    """
    root = Path(root)
    for f in root.rglob("*.safetensors"):
        from safetensors import safe_open

        with safe_open(str(f), "pt") as fh:
            meta = fh.metadata()
        t = load_file(str(f))
        atomic_save_file({k: (v.half() if v.is_floating_point() else v) for k, v in t.items()}, f, metadata=meta)
    for f in list(root.rglob("config.json")) + list(root.rglob("tokenizer_config.json")) + list(
            root.rglob("model_index.json")):
        obj = json.loads(f.read_text())
        changed = False

        def fix(o):
            nonlocal changed
            if isinstance(o, dict):
                for k, v in o.items():
                    if k in ("dtype", "torch_dtype") and v in ("float16", "bfloat16"):
                        o[k] = "float32"
                        changed = True
                    elif v == "TokenizersBackend":
                        o[k] = "PreTrainedTokenizerFast"
                        changed = True
                    else:
                        fix(v)
            elif isinstance(o, list):
                for i, v in enumerate(o):
                    if v == "TokenizersBackend":
                        o[i] = "PreTrainedTokenizerFast"
                        changed = True
                    else:
                        fix(v)

        fix(obj)
        if isinstance(obj, dict) and obj.pop("_name_or_path", None) is not None:  # a local path: don't ship it
            changed = True
        if changed:
            atomic_write_json(obj, f)
