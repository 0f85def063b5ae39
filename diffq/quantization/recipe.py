"""Recipes: typed, stackable descriptions of *how* to quantize a pipeline.

A ``Recipe`` is a frozen dataclass that accepts ``key=value`` overrides (dotted for the specs,
e.g. ``weight.group_size=128``) and loads from stacked YAML/JSON files
(:func:`diffq.quantization.presets.load_recipe_files`), so the CLI, Python and config files all build
the same object. Named recipes live in :mod:`diffq.quantization.presets`.
"""

from __future__ import annotations

import ast
import difflib
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from diffq.attention.spec import ATTN_CHOICES, ATTN_GRANULARITIES, ATTN_ROLES, attn_format
from diffq.errors import FormatError, RecipeError
from diffq.formats import QuantSpec
from diffq.methods.smooth_search import SEARCH_OUTPUTS, WARM_POWER_ITERS
from diffq.methods.weight_clipping import CLIP_METHODS, WEIGHT_CLIP_METHODS
from diffq.pipelines.roles import ROLES

DEFAULT_SKIP_ROLES = ("embed", "adanorm", "io")
#: tuple fields, lists in JSON / YAML
_LIST_FIELDS = ("skip_roles", "skip_patterns", "include_patterns", "attn_skip_roles", "attn_skip_patterns",
                "weight_only_roles", "int8_weight_roles")
#: roles quantized weight-only when they are a large share of the weights (FLUX's and SD3's adaLN: ~1/4)
DEFAULT_WEIGHT_ONLY_ROLES = ("adanorm",)
#: skipped roles whose weights are stored int8 (weight-only, no branch) instead of 16 bits by default
DEFAULT_INT8_WEIGHT_ROLES = ("shortcut", "resample", "proj")
#: QuantSpec fields of a recipe
_SPEC_FIELDS = ("weight", "act", "weight_only")
#: the reference (SVDQuant) 16-bit layer set of 4-bit-activation recipes: also the ResNet shortcut
#: convs, the down/up-sampling convs and the transformer proj_in/proj_out (roles UNets have)
W4A4_SKIP_ROLES = (*DEFAULT_SKIP_ROLES, "shortcut", "resample", "proj")
ROUNDINGS = ("rtn", "gptq")
#: fields of older diffq versions that are read and ignored, so their checkpoints still load:
#: ``bos_aware`` kept the first token of text encoders in 16 bits, which per-token scales made a no-op
REMOVED_FIELDS = ("bos_aware",)


