"""Adapter registry: one small class per model family says how to find the denoiser and the text
encoders (the parts of a pipeline diffq quantizes: :meth:`FamilyAdapter.scopes`), how to read the
timestep the pipeline passes the denoiser, which canonical role each layer plays
(:meth:`FamilyAdapter.role_of`) and which modules need special treatment.

``adapter_for(pipe)`` picks the family; unsupported pipelines get an error naming the supported ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from diffq.errors import UnsupportedModelError
from diffq.pipelines import roles

#: pipeline attributes that may hold a text encoder, in the order diffusers numbers them
TEXT_ENCODER_ATTRS = ("text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass
class FamilyAdapter:
    """Base adapter. Subclasses set ``name``, ``pipeline_prefixes`` and ``denoiser_attr``."""

    name: ClassVar[str] = ""
    pipeline_prefixes: ClassVar[tuple[str, ...]] = ()
    denoiser_attr: ClassVar[str] = "transformer"
    timestep_scale: ClassVar[float] = 1.0  # multiply the denoiser's timestep to reach 0..1000
    #: family-specific (regex, role) pairs searched before the common table of :mod:`roles`
    role_patterns: ClassVar[tuple[tuple[str, str], ...]] = ()

    @classmethod
    def matches(cls, pipe) -> bool:
        cname = type(pipe).__name__
        return any(cname.startswith(p) for p in cls.pipeline_prefixes) and hasattr(pipe, cls.denoiser_attr)

    def denoiser(self, pipe) -> nn.Module:
        return getattr(pipe, self.denoiser_attr)

    def text_encoders(self, pipe) -> dict[str, nn.Module]:
        """attribute name -> text encoder module, for the encoders this pipeline has."""
        out = {}
        for attr in TEXT_ENCODER_ATTRS:
            enc = getattr(pipe, attr, None)
            if isinstance(enc, nn.Module):
                out[attr] = enc
        return out

    def scopes(self, pipe) -> dict[str, nn.Module]:
        """Every part of ``pipe`` that diffq may quantize: ``{"denoiser": ..., "text_encoder": ...}``.

        The one list of quantized parts: quantize, save/load and the finite checks all walk it.
        """
        return {"denoiser": self.denoiser(pipe), **self.text_encoders(pipe)}

    def role_of(self, name: str) -> str:
        """Canonical role of the denoiser layer ``name`` (family patterns first, then the common table)."""
        return roles.role_of(name, self.role_patterns)

    def timestep_of(self, args: tuple, kwargs: dict) -> torch.Tensor | float | None:
        """The timestep argument of one denoiser call, on the 0..1000 scale."""
        t = kwargs.get("timestep")
        if t is None and len(args) > 1:
            t = args[1]
        if t is None:
            return None
        if isinstance(t, torch.Tensor):
            t = t.reshape(-1)[0].float() if t.numel() else 0.0
        return t * self.timestep_scale if self.timestep_scale != 1.0 else t

    def skip_splits(self, denoiser: nn.Module) -> dict[str, tuple[int, int]]:
        """Modules whose input is a channel concatenation [main, skip]: name -> (main, skip) widths."""
        return {}

    def extra_call_kwargs(self, pipe) -> dict:
        """Family-specific ``pipe(...)`` arguments diffq needs for a plain text-to-image call."""
        return {}


class SDAdapter(FamilyAdapter):
    name = "sd"
    pipeline_prefixes = ("StableDiffusionPipeline", "StableDiffusionImg2Img", "StableDiffusionInpaint")
    denoiser_attr = "unet"

    def skip_splits(self, denoiser: nn.Module) -> dict[str, tuple[int, int]]:
        """UNet up blocks concatenate [hidden, skip] before each resnet (Q-Diffusion's bimodal case).

        The main part is the previous block's output channels for the first resnet and the block's
        own channels after it; the rest of the resnet's input is the skip connection.
        """
        out: dict[str, tuple[int, int]] = {}
        ups = getattr(denoiser, "up_blocks", None)
        if ups is None:
            return out
        prev = denoiser.config.block_out_channels[-1]
        for i, block in enumerate(ups):
            for j, res in enumerate(block.resnets):
                main = prev if j == 0 else res.out_channels
                total = res.conv1.in_channels
                if 0 < main < total:
                    out[f"up_blocks.{i}.resnets.{j}.conv1"] = (main, total - main)
                    if res.conv_shortcut is not None:
                        out[f"up_blocks.{i}.resnets.{j}.conv_shortcut"] = (main, total - main)
            prev = block.resnets[-1].out_channels
        return out


class SDXLAdapter(SDAdapter):
    name = "sdxl"
    pipeline_prefixes = ("StableDiffusionXL",)


class PixArtAdapter(FamilyAdapter):
    name = "pixart"
    pipeline_prefixes = ("PixArt",)

    def extra_call_kwargs(self, pipe) -> dict:
        """PixArt only knows aspect-ratio bins for latents of 32/64/128; other sizes must opt out.
        ``clean_caption`` needs bs4/ftfy, which diffq does not install."""
        kw = {"clean_caption": False}
        if pipe.transformer.config.sample_size not in (32, 64, 128):
            kw["use_resolution_binning"] = False
        return kw


class SD3Adapter(FamilyAdapter):
    name = "sd3"
    pipeline_prefixes = ("StableDiffusion3",)


class FluxAdapter(FamilyAdapter):
    name = "flux"
    pipeline_prefixes = ("Flux",)
    timestep_scale = 1000.0  # FluxPipeline passes timestep / 1000


class DiTAdapter(FamilyAdapter):
    name = "dit"
    pipeline_prefixes = ("DiTPipeline",)


# order matters: the more specific prefixes first
ADAPTERS: tuple[type[FamilyAdapter], ...] = (
    SDXLAdapter,
    SD3Adapter,
    SDAdapter,
    PixArtAdapter,
    FluxAdapter,
    DiTAdapter,
)
SUPPORTED = {a.name: a.pipeline_prefixes for a in ADAPTERS}


def adapter_for(pipe) -> FamilyAdapter:
    for cls in ADAPTERS:
        if cls.matches(pipe):
            return cls()
    supported = ", ".join(f"{k} ({'/'.join(v)}...)" for k, v in SUPPORTED.items())
    raise UnsupportedModelError(
        f"diffq has no adapter for {type(pipe).__name__}; supported pipeline families: {supported}. "
        f"Load the model with one of those pipeline classes."
    )
