"""Ahead-of-time compilation of the Triton kernels for NVIDIA targets, on any machine (no GPU).

Triton compiles for a named target without a device (``triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))``) and ships ``ptxas`` and ``cuobjdump``; this module uses them
to read what a kernel compiles to:

* registers, spilled bytes and stack frame (``ptxas -v``, same flags Triton uses), shared memory;
* the MMA instruction kind in SASS (``HGMMA``/``IGMMA``/``QGMMA`` = Hopper ``wgmma``,
  ``HMMA``/``IMMA`` = ``mma.sync``), and whether the wgmma loop is asynchronous (a
  ``warp_group_dot_wait`` with ``pendings > 0`` in the TTGIR: a wgmma stays in flight across
  loop iterations instead of draining every iteration);
* the **main loop**: the backward branch of the SASS whose body holds the most MMA instructions,
  its instruction mix, and a static cycle budget per loop iteration on one SM:

  - ``mma_clk``: the loop's multiply-accumulates (counted from the SASS MMA shapes) divided by the
    dense tensor-core rate of the target (:data:`MMA_RATE`, MAC per clock per SM);
  - ``issue_clk``: ``num_warps * loop instructions / 4`` (4 warp schedulers, one instruction per
    clock each);
  - ``xu_clk``: quarter-rate conversions (``I2F``/``F2I``/``F2F``/``FRND``/``MUFU``) at 16 per clock
    per SM; ``alu_clk`` / ``fp32_clk``: integer-ALU and FP32 instructions at the lane counts of
    :data:`PIPE_LANES`.

  ``issue_clk / mma_clk <= 1`` means the loop can keep the tensor cores busy as far as instruction
  issue goes. These are **static predictions from compiled code**, not measurements: latencies,
  memory bandwidth, bank conflicts and clocks are not modelled. Pipe assignments are leads (for
  example ``I2FP`` is counted on the integer ALU, ``IMAD`` on the FP32/FMA pipe).

The per-kernel build recipes (argument types, constexprs, what a tile means) are
:func:`variants`; :mod:`benchmarks/kernel_static.py` and ``tests/test_kernel_compile.py`` use them.
Set ``TRITON_CACHE_DIR`` to keep Triton's cache somewhere disposable.
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

#: dense MMA rates, multiply-accumulates per clock per SM (H100 SXM: 989 TFLOP/s bf16 at 1.83 GHz
#: x 132 SMs; A100: 312 TFLOP/s bf16 at 1.41 GHz x 108 SMs; L40S (sm_89): 362 TFLOP/s fp16 with
#: fp32 accumulation at 2.52 GHz x 142 SMs; 8-bit twice that). mma.sync on sm_90 is counted at the
#: wgmma rate (optimistic: its real peak there is lower). Blackwell, from the vendor's dense peak
#: figures (assumed, not measured): B200 (sm_100) 2.25 / 4.5 / 9 PFLOP/s bf16 / fp8 / fp4 at about
#: 1.85 GHz x 148 SMs = 4096 / 8192 / 16384 MAC per clock per SM (tcgen05); RTX 5090 (sm_120)
#: 1676 TFLOP/s fp4 at 2.41 GHz x 170 SMs = 2048 MAC per clock per SM, fp8 half of that
#: (block-scaled mma.sync).
MMA_RATE = {
    90: {"16bit": 2048, "8bit": 4096, "tf32": 1024},
    89: {"16bit": 512, "8bit": 1024, "tf32": 256},
    80: {"16bit": 1024, "8bit": 2048, "tf32": 512},
    100: {"16bit": 4096, "8bit": 8192, "fp4": 16384, "tf32": 2048},
    120: {"16bit": 512, "8bit": 1024, "fp4": 2048, "tf32": 256},
}
#: shared memory per SM (bytes) and the per-CTA reservation, registers per SM, warps per SM
SM_LIMITS = {
    90: {"smem": 233472, "reserve": 1024, "regs": 65536, "warps": 64},
    89: {"smem": 102400, "reserve": 1024, "regs": 65536, "warps": 48},
    80: {"smem": 167936, "reserve": 1024, "regs": 65536, "warps": 64},
    100: {"smem": 233472, "reserve": 1024, "regs": 65536, "warps": 64},
    120: {"smem": 102400, "reserve": 1024, "regs": 65536, "warps": 48},
}
#: lanes per SM per clock of the pipes modelled besides issue: integer ALU and FP32 (FFMA/FADD/FMUL,
#: IMAD), by architecture (H100 and Ada: 128 FP32 lanes; A100: 64)
PIPE_LANES = {
    90: {"alu": 64, "fp32": 128, "xu": 16},
    89: {"alu": 64, "fp32": 128, "xu": 16},
    80: {"alu": 64, "fp32": 64, "xu": 16},
    100: {"alu": 64, "fp32": 128, "xu": 16},
    120: {"alu": 64, "fp32": 128, "xu": 16},
}
MMA_OPS = ("HGMMA", "IGMMA", "QGMMA", "HMMA", "IMMA", "QMMA", "OMMA", "UTCHMMA", "UTCIMMA", "UTCQMMA", "UTCOMMA")
#: Blackwell tcgen05 MMAs (SASS ``UTC*MMA``, one instruction per CTA tile, issued by one thread):
#: the K depth of one instruction by kind (16-bit 16, 8-bit 32, FP4 64); the M x N shape sits in a
#: runtime instruction descriptor, so it is taken from the build's tile
TCGEN05_K = {"UTCHMMA": 16, "UTCIMMA": 32, "UTCQMMA": 32, "UTCOMMA": 64}
XU_OPS = ("I2F", "F2I", "F2F", "FRND", "MUFU", "I2I")
FP32_OPS = ("FFMA", "FADD", "FMUL", "FMNMX", "FSETP", "FSEL", "IMAD", "FCHK", "HADD2", "HFMA2", "HMUL2")
ALU_OPS = (
    "LOP3", "SHF", "IADD3", "PRMT", "SGXT", "ISETP", "SEL", "LEA", "IABS", "IMNMX", "VIADD", "BMSK",
    "POPC", "FLO", "BREV", "I2FP", "F2FP", "VIMNMX", "IADD", "LOP", "SHL", "SHR", "BFE", "BFI",
)  # fmt: skip
BIN_DIR = None


def _write_file(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary name, fsync, rename): diffq.kernels may not
    import diffq.io, so this is its own small copy of the rule."""
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _bin(tool: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


@dataclass
class Build:
    """One compile request: a kernel specialised for a target (what a launch would compile)."""

    name: str  # variant name, e.g. "w4a8"
    kernel: str  # function name, e.g. "_w4a8_kernel"
    fn: Any  # the JITFunction
    types: dict[str, str]  # non-constexpr argument -> Triton type ("*bf16", "i32", ...)
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    tile: str = ""  # "BMxBNxBK-wWsS" or "" for kernels without a tile table
    mma_input: str | None = None  # "16bit" | "8bit" | "tf32" | None (no tensor-core GEMM)
    block_macs: int | None = None  # BLOCK_M * BLOCK_N * BLOCK_K: MACs per CTA per k-step
    tile_mn: int | None = None  # BLOCK_M * BLOCK_N of the CTA's MMA (tcgen05 shapes are not in SASS)
    div16: Iterable[str] | None = None  # args hinted divisible by 16 (default: all)
    maxnreg: int | None = None

    @property
    def tag(self) -> str:
        return f"{self.name}{'-' + self.tile if self.tile else ''}"


@dataclass
class Report:
    """What one :class:`Build` compiled to on one target (JSON-friendly)."""

    name: str
    kernel: str
    cap: int
    tile: str
    ok: bool
    error: str = ""
    regs: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    shared: int | None = None
    mma: str = ""  # SASS MMA instruction, e.g. "IGMMA.64x128x32.S8.S8" ("" when none)
    mma_kinds: dict[str, int] = field(default_factory=dict)  # MMA opcode -> SASS count, e.g. {"IGMMA": 8, "QGMMA": 4}
    mma_unit: str = ""  # "wgmma" | "mma.sync" | "tcgen05" | ""
    wgmma_a_regs: bool | None = None  # wgmma A operand from registers (else shared memory)
    wgmma_async: bool | None = None  # None when the kernel has no wgmma
    imprecise_acc: list[int] = field(default_factory=list)  # maxNumImpreciseAcc of fp8 dots
    ptx_mma: list[str] = field(default_factory=list)  # distinct PTX MMA opcodes, e.g. "tcgen05.mma...kind::mxf4..."
    trap_only: bool = False  # the compiled body is a bare ``trap;`` (a miscompile that still "compiles")
    loop_instr: int | None = None  # SASS instructions in the main loop body (per thread)
    loop_k_steps: float | None = None  # k-steps (BLOCK_K each) per main-loop iteration
    loop_ops: dict[str, int] = field(default_factory=dict)
    mma_clk: float | None = None  # per main-loop iteration per SM
    issue_clk: float | None = None
    xu_clk: float | None = None
    alu_clk: float | None = None
    fp32_clk: float | None = None
    ctas_per_sm: int | None = None  # resident CTAs per SM allowed by registers and shared memory
    num_warps: int = 4
    secs: float | None = None

    @property
    def issue_ratio(self) -> float | None:
        return None if not self.mma_clk else round(self.issue_clk / self.mma_clk, 3)

    @property
    def overlap(self) -> bool | None:
        """Can tensor-core work overlap the loop's other instructions? wgmma (a warpgroup waits
        on its own MMAs): an asynchronous loop, or two or more resident CTAs per SM. mma.sync
        (per-warp, the schedulers interleave warps): at least 2 resident warps per scheduler.
        None without a main loop."""
        if self.mma_clk is None:
            return None
        if self.mma_unit == "wgmma":
            return bool(self.wgmma_async) or (self.ctas_per_sm or 0) >= 2
        if self.mma_unit == "tcgen05":  # asynchronous by design (commit + mbarrier wait)
            return True
        return (self.ctas_per_sm or 0) * self.num_warps >= 8

    @property
    def bound_ratio(self) -> float | None:
        """Strictest modelled pipe (issue, XU, ALU, FP32) over MMA clocks."""
        if not self.mma_clk:
            return None
        return round(max(self.issue_clk, self.xu_clk, self.alu_clk, self.fp32_clk) / self.mma_clk, 3)

    def per_k_step(self, value: float | None) -> float | None:
        return None if value is None or not self.loop_k_steps else round(value / self.loop_k_steps, 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(issue_ratio=self.issue_ratio, bound_ratio=self.bound_ratio, overlap=self.overlap)
        return d


# ----------------------------------------------------------------------------- SASS parsing

_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?);")


def parse_sass(sass: str) -> list[tuple[int, str]]:
    """cuobjdump -sass text -> [(address, instruction text without predicate)]."""
    out = []
    for line in sass.splitlines():
        m = _SASS_LINE.match(line)
        if m:
            txt = re.sub(r"^@!?U?P\w+\s+", "", m.group(2).strip())
            out.append((int(m.group(1), 16), txt))
    return out


def opcode(txt: str) -> str:
    return txt.split()[0].split(".")[0] if txt else ""


def mma_macs(txt: str, tile_mn: int | None = None) -> tuple[int, str, str]:
    """SASS MMA instruction -> (MACs per issuing unit, unit "wgmma"/"mma.sync"/"tcgen05", input class).

    ``tile_mn``: BLOCK_M x BLOCK_N of the CTA, needed for tcgen05 (``UTC*MMA``), whose shape is not
    in the SASS text: one instruction computes the CTA tile over :data:`TCGEN05_K` of K."""
    op = opcode(txt)
    head = txt.split()[0]
    if op in TCGEN05_K:
        if tile_mn is None:
            raise ValueError(f"{txt}: a tcgen05 MMA needs the CTA tile (tile_mn)")
        cls = {"UTCHMMA": "16bit", "UTCIMMA": "8bit", "UTCQMMA": "8bit", "UTCOMMA": "fp4"}[op]
        return tile_mn * TCGEN05_K[op], "tcgen05", cls
    if op in ("HGMMA", "IGMMA", "QGMMA"):
        m = re.search(r"\.(\d+)x(\d+)x(\d+)", head)
        mm, nn, kk = (int(v) for v in m.groups())
        cls = "16bit" if op == "HGMMA" and ".TF32" not in head else ("tf32" if op == "HGMMA" else "8bit")
        return mm * nn * kk, "wgmma", cls
    if op in ("HMMA", "IMMA", "QMMA", "OMMA"):
        m = re.search(r"\.(\d\d)(\d)(\d+)", head)  # 16816 -> m16 n8 k16; 16832 -> m16 n8 k32; 16864 -> k64
        mm, nn, kk = int(m.group(1)), int(m.group(2)), int(m.group(3))
        cls = {"IMMA": "8bit", "QMMA": "8bit", "OMMA": "fp4"}.get(op) or ("tf32" if ".TF32" in head else "16bit")
        return mm * nn * kk, "mma.sync", cls
    raise ValueError(txt)


def main_loop(ins: list[tuple[int, str]]) -> list[str] | None:
    """Body of the backward branch with the most MMA instructions (ties: the larger body)."""
    best = None
    for addr, txt in ins:
        if not txt.startswith("BRA"):
            continue
        t = re.search(r"0x([0-9a-f]+)", txt)
        if not t:
            continue
        target = int(t.group(1), 16)
        if target >= addr:
            continue
        body = [x for a, x in ins if target <= a <= addr]
        n_mma = sum(1 for x in body if opcode(x) in MMA_OPS)
        key = (n_mma, len(body))
        if best is None or key > best[0]:
            best = (key, body)
    return None if best is None else best[1]


# ----------------------------------------------------------------------------- compile + analyse


def _signature(build: Build) -> tuple[dict[str, str], dict[tuple[int, ...], list]]:
    sig, attrs = {}, {}
    div16 = None if build.div16 is None else set(build.div16)
    for i, n in enumerate(build.fn.arg_names):
        if n in build.constexprs:
            sig[n] = "constexpr"
            continue
        if n not in build.types:
            raise KeyError(f"{build.kernel}: no type given for argument {n!r}")
        sig[n] = build.types[n]
        if div16 is None or n in div16:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def compile_build(build: Build, cap: int, keep: str | None = None) -> Report:
    """Compile ``build`` for ``sm_<cap>`` and read its resources and main loop (never raises for
    a compile error: the Report says ``ok=False`` and why). ``keep``: directory for the
    TTGIR/PTX/SASS files."""
    import time

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    rep = Report(build.name, build.kernel, cap, build.tile, ok=False, num_warps=build.num_warps)
    t0 = time.time()
    try:
        sig, attrs = _signature(build)
        src = ASTSource(fn=build.fn, signature=sig, constexprs=dict(build.constexprs), attrs=attrs)
        target = GPUTarget("cuda", cap, 32)
        opts = {"num_warps": build.num_warps, "num_stages": build.num_stages}
        if build.maxnreg:
            opts["maxnreg"] = build.maxnreg
        options = make_backend(target).parse_options(opts)
        with contextlib.redirect_stdout(io.StringIO()):  # Triton prints the whole PTX on a ptxas error
            cc = triton.compile(src, target=target, options=options.__dict__)
    except Exception as e:  # noqa: BLE001  (any compiler error is a result here)
        msg, cause = f"{type(e).__name__}: {e}", e.__cause__ or e.__context__
        while cause is not None:
            msg += f"\n  caused by {type(cause).__name__}: {cause}"
            cause = cause.__cause__ or cause.__context__
        rep.error = msg[-3000:]
        rep.secs = round(time.time() - t0, 2)
        return rep
    rep.ok = True
    rep.shared = int(getattr(cc.metadata, "shared", 0) or 0)
    asm = cc.asm
    ptx, ttgir, cubin = asm.get("ptx", ""), asm.get("ttgir", ""), asm.get("cubin", b"")
    with tempfile.TemporaryDirectory() as d:
        ptx_path, cub_path = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        _write_file(ptx_path, ptx.encode())
        _write_file(cub_path, cubin)
        arch = f"sm_{cap}a" if cap >= 90 else f"sm_{cap}"
        log = subprocess.run(
            [_bin("ptxas-blackwell" if cap >= 100 else "ptxas"), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", ptx_path, "-o",
             os.path.join(d, "k2.cubin")],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        sass = subprocess.run([_bin("cuobjdump"), "-sass", cub_path], capture_output=True, text=True, check=False).stdout
    text = log.stderr + log.stdout
    m = re.search(r"Used (\d+) registers", text)
    rep.regs = int(m.group(1)) if m else None
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    rep.spill_stores, rep.spill_loads = (int(m.group(1)), int(m.group(2))) if m else (None, None)
    m = re.search(r"(\d+) bytes stack frame", text)
    rep.stack = int(m.group(1)) if m else None
    rep.ctas_per_sm = ctas_per_sm(cap, build.num_warps, rep.regs, rep.shared)
    if keep:
        os.makedirs(keep, exist_ok=True)
        for ext, body in (("ttgir", ttgir), ("ptx", ptx), ("sass", sass), ("ptxas.log", text)):
            _write_file(os.path.join(keep, f"{build.tag}-sm{cap}.{ext}"), body.encode())
    _analyse(rep, build, cap, sass, ttgir, ptx)
    rep.secs = round(time.time() - t0, 2)
    return rep


def trap_only(ptx: str) -> bool:
    """True when a kernel's PTX body is a bare ``trap;`` without memory or MMA instructions: LLVM
    proved the code undefined and dropped it, which still "compiles" (Triton 3.8 does this for a
    ``tf32x3`` dot next to ``tcgen05`` block-scaled MMAs on sm_100)."""
    body = ptx[ptx.find(".entry"):] if ".entry" in ptx else ptx
    return "trap;" in body and not re.search(r"\b(ld|st|cp|mma|wgmma|tcgen05)\.", body)


def ctas_per_sm(cap: int, warps: int, regs: int | None, shared: int | None) -> int | None:
    """Resident CTAs per SM allowed by registers (allocated per warp in units of 256), shared
    memory and warp slots."""
    if regs is None:
        return None
    lim = SM_LIMITS[cap]
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = lim["regs"] // (per_warp * warps)
    by_smem = lim["smem"] // ((shared or 0) + lim["reserve"])
    return max(0, min(by_regs, by_smem, lim["warps"] // warps, 32))


def _analyse(rep: Report, build: Build, cap: int, sass: str, ttgir: str, ptx: str) -> None:
    ins = parse_sass(sass)
    mmas = [x for _, x in ins if opcode(x) in MMA_OPS]
    if mmas:
        rep.mma = collections.Counter(x.split()[0] for x in mmas).most_common(1)[0][0]
        rep.mma_unit = mma_macs(rep.mma, build.tile_mn or 1)[1]
        rep.mma_kinds = dict(sorted(collections.Counter(opcode(x) for x in mmas).items()))
    if rep.mma_unit == "wgmma" or "warp_group_dot" in ttgir:
        pend = [int(p) for p in re.findall(r"warp_group_dot_wait[^\n]*pendings = (\d+)", ttgir)]
        rep.wgmma_async = any(p > 0 for p in pend)
        rep.wgmma_a_regs = bool(re.search(r"ttng\.warp_group_dot %\S+, %\S+, %\S+[^\n]*: tensor<", ttgir))
    rep.imprecise_acc = sorted({int(v) for v in re.findall(r"maxNumImpreciseAcc = (\d+)", ttgir)})
    rep.trap_only = trap_only(ptx)
    rep.ptx_mma = sorted(set(re.findall(r"\b(tcgen05\.mma[\w.:]*|mma\.sync\.aligned[\w.:]*|wgmma\.mma_async[\w.:]*)", ptx)))
    body = main_loop(ins)
    if body is None or not build.mma_input:
        return
    ops = collections.Counter(opcode(x) for x in body)
    rep.loop_instr = len(body)
    rep.loop_ops = dict(ops.most_common())
    w = build.num_warps
    macs = 0.0
    for x in body:
        if opcode(x) in MMA_OPS:
            per, unit, _ = mma_macs(x, build.tile_mn)
            macs += per * {"wgmma": w / 4, "tcgen05": 1}.get(unit, w)
    rate = MMA_RATE[cap][build.mma_input]
    lanes = PIPE_LANES[cap]
    rep.mma_clk = round(macs / rate, 1) if macs else None
    rep.issue_clk = round(w * len(body) / 4, 1)
    count = lambda names: sum(ops.get(k, 0) for k in names)
    rep.xu_clk = round(w * 32 * count(XU_OPS) / lanes["xu"], 1)
    rep.alu_clk = round(w * 32 * count(ALU_OPS) / lanes["alu"], 1)
    rep.fp32_clk = round(w * 32 * count(FP32_OPS) / lanes["fp32"], 1)
    if build.block_macs and macs:
        rep.loop_k_steps = round(macs / build.block_macs, 3)


_JOBS: list[tuple[Build, int, str | None]] = []


def _worker(i: int) -> Report:
    return compile_build(*_JOBS[i])


def compile_many(
    jobs: list[tuple[Build, int]], processes: int = 1, keep: str | None = None, progress: Callable | None = None
) -> list[Report]:
    """Compile every (build, cap) job, in a forked process pool when ``processes > 1`` (order kept;
    the jobs reach the workers by fork, so kernels need not pickle)."""
    global _JOBS
    _JOBS = [(b, cap, keep) for b, cap in jobs]
    out: list[Report] = []
    try:
        if processes <= 1:
            for i in range(len(_JOBS)):
                out.append(_worker(i))
                if progress:
                    progress(out[-1])
            return out
        import multiprocessing as mp

        with mp.get_context("fork").Pool(processes) as pool:
            for rep in pool.imap(_worker, range(len(_JOBS))):
                out.append(rep)
                if progress:
                    progress(rep)
        return out
    finally:
        _JOBS = []


# ----------------------------------------------------------------------------- what the dispatcher compiles

#: FLUX.1 single-block QKV (4608 tokens x 3072 -> 3072, group 64, rank 32): the shape whose
#: default tiles the static table reports
FLUX_SHAPE = (4608, 3072, 3072)
GROUP = 64
RANK = 32

_I32 = "i32"


def _ints(*names: str) -> dict[str, str]:
    return {n: _I32 for n in names}


def _tile_consts(tile: Any) -> dict[str, int]:
    return tile.meta()


def build_gemm(kind: str, cap: int, tile: Any, *, dtype: str = "bf16", bias: bool = False, even: bool = True,
               group: int = GROUP, lr_f32: bool = False, splits: int = 4, route: str | None = None) -> Build:
    """The GEMM kernel of ``kind`` specialised as the dispatcher launches it on sm_<cap>.

    dtype: activation/output dtype ("bf16", "fp16", "fp32"); route (w4a4): "fp8" or "int8"
    (default: what :func:`diffq.kernels.dispatch.w4a4_route` picks for the capability)."""
    from diffq.kernels import row_scaled, w4a4_lowrank, w4a8, w4a16
    from diffq.kernels.dispatch import w4a4_route

    cap_t = (cap // 10, cap % 10)
    ptr = f"*{dtype}"
    tag_extra = "" if dtype == "bf16" else f"-{dtype}"
    tag_extra += "-bias" if bias else ""
    tag_extra += "" if even else "-oddk"
    tag_extra += "" if group == GROUP or kind in ("w8a8", "fp8") else f"-g{group}"
    macs = tile.block_m * tile.block_n * tile.block_k
    if kind == "w4a16":
        f32 = dtype == "fp32"
        types = {"x_ptr": ptr, "w_ptr": "*u8", "ws_ptr": "*fp32", "b_ptr": "*fp32", "y_ptr": ptr,
                 **_ints("M", "N", "K", "stride_xm", "stride_wn", "stride_ym")}
        consts = {"G": group, "EVEN": even, "HAS_BIAS": bias, "F32_DOT": f32, "ASM": True, **_tile_consts(tile)}
        return Build(f"w4a16{tag_extra}", "_w4a16_kernel", w4a16._w4a16_kernel, types, consts, tile.num_warps,
                     tile.num_stages, tile.name(), "tf32" if f32 else "16bit", macs)
    if kind == "w4a8":
        types = {"x_ptr": "*i8", "xs_ptr": "*fp32", "w_ptr": "*u8", "ws_ptr": "*fp32", "b_ptr": "*fp32", "y_ptr": ptr,
                 **_ints("M", "N", "K", "stride_xm", "stride_wn", "stride_ym")}
        consts = {"G": group, "EVEN": even, "HAS_BIAS": bias, "ASM": True, "MAGIC": cap < 90, **_tile_consts(tile)}
        return Build(f"w4a8{tag_extra}", "_w4a8_kernel", w4a8._w4a8_kernel, types, consts, tile.num_warps,
                     tile.num_stages, tile.name(), "8bit", macs)
    if kind == "w4a4":
        route = route or w4a4_route(cap_t)
        fp8 = route == "fp8"
        types = {"x_ptr": "*fp8e4nv" if fp8 else "*i8", "u_ptr": "*fp32", "w_ptr": "*u8", "ws_ptr": "*fp32",
                 "d_ptr": "*fp32", "l2_ptr": "*fp32" if lr_f32 else ptr, "b_ptr": "*fp32", "y_ptr": ptr,
                 **_ints("M", "N", "K", "R", "stride_xm", "stride_wn", "stride_ds", "stride_dm", "stride_l2r", "stride_ym")}
        consts = {"G": group, "EVEN": even, "FP8_MMA": fp8, "HAS_LR": True, "LR_F32": lr_f32, "R_PAD": RANK,
                  "SPLITS": splits, "HAS_BIAS": bias, "ASM": True, "MAGIC": (not fp8) and cap < 90, **_tile_consts(tile)}
        name = f"w4a4-{route}{tag_extra}" + ("-lrf32" if lr_f32 else "") + (f"-s{splits}" if splits != 4 else "")
        return Build(name, "_w4a4_kernel", w4a4_lowrank._w4a4_kernel, types, consts, tile.num_warps,
                     tile.num_stages, tile.name(), "8bit", macs)
    if kind in ("w8a8", "fp8"):
        fp8 = kind == "fp8"
        q = "*fp8e4nv" if fp8 else "*i8"
        types = {"x_ptr": q, "xs_ptr": "*fp32", "w_ptr": q, "ws_ptr": "*fp32", "b_ptr": "*fp32", "y_ptr": ptr,
                 **_ints("M", "N", "K", "stride_xm", "stride_wn", "stride_ym")}
        consts = {"INT_ACC": not fp8, "HAS_BIAS": bias, "EVEN_K": even, "IMPRECISE": tile.block_k if fp8 else None,
                  **_tile_consts(tile)}
        return Build(f"{kind}{tag_extra}", "_row_scaled_kernel", row_scaled._row_scaled_kernel, types, consts,
                     tile.num_warps, tile.num_stages, tile.name(), "8bit", macs)
    raise ValueError(kind)


def build_fp4_gemm(fmt: str, cap: int, tile: Any, *, dtype: str = "bf16", bias: bool = False, even: bool = True,
                   lr: bool = True, lr_f32: bool = False, splits: int = 4) -> Build:
    """The FP4 GEMM (:func:`diffq.kernels.fp4_gemm._fp4_gemm_kernel`) for ``fmt`` ("nvfp4" /
    "mxfp4") as :mod:`diffq.kernels.fp4_launch` launches it on sm_<cap>; the main loop's MMA
    class is "fp4" where the GPU has block-scaled FP4 MMA (sm_100, sm_120), else "16bit"
    (Triton's bf16 emulation of dot_scaled)."""
    from diffq.kernels import fp4_gemm
    from diffq.kernels.fp4_dispatch import FP4_FORMATS, fp4_route

    block = FP4_FORMATS[fmt][0]
    nv = fmt == "nvfp4"
    ptr = f"*{dtype}"
    sc = "*fp8e4nv" if nv else "*u8"
    types = {"x_ptr": "*u8", "xs_ptr": sc, "w_ptr": "*u8", "ws_ptr": sc, "amax_ptr": "*i32", "wg_ptr": "*fp32",
             "d_ptr": "*fp32", "l2_ptr": "*fp32" if lr_f32 else ptr, "b_ptr": "*fp32", "y_ptr": ptr,
             **_ints("M", "N", "K", "R", "stride_xm", "stride_xsm", "stride_wn", "stride_wsn", "stride_ds", "stride_dm",
                     "stride_l2r", "stride_ym")}  # fmt: skip
    consts = {"B": block, "NV": nv, "EVEN_K": even, "HAS_LR": lr, "LR_F32": lr_f32, "R_PAD": RANK, "SPLITS": splits,
              "HAS_BIAS": bias, **_tile_consts(tile)}  # fmt: skip
    name = fmt + ("" if dtype == "bf16" else f"-{dtype}") + ("-bias" if bias else "") + ("" if even else "-oddk")
    name += ("" if lr else "-nolr") + ("-lrf32" if lr_f32 else "") + (f"-s{splits}" if splits != 4 else "")
    native = fp4_route((cap // 10, cap % 10)) == "fp4-mma"
    return Build(name, "_fp4_gemm_kernel", fp4_gemm._fp4_gemm_kernel, types, consts, tile.num_warps, tile.num_stages,
                 tile.name(), "fp4" if native else "16bit", tile.block_m * tile.block_n * tile.block_k,
                 tile_mn=tile.block_m * tile.block_n)  # fmt: skip


def build_fp4_act(cap: int, fmt: str, *, dtype: str = "bf16", lr: bool = True, lr_f32: bool = False,
                  smooth: bool = True, m: int = FLUX_SHAPE[0]) -> Build:
    """The FP4 activation kernel (codes, block scales, down-projection partials) at FLUX width."""
    from diffq.kernels import fp4_gemm
    from diffq.kernels.fp4_dispatch import FP4_FORMATS

    bm, _, _ = fp4_gemm.act_config(m, FLUX_SHAPE[1] // fp4_gemm.CHUNK, 132)
    nv = fmt == "nvfp4"
    types = {"x_ptr": f"*{dtype}", "sm_ptr": "*fp32", "amax_ptr": "*i32", "l1_ptr": "*fp32" if lr_f32 else f"*{dtype}",
             "q_ptr": "*u8",
             "s_ptr": "*fp8e4nv" if nv else "*u8", "d_ptr": "*fp32",
             **_ints("M", "K", "R", "stride_xm", "stride_qm", "stride_sm", "stride_l1k", "stride_ds", "stride_dm",
                     "chunks_per_split")}  # fmt: skip
    consts = {"B": FP4_FORMATS[fmt][0], "NV": nv, "HAS_SMOOTH": smooth, "HAS_LR": lr, "LR_F32": lr_f32,
              "BLOCK_M": bm, "CB": fp4_gemm.CHUNK, "R_PAD": RANK}  # fmt: skip
    name = f"fp4_act-{fmt}" + ("" if lr else "-nolr") + ("-lrf32" if lr_f32 else "") + ("" if dtype == "bf16" else f"-{dtype}")
    return Build(name, "_fp4_act_kernel", fp4_gemm._fp4_act_kernel, types, consts, 4, 1, f"{bm}-w4")


def build_fp4_amax(cap: int, *, dtype: str = "bf16", m: int = FLUX_SHAPE[0]) -> Build:
    """The NVFP4 abs-max reduction (one atomic per program)."""
    from diffq.kernels import fp4_gemm

    bm, _, _ = fp4_gemm.act_config(m, FLUX_SHAPE[1] // fp4_gemm.CHUNK, 132)
    types = {"x_ptr": f"*{dtype}", "sm_ptr": "*fp32", "amax_ptr": "*i32", **_ints("M", "K", "stride_xm", "chunks_per_split")}
    consts = {"HAS_SMOOTH": True, "BLOCK_M": bm, "CB": fp4_gemm.CHUNK}
    return Build(f"fp4_amax-{dtype}", "_fp4_amax_kernel", fp4_gemm._fp4_amax_kernel, types, consts, 4, 1, f"{bm}-w4")


def build_act_rows(cap: int, k: int, fmt: str = "int8", *, dtype: str = "bf16", smooth: bool = True,
                   static: bool = False) -> Build:
    from diffq.kernels import activation_kernels as ak

    bm, bk, warps, one = ak.rows_config(k)
    fp8 = fmt == "fp8"
    types = {"x_ptr": f"*{dtype}", "inv_sm_ptr": "*fp32", "static_ptr": "*fp32", "q_ptr": "*fp8e4nv" if fp8 else "*i8",
             "s_ptr": "*fp32", **_ints("M", "K", "stride_xm", "stride_qm")}
    consts = {"QMAX": 448.0 if fp8 else 127.0, "FP8": fp8, "HAS_SMOOTH": smooth, "STATIC": static, "ONE_PASS": one,
              "BLOCK_M": bm, "BLOCK_K": bk}
    name = f"act_rows-{fmt}-K{k}" + ("-static" if static else "")
    return Build(name, "_act_rows_kernel", ak._act_rows_kernel, types, consts, warps, 1, f"{bm}x{bk}-w{warps}")


def build_act_groups(cap: int, out: int, *, dtype: str = "bf16", lr: bool = True, lr_f32: bool = False,
                     static: bool = False, m: int = FLUX_SHAPE[0], pad: bool = False) -> Build:
    from diffq.kernels import activation_kernels as ak

    bm, _, _ = ak.groups_config(m, FLUX_SHAPE[1] // GROUP, 132)
    q = {0: "*u8", 1: "*i8", 2: "*fp8e4nv"}[out]
    types = {"x_ptr": f"*{dtype}", "inv_sm_ptr": "*fp32", "static_ptr": "*fp32", "l1_ptr": "*fp32" if lr_f32 else f"*{dtype}",
             "q_ptr": q, "s_ptr": "*fp32", "d_ptr": "*fp32",
             **_ints("M", "K", "R", "stride_xm", "stride_qm", "stride_sm", "stride_sg", "stride_l1k", "stride_ds",
                     "stride_dm", "static_stride", "groups_per_split")}
    s_factor = {0: 1.0, 1: 0.0625, 2: 512.0}[out]
    consts = {"G": GROUP, "HAS_SMOOTH": True, "STATIC": static, "HAS_LR": lr, "LR_F32": lr_f32, "OUT": out,
              "S_FACTOR": s_factor, "PAD_GROUP": pad, "BLOCK_M": bm, "R_PAD": RANK}
    name = f"act_groups-{['packed', 'int8', 'e4m3'][out]}" + ("" if lr else "-nolr") + ("-lrf32" if lr_f32 else "")
    name += "-static" if static else ""
    return Build(name, "_act_groups_kernel", ak._act_groups_kernel, types, consts, 4, 1, f"{bm}-w4")


def fp4_gate_jobs() -> list[tuple[Build, int]]:
    """The FP4 builds of the gate (a minute or so on 2 cores): every tile of every FP4 table on
    its family's target (NVFP4 where E4M3 scales exist, else MXFP4), MXFP4 on the default tiles
    of sm_100 / sm_120 / sm_90, the fp32-output tiles of the Blackwell targets (fp32
    activations, bias, ragged K, no fused branch: the launcher adds fp32 low-rank branches in torch),
    and the activation kernels."""
    from diffq.kernels.fp4_dispatch import FP4_F32_TILES, FP4_FAMILY_CAP, FP4_MIN_CAPABILITY, FP4_TILES

    jobs: list[tuple[Build, int]] = []
    for family, cap in FP4_FAMILY_CAP.items():
        fmt = "nvfp4" if (cap // 10, cap % 10) >= FP4_MIN_CAPABILITY["nvfp4"] else "mxfp4"
        jobs += [(build_fp4_gemm(fmt, cap, t), cap) for t in FP4_TILES[family]]
        if family in ("sm100", "sm120", "hopper"):
            jobs.append((build_fp4_gemm("mxfp4", cap, FP4_TILES[family][0]), cap))
        if family in ("sm100", "sm120"):
            for t in FP4_F32_TILES.get(family, FP4_TILES[family][:1]):
                jobs.append((build_fp4_gemm("nvfp4", cap, t, dtype="fp32", bias=True, even=False, lr=False), cap))
            jobs += [(build_fp4_act(cap, "nvfp4"), cap), (build_fp4_amax(cap), cap)]
    jobs += [(build_fp4_act(120, "mxfp4", dtype="fp32", lr_f32=True), 120), (build_fp4_act(90, "nvfp4"), 90)]
    return jobs


#: quantized-attention variants (``kernels/attention.py``): name -> (PV format, QK bits, token block,
#: head dim, input dtype, attention mask, per-head QK scales)
ATTENTION_VARIANTS: dict[str, tuple[str, int, int, int, str, bool, bool]] = {
    "int8-fp8_d128_b64_bf16": ("fp8", 8, 64, 128, "bf16", False, False),  # FLUX / SD3 (head dim 128)
    "int8-fp8_d64_b64_fp16": ("fp8", 8, 64, 64, "fp16", False, False),  # SD1.5-like heads
    "int8-fp8_d128_b128_bf16": ("fp8", 8, 128, 128, "bf16", False, False),
    "int8-fp8_d128_b64_mask": ("fp8", 8, 64, 128, "bf16", True, False),  # PixArt cross-attention mask
    "int8-int8_d128_b64_bf16": ("int8", 8, 64, 128, "bf16", False, False),  # the sm_80-native variant
    "int4-fp8_d128_b64_bf16": ("fp8", 4, 64, 128, "bf16", False, False),
    "int8-fp16_d128_b64_bf16": ("fp16", 8, 64, 128, "bf16", False, False),  # SageAttention1-style
    "int8-fp8_d128_head_bf16": ("fp8", 8, 64, 128, "bf16", False, True),
}
#: the attention variants the compile gate builds (the two the dispatcher uses most)
GATED_ATTENTION = ("int8-fp8_d128_b64_bf16", "int8-int8_d128_b64_bf16")


def build_attention(variant: str, cap: int, num_warps: int | None = None) -> Build:
    """The fused quantized flash-attention kernel as a launch of ``variant`` on ``sm_<cap>`` compiles it.

    Pointers, the head dim and the q/k/v/o strides (multiples of the head dim) are hinted 16-divisible,
    as Triton's launcher specialises them; the mask's strides (odd token counts) are not."""
    from diffq.kernels.attention import PV_MODES, _quant_attn_kernel, head_pad, launch_warps

    pv, bits, block, d, dtype, has_mask, per_head = ATTENTION_VARIANTS[variant]
    consts = {"QMAX": float(2 ** (bits - 1) - 1), "PV_MODE": PV_MODES[pv], "SMOOTH_K": True, "PER_HEAD": per_head,
              "HAS_MASK": has_mask, "FP8_MMA": cap >= 89, "BLOCK": block, "D_PAD": head_pad(d)}
    types = {}
    for n in _quant_attn_kernel.arg_names:
        if n in consts:
            continue
        if n in ("q_ptr", "k_ptr", "v_ptr", "o_ptr"):
            types[n] = f"*{dtype}"
        elif n.endswith("_ptr"):
            types[n] = "*fp32"
        else:
            types[n] = "fp32" if n == "qk_scale" else "i32"
    div16 = [n for n in _quant_attn_kernel.arg_names
             if n.endswith("_ptr") or n == "D" or (n.startswith("stride_") and not n.startswith("stride_m"))]
    return Build(f"attn_{variant}", "_quant_attn_kernel", _quant_attn_kernel, types, consts,
                 num_warps or launch_warps(block), 2, div16=div16)


def gate_jobs() -> list[tuple[Build, int]]:
    """Every (build, capability) the compile gate checks: each GEMM kind x every tile its tables
    can pick x each family's target (sm_90 hopper, sm_89 ada, sm_80 ampere; FP4: also sm_100 and
    sm_120, :func:`fp4_gate_jobs`; FP8 kinds only where
    :data:`diffq.kernels.dispatch.MIN_CAPABILITY` allows them), the other constexpr variants the
    dispatcher launches (fp16/fp32 activations, bias, ragged K, G = 128, fp32 low-rank, K splits,
    the int8 W4A4 route on sm_90), and the activation kernels at the launch configurations of
    FLUX / SDXL widths, and the quantized attention kernel (:data:`GATED_ATTENTION`)."""
    from diffq.kernels import autotune as at
    from diffq.kernels.dispatch import MIN_CAPABILITY

    jobs: list[tuple[Build, int]] = []
    for family, cap in at.FAMILY_CAP.items():
        for kind in at.KINDS:
            need = MIN_CAPABILITY[kind]
            if (cap // 10, cap % 10) < need:
                continue
            for tile in at.table(kind, family):
                jobs.append((build_gemm(kind, cap, tile), cap))
        f32 = at.table("w4a16", family, f32=True)[0]
        jobs.append((build_gemm("w4a16", cap, f32, dtype="fp32", bias=True), cap))
    for cap, family in ((90, "hopper"), (80, "ampere")):
        def t(kind: str, family: str = family) -> Any:
            return at.pick_tile(kind, family, at.m_bucket(FLUX_SHAPE[0]), FLUX_SHAPE[2], FLUX_SHAPE[1], GROUP)

        jobs += [
            (build_gemm("w4a16", cap, t("w4a16"), dtype="fp16", bias=True, even=False), cap),
            (build_gemm("w4a16", cap, t("w4a16"), group=128), cap),
            (build_gemm("w4a8", cap, t("w4a8"), bias=True, even=False), cap),
            (build_gemm("w4a8", cap, t("w4a8"), group=128), cap),
            (build_gemm("w4a4", cap, t("w4a4"), bias=True, even=False, splits=1), cap),
            (build_gemm("w4a4", cap, t("w4a4"), group=128, splits=2), cap),
            (build_gemm("w4a4", cap, t("w4a4"), lr_f32=True, dtype="fp32"), cap),
            (build_gemm("w8a8", cap, t("w8a8"), bias=True, even=False, dtype="fp16"), cap),
        ]
        if cap >= 90:
            jobs.append((build_gemm("w4a4", cap, t("w4a4"), route="int8"), cap))
            jobs.append((build_gemm("fp8", cap, t("fp8"), bias=True, even=False), cap))
        for k in (3072, 12288, 15360, 40960):
            jobs.append((build_act_rows(cap, k, "int8"), cap))
            if cap >= 89:
                jobs.append((build_act_rows(cap, k, "fp8"), cap))
        jobs.append((build_act_rows(cap, 3072, "int8", dtype="fp32", smooth=False, static=True), cap))
        for out in (0, 1, 2):
            if out == 2 and cap < 89:
                continue
            jobs.append((build_act_groups(cap, out), cap))
        jobs.append((build_act_groups(cap, 1, lr=False, static=True, pad=True), cap))
        jobs.append((build_act_groups(cap, 0, dtype="fp32", lr_f32=True, m=16), cap))
        jobs += [(build_attention(v, cap), cap) for v in GATED_ATTENTION]
    return jobs + fp4_gate_jobs()


def expected_failures() -> list[tuple[Build, int]]:
    """Builds that must *not* compile (checked by the gate so that the reason the dispatcher
    keeps FP8 off sm_80 stays true): the FP8 GEMM and quantizer for sm_80, and the NVFP4 GEMM
    there (its E4M3 block scales; MXFP4 runs on sm_80)."""
    from diffq.kernels import autotune as at
    from diffq.kernels.fp4_dispatch import FP4_TILES

    tile = at.table("fp8", "hopper")[2]
    return [(build_gemm("fp8", 80, tile), 80), (build_act_rows(80, 3072, "fp8"), 80),
            (build_fp4_gemm("nvfp4", 80, FP4_TILES["ampere"][0]), 80)]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """``python -m diffq.kernels.aot --gate --json out.json [--processes 2]``: compile every gate
    job (and the expected failures) and write the reports as JSON."""
    import argparse
    import json
    import sys
    import time

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--gate", action="store_true", help="compile gate_jobs() and expected_failures()")
    ap.add_argument("--json", required=True)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--keep", default=None, help="directory for TTGIR/PTX/SASS dumps")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("aot: unset TRITON_INTERPRET (the interpreter cannot compile)", file=sys.stderr)
        return 2
    t0 = time.time()
    jobs = gate_jobs() if a.gate else []
    fails = expected_failures() if a.gate else []

    def show(r: Report) -> None:
        if not a.quiet:
            state = "ok" if r.ok else "FAIL"
            print(f"{r.name:34s} {r.tile:20s} sm_{r.cap} {state} regs={r.regs} spill={r.spill_stores} "
                  f"smem={r.shared} issue/mma={r.issue_ratio} ({r.secs}s)", flush=True)  # fmt: skip

    reps = compile_many(jobs + fails, processes=a.processes, keep=a.keep, progress=show)
    out = {
        "jobs": [r.to_dict() for r in reps[: len(jobs)]],
        "expected_failures": [r.to_dict() for r in reps[len(jobs) :]],
        "secs": round(time.time() - t0, 1),
    }
    _write_file(a.json, json.dumps(out, indent=1).encode())
    bad = [r for r in reps[: len(jobs)] if not r.ok]
    print(f"aot: {len(jobs)} builds, {len(bad)} failed, {out['secs']} s", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
