"""Benchmark registry, timing helper and command line.

    python -m scalelab.bench --list
    python -m scalelab.bench NAME [--quick] [--json] [--out FILE] [--save]

The registry maps a name to a ``"module:function"`` path, so the CLI imports only the
benchmark it runs. A benchmark function takes ``quick: bool`` and returns a dict of
measured figures; :func:`run` adds ``name``, ``device``, ``backend``, ``versions``,
``quick`` and the date. Notebooks call the same functions, so a figure in a chapter and
a figure from the CLI come from one code path.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import importlib
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scalelab import env, io


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    target: str  # "package.module:function"
    description: str

    def load(self) -> Callable[..., dict[str, Any]]:
        module, _, func = self.target.partition(":")
        return getattr(importlib.import_module(module), func)


REGISTRY: dict[str, Benchmark] = {}


def register(name: str, target: str, description: str) -> None:
    """Add a benchmark to the registry (``target`` is ``"module:function"``)."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"benchmark names are lower_snake_case, got {name!r}")
    if ":" not in target:
        raise ValueError(f"benchmark target must look like 'module:function', got {target!r}")
    REGISTRY[name] = Benchmark(name, target, description)


# One line per chapter benchmark.
register(
    "abstractions",
    "scalelab.abstractions:bench_abstractions",
    "Chapter 00: dot product in pure Python vs NumPy vs jax.jit, time per element",
)
register(
    "hardware",
    "scalelab.hardware:bench_hardware",
    "Chapter 01: matmul FLOP/s sweep, estimated peak, memory bandwidth, fraction of peak",
)
register(
    "storage",
    "scalelab.data:bench_storage",
    "Chapter 03: HDF5 layouts (contiguous, chunked, lzf, gzip) and .npy memmap: size, write, reads; 1-4 parallel readers",
)
register(
    "pipeline",
    "scalelab.pipeline:bench_pipeline",
    "Chapter 04: sequential vs overlapped input pipeline vs Grain, overlap efficiency",
)
register(
    "train",
    "scalelab.train:bench_train",
    "Chapter 05: CNN on the digits: steps/s, samples/s, compile time, test accuracy",
)
register(
    "data_parallel",
    "scalelab.parallel.data_parallel:bench_data_parallel",
    "Chapter 07: pmap / jit+NamedSharding / shard_map vs single device, step time, 2-process run",
)
register(
    "systolic",
    "scalelab.systolic:bench_systolic",
    "Chapter 02: systolic-array simulator speed (PE-cycles/s) vs a per-PE Python loop",
)
register(
    "model_parallel",
    "scalelab.parallel.model_parallel:bench_model_parallel",
    "Chapter 08: DP / ZeRO-1-2 / FSDP / tensor / pipeline parallelism: equality, bytes per device, "
    "step time, GPipe bubble in time, GPipe vs 1F1B activation bytes",
)
register(
    "hpo",
    "scalelab.hpo:bench_hpo",
    "Chapter 09: vmap over 64 configurations vs a loop of jitted runs; median best accuracy per search strategy",
)
register(
    "remat",
    "scalelab.memory:bench_remat",
    "Chapter 10: activation memory vs depth without remat, with sqrt(n) and full remat; time overhead",
)
register(
    "precision",
    "scalelab.precision:bench_precision",
    "Chapter 11: float32 / bfloat16 / float16 (loss scaling) / int8: accuracy, bytes, step time",
)

register(
    "checkpoint",
    "scalelab.checkpoint:bench_checkpoint",
    "Chapter 12: Orbax save/restore throughput vs a raw disk write; training blocked by async vs sync saves",
)
register(
    "monitor",
    "scalelab.monitor:bench_monitor",
    "Chapter 13: resource sampler overhead; step-time prediction from small runs vs a measured larger run",
)
register(
    "serve",
    "scalelab.serve:bench_serve",
    "Chapter 14: batched vs unbatched HTTP serving under load (throughput, p50/p99), cold starts",
)
register(
    "capstone",
    "scalelab.capstone:bench_capstone",
    "Chapter 15 (in progress): a byte-level GPT on the standard library's sources: tokens/s, MFU, val loss vs "
    "unigram, pipeline headroom, sharded == single, KV-cache speed-up, prefill vs decode per token",
)

