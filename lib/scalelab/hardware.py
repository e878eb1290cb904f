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


@dataclasses.dataclass(frozen=True)
class CpuInfo:
    """What the operating system reports about the processor."""

    model: str
    vendor: str
    family: int | None
    arch: str
    cores: int
    clock_ghz: float | None
    flags: frozenset[str]


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


def cpu_info(cpuinfo_text: str | None = None) -> CpuInfo:
    """Parse ``/proc/cpuinfo`` (or the given text); falls back to ``platform`` elsewhere."""
    if cpuinfo_text is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as handle:
                cpuinfo_text = handle.read()
        except OSError:
            cpuinfo_text = ""
    fields = _read_cpuinfo(cpuinfo_text)
    flags = frozenset((fields.get("flags") or fields.get("features") or "").split())
    clock = None
    if fields.get("cpu mhz"):
        try:
            clock = float(fields["cpu mhz"]) / 1000.0
        except ValueError:
            clock = None
    try:
        family = int(fields["cpu family"]) if "cpu family" in fields else None
    except ValueError:
        family = None
    cores = env.cpu_cores()
    return CpuInfo(
        model=fields.get("model name") or platform.processor() or platform.machine(),
        vendor=fields.get("vendor_id", ""),
        family=family,
        arch=platform.machine(),
        cores=cores,
        clock_ghz=clock,
        flags=flags,
    )


@dataclasses.dataclass(frozen=True)
class PeakEstimate:
    """Theoretical peak = cores x clock x FLOPs per cycle per core. An estimate, not a spec."""

    cores: int
    clock_ghz: float | None
    simd_bits: int
    fma_units: int
    flops_per_cycle_fp32: int
    fp32: float | None  # FLOP/s
    bf16: float | None  # FLOP/s
    assumptions: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def estimate_peak(cpu: CpuInfo) -> PeakEstimate:
    """Estimate the CPU's peak FLOP/s from its core count, clock and instruction-set flags.

    FLOPs per cycle per core = SIMD lanes (float32) x 2 (a fused multiply-add is two
    FLOPs) x FMA units. Every assumption is listed in ``assumptions``.
    """
    f = cpu.flags
    notes = []
    if "avx512f" in f:
        simd = 512
    elif "avx2" in f or "avx" in f:
        simd = 256
    elif "asimd" in f or cpu.arch in ("aarch64", "arm64"):
        simd = 128
    else:
        simd = 128
    notes.append(f"SIMD width {simd} bits from the CPU flags")
    fma_units = 2 if ("fma" in f or "asimd" in f or cpu.arch in ("aarch64", "arm64")) else 1
    notes.append(f"{fma_units} FMA unit(s) per core assumed (typical for server cores; not reported)")
    per_cycle = simd // 32 * 2 * fma_units
    if cpu.clock_ghz:
        notes.append(f"clock {cpu.clock_ghz:.2f} GHz as reported by the OS (often the base clock; "
                     "turbo can be higher)")
    else:
        notes.append("clock not reported: no estimate")
    bf16_per_cycle = per_cycle
    if "amx_bf16" in f:
        bf16_per_cycle = 1024
        notes.append("AMX tiles: 1024 bf16 FLOPs per cycle per core")
    elif "avx512_bf16" in f:
        bf16_per_cycle = per_cycle * 2
        notes.append("AVX512-BF16: two bf16 products per float32 lane, so twice the float32 rate")
    if cpu.vendor == "AuthenticAMD" and cpu.family == 25 and simd == 512:
        notes.append("AMD family 25 (Zen 4) runs 512-bit instructions on 256-bit units: "
                     "the real per-cycle figure is half of this")
    scale = cpu.cores * (cpu.clock_ghz or 0) * 1e9
    return PeakEstimate(
        cores=cpu.cores,
        clock_ghz=cpu.clock_ghz,
        simd_bits=simd,
        fma_units=fma_units,
        flops_per_cycle_fp32=per_cycle,
        fp32=scale * per_cycle if cpu.clock_ghz else None,
        bf16=scale * bf16_per_cycle if cpu.clock_ghz else None,
        assumptions=tuple(notes),
    )


