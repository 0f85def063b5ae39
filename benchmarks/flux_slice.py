"""Real-size FLUX on this CPU: per-block quantize times of the FLUX-width slice, a standalone checkpoint
loaded without the bf16 transformer (peak RSS, identical images), and the peak RSS of block-streamed
quantization of a deeper FLUX-config model.

    python -m benchmarks.flux_slice slice  [--out DIR]   # width 3072, 1 double + 2 single blocks
    python -m benchmarks.flux_slice stream [--out DIR] [--double 6] [--single 12] [--heads 8] [--rtn]
    python -m benchmarks.flux_slice calibrate [--double 6] [--single 12] [--heads 8]  # streamed calibration

Both build a ``FluxPipeline`` around a ``FluxTransformer2DModel`` from FLUX.1's config
(:data:`benchmarks.model_configs.FLUX_DIT`, random bf16 weights, seed 0) cut to the given blocks
(``--heads`` x 128 wide for ``stream``, 24 x 128 = 3072 for ``slice``), with small text encoders
(a 1-layer 768-wide CLIP, a 1-layer 4096-wide T5) and a small 4-level VAE (scale 8, 16 latent
channels), so 256x256 images make 256 image tokens as in FLUX. Calibration: 1 prompt x 2 steps.
Every measurement runs in a fresh child process (peak RSS = ``ru_maxrss``, minus the RSS before the
measured call; the calibration statistics, an input of the call, are paged in before that RSS is
taken; RSS anon/file after every block and at a sampled peak are recorded too). Writes
``DIR/flux_slice.json`` / ``DIR/flux_stream.json`` (``--rtn``: ``flux_stream_rtn.json``).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.model_configs import FLUX_DIT

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT, SIZE, STEPS, TEXT_TOKENS = "a photo of a cat", 256, 2, 32
PRESET = "w4a4-svd"
#: ``--rtn``: the preset with round-to-nearest and a fixed smoothing strength (no GPTQ, no search; the
#: quantizer of ``w4a4-svd`` before issue 15), for the memory of streaming without GPTQ's Hessians
RTN = {"preset": PRESET, "rounding": "rtn", "smooth_search": False}
RESERVOIR = 256  # input rows per layer and step: the preset's GPTQ and smoothing search need them


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_parts() -> dict[str, int]:
    """RssAnon / RssFile (bytes) of this process: working memory vs. pages of mapped files."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _make_resident(stats) -> int:
    """Read one value per 4 KiB page of every tensor of the calibration statistics (they are memory-
    mapped from their file), so that they are resident before the measured call; returns their bytes."""
    tensors = [t for name, st in stats.layers.items() for t in st.to_tensors(name).values()]
    for group in (stats.reservoirs, stats.patches):
        tensors += [t for name, res in group.items() for t in res.to_tensors(name).values()]
    total = 0
    for t in tensors:
        if t.numel():
            t.reshape(-1)[:: max(1, 4096 // t.element_size())].float().sum()
            total += t.numel() * t.element_size()
    return total


class _BlockRss:
    """Instrumentation of the measured call: RSS (anon/file) after every block, and the largest RSS a
    10 ms sampling thread saw with its split and the block it was in (``ru_maxrss`` is the exact peak)."""

    def __enter__(self):
        import threading

        from diffq.quantization import streaming

        self.rows, self.peak, self._block, self._stop = [], {"rss": 0}, "-", False
        self._streaming, real = streaming, streaming.install_layers

        def per_block(root, chs, *a, **k):
            from diffq.quantization.streaming import block_of

            self._block = block_of(chs[0].name)
            out = real(root, chs, *a, **k)
            self.rows.append({"block": self._block, **_rss_parts()})
            return out

        def sample():
            while not self._stop:
                now = _rss_parts()
                if now["RssAnon"] + now["RssFile"] > self.peak["rss"]:
                    self.peak = {"rss": now["RssAnon"] + now["RssFile"], **now, "block": self._block}
                time.sleep(0.01)

        streaming.install_layers = per_block
        self._real = real
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()
        self._streaming.install_layers = self._real


def transformer_config(double: int, single: int, heads: int) -> dict:
    return FLUX_DIT | {"num_layers": double, "num_single_layers": single, "num_attention_heads": heads}


def build_pipeline(config: dict, transformer=None):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from diffq.pipelines.tiny_tokenizers import (
        CLIP_SPECIAL_IDS,
        T5_SPECIAL_IDS,
        clip_style_tokenizer,
        t5_style_tokenizer,
        vocab_size,
    )

    torch.manual_seed(0)
    if transformer is None:
        transformer = FluxTransformer2DModel(**config).to(torch.bfloat16).eval()
    ids = CLIP_SPECIAL_IDS
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size("clip"), hidden_size=768, intermediate_size=256,
                                        num_hidden_layers=1, num_attention_heads=12, bos_token_id=ids["bos"],
                                        eos_token_id=ids["eos"], pad_token_id=ids["pad"]))
    t5 = T5EncoderModel(T5Config(vocab_size=vocab_size("t5"), d_model=4096, d_kv=64, d_ff=256, num_layers=1,
                                 num_heads=4, feed_forward_proj="gated-gelu", pad_token_id=T5_SPECIAL_IDS["pad"],
                                 eos_token_id=T5_SPECIAL_IDS["eos"], decoder_start_token_id=T5_SPECIAL_IDS["pad"]))
    vae = AutoencoderKL(block_out_channels=(32, 32, 32, 32), latent_channels=16, norm_num_groups=16,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        scaling_factor=0.3611, shift_factor=0.1159)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae.to(torch.bfloat16).eval(),
                        text_encoder=clip.to(torch.bfloat16).eval(), tokenizer=clip_style_tokenizer(),
                        text_encoder_2=t5.to(torch.bfloat16).eval(), tokenizer_2=t5_style_tokenizer(),
                        transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(pipe) -> torch.Tensor:
    return pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=3.5,
                max_sequence_length=TEXT_TOKENS, output_type="pt", generator=torch.Generator().manual_seed(0)).images


