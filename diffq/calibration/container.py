"""``CalibrationStats``: everything calibration learned about one denoiser, saved as one
safetensors file (tensors + a JSON header), written atomically."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diffq.calibration.reservoir import InputReservoir
from diffq.calibration.stats import HIST_BINS, LayerStats
from diffq.errors import CalibrationError, CheckpointError
from diffq.io import atomic_path

FORMAT_VERSION = 1


@dataclass
class CalibrationStats:
    """Per-layer, per-step input statistics of a denoiser.

    step_buckets: [T] timestep of each step index on the 0..1000 scale (-1: never observed).
    splits: layers whose input is a [main, skip] channel concatenation -> widths.
    reservoirs: layer -> capped sample of real input rows per step (only when calibrate was asked
        for ``reservoir=N``; see :mod:`diffq.calibration.reservoir`).
    patches: kh x kw conv layer -> capped sample of its im2col input patches per step (with
        ``reservoir=N``), rows ``[kh·kw·Cin]`` in the stored weight's channel-fastest order.
    operands: ``"<attention>.q|k|v"`` -> statistics of attention's matmul operands (only with
        ``attention_operands=True``; see :mod:`diffq.calibration.operands`).
    structure: fingerprint of the denoiser's quantizable layers (names and shapes), checked
        before the stats are used on a pipeline.
    """

    family: str
    structure: str
    num_steps: int
    step_buckets: list[int]
    layers: dict[str, LayerStats]
    splits: dict[str, tuple[int, int]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    reservoirs: dict[str, InputReservoir] = field(default_factory=dict)
    operands: dict[str, LayerStats] = field(default_factory=dict)
    patches: dict[str, InputReservoir] = field(default_factory=dict)

    def observed_steps(self) -> list[int]:
        return [i for i, b in enumerate(self.step_buckets) if b >= 0]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tensors: dict[str, torch.Tensor] = {}
        for name, st in self.layers.items():
            tensors.update(st.to_tensors(name))
        for name, res in self.reservoirs.items():
            tensors.update(res.to_tensors(name))
        for name, st in self.operands.items():
            tensors.update(st.to_tensors(f"operand:{name}"))
        for name, res in self.patches.items():
            tensors.update(res.to_tensors(f"patch:{name}"))
        header = {
            "version": FORMAT_VERSION,
            "family": self.family,
            "structure": self.structure,
            "num_steps": self.num_steps,
            "step_buckets": self.step_buckets,
            "layers": list(self.layers),
            "splits": {k: list(v) for k, v in self.splits.items()},
            "meta": self.meta,
            "reservoirs": list(self.reservoirs),
            "operands": list(self.operands),
            "patches": list(self.patches),
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"diffq_calibration": json.dumps(header)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> CalibrationStats:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"calibration file {str(path)!r} does not exist; run `diffq calibrate` first")
        try:
            tensors = load_file(str(path))
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                header = json.loads((f.metadata() or {})["diffq_calibration"])
        except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as e:
            raise CheckpointError(
                f"{str(path)!r} is not a diffq calibration file or is corrupted ({e}); re-run `diffq calibrate`"
            ) from e
        if header.get("version") != FORMAT_VERSION:
            raise CheckpointError(f"calibration file version {header.get('version')} is not {FORMAT_VERSION}")
        try:
            layers = {n: LayerStats.from_tensors(tensors, n) for n in header["layers"]}
            reservoirs = {n: InputReservoir.from_tensors(tensors, n) for n in header.get("reservoirs", [])}
            operands = {n: LayerStats.from_tensors(tensors, f"operand:{n}") for n in header.get("operands", [])}
            patches = {n: InputReservoir.from_tensors(tensors, f"patch:{n}") for n in header.get("patches", [])}
        except KeyError as e:
            raise CheckpointError(f"calibration file {str(path)!r} misses tensor {e}; it is truncated") from e
        for n, st in layers.items():
            if st.hist.shape[-1] != HIST_BINS or st.absmax.shape[0] != header["num_steps"]:
                raise CheckpointError(f"calibration file {str(path)!r}: layer {n} has inconsistent shapes")
        return cls(
            family=header["family"],
            structure=header["structure"],
            num_steps=header["num_steps"],
            step_buckets=list(header["step_buckets"]),
            layers=layers,
            splits={k: tuple(v) for k, v in header["splits"].items()},
            meta=header.get("meta", {}),
            reservoirs=reservoirs,
            operands=operands,
            patches=patches,
        )

    def check_matches(self, structure: str, family: str) -> None:
        if self.family != family or self.structure != structure:
            raise CalibrationError(
                f"these calibration statistics were collected on a different model "
                f"({self.family}, structure {self.structure[:12]}) than this pipeline ({family}, {structure[:12]}); "
                f"re-run diffq.calibrate on this pipeline"
            )
