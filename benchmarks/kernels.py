"""GEMM micro-benchmark of the diffq kernels at the layer shapes of real diffusion denoisers.

On a CUDA GPU every kernel (W4A16, W8A8, W4A8, W4A4, W4A4 + rank-32 low-rank, FP8 on Triton and
FP8 via torch._scaled_mm) is timed against ``torch.matmul`` in bf16 measured in the same run. On
the CPU the int8 path (``torch._int_mm``, and the whole W8A8 reference layer: per-token
quantization + int8 GEMM + epilogue) is compared with an fp32 matmul instead.

Reported per (model, layer, batch, kernel): time (median), TFLOP/s (2*M*N*K, the dense GEMM's
work, for every kernel so that rates compare), speed ratio vs the baseline, and the minimum bytes
the kernel(s) must move (inputs, weights, scales, outputs, and the intermediate activation codes
written and re-read by the quantization stage).

    python -m benchmarks.kernels [--quick] [--json out.json] [--models sd15,flux] [--batches 1,2]

Shapes (tokens x in x out, batch 1; batch 2 = classifier-free guidance doubles the tokens) come
from the diffusers configs on the Hugging Face hub, at each model's native resolution:

* SD1.5 ``runwayml/stable-diffusion-v1-5/unet/config.json``: block_out_channels (320, 640, 1280,
  1280), cross_attention_dim 768, sample_size 64 (512 px); attention at 64x64, 32x32, 16x16
  latents (4096 / 1024 / 256 tokens, 8x8 = 64 in the mid block); GEGLU feed-forward C -> 2*4C,
  4C -> C; text 77 tokens. 3x3 convs are GEMMs of K = 9*C via im2col.
* SDXL ``stabilityai/stable-diffusion-xl-base-1.0/unet/config.json``: block_out_channels
  (320, 640, 1280), transformer_layers_per_block (1, 2, 10), cross_attention_dim 2048,
  sample_size 128 (1024 px): attention at 64x64 (640 ch) and 32x32 (1280 ch); text 77 tokens.
* PixArt-Sigma ``PixArt-alpha/PixArt-Sigma-XL-2-1024-MS/transformer/config.json``: 28 layers,
  16 heads x 72 = 1152, patch_size 2, sample_size 128 -> 4096 tokens, caption_channels 4096,
  FF 4x (4608); text 300 tokens (max_sequence_length of the Sigma pipeline).
* FLUX.1 ``black-forest-labs/FLUX.1-dev/transformer/config.json``: 24 heads x 128 = 3072,
  joint_attention_dim 4096, 19 double + 38 single blocks; 1024 px -> 4096 image tokens (2x2
  packed 128x128 latent) + 512 T5 tokens; FF 4x (12288); single-block proj_out 15360 -> 3072.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from dataclasses import asdict, dataclass

import torch

from diffq.io import write_json_atomic
from diffq.timing import device_name, time_call

# (model, layer, tokens at batch 1, K = in features, N = out features)
SHAPES: list[tuple[str, str, int, int, int]] = [
    ("sd15", "attn qkv/out 64x64", 4096, 320, 320),
    ("sd15", "ff geglu in 64x64", 4096, 320, 2560),
    ("sd15", "ff out 64x64", 4096, 1280, 320),
    ("sd15", "conv3x3 64x64 (im2col)", 4096, 2880, 320),
    ("sd15", "attn qkv/out 32x32", 1024, 640, 640),
    ("sd15", "ff geglu in 32x32", 1024, 640, 5120),
    ("sd15", "attn qkv/out 16x16", 256, 1280, 1280),
    ("sd15", "ff geglu in 16x16", 256, 1280, 10240),
    ("sd15", "conv3x3 16x16 (im2col)", 256, 11520, 1280),
    ("sd15", "cross-attn k/v (text)", 77, 768, 320),
    ("sdxl", "attn qkv/out 64x64", 4096, 640, 640),
    ("sdxl", "ff geglu in 64x64", 4096, 640, 5120),
    ("sdxl", "ff out 64x64", 4096, 2560, 640),
    ("sdxl", "attn qkv/out 32x32", 1024, 1280, 1280),
    ("sdxl", "ff geglu in 32x32", 1024, 1280, 10240),
    ("sdxl", "ff out 32x32", 1024, 5120, 1280),
    ("sdxl", "cross-attn k/v (text)", 77, 2048, 1280),
    ("pixart", "attn qkv/out", 4096, 1152, 1152),
    ("pixart", "ff in", 4096, 1152, 4608),
    ("pixart", "ff out", 4096, 4608, 1152),
    ("pixart", "cross-attn k/v (text)", 300, 1152, 1152),
    ("pixart", "caption proj", 300, 4096, 1152),
    ("flux", "double img qkv/out", 4096, 3072, 3072),
    ("flux", "double img ff in", 4096, 3072, 12288),
    ("flux", "double img ff out", 4096, 12288, 3072),
    ("flux", "double txt qkv", 512, 3072, 3072),
    ("flux", "single qkv", 4608, 3072, 3072),
    ("flux", "single proj_mlp", 4608, 3072, 12288),
    ("flux", "single proj_out", 4608, 15360, 3072),
    ("flux", "context_embedder", 512, 4096, 3072),
]
#: the --quick subset: small enough for a 2-core CPU in well under a minute
QUICK = {
    ("sd15", "attn qkv/out 64x64"), ("sd15", "attn qkv/out 16x16"), ("sd15", "cross-attn k/v (text)"),
    ("sdxl", "attn qkv/out 32x32"), ("pixart", "cross-attn k/v (text)"), ("flux", "double txt qkv"),
}  # fmt: skip
GROUP = 64
RANK = 32


@dataclass
class Row:
    model: str
    layer: str
    batch: int
    M: int
    K: int
    N: int
    kernel: str
    ms: float
    tflops: float
    speedup: float  # baseline time / this time (>1 = faster than the baseline)
    bytes: int
    gbps: float
    note: str = ""


def bytes_moved(kernel: str, m: int, k: int, n: int, out_bytes: int = 2) -> int:
    """Minimum HBM traffic of ``kernel`` (all its launches) for an [m, k] x [k, n] layer."""
    g, r = GROUP, RANK
    out = out_bytes * m * n
    if kernel in ("bf16", "fp32"):
        e = 2 if kernel == "bf16" else 4
        return e * (m * k + k * n) + e * m * n
    if kernel == "int8_mm":  # codes in, int32 out
        return m * k + n * k + 4 * m * n
    if kernel == "w4a16":
        return 2 * m * k + n * k // 2 + 2 * n * (k // g) + out
    act8 = 2 * m * k + 2 * (m * k + 4 * m)  # read x, write codes + scale, re-read them
    if kernel in ("w8a8", "fp8", "fp8_scaled_mm", "w8a8_ref"):
        return act8 + n * k + 4 * n + out
    if kernel == "w4a8":
        return act8 + n * k // 2 + 2 * n * (k // g) + out
    if kernel in ("w4a4", "w4a4_lr"):
        act4 = 2 * m * k + 2 * (m * k // 2 + 4 * m * (k // g))
        w = n * k // 2 + 2 * n * (k // g)
        lr = 2 * k * r + 2 * 4 * m * r + 2 * r * n if kernel == "w4a4_lr" else 0
        return act4 + w + lr + out
    if kernel in ("nvfp4_lr", "mxfp4_lr"):  # NVFP4 reads x twice (abs-max pass); 1-byte block scales
        b = 16 if kernel == "nvfp4_lr" else 32
        reads = 2 if kernel == "nvfp4_lr" else 1
        act4 = reads * 2 * m * k + 2 * (m * k // 2 + m * (k // b))
        lr = 2 * k * r + 2 * 4 * m * r + 2 * r * n
        return act4 + n * k // 2 + n * (k // b) + lr + out
    raise ValueError(kernel)


def _time_cuda(fn, reps: int) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=max(reps, 25), return_mode="median"))


def _cpu_kernels(m: int, k: int, n: int):
    from diffq.kernels import w8a8_linear

    x = torch.randn(m, k)
    w = torch.randn(n, k)
    xq = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    wq = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    wqt = wq.t()
    ws = torch.rand(n, 1) * 0.01
    return "fp32", {
        "fp32": lambda: torch.matmul(x, w.t()),
        "int8_mm": lambda: torch._int_mm(xq, wqt),
        "w8a8_ref": lambda: w8a8_linear(x, wq, ws, backend="reference"),
    }


def _cuda_kernels(m: int, k: int, n: int):
    import diffq.kernels as K
    from diffq.formats import pack_int4

    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(m, k, device=dev, dtype=dt)
    w = torch.randn(n, k, device=dev, dtype=dt)
    q4 = pack_int4(torch.randint(-8, 8, (n, k), dtype=torch.int8, device=dev))
    s4 = torch.rand(n, k // GROUP, device=dev, dtype=torch.float16) * 0.01
    q8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=dev)
    s8 = torch.rand(n, 1, device=dev) * 0.01
    f8 = torch.randn(n, k, device=dev).clamp(-448, 448).to(torch.float8_e4m3fn)
    l1 = torch.randn(k, RANK, device=dev, dtype=dt) * 0.02
    l2 = torch.randn(RANK, n, device=dev, dtype=dt) * 0.02
    fns = {"bf16": lambda: torch.matmul(x, w.t())}
    avail = {kind: K.triton_unavailable_reason(kind, dev, GROUP) for kind in ("w4a16", "w8a8", "w4a8", "w4a4", "fp8")}
    if avail["w4a16"] is None:
        fns["w4a16"] = lambda: K.w4a16_linear(x, q4, s4, GROUP, backend="triton")
    if avail["w8a8"] is None:
        fns["w8a8"] = lambda: K.w8a8_linear(x, q8, s8, backend="triton")
    if avail["w4a8"] is None:
        fns["w4a8"] = lambda: K.w4a8_linear(x, q4, s4, GROUP, backend="triton")
    if avail["w4a4"] is None:
        fns["w4a4"] = lambda: K.w4a4_linear(x, q4, s4, GROUP, backend="triton")
        fns["w4a4_lr"] = lambda: K.w4a4_linear(x, q4, s4, GROUP, lr_down=l1, lr_up=l2, backend="triton")
    for fmt in ("nvfp4", "mxfp4"):  # native on sm_100 / sm_120, Triton's bf16 emulation below
        if K.fp4_unavailable_reason(fmt, dev) is None:
            from diffq.formats import MXFP4, NVFP4, pack_bits, quantize

            qf = quantize(w, NVFP4 if fmt == "nvfp4" else MXFP4)
            args = (pack_bits(qf.codes, 4), qf.scale_stored, fmt)
            fns[f"{fmt}_lr"] = lambda a=args, g=qf.global_scale: K.fp4_linear(
                x, *a, wscale_global=g, lr_down=l1, lr_up=l2, backend="triton")
    if avail["fp8"] is None:
        fns["fp8"] = lambda: K.fp8_linear(x, f8, s8, backend="triton")
        if k % 16 == 0 and n % 16 == 0:
            fns["fp8_scaled_mm"] = lambda: K.fp8_linear(x, f8, s8, backend="scaled_mm")
    return "bf16", fns


def run(shapes, batches, reps: int, progress: bool = True) -> list[Row]:
    on_gpu = torch.cuda.is_available()
    rows: list[Row] = []
    todo = [(s, b) for s in shapes for b in batches]
    for i, ((model, layer, tokens, k, n), b) in enumerate(todo):
        m = tokens * b
        base, fns = _cuda_kernels(m, k, n) if on_gpu else _cpu_kernels(m, k, n)
        timer = (lambda f: _time_cuda(f, reps)) if on_gpu else (lambda f: time_call(f, repeats=reps).median_s * 1e3)
        times = {}
        for name, fn in fns.items():
            try:
                times[name] = timer(fn)
            except Exception as e:  # noqa: BLE001  (one kernel failing must not end the sweep)
                print(f"  {name} failed at {m}x{k}x{n}: {type(e).__name__}: {e}", file=sys.stderr)
        t0 = times.get(base)
        for name, ms in times.items():
            nbytes = bytes_moved(name, m, k, n, out_bytes=2 if on_gpu else 4)
            rows.append(Row(
                model, layer, b, m, k, n, name, round(ms, 4), round(2 * m * n * k / (ms * 1e-3) / 1e12, 3),
                round(t0 / ms, 3) if t0 else float("nan"), nbytes, round(nbytes / (ms * 1e-3) / 1e9, 1),
            ))  # fmt: skip
        if progress:
            line = "  ".join(f"{r.kernel}={r.ms:.3f}ms({r.speedup:.2f}x)" for r in rows if r.M == m and r.K == k
                             and r.N == n and r.layer == layer and r.model == model)  # fmt: skip
            print(f"[{i + 1}/{len(todo)}] {model:6s} {layer:26s} b{b} {m}x{k}x{n}: {line}", flush=True)
    return rows


def print_table(rows: list[Row]) -> None:
    head = f"{'model':6s} {'layer':26s} {'b':>1s} {'MxKxN':>17s} {'kernel':13s} {'ms':>9s} {'TFLOP/s':>8s} "
    head += f"{'vs base':>7s} {'MB moved':>9s} {'GB/s':>7s}"
    print(head)
    for r in rows:
        print(
            f"{r.model:6s} {r.layer:26s} {r.batch:1d} {f'{r.M}x{r.K}x{r.N}':>17s} {r.kernel:13s} {r.ms:9.3f} "
            f"{r.tflops:8.3f} {r.speedup:6.2f}x {r.bytes / 1e6:9.2f} {r.gbps:7.1f}"
        )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small subset of shapes, batch 1 only")
    ap.add_argument("--models", default="sd15,sdxl,pixart,flux")
    ap.add_argument("--batches", default="1,2", help="1 = one image, 2 = classifier-free guidance")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (CPU default 5, quick 3)")
    ap.add_argument(
        "--threads", type=int, default=None,
        help="CPU threads (default 1 on the CPU: on a shared machine OpenMP barriers of >1 thread turn "
        "every op into a scheduler wait and timings become noise)",
    )  # fmt: skip
    ap.add_argument("--json", default=None, help="write the rows and run metadata to this file")
    args = ap.parse_args(argv)
    if args.threads or not torch.cuda.is_available():
        torch.set_num_threads(args.threads or 1)
    models = set(args.models.split(","))
    shapes = [s for s in SHAPES if s[0] in models and (not args.quick or (s[0], s[1]) in QUICK)]
    batches = [1] if args.quick else [int(b) for b in args.batches.split(",")]
    reps = args.reps or (3 if args.quick else 5)
    torch.manual_seed(0)
    rows = run(shapes, batches, reps)
    print()
    print_table(rows)
    meta = {
        "device": device_name(), "torch": torch.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/kernels.py", *(argv if argv is not None else sys.argv[1:])]),
        "baseline": "torch.matmul bf16" if torch.cuda.is_available() else "torch.matmul fp32",
        "group_size": GROUP, "rank": RANK, "tflops_rule": "2*M*N*K for every kernel",
    }  # fmt: skip
    if args.json:
        write_json_atomic(args.json, {"meta": meta, "rows": [asdict(r) for r in rows]})
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