# --------------------------------------------------------------------------- timing


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per call, one entry per repeat (each the mean of ``number`` calls)."""

    times: tuple[float, ...]
    number: int

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def spread(self) -> float:
        """Relative spread (max - min) / median of the repeats."""
        return (max(self.times) - min(self.times)) / self.median if self.median else 0.0


def _block(out: Any) -> Any:
    """Wait for JAX's asynchronous results: an array, or a small container of them.

    Large Python containers (a list of a million floats from a pure-Python kernel) are
    not walked: flattening them would cost more than the kernel being timed.
    """
    if "jax" not in sys.modules:
        return out
    import jax

    if isinstance(out, jax.Array):
        return out.block_until_ready()
    if isinstance(out, tuple | list | dict) and len(out) <= 64:
        return jax.block_until_ready(out)
    if hasattr(out, "__jax_array__") or dataclasses.is_dataclass(out):
        return jax.block_until_ready(out)
    return out


def timeit(
    fn: Callable[..., Any],
    *args: Any,
    repeat: int = 5,
    number: int | None = None,
    warmup: int = 1,
    min_time: float = 0.02,
    max_number: int = 100_000,
) -> Timing:
    """Time ``fn(*args)``, waiting for JAX results (asynchronous dispatch) on every call.

    ``warmup`` calls run first (they include compilation for jitted functions). When
    ``number`` is None it is chosen so one repeat lasts at least ``min_time`` seconds.
    """
    if repeat < 1 or warmup < 0:
        raise ValueError(f"repeat must be >= 1 and warmup >= 0, got {repeat}, {warmup}")
    for _ in range(warmup):
        _block(fn(*args))
    if number is None:
        number = 1
        while number < max_number:
            start = time.perf_counter()
            for _ in range(number):
                _block(fn(*args))
            if time.perf_counter() - start >= min_time:
                break
            number *= 4
    elif number < 1:
        raise ValueError(f"number must be >= 1, got {number}")
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            _block(fn(*args))
        times.append((time.perf_counter() - start) / number)
    return Timing(tuple(times), number)


# --------------------------------------------------------------------------- running


def host_info() -> dict[str, Any]:
    """The machine: processor model, core count, operating system."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "os": platform.platform(terse=True)}


def device_info() -> dict[str, Any]:
    """The JAX runtime the benchmark ran on."""
    info = env.describe()
    return {
        "device": info.device_kind,
        "backend": info.backend,
        "device_count": info.device_count,
        "simulated_devices": info.simulated,
        "host": host_info(),
        "versions": info.versions,
    }


