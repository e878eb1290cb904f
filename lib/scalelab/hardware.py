"""Chapter 01: processors measured — scalar, vector and matrix throughput, peak, bandwidth, roofline.

Everything measured here runs on the current JAX backend (and NumPy on the host) in the
same run as its comparison. Published accelerator figures live in :data:`SPECS`, each with
its source, and are never mixed with measurements.
"""

from __future__ import annotations

import dataclasses
import math
import platform
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from scalelab import bench, env, plot

# --------------------------------------------------------------------------- the CPU

CPUFREQ_MAX = "/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq"  # kHz, where Linux exposes it


@dataclasses.dataclass(frozen=True)
class CpuInfo:
    """What the operating system reports about the processor."""

    model: str
    vendor: str
    family: int | None
    arch: str
    cores: int
    clock_ghz: float | None  # the clock /proc/cpuinfo reports ("cpu MHz": often the base clock)
    flags: frozenset[str]
    model_number: int | None = None  # the "model" field (with vendor and family: the core design)
    max_clock_ghz: float | None = None  # cpufreq's maximum (the boost clock), when exposed


def _read_cpuinfo(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:  # first processor block is enough
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    return fields


def _int(text: str | None) -> int | None:
    try:
        return int(text, 0) if text else None  # "25" or "0x19"
    except ValueError:
        return None


def cpu_info(cpuinfo_text: str | None = None, max_freq_khz: str | None = None) -> CpuInfo:
    """Parse ``/proc/cpuinfo`` (or the given text); falls back to ``platform`` elsewhere.

    With no text, the boost clock is read from cpufreq (``cpuinfo_max_freq``, kHz) where Linux
    exposes it (virtual machines often do not); with a text, only ``max_freq_khz`` gives it.
    """
    if cpuinfo_text is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as handle:
                cpuinfo_text = handle.read()
        except OSError:
            cpuinfo_text = ""
        if max_freq_khz is None:
            try:
                with open(CPUFREQ_MAX, encoding="utf-8") as handle:
                    max_freq_khz = handle.read()
            except OSError:
                max_freq_khz = None
    fields = _read_cpuinfo(cpuinfo_text)
    flags = frozenset((fields.get("flags") or fields.get("features") or "").split())
    clock = None
    if fields.get("cpu mhz"):
        try:
            clock = float(fields["cpu mhz"]) / 1000.0
        except ValueError:
            clock = None
    max_khz = _int(max_freq_khz.strip()) if max_freq_khz else None
    return CpuInfo(
        model=fields.get("model name") or platform.processor() or platform.machine(),
        vendor=fields.get("vendor_id", ""),
        family=_int(fields.get("cpu family")),
        arch=platform.machine(),
        cores=env.cpu_cores(),
        clock_ghz=clock,
        flags=flags,
        model_number=_int(fields.get("model")),
        max_clock_ghz=max_khz / 1e6 if max_khz else None,
    )


@dataclasses.dataclass(frozen=True)
class Core:
    """How one core executes floating point: what :func:`microarchitecture` could tell."""

    name: str  # e.g. "AMD Zen 4", or "unknown"
    known: bool  # identified from vendor / family / model, not guessed from the flags alone
    simd_bits: int  # widest vector register the instruction set has
    datapath_bits: int  # width the FMA units execute per cycle (< simd_bits: "double-pumped")
    fma_units: int  # vector FMA pipes per core
    note: str


def _simd_bits(cpu: CpuInfo) -> int:
    f = cpu.flags
    if "avx512f" in f:
        return 512
    if "avx2" in f or "avx" in f:
        return 256
    return 128  # SSE on x86, NEON ("asimd") on Arm


def microarchitecture(cpu: CpuInfo) -> Core:
    """Identify the core design from vendor, family, model and flags (x86 only so far).

    The FMA pipe count and datapath width are not reported by any flag; they come from the
    vendors' optimisation manuals for the designs listed here. Anything else is ``known=False``
    and the caller's estimate says what it assumed.
    """
    f, simd = cpu.flags, _simd_bits(cpu)
    fam, model = cpu.family, cpu.model_number
    if cpu.vendor == "AuthenticAMD" and fam == 23:
        if model is not None and model < 0x30:
            return Core("AMD Zen / Zen+", True, simd, 128, 2,
                        "two 128-bit FMA pipes: each 256-bit AVX2 instruction takes two passes")
        return Core("AMD Zen 2", True, simd, 256, 2, "two 256-bit FMA pipes")
    if cpu.vendor == "AuthenticAMD" and fam == 25:
        if "avx512f" in f:
            return Core("AMD Zen 4", True, simd, 256, 2,
                        "two 256-bit FMA pipes: a 512-bit AVX-512 instruction is executed as two "
                        "256-bit halves (double-pumped), so AVX-512 does not double the FLOPs per cycle")
        return Core("AMD Zen 3", True, simd, 256, 2, "two 256-bit FMA pipes")
    if cpu.vendor == "AuthenticAMD" and fam == 26:
        return Core("AMD Zen 5", True, simd, 512 if "avx512f" in f else 256, 2,
                    "two 512-bit FMA pipes on desktop and server parts (mobile parts have 256-bit "
                    "datapaths: this estimate is then twice too high)")
    if cpu.vendor == "GenuineIntel" and fam == 6:
        if "avx512f" in f:
            lower_tier = any(w in cpu.model for w in ("Bronze", "Silver"))
            units = 1 if lower_tier else 2
            return Core("Intel core with AVX-512", True, 512, 512, units,
                        f"{units} 512-bit FMA unit(s): Xeon Scalable Gold 6xxx / Platinum and later "
                        "server cores have two; Bronze, Silver, some Gold 5xxx and client cores "
                        "have one (assumed from the model name)")
        if "avx2" in f and "fma" in f:
            return Core("Intel Haswell or later (AVX2)", True, 256, 256, 2, "two 256-bit FMA units")
        if "avx" in f:
            return Core("Intel Sandy / Ivy Bridge (AVX, no FMA)", True, 256, 256, 1,
                        "no FMA: one 256-bit multiply and one 256-bit add unit, counted as one "
                        "multiply-add per cycle")
    units = 2 if ("fma" in f or "asimd" in f or cpu.arch in ("aarch64", "arm64")) else 1
    return Core("unknown", False, simd, simd, units,
                f"microarchitecture not identified: datapaths assumed as wide as the {simd}-bit "
                f"registers, {units} FMA unit(s) assumed")


@dataclasses.dataclass(frozen=True)
class PeakEstimate:
    """Theoretical peak = cores x clock x FLOPs per cycle per core. An estimate, not a spec."""

    cores: int
    clock_ghz: float | None  # the clock the estimate uses
    clock_source: str  # "cpufreq max (boost)" or "reported (boost unknown)" or "none"
    reported_clock_ghz: float | None
    microarchitecture: str
    simd_bits: int
    datapath_bits: int
    fma_units: int
    flops_per_cycle_fp32: int
    fp32: float | None  # FLOP/s
    bf16: float | None  # FLOP/s
    assumptions: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def estimate_peak(cpu: CpuInfo) -> PeakEstimate:
    """Estimate the CPU's peak FLOP/s from its core design, core count and clock.

    FLOPs per cycle per core = float32 lanes of the FMA datapath x 2 (a fused multiply-add is
    two FLOPs) x FMA units. The datapath is narrower than the registers on some designs
    (AMD Zen 4 runs 512-bit instructions on 256-bit units). The clock is cpufreq's maximum
    (boost) where exposed, else the reported one. Every assumption is in ``assumptions``.
    """
    core = microarchitecture(cpu)
    notes = [f"SIMD registers {core.simd_bits} bits (from the CPU flags)"]
    if core.known:
        notes.append(f"core: {core.name}: {core.note}")
    else:
        notes.append(core.note)
    per_cycle = core.datapath_bits // 32 * 2 * core.fma_units
    notes.append(f"{per_cycle} float32 FLOPs/cycle/core = {core.datapath_bits // 32} lanes x 2 (FMA) "
                 f"x {core.fma_units} FMA unit(s)")
    if cpu.max_clock_ghz:
        clock, source = cpu.max_clock_ghz, "cpufreq max (boost)"
        notes.append(f"clock {clock:.2f} GHz: cpufreq's maximum (boost); all cores at once may run "
                     "slower, and AVX-512 can lower it further")
    elif cpu.clock_ghz:
        clock, source = cpu.clock_ghz, "reported (boost unknown)"
        notes.append(f"clock {clock:.2f} GHz as reported by /proc/cpuinfo, assumed to be the clock "
                     "under load: cpufreq is not exposed here, so the boost clock is unknown (the "
                     "estimate is too low if the cores boost)")
    else:
        clock, source = None, "none"
        notes.append("clock not reported: no estimate")
    bf16_per_cycle = per_cycle
    if "amx_bf16" in cpu.flags:
        bf16_per_cycle = 1024
        notes.append("AMX tiles: 1024 bf16 FLOPs per cycle per core")
    elif "avx512_bf16" in cpu.flags:
        bf16_per_cycle = per_cycle * 2
        notes.append("AVX512-BF16: two bf16 products per float32 lane, so twice the float32 rate "
                     "(if the compiler emits these instructions)")
    scale = cpu.cores * (clock or 0) * 1e9
    return PeakEstimate(
        cores=cpu.cores,
        clock_ghz=clock,
        clock_source=source,
        reported_clock_ghz=cpu.clock_ghz,
        microarchitecture=core.name,
        simd_bits=core.simd_bits,
        datapath_bits=core.datapath_bits,
        fma_units=core.fma_units,
        flops_per_cycle_fp32=per_cycle,
        fp32=scale * per_cycle if clock else None,
        bf16=scale * bf16_per_cycle if clock else None,
        assumptions=tuple(notes),
    )


def reconcile(measured_flops: float, peak: PeakEstimate) -> dict[str, Any]:
    """Compare a measured float32 rate with the estimate; say which assumption breaks if any.

    ``implied_clock_ghz`` is the clock the measured rate needs at the estimate's FLOPs per
    cycle and core count: above the assumed clock means the estimate is wrong, not the
    measurement (a peak can be approached, never exceeded).
    """
    if measured_flops <= 0:
        raise ValueError(f"measured_flops must be positive, got {measured_flops}")
    if not peak.fp32 or not peak.clock_ghz:
        return {"fraction": None, "implied_clock_ghz": None,
                "explanation": "no estimate (the clock is not reported), nothing to reconcile"}
    fraction = measured_flops / peak.fp32
    implied = measured_flops / (peak.cores * peak.flops_per_cycle_fp32 * 1e9)
    if fraction <= 1:
        text = (f"the measured rate is {fraction:.0%} of the estimate, below it as a peak must be: "
                "the rest is what the kernel, memory traffic and the clock under load leave unused")
    elif peak.clock_source.startswith("reported"):
        text = (f"the measured rate is {fraction:.2f}x the estimate, so the estimate is wrong: at "
                f"{peak.flops_per_cycle_fp32} FLOPs/cycle on {peak.cores} core(s) it needs at least "
                f"{implied:.2f} GHz, more than the {peak.clock_ghz:.2f} GHz reported. The cores run "
                "above the reported clock (boost, which this machine does not expose), or do more "
                "FLOPs per cycle than the core model says")
    else:
        text = (f"the measured rate is {fraction:.2f}x the estimate, so the estimate is wrong: at "
                f"{peak.flops_per_cycle_fp32} FLOPs/cycle on {peak.cores} core(s) it needs "
                f"{implied:.2f} GHz, above even the boost clock: the core model (FMA units, "
                "datapath width) or the core count is too low")
    return {"fraction": fraction, "implied_clock_ghz": implied, "explanation": text}


# --------------------------------------------------------------------------- scalar / vector / matrix


def axpy_python(a: float, x: list[float], y: list[float]) -> list[float]:
    """The interpreter: one multiply-add per interpreted loop iteration (boxed Python floats)."""
    return [a * xi + yi for xi, yi in zip(x, y, strict=True)]


@jax.jit
def axpy_scalar(a: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
    """Scalar processing, compiled: one element per iteration of an XLA loop (no SIMD lanes).

    Each iteration reads ``x[i]`` and ``y[i]`` and writes one result, as a scalar core without
    vector instructions would; the loop also pays XLA's bookkeeping per iteration, so this is an
    upper bound on a scalar core's time, not its best.
    """
    def step(i, out):
        return out.at[i].set(a * x[i] + out[i])

    return jax.lax.fori_loop(0, x.shape[0], step, y)


@jax.jit
def axpy_vector(a: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
    """Vector processing: the same multiply-add on every element at once (SIMD)."""
    return a * x + y


_axpy_vector_donated = jax.jit(axpy_vector.__wrapped__, donate_argnums=2)


class InPlace:
    """``y <- a*x + y`` written into ``y``'s own buffer (donated), callable with no arguments.

    A jitted function normally returns a fresh array; for arrays of hundreds of MB the operating
    system must map every page of that output, which costs more than the arithmetic. Donating
    ``y`` lets XLA reuse its buffer, so a timing sees the kernel and the memory system only.
    """

    def __init__(self, a: jax.Array, x: jax.Array, y: jax.Array):
        self.a, self.x, self.y = a, x, jnp.array(y, copy=True)

    def __call__(self) -> jax.Array:
        self.y = _axpy_vector_donated(self.a, self.x, self.y)
        return self.y


@jax.jit
def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """Matrix processing: n^3 multiply-adds on 3 n^2 numbers."""
    return a @ b


@jax.jit
def matmul_highest(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` with ``precision=HIGHEST``: true float32 products on every backend."""
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


INTERPRETER_MAX_ELEMENTS = 1 << 22  # the Python loop does a slice of the work; its rate is what counts


def scalar_vector_matrix(m: int, repeat: int = 3) -> list[dict[str, Any]]:
    """The same FLOP count (2 m^3) as compiled scalar, vector (SIMD) and matrix work.

    Rows: ``interpreter`` (a Python loop, on at most :data:`INTERPRETER_MAX_ELEMENTS`
    elements: its ``flops`` column says how many it did), ``scalar`` (:func:`axpy_scalar`,
    compiled, one element per iteration), ``vector`` (:func:`axpy_vector` in place, SIMD) and
    ``matrix`` (:func:`matmul`). ``min_bytes`` is the float32 operand traffic (each operand read
    once, each result written once); the interpreter moves far more (boxed objects).
    """
    if m < 2:
        raise ValueError(f"m must be >= 2, got {m}")
    flops = 2 * m**3
    n = flops // 2  # axpy does 2 FLOPs per element
    n_py = min(n, INTERPRETER_MAX_ELEMENTS)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(n, dtype=np.float32)
    y = rng.standard_normal(n, dtype=np.float32)
    a = rng.standard_normal((m, m), dtype=np.float32)
    xs, ys = x[:n_py].tolist(), y[:n_py].tolist()
    xd, yd, ad = jnp.asarray(x), jnp.asarray(y), jnp.asarray(a)
    small = jnp.float32(1e-3)  # y grows by a*x per in-place call: keep it small
    cases: list[tuple[str, str, Callable[..., Any], tuple, int]] = [
        ("interpreter", "Python loop a*x[i]+y[i]", axpy_python, (2.0, xs, ys), n_py),
        ("scalar", "jit fori_loop, one element per iteration", axpy_scalar, (small, xd, yd), n),
        ("vector", "jit a*x+y, in place (SIMD)", InPlace(small, xd, yd), (), n),
        ("matrix", "jit A @ A", matmul, (ad, ad), 0),
    ]
    rows = []
    for kind, kernel, fn, args, elements in cases:
        once = kind in ("interpreter", "scalar")
        t = bench.timeit(fn, *args, repeat=1 if kind == "interpreter" else repeat, warmup=1,
                         number=1 if once else None)
        done = 2 * elements if elements else flops
        nbytes = 12 * elements if elements else 12 * m * m
        rows.append({
            "processing": kind, "kernel": kernel, "flops": done, "seconds": t.best,
            "flops_per_s": done / t.best, "min_bytes": nbytes, "bytes_per_flop": nbytes / done,
            "bytes_per_s": nbytes / t.best,
        })
    return rows


# --------------------------------------------------------------------------- matmul sweep


def matmul_dtypes() -> list[str]:
    """float32 and bfloat16 everywhere; float16 too on GPUs."""
    dtypes = ["float32", "bfloat16"]
    if jax.default_backend() == "gpu":
        dtypes.append("float16")
    return dtypes


FLOAT32_DEFAULT = {
    "cpu": "float32",  # XLA's CPU backend has no reduced-precision float32 matmul
    "gpu": "TF32",  # tensor cores round the inputs to 10 mantissa bits (Ampere and later)
    "tpu": "one bf16 pass",  # the MXU multiplies bfloat16
}


def float32_label(backend: str) -> str:
    """What a float32 matmul at JAX's default precision computes on ``backend``.

    JAX's default leans to speed: TF32 on recent NVIDIA GPUs, one bfloat16 pass on TPUs, true
    float32 on CPUs (https://docs.jax.dev/en/latest/201/precision.html). ``precision=HIGHEST``
    asks for true float32 everywhere.
    """
    means = FLOAT32_DEFAULT.get(backend)
    if means is None:
        return "float32 (default precision)"
    if means == "float32":
        return "float32"
    return f"float32 = {means} (default precision)"


def matmul_sweep(sizes: Sequence[int], dtypes: Sequence[str] | None = None,
                 repeat: int = 3, numpy_too: bool = True, highest: bool = True) -> list[dict[str, Any]]:
    """Achieved FLOP/s of square matmuls for each size and dtype; NumPy float32 beside JAX.

    Every row has ``precision``: ``default`` (JAX's default, see :func:`float32_label`) or, with
    ``highest``, an extra float32 row at ``precision=HIGHEST`` (true float32).
    """
    if not sizes or any(int(s) < 1 for s in sizes):
        raise ValueError(f"sizes must be positive integers, got {list(sizes)}")
    dtypes = list(dtypes or matmul_dtypes())
    for d in dtypes:
        if d not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {d!r}")
    rng = np.random.default_rng(0)
    rows = []
    for n in map(int, sizes):
        host = rng.standard_normal((n, n), dtype=np.float32)
        flops = 2 * n**3
        for d in dtypes:
            x = jnp.asarray(host, dtype=d)
            variants = [("default", matmul)]
            if highest and d == "float32":
                variants.append(("highest", matmul_highest))
            for precision, fn in variants:
                t = bench.timeit(fn, x, x, repeat=repeat, min_time=0.05)
                rows.append({"impl": "jax", "dtype": d, "precision": precision, "n": n,
                             "seconds": t.best, "flops_per_s": flops / t.best})
        if numpy_too:
            t = bench.timeit(np.matmul, host, host, repeat=repeat, min_time=0.05)
            rows.append({"impl": "numpy", "dtype": "float32", "precision": "float32", "n": n,
                         "seconds": t.best, "flops_per_s": flops / t.best})
    return rows


# --------------------------------------------------------------------------- bandwidth


@jax.jit
def _triad(x: jax.Array, y: jax.Array) -> jax.Array:
    return x + jnp.float32(2.0) * y


_triad_donated = jax.jit(_triad.__wrapped__, donate_argnums=0)


class _TriadInPlace:
    def __init__(self, x: jax.Array, y: jax.Array):
        self.x, self.y = jnp.array(x, copy=True), y

    def __call__(self) -> jax.Array:
        self.x = _triad_donated(self.x, self.y)
        return self.x


BANDWIDTH_KERNELS = ("numpy copy", "numpy add", "jax triad x+2y, fresh output",
                     "jax triad x+2y, in place")


def bandwidth(nbytes: int, repeat: int = 9,
              extra: Sequence[tuple[str, Callable[[], Any], int]] = ()) -> list[dict[str, Any]]:
    """Streaming kernels over float32 arrays of ``nbytes`` each: bytes moved per second.

    copy (read 1, write 1) and add (read 2, write 1) in NumPy into a preallocated output; the
    triad x + 2y (read 2, write 1) in JAX, once returning a fresh array per call and once
    writing into ``x``'s donated buffer. The best of them is the measured memory bandwidth.

    The kernels are timed *interleaved*: ``repeat`` rounds, each timing every kernel once, and
    each kernel keeps its best round, so a burst of load from other processes hits all kernels
    alike instead of one. ``extra`` adds ``(name, fn, bytes_moved)`` kernels (called with no
    arguments) to the same rounds, e.g. a kernel to compare with the bandwidth at its own size.
    Arrays under 4 MiB run several calls per timing (a single call would be timer noise).
    """
    n = int(nbytes) // 4
    if n < 1024:
        raise ValueError(f"nbytes must be at least 4 KiB, got {nbytes}")
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    rng = np.random.default_rng(0)
    x = rng.standard_normal(n, dtype=np.float32)
    y = rng.standard_normal(n, dtype=np.float32) * np.float32(1e-3)
    out = np.empty_like(x)
    xd, yd = jnp.asarray(x), jnp.asarray(y)
    triad_in_place = _TriadInPlace(xd, yd)
    cases: list[tuple[str, Callable[[], Any], int]] = [
        ("numpy copy", lambda: np.copyto(out, x), 8 * n),
        ("numpy add", lambda: np.add(x, y, out=out), 12 * n),
        ("jax triad x+2y, fresh output", lambda: _triad(xd, yd), 12 * n),
        ("jax triad x+2y, in place", triad_in_place, 12 * n),
        *extra,
    ]
    number = 1 if nbytes >= 4 * 2**20 else None  # small arrays: enough calls for >= 20 ms a timing
    numbers = {name: bench.timeit(fn, repeat=1, warmup=2, number=number).number
               for name, fn, _ in cases}
    best = {name: math.inf for name, _, _ in cases}
    for _ in range(repeat):
        for name, fn, _ in cases:
            t = bench.timeit(fn, repeat=1, warmup=0, number=numbers[name])
            best[name] = min(best[name], t.best)
    return [{"kernel": name, "bytes": moved, "seconds": best[name], "bytes_per_s": moved / best[name]}
            for name, _, moved in cases]


CACHE_DIR = "/sys/devices/system/cpu/cpu0/cache"  # index*/level, type, size where Linux exposes it
CACHE_FALLBACK = {1: 32 * 2**10, 2: 1 * 2**20, 3: 32 * 2**20}  # assumed where sysfs is absent


def _size_bytes(text: str) -> int | None:
    text = text.strip().upper()
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    digits = text.rstrip("KMGB")
    return int(digits) * scale if digits.isdigit() else None


def cache_sizes(cache_dir: str = CACHE_DIR) -> tuple[dict[int, int], str]:
    """Data/unified cache size in bytes per level as seen by one core, and where it came from.

    Read from Linux's sysfs (``index*/level``, ``type``, ``size``); where it is not exposed,
    :data:`CACHE_FALLBACK` (typical server sizes) is returned and the source says "assumed".
    """
    import glob
    import os

    sizes: dict[int, int] = {}
    for index in sorted(glob.glob(os.path.join(cache_dir, "index*"))):
        try:
            with open(os.path.join(index, "type"), encoding="utf-8") as f:
                kind = f.read().strip()
            with open(os.path.join(index, "level"), encoding="utf-8") as f:
                level = int(f.read())
            with open(os.path.join(index, "size"), encoding="utf-8") as f:
                size = _size_bytes(f.read())
        except (OSError, ValueError):
            continue
        if kind != "Instruction" and size:
            sizes[level] = max(sizes.get(level, 0), size)
    if 2 in sizes:
        return sizes, "sysfs"
    return dict(CACHE_FALLBACK), "assumed (sysfs not exposed)"


def cache_working_sets(sizes: dict[int, int], dram_bytes: int) -> list[tuple[str, int]]:
    """Per-array sizes for :func:`bandwidth` meant to stream from L2, from L3 and from DRAM.

    :func:`bandwidth`'s kernels touch up to three arrays, so the whole working set is three times
    the per-array size: an eighth of L2 (3/8 of it in use), an eighth of L3 (above L2 when L3 is
    more than 8/3 the L2), and ``dram_bytes`` (choose it well above L3) for main memory.
    """
    if 2 not in sizes or dram_bytes <= 0:
        raise ValueError("need an L2 size and a positive dram_bytes")
    levels = [("L2", max(sizes[2] // 8, 4096))]
    if 3 in sizes and sizes[3] // 8 > sizes[2] // 2:
        levels.append(("L3", sizes[3] // 8))
    levels.append(("DRAM", int(dram_bytes)))
    return levels


# --------------------------------------------------------------------------- roofline


def roofline_ops(quick: bool = False) -> dict[str, tuple[Callable[..., Any], tuple]]:
    """The operations placed on the roofline, with example inputs."""
    rng = np.random.default_rng(1)

    def arr(*shape):
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32))

    n_vec = 1 << (20 if quick else 22)
    n_mv = 1024 if quick else 2048
    ops: dict[str, tuple[Callable[..., Any], tuple]] = {
        "elementwise a*x+y": (lambda x, y: 2.0 * x + y, (arr(n_vec), arr(n_vec))),
        "dot product": (jnp.dot, (arr(n_vec), arr(n_vec))),
        f"matrix-vector {n_mv}": (jnp.dot, (arr(n_mv, n_mv), arr(n_mv))),
    }
    for m in (64, 256, 512) if quick else (64, 256, 1024, 2048):
        ops[f"matmul {m}"] = (jnp.matmul, (arr(m, m), arr(m, m)))
    return ops


def roofline_point(name: str, fn: Callable[..., Any], args: tuple, repeat: int = 3) -> dict[str, Any]:
    """One op on the roofline: FLOPs and bytes from XLA's cost analysis, FLOP/s from timing.

    Where the backend's cost analysis has no count (GPU library calls report -1), ``flops``
    and ``bytes`` are kept as reported and ``intensity`` / ``flops_per_s`` are None.
    """
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older JAX returned one dict per device
        cost = cost[0] if cost else {}
    flops = float((cost or {}).get("flops", -1.0))
    nbytes = float((cost or {}).get("bytes accessed", -1.0))
    t = bench.timeit(compiled, *args, repeat=repeat, min_time=0.02)
    counted = flops > 0 and nbytes > 0
    return {"op": name, "flops": flops, "bytes": nbytes,
            "intensity": flops / nbytes if counted else None, "seconds": t.best,
            "flops_per_s": flops / t.best if counted else None}


def roofline_points(quick: bool = False, repeat: int = 3) -> list[dict[str, Any]]:
    """:func:`roofline_point` for every op of :func:`roofline_ops`."""
    return [roofline_point(name, fn, args, repeat) for name, (fn, args) in roofline_ops(quick).items()]


def attainable(intensity: float | np.ndarray, peak: float, bandwidth_bps: float):
    """The roofline: min(peak, intensity x bandwidth)."""
    if peak <= 0 or bandwidth_bps <= 0:
        raise ValueError("peak and bandwidth must be positive")
    return np.minimum(peak, np.asarray(intensity) * bandwidth_bps)


def ridge_point(peak: float, bandwidth_bps: float) -> float:
    """Arithmetic intensity (FLOP/byte) above which an op can be compute-bound."""
    if peak <= 0 or bandwidth_bps <= 0:
        raise ValueError("peak and bandwidth must be positive")
    return peak / bandwidth_bps


def _footer(fig, info: env.EnvInfo | None, source: str = "measured") -> str:
    """The figure's provenance line: every kernel here runs on one device of the runtime."""
    info = info or env.describe()
    if info.backend == "cpu":
        cpu = cpu_info()
        source = f"{source} (CPU: {cpu.model}, {cpu.cores} core(s))"
    return plot.label(fig, info, source=source, devices=1)


def plot_roofline(points: Sequence[dict[str, Any]], bandwidth_bps: float,
                  measured_peak: float, estimated_peak: float | None = None,
                  info: env.EnvInfo | None = None):
    """Log-log roofline: measured bandwidth slope, measured and estimated compute ceilings.

    Each op is a numbered marker named in a legend beside the axes (labels written next to the
    points overlap where ops have similar intensity). Ops without a cost count are left out.
    """
    pts = [p for p in points if p.get("intensity") and p.get("flops_per_s")]
    if not pts:
        raise ValueError("no roofline point has a FLOP and byte count to plot")
    fig, ax = plot.figure(width=8.2, height=4.4)
    lo = min(p["intensity"] for p in pts) / 2
    hi = max(p["intensity"] for p in pts) * 4
    xs = np.logspace(math.log10(lo), math.log10(hi), 200)
    ax.plot(xs, attainable(xs, measured_peak, bandwidth_bps), color="k",
            label=f"measured roof: {bandwidth_bps / 1e9:.0f} GB/s, {measured_peak / 1e9:.0f} GFLOP/s")
    if estimated_peak:
        ax.plot(xs, attainable(xs, estimated_peak, bandwidth_bps), color="0.5", ls="--",
                label=f"estimated peak {estimated_peak / 1e9:.0f} GFLOP/s (estimate)")
    ridge = ridge_point(measured_peak, bandwidth_bps)
    ax.axvline(ridge, color="0.7", ls=":", lw=1)
    ax.text(ridge, 0.03, f" ridge {ridge:.1f} FLOP/B", fontsize=8, color="0.3",
            transform=ax.get_xaxis_transform())
    markers = "osD^vP*Xh<>"
    for i, p in enumerate(pts):
        ax.scatter(p["intensity"], p["flops_per_s"], zorder=3, s=36, marker=markers[i % len(markers)],
                   color=f"C{i % 10}", label=f"{p['op']} ({p['intensity']:.3g} FLOP/B)")
    ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP/byte, XLA cost analysis)",
           ylabel="FLOP/s", title="Roofline of this device")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    _footer(fig, info)
    return fig


_SERIES_COLOURS = {"float32": "C0", "float32 HIGHEST": "C1", "bfloat16": "C2", "float16": "C3",
                   "numpy": "C4"}


def plot_matmul_sweep(result: dict[str, Any], others: Sequence[dict[str, Any]] = (),
                      info: env.EnvInfo | None = None):
    """Achieved matmul FLOP/s vs size from a ``hardware`` benchmark result.

    This run's curves are solid; results committed from other devices are dashed and
    labelled with their device, date and what their float32 means (TF32 on a GPU at JAX's
    default precision). The estimated peak (an estimate) is dotted.
    """
    fig, ax = plot.figure(width=7.2, height=5.6)

    def curve(by_size: dict[str, float]):
        return zip(*sorted((int(n), v) for n, v in by_size.items()), strict=True)

    def series(res: dict[str, Any]):
        backend = res.get("backend", "cpu")
        for dtype, by_size in res.get("matmul_flops", {}).items():
            name = float32_label(backend) if dtype == "float32" else dtype
            yield dtype, name, by_size
        if res.get("matmul_flops_float32_highest"):
            yield "float32 HIGHEST", "float32, precision=HIGHEST (true fp32)", \
                res["matmul_flops_float32_highest"]

    for key, name, by_size in series(result):
        ax.plot(*curve(by_size), marker="o", ms=4, color=_SERIES_COLOURS.get(key),
                label=f"jax {name} (this run)")
    ax.plot(*curve(result["numpy_matmul_flops"]), marker="s", ms=4, color=_SERIES_COLOURS["numpy"],
            label="numpy float32 (this run)")
    for other in others:
        for key, name, by_size in series(other):
            ax.plot(*curve(by_size), ls="--", marker=".", color=_SERIES_COLOURS.get(key),
                    label=f"{other['device']} {name} (committed, {other['date'][:10]})")
    if result.get("peak_flops_estimate"):
        ax.axhline(result["peak_flops_estimate"], color="0.5", ls=":",
                   label="estimated fp32 peak of this CPU (estimate)")
    ax.set(xscale="log", yscale="log", xlabel="matrix size n (n x n @ n x n)",
           ylabel="FLOP/s", title="Matrix multiply throughput")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=7)
    _footer(fig, info, "solid: measured" if not others else
            "dashed: committed results (legend); solid: measured")
    return fig


# --------------------------------------------------------------------------- published specs


@dataclasses.dataclass(frozen=True)
class Spec:
    """Published figures of one chip. None = not published by the vendor."""

    name: str
    kind: str
    peak_16bit: float  # FLOP/s (OP/s for TPU v1): bf16 dense matrix, see note
    peak_fp32: float | None
    bandwidth: float  # bytes/s
    power_w: float | None
    note: str
    source: str
    peak_tf32: float | None = None  # FLOP/s, dense TF32 tensor-core matmul (NVIDIA Ampere and later)

    def row(self) -> dict[str, Any]:
        per_watt = self.peak_16bit / self.power_w / 1e9 if self.power_w else None
        return {
            "chip": self.name,
            "16-bit peak TFLOP/s": self.peak_16bit / 1e12,
            "fp32 TFLOP/s": self.peak_fp32 / 1e12 if self.peak_fp32 else None,
            "tf32 TFLOP/s": self.peak_tf32 / 1e12 if self.peak_tf32 else None,
            "memory GB/s": self.bandwidth / 1e9,
            "power W": self.power_w,
            "GFLOP/s per W": per_watt,
            "ridge FLOP/B": self.peak_16bit / self.bandwidth,
            "note": self.note,
            "source": self.source,
        }


T, G = 1e12, 1e9
SPECS: tuple[Spec, ...] = (
    Spec("TPU v1 (2015)", "ASIC", 92 * T, None, 34 * G, 75,
         "int8 TOP/s, no floating point; 256x256 MACs at 700 MHz; power = TDP (busy ~40 W)",
         "https://arxiv.org/abs/1704.04760"),
    Spec("NVIDIA V100 SXM2", "GPU", 125 * T, 15.7 * T, 900 * G, 300,
         "fp16 tensor cores (no bf16)",
         "https://images.nvidia.com/content/technologies/volta/pdf/volta-v100-datasheet-update-us-1165301-r5.pdf"),
    Spec("NVIDIA A100 SXM 80GB", "GPU", 312 * T, 19.5 * T, 2039 * G, 400,
         "bf16 tensor, dense; tf32 dense (312 with sparsity)",
         "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-nvidia-us-2188504-web.pdf",
         peak_tf32=156 * T),
    Spec("NVIDIA H100 SXM", "GPU", 989 * T, 67 * T, 3350 * G, 700,
         "bf16 tensor, dense (1,979 with sparsity); tf32 dense (989 with sparsity)",
         "https://www.nvidia.com/en-us/data-center/h100/", peak_tf32=494.5 * T),
    Spec("NVIDIA H200 SXM", "GPU", 989 * T, 67 * T, 4800 * G, 700,
         "the H100's compute with HBM3e memory; bf16 dense (1,979 with sparsity); tf32 dense "
         "(989 with sparsity)",
         "https://www.nvidia.com/en-us/data-center/h200/", peak_tf32=494.5 * T),
    Spec("NVIDIA B200 (HGX)", "GPU", 2250 * T, 75 * T, 7700 * G, 1000,
         "per GPU, from the page's 'individual Blackwell GPU' HGX B200 column (the 8-GPU totals are "
         "listed apart; its GB200 NVL72 column, up to 1,200 W, gives 80 fp32): bf16 tensor dense "
         "(4.5 PFLOP/s with sparsity), tf32 dense (2.2 with sparsity), up to 1,000 W",
         "https://www.nvidia.com/en-us/data-center/hgx/", peak_tf32=1100 * T),
    Spec("TPU v4", "TPU", 275 * T, None, 1200 * G, 170,
         "power: measured mean (min/max 90/192 W)",
         "https://cloud.google.com/tpu/docs/v4"),
    Spec("TPU v5e", "TPU", 197 * T, None, 819 * G, None,
         "power not published", "https://cloud.google.com/tpu/docs/v5e"),
    Spec("TPU v5p", "TPU", 459 * T, None, 2765 * G, None,
         "power not published", "https://cloud.google.com/tpu/docs/v5p"),
    Spec("TPU v6e (Trillium)", "TPU", 918 * T, None, 1640 * G, None,
         "two 256x256 MXUs per core; power not published", "https://cloud.google.com/tpu/docs/v6e"),
)


def spec_table(cpu: CpuInfo | None = None, peak: PeakEstimate | None = None,
               bandwidth_bps: float | None = None) -> list[dict[str, Any]]:
    """Rows of the published spec table, with this CPU's estimate first when given.

    The CPU row is labelled as an estimate (peak) and a measurement (bandwidth): it is not
    a published spec.
    """
    rows = []
    if cpu is not None and peak is not None and peak.fp32 and bandwidth_bps:
        rows.append({
            "chip": f"this CPU: {cpu.model} x{cpu.cores}",
            "16-bit peak TFLOP/s": (peak.bf16 or peak.fp32) / 1e12,
            "fp32 TFLOP/s": peak.fp32 / 1e12,
            "tf32 TFLOP/s": None,
            "memory GB/s": bandwidth_bps / 1e9,
            "power W": None,
            "GFLOP/s per W": None,
            "ridge FLOP/B": peak.fp32 / bandwidth_bps,
            "note": "ESTIMATED peak, MEASURED bandwidth (this run)",
            "source": "this notebook",
        })
    rows += [s.row() for s in SPECS]
    return rows


# --------------------------------------------------------------------------- benchmark


BANDWIDTH_ARRAY_BYTES = {"full": 256 * 2**20, "quick": 64 * 2**20}


def bench_hardware(quick: bool = False) -> dict[str, Any]:
    """Benchmark ``hardware``: matmul sweep (float32 also at ``precision=HIGHEST``), NumPy peer,
    estimated peak and its reconciliation with the measured rate, bandwidth, roofline."""
    sizes = [64, 128, 256, 512, 1024] if quick else [64, 128, 256, 512, 1024, 2048, 4096]
    cpu = cpu_info()
    peak = estimate_peak(cpu)
    sweep = matmul_sweep(sizes)
    array_bytes = BANDWIDTH_ARRAY_BYTES["quick" if quick else "full"]
    bw_rows = bandwidth(array_bytes)
    bw = max(r["bytes_per_s"] for r in bw_rows)
    matmul_flops: dict[str, dict[str, float]] = {}
    highest: dict[str, float] = {}
    for r in sweep:
        if r["impl"] == "jax" and r["precision"] == "highest":
            highest[str(r["n"])] = r["flops_per_s"]
        elif r["impl"] == "jax":
            matmul_flops.setdefault(r["dtype"], {})[str(r["n"])] = r["flops_per_s"]
    numpy_flops = {str(r["n"]): r["flops_per_s"] for r in sweep if r["impl"] == "numpy"}
    best_fp32 = max(matmul_flops["float32"].values())
    on_cpu = jax.default_backend() == "cpu"
    points = roofline_points(quick)
    return {
        "sizes": sizes,
        "matmul_flops": matmul_flops,
        "matmul_flops_float32_highest": highest,
        "float32_default_precision": float32_label(jax.default_backend()),
        "numpy_matmul_flops": numpy_flops,
        "best_matmul_flops": {d: max(v.values()) for d, v in matmul_flops.items()},
        "best_matmul_flops_float32_highest": max(highest.values()) if highest else None,
        "peak_flops_estimate": peak.fp32 if on_cpu else None,
        "peak_estimate": peak.as_dict(),
        "fraction_of_peak": best_fp32 / peak.fp32 if (on_cpu and peak.fp32) else None,
        "peak_reconciliation": reconcile(best_fp32, peak) if on_cpu else None,
        "bandwidth_array_bytes": array_bytes,
        "bandwidth_bytes_per_s": bw,
        "bandwidth_kernels": bw_rows,
        "roofline": points,
        "cpu_model": cpu.model,
    }


# --------------------------------------------------------------------------- explorer

THIS_MACHINE = "this machine (measured)"


def roofline_model(chip: str, precision: str, intensity: float, n: int,
                   measured: Sequence[float] | None = None) -> dict[str, Any]:
    """Where an operation lands on one chip's roofline (pure: the explorer's model).

    ``chip`` is a name from :data:`SPECS` or :data:`THIS_MACHINE` (then ``measured`` = this
    machine's (peak FLOP/s, bandwidth bytes/s)); ``precision`` is "16-bit" or "fp32" (a chip
    that publishes no fp32 peak uses its 16-bit one, as TPUs do); ``intensity`` in FLOP/byte;
    ``n`` the side of a square matmul, whose intensity is 2n^3 FLOPs over 3 n^2 elements moved
    once (n/6 FLOP/byte in fp32, n/3 in 16-bit). Returns the chip's peak, bandwidth and ridge,
    the attainable rate at ``intensity`` and for the matmul, and which roof bounds each.
    """
    if precision not in ("16-bit", "fp32"):
        raise ValueError(f"precision must be '16-bit' or 'fp32', got {precision!r}")
    if not intensity > 0:
        raise ValueError(f"intensity must be positive FLOP/byte, got {intensity!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer matrix side, got {n!r}")
    if chip == THIS_MACHINE:
        if measured is None:
            raise ValueError("this machine's row needs measured=(peak FLOP/s, bandwidth bytes/s)")
        peak, bandwidth_bps = measured
    else:
        spec = next((s for s in SPECS if s.name == chip), None)
        if spec is None:
            raise ValueError(f"unknown chip {chip!r}; expected one of {[s.name for s in SPECS]}")
        peak = spec.peak_16bit if precision == "16-bit" or spec.peak_fp32 is None else spec.peak_fp32
        bandwidth_bps = spec.bandwidth
    element = 2 if precision == "16-bit" else 4
    ridge = ridge_point(peak, bandwidth_bps)
    matmul_intensity = 2 * n**3 / (3 * n * n * element)
    return {
        "peak_flops": float(peak), "bandwidth_bps": float(bandwidth_bps), "ridge": ridge,
        "attainable_flops": float(attainable(intensity, peak, bandwidth_bps)),
        "bound": "compute" if intensity >= ridge else "memory",
        "matmul_intensity": matmul_intensity,
        "matmul_attainable_flops": float(attainable(matmul_intensity, peak, bandwidth_bps)),
        "matmul_bound": "compute" if matmul_intensity >= ridge else "memory",
    }


def measure_matmul_point(n: int, repeat: int = 3) -> dict[str, Any]:
    """One float32 n x n matmul on this machine's first device: intensity and FLOP/s."""
    key = jax.random.key(0)
    a = jax.random.normal(key, (n, n), jnp.float32)
    b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), jnp.float32)
    f = jax.jit(matmul)
    f(a, b).block_until_ready()
    best = bench.timeit(lambda: f(a, b).block_until_ready(), repeat=repeat).best
    return {"intensity": 2 * n**3 / (3 * n * n * 4), "flops_per_s": 2 * n**3 / best}


def roofline_explorer(measured_peak: float | None = None, measured_bandwidth: float | None = None,
                      info: env.EnvInfo | None = None):
    """The roofline explorer: a chip (cited specs, and this machine's measured ceilings when
    given), a precision, an arithmetic intensity and a matmul size -> where each lands; "measure
    this point" times the float32 matmul of that size here and plots it."""
    from scalelab import widgets

    here = measured_peak is not None and measured_bandwidth is not None
    chips = ([THIS_MACHINE] if here else []) + [s.name for s in SPECS if s.kind != "ASIC"]
    context = {"measured": [measured_peak, measured_bandwidth] if here else None}

    def draw(settings, pred, points):
        fig, ax = plot.figure(width=7.0, height=3.8)
        xs = np.logspace(-2, 4, 200)
        ax.plot(xs, attainable(xs, pred["peak_flops"], pred["bandwidth_bps"]), color="k",
                label=f"{settings['chip']} ({settings['precision']})")
        ax.axvline(pred["ridge"], color="0.7", ls=":", lw=1)
        ax.scatter([settings["intensity"]], [pred["attainable_flops"]], s=60, color="C0", zorder=3,
                   label=f"an op at {settings['intensity']:.3g} FLOP/B: {pred['bound']}-bound")
        ax.scatter([pred["matmul_intensity"]], [pred["matmul_attainable_flops"]], s=60, marker="s",
                   color="C1", zorder=3, label=f"matmul n={settings['n']}: {pred['matmul_bound']}-bound")
        for i, p in enumerate(points):
            ax.scatter([p["result"]["intensity"]], [p["result"]["flops_per_s"]], marker="*", s=120,
                       color="C3", zorder=4, label="measured here (fp32 matmul)" if i == 0 else None)
        ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP/byte)", ylabel="FLOP/s",
               title="Roofline: min(peak, intensity x bandwidth)")
        ax.legend(fontsize=7, loc="lower right")
        source = ("cited spec" if settings["chip"] != THIS_MACHINE
                  else "estimated or measured ceilings of this run")
        plot.label(fig, info or env.describe(), source=source + "; stars: measured here", devices=1)
        return fig

    controls = {
        "chip": widgets.dropdown("chip", chips),
        "precision": widgets.dropdown("precision", ["fp32", "16-bit"]),
        "intensity": widgets.slider("intensity (FLOP/B)", 1.0, 0.01, 10_000, log=True),
        "n": widgets.slider("matmul n", 512, 16, 8192, step=16, integer=True),
    }
    return widgets.Explorer(
        "roofline", "Roofline explorer", controls, roofline_model, draw, context=context,
        measure=lambda chip, precision, intensity, n: measure_matmul_point(int(n)),
        shown=["attainable_flops", "bound", "ridge", "matmul_intensity", "matmul_bound"],
        labels={"attainable_flops": "attainable FLOP/s", "ridge": "ridge (FLOP/B)",
                "matmul_intensity": "matmul intensity (FLOP/B)", "matmul_bound": "matmul is"},
        note="'measure this point' times the fp32 n x n matmul on this machine (compare it with the "
             "'this machine' row).")