# --------------------------------------------------------------------------- scalar / vector / matrix


def axpy_python(a: float, x: list[float], y: list[float]) -> list[float]:
    """Scalar processing: one multiply-add per interpreted loop iteration."""
    return [a * xi + yi for xi, yi in zip(x, y, strict=True)]


@jax.jit
def axpy_vector(a: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
    """Vector processing: the same multiply-add on every element at once (SIMD)."""
    return a * x + y


@jax.jit
def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """Matrix processing: n^3 multiply-adds on 3 n^2 numbers."""
    return a @ b


def scalar_vector_matrix(m: int, repeat: int = 3) -> list[dict[str, Any]]:
    """Run the same FLOP count (2 m^3) as scalar, vector and matrix work.

    ``bytes_per_flop`` is the minimum traffic: each float32 operand read once and each
    result written once (the Python loop moves far more: every float is a boxed object).
    """
    if m < 2:
        raise ValueError(f"m must be >= 2, got {m}")
    flops = 2 * m**3
    n = flops // 2  # axpy does 2 FLOPs per element
    rng = np.random.default_rng(0)
    x = rng.standard_normal(n, dtype=np.float32)
    y = rng.standard_normal(n, dtype=np.float32)
    a = rng.standard_normal((m, m), dtype=np.float32)
    xs, ys = x.tolist(), y.tolist()
    xd, yd, ad = jnp.asarray(x), jnp.asarray(y), jnp.asarray(a)
    two = jnp.float32(2.0)
    rows = []
    cases: list[tuple[str, str, Callable[..., Any], tuple, float]] = [
        ("scalar", "Python loop a*x[i]+y[i]", axpy_python, (2.0, xs, ys), 16 * n),
        ("vector", "jit a*x+y (SIMD)", axpy_vector, (two, xd, yd), 12 * n),
        ("matrix", "jit A @ A", matmul, (ad, ad), 12 * m * m),
    ]
    for kind, kernel, fn, args, nbytes in cases:
        t = bench.timeit(fn, *args, repeat=1 if kind == "scalar" else repeat, warmup=1,
                         number=1 if kind == "scalar" else None)
        rows.append({
            "processing": kind, "kernel": kernel, "flops": flops, "seconds": t.best,
            "flops_per_s": flops / t.best, "min_bytes": nbytes, "bytes_per_flop": nbytes / flops,
        })
    return rows


# --------------------------------------------------------------------------- matmul sweep


def matmul_dtypes() -> list[str]:
    """float32 and bfloat16 everywhere; float16 too on GPUs."""
    dtypes = ["float32", "bfloat16"]
    if jax.default_backend() == "gpu":
        dtypes.append("float16")
    return dtypes


def matmul_sweep(sizes: Sequence[int], dtypes: Sequence[str] | None = None,
                 repeat: int = 3, numpy_too: bool = True) -> list[dict[str, Any]]:
    """Achieved FLOP/s of square matmuls for each size and dtype; NumPy float32 beside JAX."""
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
            t = bench.timeit(matmul, x, x, repeat=repeat, min_time=0.05)
            rows.append({"impl": "jax", "dtype": d, "n": n, "seconds": t.best,
                         "flops_per_s": flops / t.best})
        if numpy_too:
            t = bench.timeit(np.matmul, host, host, repeat=repeat, min_time=0.05)
            rows.append({"impl": "numpy", "dtype": "float32", "n": n, "seconds": t.best,
                         "flops_per_s": flops / t.best})
    return rows


# --------------------------------------------------------------------------- bandwidth


@jax.jit
def _triad(x: jax.Array, y: jax.Array) -> jax.Array:
    return x + jnp.float32(2.0) * y


def bandwidth(nbytes: int, repeat: int = 5) -> list[dict[str, Any]]:
    """Streaming kernels over arrays far larger than the caches: bytes moved per second.

    copy (read 1, write 1) and add (read 2, write 1) in NumPy, triad (read 2, write 1) in
    JAX. The best of them is the machine's measured memory bandwidth.
    """
    n = int(nbytes) // 4
    if n < 1024:
        raise ValueError(f"nbytes must be at least 4 KiB, got {nbytes}")
    rng = np.random.default_rng(0)
    x = rng.standard_normal(n, dtype=np.float32)
    y = rng.standard_normal(n, dtype=np.float32)
    out = np.empty_like(x)
    xd, yd = jnp.asarray(x), jnp.asarray(y)
    cases: list[tuple[str, Callable[..., Any], tuple, int]] = [
        ("numpy copy", lambda: np.copyto(out, x), (), 8 * n),
        ("numpy add", lambda: np.add(x, y, out=out), (), 12 * n),
        ("jax triad x+2y", _triad, (xd, yd), 12 * n),
    ]
    rows = []
    for name, fn, args, moved in cases:
        t = bench.timeit(fn, *args, repeat=repeat, warmup=2, number=1)
        rows.append({"kernel": name, "bytes": moved, "seconds": t.best,
                     "bytes_per_s": moved / t.best})
    return rows


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


def roofline_points(quick: bool = False, repeat: int = 3) -> list[dict[str, Any]]:
    """FLOPs and bytes from XLA's cost analysis, and the FLOP/s measured, for each op."""
    from scalelab.abstractions import lowering

    rows = []
    for name, (fn, args) in roofline_ops(quick).items():
        low = lowering(fn, *args)
        jitted = jax.jit(fn)
        t = bench.timeit(jitted, *args, repeat=repeat, min_time=0.02)
        rows.append({
            "op": name, "flops": low.flops, "bytes": low.bytes_accessed,
            "intensity": low.flops / low.bytes_accessed, "seconds": t.best,
            "flops_per_s": low.flops / t.best,
        })
    return rows


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


def plot_roofline(points: Sequence[dict[str, Any]], bandwidth_bps: float,
                  measured_peak: float, estimated_peak: float | None = None,
                  info: env.EnvInfo | None = None):
    """Log-log roofline: measured bandwidth slope, measured and estimated compute ceilings."""
    fig, ax = plot.figure(width=6.4, height=4.2)
    lo = min(p["intensity"] for p in points) / 2
    hi = max(p["intensity"] for p in points) * 4
    xs = np.logspace(math.log10(lo), math.log10(hi), 200)
    ax.plot(xs, attainable(xs, measured_peak, bandwidth_bps), color="k",
            label=f"measured roof: {bandwidth_bps / 1e9:.0f} GB/s, {measured_peak / 1e9:.0f} GFLOP/s")
    if estimated_peak:
        ax.plot(xs, attainable(xs, estimated_peak, bandwidth_bps), color="0.5", ls="--",
                label=f"estimated peak {estimated_peak / 1e9:.0f} GFLOP/s (estimate)")
    ridge = ridge_point(measured_peak, bandwidth_bps)
    ax.axvline(ridge, color="0.7", ls=":", lw=1)
    ax.text(ridge, 0.02, f" ridge {ridge:.1f} FLOP/B", fontsize=8, color="0.3",
            transform=ax.get_xaxis_transform())
    for p in points:
        ax.scatter(p["intensity"], p["flops_per_s"], zorder=3)
        ax.annotate(p["op"], (p["intensity"], p["flops_per_s"]), fontsize=7,
                    xytext=(4, -10), textcoords="offset points")
    ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP/byte, XLA cost analysis)",
           ylabel="FLOP/s", title="Roofline of this device")
    ax.legend(loc="upper left")
    plot.label(fig, info)
    return fig


