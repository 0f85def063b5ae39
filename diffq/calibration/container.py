"""``CalibrationStats``: everything calibration learned about one denoiser, saved as one
safetensors file (tensors + a JSON header), written atomically."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError

from diffq.calibration.reservoir import InputReservoir
from diffq.calibration.stats import HIST_BINS, LayerStats
from diffq.errors import CalibrationError, CheckpointError
from diffq.tensor_file import read_safetensors_with_metadata, write_safetensors

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
    attention_error: attention module -> fp64 [T, F, 2]: per step and per format of
        ``attention_formats`` (labels such as ``int8-fp8``, ``int8-fp8/no-smooth``), the summed
        squared error of the quantized attention output and the summed squared full-precision output
        (also only with ``attention_operands=True``; :meth:`attention_relative_error`).
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
    attention_error: dict[str, torch.Tensor] = field(default_factory=dict)
    attention_formats: list[str] = field(default_factory=list)

    def attention_relative_error(self, name: str, label: str) -> torch.Tensor:
        """[T] fp64 relative L2 error of module ``name``'s attention output under format ``label``
        per step (NaN at steps that were not recorded)."""
        sums = self.attention_error[name][:, self.attention_formats.index(label)]
        return torch.where(sums[:, 1] > 0, (sums[:, 0] / sums[:, 1].clamp_min(1e-300)).sqrt(),
                           torch.full_like(sums[:, 0], float("nan")))

    def mean_attention_error(self, name: str, label: str) -> float | None:
        """Mean over the recorded steps of :meth:`attention_relative_error` (None when not measured)."""
        if name not in self.attention_error or label not in self.attention_formats:
            return None
        err = self.attention_relative_error(name, label)
        err = err[~torch.isnan(err)]
        return float(err.mean()) if err.numel() else None

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
        for name, t in self.attention_error.items():
            tensors[f"attn_error:{name}"] = t.contiguous()
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
            "attention_error": list(self.attention_error),
            "attention_formats": list(self.attention_formats),
            "patches": list(self.patches),
        }
        write_safetensors(path, tensors, {"diffq_calibration": json.dumps(header)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> CalibrationStats:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"calibration file {str(path)!r} does not exist; run `diffq calibrate` first")
        try:
            tensors, meta = read_safetensors_with_metadata(path)
            header = json.loads(meta["diffq_calibration"])
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
            attention_error = {n: tensors[f"attn_error:{n}"] for n in header.get("attention_error", [])}
            patches = {n: InputReservoir.from_tensors(tensors, f"patch:{n}") for n in header.get("patches", [])}
        except KeyError as e:
            raise CheckpointError(f"calibration file {str(path)!r} misses tensor {e}; it is truncated") from e
        for n, st in layers.items():
            if st.hist.shape[-1] != HIST_BINS or st.absmax.shape[0] != header["num_steps"]:
                raise CheckpointError(f"calibration file {str(path)!r}: layer {n} has inconsistent shapes")
        formats = list(header.get("attention_formats", []))
        for n, t in attention_error.items():
            if tuple(t.shape) != (header["num_steps"], len(formats), 2):
                raise CheckpointError(f"calibration file {str(path)!r}: attention errors of {n} have inconsistent shapes")
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
            attention_error=attention_error,
            attention_formats=formats,
            patches=patches,
        )

    def check_matches(self, structure: str, family: str) -> None:
        if self.family != family or self.structure != structure:
            raise CalibrationError(
                f"these calibration statistics were collected on a different model "
                f"({self.family}, structure {self.structure[:12]}) than this pipeline ({family}, {structure[:12]}); "
                f"re-run diffq.calibrate on this pipeline"
            )