@dataclass(frozen=True)
class Recipe:
    """How to quantize the denoiser (and optionally the text encoders).

    weight / act: formats of weights and activations (``act=None``: weight-only).
    act_static: activations use calibrated ranges per timestep group instead of dynamic per-token
        scales; ``timestep_groups`` fixes the number of groups (1 = one static range), ``None``
        chooses them from the statistics, merging adjacent steps while the range changes less
        than ``group_threshold`` (relative).
    weight_clip / act_clip: ``minmax``, ``mse`` or ``percentile`` (with ``percentile``); weight clipping
        also takes ``mse-coarse`` (the coarse pass of the MSE search only: ratios 1.0 .. 0.5 in steps
        of 0.1; :func:`diffq.methods.weight_clipping.mse_clip_ratio`).
    smooth_alpha: SmoothQuant migration strength (None = no smoothing; needs calibration).
    smooth_search: choose the strength per layer instead: the α of ``smooth_grid`` whose quantized
        layer (branch and both quantizers included) has the lowest output error on the calibration
        rows (:mod:`diffq.methods.smooth_search`; needs ``calibrate(reservoir=...)``). Its cost:
        ``smooth_outputs`` output channels (a fixed seeded subset) score each candidate;
        ``smooth_power_iters`` power iterations of the branch's range finder per candidate after the
        first (each starts from the previous candidate's subspace; layers wider than 512 only);
        ``smooth_clip`` the weight clipping the candidates are scored with (None: ``weight_clip``).
        A layer with its own smoothing (not shared) takes the chosen candidate's subspace for its
        low-rank split (no second range finder).
    shared_smoothing: projections that read one input and that diffusers' ``fuse_qkv_projections``
        fuses (q/k/v, cross-attention k/v, joint attention's added q/k/v) get one smoothing vector,
        from their stacked weights (and one α from the search on the stack), so they stay fusable
        and the vector could be folded into the norm before them; False: each its own (less error
        per layer: on the validation split the shared vector cost digits-sd 0.15 / 0.23 / 0.60 dB
        in ``w4a8`` / ``w4a4-svd`` / ``fp4-svd`` and gave digits-dit +0.07 / +0.20 / -0.26 dB).
        On in ``w4a8`` / ``w4a16``, which stay fusable as they were before they were smoothed.
    timestep_balance: smoothing factors, the α search and the GPTQ Hessian weigh every denoising
        step equally (each step's channel profile normalised, each step's rows scaled to equal
        energy) instead of one abs-max over all steps.
    rank: SVD low-rank branch rank (0 = none); the effective rank is capped per layer at a quarter of
        its smaller side (:func:`diffq.methods.lowrank.effective_rank`), so a rank larger than a
        layer is not an error. ``rank_ratio`` instead sets it relative to the layer:
        ``round(rank_ratio * min(N, K))`` (at least 1; FLUX's rank 32 on 3072-wide layers is ~0.01).
    lowrank_refit: iterations that alternate the low-rank split with the residual's quantization
        (:func:`diffq.methods.lowrank.refit_lowrank`), keeping the best; 0 = one plain SVD.
    rounding: ``rtn`` (round to nearest) or ``gptq`` (error-compensating, with the Hessian of the
        calibration rows; :mod:`diffq.methods.gptq`; needs ``calibrate(reservoir=...)``), with
        ``gptq_damp`` (relative diagonal damping), ``gptq_act_order`` (columns by decreasing
        Hessian diagonal) and ``gptq_weighted_clip`` (each group's MSE clip weighs its columns by
        the Hessian diagonal: output error instead of weight error).
    act_unsigned: layers whose input is provably bounded below (right after a GELU/SiLU/ReLU, see
        :mod:`diffq.pipelines.input_bounds`) quantize ``x + c`` with the unsigned format of the same
        width (``uint4``: 0..15) and subtract ``c`` again (exact; a kernel folds it into the bias).
        Dynamic integer activations only. Asymmetric (zero-point) activations or weights everywhere
        are the ``uint`` formats, e.g. ``act="uint4:g64"``.
    act_center: dynamic activations of linear layers quantize ``x - c`` and add ``c`` back, ``c``
        being each sample's per-channel mean over its tokens (:class:`diffq.modules.ActQuantizer`):
        removes per-sample channel offsets such as the shift of adaLN-modulated norms (DiT FFN and
        attention inputs). Conv inputs are not centred (doing so lowered digits-sd's PSNR by 0.5 dB on
        the validation split). Linear layers with int4 weights keep their kernel (the means go
        through the W4A16 kernel: :mod:`diffq.kernels.layer_dispatch`); others run on the reference
        path. Excludes ``act_unsigned``.
    Group sizes (``weight``/``act`` with granularity ``group``) that do not divide a layer's input
        width are halved until they do (down to 8), else that layer uses one scale per row; see
        :func:`diffq.quantization.selection.fit_group`.
    split_shortcut: separate activation scales for the [main, skip] halves of UNet up-block inputs.
    skip_roles / skip_patterns / include_patterns: which layers stay in 16 bits (roles from
        :mod:`diffq.pipelines.roles`; regexes on module names; includes win over skips).
        Text-encoder layers ignore them (every Linear of at least ``min_features`` is quantized).
    weight_only_roles / weight_only_share / weight_only: a role of ``weight_only_roles`` whose layers
        hold at least ``weight_only_share`` of the denoiser's quantizable weights (FLUX's and SD3's
        adaLN modulation linears: about a quarter) is quantized weight-only, with the ``weight_only``
        format, without activation quantization or smoothing, even where ``skip_roles`` lists it; a
        smaller share follows the skip rules (on UNets and PixArt these roles are a few percent);
        ``w4a4-svd`` / ``fp4-svd`` list ``adanorm`` and ``resample`` at share 0 (any share).
        ``weight_only=None`` chooses per layer: int8 per channel without a branch where that takes no
        more bytes than the recipe's ``weight`` format with its low-rank branch (narrow layers), else
        that format and branch (:func:`diffq.quantization.selection.choose_layers`); an 8-bit
        ``weight_only`` never gets a branch. ``weight_only_roles=()`` keeps those roles in 16 bits.
    int8_weight_roles: roles of ``skip_roles`` whose weights are stored int8 per channel
        (weight-only, no branch, 16-bit activations) instead of 16 bits, whatever their share: by
        default the UNets' reference set of the 4-bit-activation presets (``shortcut``, ``resample``,
        ``proj``), which keeps them out of 4-bit quantization at half their 16-bit bytes; ``()`` keeps
        them in 16 bits (the reference SVDQuant set as it is).
    min_features: layers with fewer input or output features stay in 16 bits.
    bit_plan: path of a BitPlan JSON (``mixed`` recipe): per-layer preset names.
    text_encoder: also quantize every Linear of the text encoders with the same ``weight`` format
        and ``act`` format (dynamic scales per token when ``act`` is static: the text encoders are
        not calibrated), without smoothing or a low-rank branch.
    attn: quantize the denoiser's attention itself (Q·Kᵀ and P·V, :mod:`diffq.attention`):
        ``none``, ``int8`` (INT8 Q·Kᵀ and P·V), ``int8-fp8`` (INT8 Q·Kᵀ, FP8 E4M3 P·V), ``int8-fp16``
        (INT8 Q·Kᵀ, 16-bit P·V) or ``int4-fp8`` (an experiment). ``attn_block``: tokens per Q/K scale (16/32/64/128);
        ``attn_granularity``: ``block`` or ``head`` (one Q/K scale per head); ``attn_smooth_k``:
        subtract K's mean over tokens first. ``attn_skip_roles`` (``self_attn``, ``cross_attn``,
        ``joint_attn``, ``first_block``, ``last_block``) / ``attn_skip_patterns`` (regexes on the
        attention module's name) keep those modules in 16 bits. ``attn_max_error``: also keep every
        module whose attention output error, measured per step by calibration
        (``calibrate(attention_operands=True)``), exceeds this relative L2 at its worst step.
    """

    name: str = "custom"
    weight: QuantSpec | None = field(default_factory=lambda: QuantSpec("int8", "channel"))
    act: QuantSpec | None = None
    act_static: bool = False
    timestep_groups: int | None = None
    group_threshold: float = 0.25
    weight_clip: str = "minmax"
    act_clip: str = "minmax"
    percentile: float = 99.9
    smooth_alpha: float | None = None
    smooth_search: bool = False
    smooth_grid: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    smooth_outputs: int = SEARCH_OUTPUTS
    smooth_power_iters: int = WARM_POWER_ITERS
    smooth_clip: str | None = None
    shared_smoothing: bool = False
    timestep_balance: bool = False
    rank: int = 0
    rank_ratio: float | None = None
    lowrank_refit: int = 0
    rounding: str = "rtn"
    gptq_damp: float = 0.01
    gptq_act_order: bool = False
    gptq_weighted_clip: bool = False
    act_unsigned: bool = False
    act_center: bool = False
    split_shortcut: bool = True
    skip_roles: tuple[str, ...] = DEFAULT_SKIP_ROLES
    skip_patterns: tuple[str, ...] = ()
    include_patterns: tuple[str, ...] = ()
    weight_only_roles: tuple[str, ...] = DEFAULT_WEIGHT_ONLY_ROLES
    weight_only_share: float = 0.1
    weight_only: QuantSpec | None = None
    int8_weight_roles: tuple[str, ...] = DEFAULT_INT8_WEIGHT_ROLES
    min_features: int = 16
    bit_plan: str | None = None
    text_encoder: bool = False
    attn: str = "none"
    attn_block: int = 64
    attn_granularity: str = "block"
    attn_smooth_k: bool = True
    attn_skip_roles: tuple[str, ...] = ()
    attn_skip_patterns: tuple[str, ...] = ()
    attn_max_error: float | None = None

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def _check_types(self) -> None:
        def bad(field_name: str, want: str):
            raise RecipeError(
                f"recipe field {field_name}={getattr(self, field_name)!r} must be {want}"
            )

        for k in _SPEC_FIELDS:
            v = getattr(self, k)
            if v is not None and not isinstance(v, QuantSpec):
                bad(k, "a format such as {'dtype': 'int4', 'granularity': 'group', 'group_size': 64}, "
                       "a string like 'int4:g64', or null")
        if not isinstance(self.name, str):
            bad("name", "a string")
        for k in ("act_static", "split_shortcut", "text_encoder", "attn_smooth_k", "smooth_search",
                  "timestep_balance", "shared_smoothing", "gptq_act_order", "gptq_weighted_clip", "act_unsigned", "act_center"):
            if not isinstance(getattr(self, k), bool):
                bad(k, "true or false")
        for k in ("rank", "min_features", "attn_block", "lowrank_refit", "smooth_outputs", "smooth_power_iters"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int):
                bad(k, "an integer")
        for k in ("group_threshold", "percentile", "gptq_damp", "weight_only_share"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
                bad(k, "a number")
        if self.smooth_alpha is not None and (
            isinstance(self.smooth_alpha, bool) or not isinstance(self.smooth_alpha, (int, float))
            or self.smooth_alpha != self.smooth_alpha
        ):
            bad("smooth_alpha", "a number in [0, 1] or null")
        if self.attn_max_error is not None and (
            isinstance(self.attn_max_error, bool) or not isinstance(self.attn_max_error, (int, float))
            or math.isnan(self.attn_max_error) or self.attn_max_error <= 0
        ):
            bad("attn_max_error", "a positive number (a relative L2 error such as 0.05) or null")
        if self.rank_ratio is not None and (
            isinstance(self.rank_ratio, bool) or not isinstance(self.rank_ratio, (int, float))
            or math.isnan(self.rank_ratio)
        ):
            bad("rank_ratio", "a number in (0, 0.25] or null")
        if not isinstance(self.smooth_grid, tuple) or not self.smooth_grid or not all(
            isinstance(a, (int, float)) and not isinstance(a, bool) and not math.isnan(a) for a in self.smooth_grid
        ):
            bad("smooth_grid", "a non-empty list of numbers in [0, 1]")
        if not isinstance(self.rounding, str):
            bad("rounding", f"one of {list(ROUNDINGS)}")
        if self.timestep_groups is not None and (
            isinstance(self.timestep_groups, bool) or not isinstance(self.timestep_groups, int)
        ):
            bad("timestep_groups", "an integer or null")
        if self.bit_plan is not None and not isinstance(self.bit_plan, str):
            bad("bit_plan", "a file path or null")
        for k in ("weight_clip", "act_clip"):
            if not isinstance(getattr(self, k), str):
                bad(k, f"one of {list(WEIGHT_CLIP_METHODS if k == 'weight_clip' else CLIP_METHODS)}")
        if self.smooth_clip is not None and not isinstance(self.smooth_clip, str):
            bad("smooth_clip", f"one of {list(WEIGHT_CLIP_METHODS)} or null")
        for k, choices in (("attn", ATTN_CHOICES), ("attn_granularity", ATTN_GRANULARITIES)):
            if not isinstance(getattr(self, k), str) or getattr(self, k) not in choices:
                bad(k, f"one of {list(choices)}")

    def validate(self) -> None:
        self._check_types()
        if self.weight is None and self.bit_plan is None:
            raise RecipeError(f"recipe {self.name!r} quantizes nothing: set weight (e.g. int8) or bit_plan")
        if self.text_encoder and self.weight is None:
            raise RecipeError(
                f"recipe {self.name!r}: text_encoder=True quantizes the text encoders with the recipe's weight "
                f"format, and this recipe has none (a bit plan covers the denoiser only); set weight too"
            )
        for c, label, methods in ((self.weight_clip, "weight_clip", WEIGHT_CLIP_METHODS),
                                  (self.act_clip, "act_clip", CLIP_METHODS),
                                  (self.smooth_clip, "smooth_clip", WEIGHT_CLIP_METHODS)):
            if c is not None and c not in methods:
                raise RecipeError(f"{label}={c!r} is not one of {list(methods)}")
        if not 50.0 < self.percentile <= 100.0:
            raise RecipeError(f"percentile={self.percentile} must be in (50, 100]")
        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
            raise RecipeError(f"smooth_alpha={self.smooth_alpha} must be in [0, 1] (0.5 is the usual choice)")
        if not isinstance(self.rank, int) or self.rank < 0 or self.rank > 4096:
            raise RecipeError(f"rank={self.rank!r} must be an integer in [0, 4096] (32 is the usual choice)")
        if self.timestep_groups is not None and (
            not isinstance(self.timestep_groups, int) or not 1 <= self.timestep_groups <= 1000
        ):
            raise RecipeError(f"timestep_groups={self.timestep_groups!r} must be an integer >= 1, or None for auto")
        if not 0.0 < self.group_threshold < 100.0:
            raise RecipeError(f"group_threshold={self.group_threshold} must be positive")
        if self.act_static and self.act is None:
            raise RecipeError("act_static=True needs an activation format (act)")
        if self.act is not None and self.act_static and self.act.granularity not in ("tensor",):
            raise RecipeError(
                f"static activation ranges are per tensor; set act.granularity='tensor' "
                f"(got {self.act.granularity!r}) or act_static=False for dynamic per-token scales"
            )
        if self.act is not None and not self.act_static and self.act.granularity == "channel":
            raise RecipeError("dynamic activation scales are per 'token' or per 'group', not per 'channel'")
        if self.act_center and (self.act is None or self.act_static):
            raise RecipeError("act_center=True needs dynamic activation quantization (act set, act_static=False)")
        if self.act_center and self.act_unsigned:
            raise RecipeError(
                "act_center and act_unsigned exclude each other: centering makes inputs signed again; "
                "set one of them to false"
            )
        if not 0.0 <= self.weight_only_share <= 1.0:
            raise RecipeError(f"weight_only_share={self.weight_only_share} must be in [0, 1] (a share of the weights)")
        for k in ("weight_only_roles", "int8_weight_roles"):
            bad = [r for r in getattr(self, k) if r not in ROLES]
            if bad:
                raise RecipeError(f"unknown roles {bad} in {k}; roles are {list(ROLES)}")
        bad = [r for r in self.skip_roles if r not in ROLES]
        if bad:
            raise RecipeError(f"unknown roles {bad} in skip_roles; roles are {list(ROLES)}")
        if self.attn_block not in (16, 32, 64, 128):
            raise RecipeError(f"attn_block={self.attn_block} must be 16, 32, 64 or 128 tokens (64 is the usual choice)")
        bad = [r for r in self.attn_skip_roles if r not in ATTN_ROLES]
        if bad:
            raise RecipeError(f"unknown roles {bad} in attn_skip_roles; attention roles are {list(ATTN_ROLES)}")
        if self.min_features < 0:
            raise RecipeError("min_features must be >= 0")
        if self.rank < 0 or not 0 <= self.lowrank_refit <= 20:
            raise RecipeError(f"rank={self.rank} must be >= 0 and lowrank_refit={self.lowrank_refit} in 0..20")
        if self.rank_ratio is not None and not 0.0 < self.rank_ratio <= 0.25:
            raise RecipeError(
                f"rank_ratio={self.rank_ratio} must be in (0, 0.25] (the branch is capped at a quarter of the "
                f"layer), or null to use rank"
            )
        if any(not 0.0 <= a <= 1.0 for a in self.smooth_grid):
            raise RecipeError(f"smooth_grid={list(self.smooth_grid)} must hold smoothing strengths in [0, 1]")
        if not 1 <= self.smooth_outputs <= 1 << 20 or not 0 <= self.smooth_power_iters <= 8:
            raise RecipeError(
                f"smooth_outputs={self.smooth_outputs} must be in 1..{1 << 20} (output channels scoring each α, "
                f"{SEARCH_OUTPUTS} is the default) and smooth_power_iters={self.smooth_power_iters} in 0..8 "
                f"({WARM_POWER_ITERS} is the default)"
            )
        if self.rounding not in ROUNDINGS:
            raise RecipeError(f"rounding={self.rounding!r} is not one of {list(ROUNDINGS)}")
        if not 0.0 < self.gptq_damp < 100.0:
            raise RecipeError(f"gptq_damp={self.gptq_damp} must be positive (0.01 is the usual choice)")
        if self.smooth_search and self.smooth_alpha is None:
            raise RecipeError("smooth_search=True searches the smoothing strength: set smooth_alpha too (the "
                              "fallback for layers without calibration rows), e.g. smooth_alpha=0.5")
        for p in self.skip_patterns + self.include_patterns + self.attn_skip_patterns:
            try:
                re.compile(p)
            except re.error as e:
                raise RecipeError(f"bad layer pattern {p!r}: {e}") from e

    @property
    def needs_reservoir(self) -> bool:
        """Whether quantizing needs real input rows: ``calibrate(..., reservoir=N)``."""
        return self.rounding == "gptq" or self.smooth_search

    @property
    def needs_calibration(self) -> bool:
        return self.act_static or self.smooth_alpha is not None or self.needs_reservoir or self.needs_attention_errors

    @property
    def needs_attention_errors(self) -> bool:
        """Calibration must have measured attention errors (``attention_operands=True``)."""
        return self.attn != "none" and self.attn_max_error is not None

    def attention_format(self):
        """The :class:`~diffq.kernels.attention_reference.AttnFormat` of ``attn`` (None for ``none``)."""
        return attn_format(self.attn, block=self.attn_block, granularity=self.attn_granularity,
                           smooth_k=self.attn_smooth_k)

    def without_calibration(self) -> Recipe:
        """This recipe minus the parts that need calibration (static ranges, smoothing, GPTQ, α search):
        what a quick latency or size run without calibration can build; the formats stay the same."""
        act = self.act
        if self.act_static and act is not None:
            act = QuantSpec(act.dtype, "token", None, act.scale_dtype)
        return Recipe.from_dict(self.to_dict() | {
            "act": None if act is None else act.to_dict(), "act_static": False, "smooth_alpha": None,
            "smooth_search": False, "rounding": "rtn", "timestep_balance": False,
        })

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in (*_LIST_FIELDS, "smooth_grid"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        if not isinstance(d, dict):
            raise RecipeError(f"a recipe must be a mapping, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k not in REMOVED_FIELDS}
        unknown = set(d) - names
        if unknown:
            raise RecipeError(f"unknown recipe fields {sorted(unknown, key=str)}; valid fields: {sorted(names)}")
        kw = dict(d)
        try:
            for k in _SPEC_FIELDS:
                if isinstance(kw.get(k), dict):
                    kw[k] = QuantSpec.from_dict(kw[k])
                elif isinstance(kw.get(k), str):
                    kw[k] = _spec_from_str(kw[k])
            for k in _LIST_FIELDS:
                if k in kw:
                    if isinstance(kw[k], str) or not all(isinstance(x, str) for x in kw[k]):
                        raise RecipeError(f"{k} must be a list of strings")
                    kw[k] = tuple(kw[k])
            if "smooth_grid" in kw:
                if isinstance(kw["smooth_grid"], (str, bytes, dict)) or not hasattr(kw["smooth_grid"], "__iter__"):
                    raise RecipeError("smooth_grid must be a list of numbers in [0, 1]")
                kw["smooth_grid"] = tuple(kw["smooth_grid"])
            return cls(**kw)
        except (FormatError, TypeError) as e:
            raise RecipeError(f"bad recipe: {e}") from e

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def with_overrides(self, overrides: dict[str, Any] | list[str]) -> Recipe:
        """Apply ``{"rank": 16, "weight.group_size": 128}`` or ``["rank=16", ...]`` overrides."""
        if isinstance(overrides, list):
            parsed = {}
            for item in overrides:
                if "=" not in item:
                    raise RecipeError(f"override {item!r} is not key=value")
                k, v = item.split("=", 1)
                parsed[k.strip()] = _parse_value(v.strip())
            overrides = parsed
        d = self.to_dict()
        for key, value in overrides.items():
            head, _, sub = key.partition(".")
            if head not in d:
                raise RecipeError(f"unknown recipe field {head!r} in override {key!r}{_did_you_mean(head, d)}; "
                                  f"fields: {sorted(d)}")
            if sub:
                if d[head] is None:
                    raise RecipeError(f"cannot set {key!r}: {head} is None in this recipe")
                spec = dict(d[head])
                if sub not in spec:
                    raise RecipeError(f"unknown format field {sub!r}{_did_you_mean(sub, spec)}; fields: {sorted(spec)}")
                spec[sub] = value
                if sub == "granularity" and value != "group":
                    spec["group_size"] = None
                d[head] = spec
            else:
                d[head] = value
        return Recipe.from_dict(d)


def _did_you_mean(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _spec_from_str(s: str) -> QuantSpec | None:
    """``"int4:g64"``, ``"int8:token"``, ``"fp8_e4m3"`` -> QuantSpec; ``"none"`` -> None."""
    if s.lower() in ("none", "null", ""):
        return None
    dtype, _, gran = s.partition(":")
    if not gran:
        return QuantSpec(dtype, "channel")
    if gran.startswith("g") and gran[1:].isdigit():
        return QuantSpec(dtype, "group", int(gran[1:]))
    return QuantSpec(dtype, gran)


def _parse_value(v: str) -> Any:
    """JSON (``16``, ``null``, ``["a"]``), else a Python literal tuple/list (``()``, ``('io',)``), else
    the string itself."""
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        pass
    if v and v[0] in "([":
        try:
            value = ast.literal_eval(v)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return v
        return list(value) if isinstance(value, tuple) else value
    return v