def plot_matmul_sweep(result: dict[str, Any], others: Sequence[dict[str, Any]] = (),
                      info: env.EnvInfo | None = None):
    """Achieved matmul FLOP/s vs size from a ``hardware`` benchmark result.

    This run's curves are solid; results committed from other devices are dashed and
    labelled with their device and date. The estimated peak (an estimate) is dotted.
    """
    fig, ax = plot.figure(width=6.6, height=4.2)

    def curve(by_size: dict[str, float]):
        return zip(*sorted((int(n), v) for n, v in by_size.items()), strict=True)

    for dtype, by_size in result["matmul_flops"].items():
        ax.plot(*curve(by_size), marker="o", label=f"jax {dtype} (this run)")
    ax.plot(*curve(result["numpy_matmul_flops"]), marker="s", label="numpy float32 (this run)")
    for other in others:
        for dtype, by_size in other.get("matmul_flops", {}).items():
            ax.plot(*curve(by_size), ls="--", marker=".",
                    label=f"{other['device']} {dtype} (committed, {other['date'][:10]})")
    if result.get("peak_flops_estimate"):
        ax.axhline(result["peak_flops_estimate"], color="0.5", ls=":",
                   label="estimated fp32 peak (estimate)")
    ax.set(xscale="log", yscale="log", xlabel="matrix size n (n x n @ n x n)",
           ylabel="FLOP/s", title="Matrix multiply throughput")
    ax.legend(fontsize=7)
    plot.label(fig, info)
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

    def row(self) -> dict[str, Any]:
        per_watt = self.peak_16bit / self.power_w / 1e9 if self.power_w else None
        return {
            "chip": self.name,
            "16-bit peak TFLOP/s": self.peak_16bit / 1e12,
            "fp32 TFLOP/s": self.peak_fp32 / 1e12 if self.peak_fp32 else None,
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
         "bf16 tensor, dense",
         "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-nvidia-us-2188504-web.pdf"),
    Spec("NVIDIA H100 SXM", "GPU", 989 * T, 67 * T, 3350 * G, 700,
         "bf16 tensor, dense (1,979 with sparsity)",
         "https://www.nvidia.com/en-us/data-center/h100/"),
    Spec("NVIDIA B200 (HGX)", "GPU", 2250 * T, 80 * T, 8000 * G, 1000,
         "bf16 tensor, dense (4.5 PFLOP/s with sparsity), at 1,000 W",
         "https://www.nvidia.com/en-us/data-center/hgx/"),
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