def run(name: str, quick: bool | None = None) -> dict[str, Any]:
    """Run the benchmark ``name`` and return its result with provenance attached."""
    if name not in REGISTRY:
        known = ", ".join(sorted(REGISTRY)) or "none"
        raise KeyError(f"unknown benchmark {name!r}; registered: {known}")
    quick = env.quick() if quick is None else bool(quick)
    func = REGISTRY[name].load()
    start = time.perf_counter()
    metrics = func(quick=quick)
    if not isinstance(metrics, dict):
        raise TypeError(f"benchmark {name!r} returned {type(metrics).__name__}, expected dict")
    result: dict[str, Any] = {"name": name, "quick": quick}
    result.update(device_info())
    result["date"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    result["wall_s"] = round(time.perf_counter() - start, 3)
    clash = set(metrics) & set(result)
    if clash:
        raise ValueError(f"benchmark {name!r} returned reserved keys {sorted(clash)}")
    result.update(metrics)
    return result


def checkout_root(start: str | os.PathLike | None = None) -> Path | None:
    """The course checkout containing ``start`` (default: the working directory), or None."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").exists() and (folder / "lib" / "scalelab").is_dir():
            return folder
    return None


def results_dir(start: str | os.PathLike | None = None) -> Path:
    """Where ``--save`` writes: the checkout's ``results/`` folder, found from ``start`` (default:
    the working directory) upwards, so notebooks (run from ``notebooks/``) and the CLI agree.
    Outside a checkout (an installed package, e.g. on Colab) it is ``./results``."""
    root = checkout_root(start)
    return root / "results" if root else Path(start or Path.cwd()).resolve() / "results"


def packaged_results_dir() -> Path | None:
    """The committed reference results shipped inside the installed package (a wheel built from
    the checkout copies ``results/*.json`` there at build time), or None in a source checkout."""
    from importlib import resources

    folder = Path(str(resources.files("scalelab") / "results"))
    return folder if folder.is_dir() else None


def reference_dirs(start: str | os.PathLike | None = None) -> list[Path]:
    """Folders whose results a chapter overlays: the checkout's ``results/`` when there is one
    (the one source of truth), else the results shipped with the package, then ``./results``
    (what this runtime saved itself)."""
    root = checkout_root(start)
    if root:
        return [root / "results"]
    shipped = packaged_results_dir()
    return [*([shipped] if shipped else []), results_dir(start)]


def device_slug(result: dict[str, Any]) -> str:
    """A file-name-safe device name; CPUs are told apart by their model."""
    name = str(result["device"])
    if result.get("backend") == "cpu" and result.get("host", {}).get("cpu"):
        name = f"cpu {result['host']['cpu']}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def result_path(result: dict[str, Any], directory: str | os.PathLike | None = None) -> Path:
    """``results/<name>-<device>[-quick].json``, the name a saved result gets."""
    suffix = "-quick" if result.get("quick") else ""
    folder = Path(directory) if directory is not None else results_dir()
    return folder / f"{result['name']}-{device_slug(result)}{suffix}.json"


def save(result: dict[str, Any], directory: str | os.PathLike | None = None) -> Path:
    """Write a result atomically under ``directory`` (default :func:`results_dir`)."""
    return io.write_json(result_path(result, directory), result)


def load_results(name: str, directory: str | os.PathLike | None = None,
                 include_quick: bool = False) -> list[dict[str, Any]]:
    """Every saved result of benchmark ``name`` (for overlaying other devices), from
    ``directory`` or else from :func:`reference_dirs` (a file name found twice is read once)."""
    folders = [Path(directory)] if directory is not None else reference_dirs()
    out, seen = [], set()
    for folder in folders:
        for path in sorted(folder.glob(f"{name}-*.json")):
            if path.name in seen or (path.stem.endswith("-quick") and not include_quick):
                continue
            seen.add(path.name)
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
            if data.get("name") == name:
                out.append(data)
    return out


def _format(result: dict[str, Any]) -> str:
    lines = []
    for key, value in result.items():
        if isinstance(value, dict | list):
            value = json.dumps(value, default=io.to_jsonable)
            if len(value) > 100:
                value = value[:97] + "..."
        lines.append(f"{key:>22}: {value}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scalelab.bench", description="Run a Scalable ML Workbench benchmark."
    )
    parser.add_argument("name", nargs="?", help="benchmark to run (see --list)")
    parser.add_argument("--list", action="store_true", help="list the registered benchmarks")
    parser.add_argument("--quick", action="store_true", help="small sizes (as in the tests)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--out", help="also write the JSON result to this file (atomically)")
    parser.add_argument("--save", action="store_true", help="also write it under results/")
    parser.add_argument(
        "--cpu-devices", type=int, default=8, help="simulated CPU devices (default 8)"
    )
    args = parser.parse_args(argv)
    if args.list:
        for bench in sorted(REGISTRY.values(), key=lambda b: b.name):
            print(f"{bench.name:<16} {bench.description}")
        return 0
    if not args.name:
        parser.error("give a benchmark NAME or --list")
    if args.name not in REGISTRY:
        parser.error(f"unknown benchmark {args.name!r}; try --list")
    env.setup(cpu_devices=args.cpu_devices, verbose=False)
    result = run(args.name, quick=args.quick or env.quick())
    if args.out:
        io.write_json(args.out, result)
    if args.save:
        print(f"saved {save(result)}", file=sys.stderr)
    print(json.dumps(result, indent=2, default=io.to_jsonable) if args.json else _format(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
