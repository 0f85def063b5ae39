"""``QuantSummary``: per layer what was done and what it costs; totals and the size ratio."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class LayerSummary:
    name: str
    role: str
    kind: str  # "linear" | "conv"
    weight: str  # format description, or "bf16"/"fp32" when kept dense
    act: str
    rank: int
    bytes_before: int
    bytes_after: int
    skipped: str | None = None
    kernel: str = "-"  # what computes the layer's forward on the GPU of ``QuantSummary.kernel_target``


@dataclass
class AttentionSummary:
    """One attention module: its kind and roles (:mod:`diffq.attention.spec`), the processor it had,
    the attention format installed (``none`` when skipped, with the reason), and the mean relative
    L2 error of its output over the calibrated steps when calibration measured that format."""

    name: str
    kind: str
    roles: list[str]
    processor: str
    format: str = "none"
    skipped: str | None = None
    calibrated_error: float | None = None


@dataclass
class QuantSummary:
    """What ``diffq.quantize`` did. Per-layer byte counts are what each module holds; the denoiser
    totals are 16-bit deployment sizes (float tensors wider than 16 bits counted at 16 bits), so
    ``size_ratio`` = bf16 denoiser bytes / quantized denoiser bytes, over *all* parameters and
    buffers of the denoiser (not only the quantized layers)."""

    recipe: str
    family: str
    layers: list[LayerSummary] = field(default_factory=list)
    denoiser_bytes_before: int = 0
    denoiser_bytes_after: int = 0
    kernel_target: str = ""  # the GPU the layers' kernel routes refer to
    attention: list[AttentionSummary] = field(default_factory=list)

    @property
    def quantized(self) -> list[LayerSummary]:
        return [layer for layer in self.layers if layer.skipped is None]

    @property
    def size_ratio(self) -> float:
        return self.denoiser_bytes_before / max(self.denoiser_bytes_after, 1)

    @property
    def packed_bytes(self) -> int:
        """Bytes held by the quantized layers (what a checkpoint stores)."""
        return sum(layer.bytes_after for layer in self.quantized)

    def to_dict(self) -> dict:
        return {
            "recipe": self.recipe,
            "family": self.family,
            "size_ratio": self.size_ratio,
            "denoiser_bytes_before": self.denoiser_bytes_before,
            "denoiser_bytes_after": self.denoiser_bytes_after,
            "packed_bytes": self.packed_bytes,
            "kernel_target": self.kernel_target,
            "layers": [asdict(layer) for layer in self.layers],
            "attention": [asdict(a) for a in self.attention],
        }

    def table(self, max_rows: int = 40) -> str:
        """A plain-text table a person can read in a terminal."""
        head = f"{'layer':52} {'role':13} {'weight':22} {'act':18} {'rank':>4} {'KiB before':>10} {'KiB after':>10}"
        lines = [head + "  GPU kernel"]
        for layer in self.layers[:max_rows]:
            lines.append(
                f"{layer.name[:52]:52} {layer.role:13} {layer.weight[:22]:22} {layer.act[:18]:18} {layer.rank:4d} "
                f"{layer.bytes_before / 1024:10.1f} {layer.bytes_after / 1024:10.1f}  {layer.kernel}"
            )
        if len(self.layers) > max_rows:
            lines.append(f"... {len(self.layers) - max_rows} more layers")
        n_q = len(self.quantized)
        lines.append(
            f"{n_q}/{len(self.layers)} layers quantized with {self.recipe}; denoiser "
            f"{self.denoiser_bytes_before / 2**20:.2f} MiB -> {self.denoiser_bytes_after / 2**20:.2f} MiB "
            f"(x{self.size_ratio:.2f} smaller)"
        )
        if self.kernel_target:
            lines.append(f"GPU kernel column: {self.kernel_target}")
        if self.attention:
            lines.append(f"{'attention module':52} {'roles':24} {'format':22} {'calibrated rel. error':>21}")
            for a in self.attention[:max_rows]:
                err = "-" if a.calibrated_error is None else f"{a.calibrated_error:.4f}"
                fmt = a.format if a.skipped is None else f"none ({a.skipped})"
                lines.append(f"{a.name[-52:]:52} {','.join(a.roles)[:24]:24} {fmt[:22]:22} {err:>21}")
            n_a = sum(a.skipped is None for a in self.attention)
            lines.append(f"{n_a}/{len(self.attention)} attention modules quantized")
        return "\n".join(lines)