def _child(args: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.flux_slice", *args], check=False, capture_output=True,
                          text=True)
    if proc.returncode:
        raise SystemExit(f"child {args} failed:\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["child_wall_s"] = round(time.perf_counter() - t0, 1)
    return out


# ------------------------------------------------------------------ child steps (each in its own process)
def step_prepare(work: Path, config: dict) -> dict:
    """Base folder (without the transformer), the transformer's safetensors file, calibration statistics."""
    from safetensors.torch import save_file

    import diffq

    pipe = build_pipeline(config)
    den = pipe.transformer
    save_file({k: v.contiguous() for k, v in den.state_dict().items()}, str(work / "transformer.safetensors"))
    pipe.save_pretrained(work / "base")
    shutil.rmtree(work / "base" / "transformer")
    t0 = time.perf_counter()
    stats = diffq.calibrate(pipe, [PROMPT], num_inference_steps=STEPS, height=SIZE, width=SIZE,
                            pipeline_kwargs={"max_sequence_length": TEXT_TOKENS}, progress=False,
                            reservoir=RESERVOIR)
    stats.save(work / "stats.safetensors")
    blocks = {}
    for name, mod in den.named_children():
        if isinstance(mod, torch.nn.ModuleList):
            for i, b in enumerate(mod):
                blocks[f"{name}.{i}"] = sum(p.numel() * 2 for p in b.parameters())
    return {"params": sum(p.numel() for p in den.parameters()), "bf16_bytes": sum(p.numel() * 2 for p in den.parameters()),
            "block_bf16_bytes": blocks, "calibration_s": round(time.perf_counter() - t0, 1)}


def _meta_pipe(work: Path, config: dict):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    with torch.device("meta"):
        den = FluxTransformer2DModel(**config).eval()
    pipe = FluxPipeline.from_pretrained(work / "base", transformer=den)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def step_quantize(work: Path, config: dict, streamed: bool, recipe=PRESET) -> dict:
    """Quantize block by block (streamed: the transformer on meta, weights read per block from its file)."""
    import diffq
    from diffq.calibration import CalibrationStats
    from diffq.quantization.streaming import block_seconds
    from diffq.sizes import module_bytes

    stats = CalibrationStats.load(work / "stats.safetensors")
    stats_bytes = _make_resident(stats)  # an input of the call: paged in before the baseline is taken
    if streamed:
        pipe = _meta_pipe(work, config)
    else:
        from safetensors.torch import load_file

        pipe = build_pipeline(config)
        pipe.transformer.load_state_dict(load_file(str(work / "transformer.safetensors")))
    base_rss, base_parts = _rss_now(), _rss_parts()
    t0, c0 = time.perf_counter(), time.process_time()
    with _BlockRss() as per_block:
        diffq.quantize(pipe, recipe, calibration=stats, progress=False, work_dir=work / "blocks",
                       dense_source=work / "transformer.safetensors" if streamed else None)
    out = {"quantize_wall_s": round(time.perf_counter() - t0, 1), "quantize_cpu_s": round(time.process_time() - c0, 1),
           "rss_before": base_rss, "rss_parts_before": base_parts, "peak_rss": _peak(),
           "calibration_stats_bytes": stats_bytes, "quantized_bytes": module_bytes(pipe.transformer),
           "block_seconds": block_seconds(work / "blocks"), "block_rss": per_block.rows,
           "sampled_peak": per_block.peak}
    if not streamed:
        img = images(pipe)
        from safetensors.torch import save_file

        save_file({"images": img.contiguous()}, str(work / "images_before.safetensors"))
        diffq.save(pipe, work / "ckpt")
    return out


def step_calibrate(work: Path, config: dict, streamed: bool) -> dict:
    """Calibrate (256 input rows per layer and step) with the transformer in memory, or on meta with
    its weights read block by block (``diffq.calibrate_streamed``); peak RSS of the whole process."""
    import diffq

    start = _rss_now()
    kw = {"num_inference_steps": STEPS, "height": SIZE, "width": SIZE, "progress": False, "reservoir": RESERVOIR,
          "pipeline_kwargs": {"max_sequence_length": TEXT_TOKENS}}
    src = work / "transformer.safetensors"
    pipe = _meta_pipe(work, config)
    for part in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        part.to(torch.bfloat16)  # the base folder loads in fp32; the transformer runs in bf16
    if not streamed:
        from diffusers import FluxTransformer2DModel
        from safetensors.torch import load_file

        den = FluxTransformer2DModel(**config).to(torch.bfloat16).eval()
        den.load_state_dict(load_file(str(src)))
        pipe.register_modules(transformer=den)
    base = _rss_now()
    c0 = time.process_time()
    stats = (diffq.calibrate_streamed(pipe, [PROMPT], dense_source=src, **kw) if streamed
             else diffq.calibrate(pipe, [PROMPT], **kw))
    cpu = time.process_time() - c0
    stats.save(work / f"stats_{'streamed' if streamed else 'dense'}.safetensors")
    return {"rss_start": start, "rss_before_call": base, "peak_rss": _peak(), "calibrate_cpu_s": round(cpu, 1)}


def _same_stats(work: Path) -> bool:
    from diffq.calibration import CalibrationStats

    a = CalibrationStats.load(work / "stats_dense.safetensors")
    b = CalibrationStats.load(work / "stats_streamed.safetensors")
    return a.layers.keys() == b.layers.keys() and all(
        torch.equal(a.layers[n].channel_absmax(), b.layers[n].channel_absmax())
        and torch.equal(a.reservoirs[n].rows, b.reservoirs[n].rows) for n in a.layers)


def step_load(work: Path) -> dict:
    """load_pipeline of the standalone checkpoint (base = the folder without a transformer), then generate."""
    import diffusers
    import transformers
    from safetensors.torch import load_file

    import diffq
    import diffq.quantization.standalone_load

    for cls in ("FluxPipeline", "FluxTransformer2DModel", "AutoencoderKL"):
        getattr(diffusers, cls)
    for cls in ("CLIPTextModel", "T5EncoderModel", "CLIPTokenizer", "T5TokenizerFast"):
        getattr(transformers, cls)
    base_rss = _rss_now()
    t0 = time.perf_counter()
    pipe = diffq.load_pipeline(work / "ckpt", base=str(work / "base"))
    load_s = time.perf_counter() - t0
    peak = _peak()
    # the checkpoint's tensors are memory-mapped and paged in when used: read one value per 4 KiB page
    # of every tensor of the transformer, so that all of it is resident, and measure again
    for t in [*pipe.transformer.parameters(), *pipe.transformer.buffers()]:
        if t.numel():
            t.reshape(-1)[:: max(1, 4096 // t.element_size())].float().sum()
    peak_resident = _peak()
    pipe.set_progress_bar_config(disable=True)
    same = torch.equal(images(pipe), load_file(str(work / "images_before.safetensors"))["images"])
    peak_generate = _peak()  # the checkpoint's tensors are memory-mapped: generating touches all of them
    size = sum(f.stat().st_size for f in (work / "ckpt").iterdir())
    others = sum(p.numel() * p.element_size() for m in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
                 for p in m.parameters())
    return {"load_s": round(load_s, 1), "rss_before": base_rss, "peak_rss": peak, "peak_rss_resident": peak_resident,
            "peak_rss_after_generate": peak_generate,
            "checkpoint_bytes": size,
            "base_components_bytes": others, "images_identical": same}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["slice", "stream", "calibrate", "_prepare", "_quantize", "_load", "_calibrate"])
    ap.add_argument("--out", default="/tmp/diffq_flux_slice")
    ap.add_argument("--double", type=int, default=6)
    ap.add_argument("--single", type=int, default=12)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--streamed", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--rtn", action="store_true", help="stream: round-to-nearest, fixed smoothing (see RTN)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(args.out)
    config = transformer_config(args.double, args.single, args.heads)
    if args.what.startswith("_"):
        step = {"_prepare": lambda: step_prepare(work, config),
                "_quantize": lambda: step_quantize(work, config, args.streamed, RTN if args.rtn else PRESET),
                "_load": lambda: step_load(work),
                "_calibrate": lambda: step_calibrate(work, config, args.streamed)}[args.what]
        print(json.dumps(step()))
        return
    if args.what == "slice":
        args.double, args.single, args.heads = 1, 2, 24
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    common = ["--out", str(work), "--double", str(args.double), "--single", str(args.single), "--heads", str(args.heads)]
    result = {"what": args.what, "config": transformer_config(args.double, args.single, args.heads),
              "preset": RTN if args.rtn else PRESET,
              "image": SIZE, "steps": STEPS, "machine": "shared 2-core CPU, 1 torch thread per process"}
    result["prepare"] = _child(["_prepare", *common])
    if args.what == "calibrate":
        result["dense"] = _child(["_calibrate", *common])
        result["streamed"] = _child(["_calibrate", *common, "--streamed"])
        result["identical_statistics"] = _same_stats(work)
        path = Path(args.json or RESULTS / "flux_calibrate_streamed.json")
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return
    result["quantize"] = _child(["_quantize", *common, *(["--streamed"] if args.what == "stream" else []),
                                 *(["--rtn"] if args.rtn else [])])
    if args.what == "slice":
        result["load"] = _child(["_load", *common])
    path = Path(args.json or RESULTS / f"flux_{args.what}{'_rtn' if args.rtn else ''}.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