def bench_hardware(quick: bool = False) -> dict[str, Any]:
    """Benchmark ``hardware``: matmul sweep, NumPy peer, estimated peak, bandwidth, roofline."""
    sizes = [64, 128, 256, 512, 1024] if quick else [64, 128, 256, 512, 1024, 2048, 4096]
    cpu = cpu_info()
    peak = estimate_peak(cpu)
    sweep = matmul_sweep(sizes)
    bw_rows = bandwidth((64 if quick else 256) * 2**20)
    bw = max(r["bytes_per_s"] for r in bw_rows)
    matmul_flops: dict[str, dict[str, float]] = {}
    for r in sweep:
        if r["impl"] == "jax":
            matmul_flops.setdefault(r["dtype"], {})[str(r["n"])] = r["flops_per_s"]
    numpy_flops = {str(r["n"]): r["flops_per_s"] for r in sweep if r["impl"] == "numpy"}
    best_fp32 = max(matmul_flops["float32"].values())
    on_cpu = jax.default_backend() == "cpu"
    points = roofline_points(quick)
    return {
        "sizes": sizes,
        "matmul_flops": matmul_flops,
        "numpy_matmul_flops": numpy_flops,
        "best_matmul_flops": {d: max(v.values()) for d, v in matmul_flops.items()},
        "peak_flops_estimate": peak.fp32 if on_cpu else None,
        "peak_estimate": peak.as_dict(),
        "fraction_of_peak": best_fp32 / peak.fp32 if (on_cpu and peak.fp32) else None,
        "bandwidth_bytes_per_s": bw,
        "bandwidth_kernels": bw_rows,
        "roofline": points,
        "cpu_model": cpu.model,
    }
