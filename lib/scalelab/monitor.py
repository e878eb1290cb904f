"""Chapter 13: resource utilisation and monitoring.

Scaling costs money only while the hardware works; monitoring tells whether it does.
This module gathers what the chapter measures:

- **sampling**: :class:`Sampler` reads CPU utilisation (this process, its child
  processes, the whole machine), resident memory, device memory (``memory_stats()`` where
  the backend reports it: GPUs and TPUs, not CPUs) and GPU utilisation (NVML, when
  ``nvidia-ml-py`` is installed) in a background thread; :class:`LivePlot` draws the
  samples while :func:`scalelab.train.fit` trains (a final static figure when nobody is
  watching); :func:`save_samples` writes them atomically as CSV or JSON. The sampler's own
  cost is measured (:func:`measure_overhead`): step time with and without it;
- **profiling**: a ``jax.profiler`` trace of a few steps (:func:`profile_steps`) that
  TensorBoard/XProf and Perfetto open, and our own per-step split into input wait,
  dispatch and device time (:class:`StepTimer`), compile time from the first call;
- **interleaving**: utilisation of host and "accelerator" under the chapter-04 sequential
  and overlapped pipelines (:func:`pipeline_utilisation`, :func:`plot_utilisation`);
- **cost**: FLOPs per training step from XLA's cost analysis (:class:`CompiledStep`,
  :func:`train_step_flops`), a linear step-time model fitted on small runs
  (:func:`fit_linear`) and checked on a larger one, the measured model FLOP utilisation
  (MFU) against this device's peak (:func:`device_peak`, :func:`utilisation`), MFU vs HFU
  under rematerialisation (:func:`remat_utilisation`), and the time and price of a full run
  on listed cloud hardware at a given utilisation (:func:`estimate_run`, :data:`PRICES`);
- **traces**: the events of a ``jax.profiler`` trace per thread (:func:`trace_events`),
  drawn as a timeline (:func:`plot_trace`);
- the ``monitor`` benchmark (:func:`bench_monitor`).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import gzip
import json
import math
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import psutil
from flax import nnx

from scalelab import io, memory, train

# --------------------------------------------------------------------------- samples


@dataclasses.dataclass(frozen=True)
class Sample:
    """One reading of the resources, ``t`` seconds after the sampler started.

    CPU figures are percentages of **one core** (``process_cpu`` of 250 means two and a
    half cores busy with this process's threads); ``system_cpu`` is the percentage of
    **all** cores busy with anything. None means "not reported here": child CPU when not
    asked for, device memory on CPU backends, GPU utilisation without NVML.
    """

    t: float
    process_cpu: float
    system_cpu: float
    rss_bytes: int
    children_cpu: float | None = None
    device_bytes: int | None = None
    device_peak_bytes: int | None = None
    gpu_util: float | None = None


FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Sample))
_INT_FIELDS = {"rss_bytes", "device_bytes", "device_peak_bytes"}


def device_memory(device: Any = None) -> dict[str, int] | None:
    """Bytes in use and peak bytes on ``device`` (default: the first local device).

    From ``device.memory_stats()``: GPUs and TPUs report it, CPU devices return None.
    """
    device = device if device is not None else jax.local_devices()[0]
    stats_fn = getattr(device, "memory_stats", None)
    if stats_fn is None:
        return None
    try:
        stats = stats_fn()
    except (NotImplementedError, RuntimeError):  # backends without the query
        return None
    if not stats or "bytes_in_use" not in stats:
        return None
    in_use = int(stats["bytes_in_use"])
    return {"bytes_in_use": in_use, "peak_bytes_in_use": int(stats.get("peak_bytes_in_use", in_use))}


def gpu_utilization_reader(index: int = 0) -> Callable[[], float] | None:
    """A function returning GPU ``index``'s utilisation in percent (NVML), or None.

    None when ``nvidia-ml-py`` is not installed (it is in the optional ``cuda`` extra),
    when there is no NVIDIA driver or GPU, or when the GPU does not report utilisation.
    NVML counts GPUs as the driver does, which may differ from JAX's order when
    ``CUDA_VISIBLE_DEVICES`` is set.
    """
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        pynvml.nvmlDeviceGetUtilizationRates(handle)
    except (pynvml.NVMLError, OSError):
        return None
    return lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)


def _system_busy(before: Any, after: Any) -> float:
    """Percent of all cores busy between two ``psutil.cpu_times()`` readings."""
    idle = lambda t: t.idle + getattr(t, "iowait", 0.0)  # noqa: E731
    total = sum(after) - sum(before)
    if total <= 0:
        return 0.0
    return max(0.0, min(100.0, 100.0 * (1.0 - (idle(after) - idle(before)) / total)))


def _check_interval(interval: Any) -> float:
    if isinstance(interval, bool) or not isinstance(interval, int | float):
        raise TypeError(f"interval must be a number of seconds, got {type(interval).__name__}")
    if not math.isfinite(interval) or interval <= 0:
        raise ValueError(f"interval must be a positive number of seconds, got {interval!r}")
    return float(interval)


# --------------------------------------------------------------------------- the sampler


class Sampler:
    """Read CPU, memory, device memory and GPU utilisation every ``interval`` seconds in
    a background thread.

    Use it as a context manager around the work to watch::

        with Sampler(interval=0.1) as sampler:
            train.fit(...)
        samples = sampler.samples

    The thread is joined when the block ends, also when the block raises. Readings start
    one interval after ``start`` (CPU percentages are averages since the previous reading).
    ``children=True`` adds the CPU of child processes (e.g. input-pipeline workers); the
    list of children is refreshed every ``children_refresh`` seconds, because listing them
    scans the whole process table. ``device`` is the JAX device whose memory is read
    (default: the first local one); ``gpu=False`` skips NVML.
    """

    def __init__(self, interval: float = 0.1, device: Any = None, gpu: bool = True,
                 children: bool = False, children_refresh: float = 1.0):
        self.interval = _check_interval(interval)
        self.children_refresh = _check_interval(children_refresh)
        self.device = device if device is not None else jax.local_devices()[0]
        self.children = children
        self._gpu = gpu
        self._proc = psutil.Process()
        self._samples: list[Sample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._kids: dict[int, psutil.Process] = {}
        self._kids_at = -math.inf
        self._gpu_reader: Callable[[], float] | None = None
        self._has_device_memory = False
        self._cpu_before: Any = None
        self.t0: float | None = None
        self.error: BaseException | None = None

    # -- one reading
    def _prime(self) -> None:
        """Start the CPU counters (the first ``cpu_percent`` call has nothing to compare to)."""
        self._proc.cpu_percent(None)
        self._cpu_before = psutil.cpu_times()
        self._has_device_memory = device_memory(self.device) is not None
        if self._gpu and self._gpu_reader is None and self.device.platform == "gpu":
            self._gpu_reader = gpu_utilization_reader(getattr(self.device, "local_hardware_id", 0) or 0)
        self._kids, self._kids_at = {}, -math.inf
        self.t0 = time.perf_counter()

    def _children_cpu(self, now: float) -> float:
        if now - self._kids_at >= self.children_refresh:
            self._kids_at = now
            with contextlib.suppress(psutil.Error):
                for kid in self._proc.children(recursive=True):
                    if kid.pid not in self._kids:
                        with contextlib.suppress(psutil.Error):
                            kid.cpu_percent(None)  # prime: it counts from the next reading
                            self._kids[kid.pid] = kid
        total = 0.0
        for pid, kid in list(self._kids.items()):
            try:
                total += kid.cpu_percent(None)
            except psutil.Error:  # the child exited
                del self._kids[pid]
        return total

    def sample_once(self) -> Sample:
        """Take one reading now (the background thread calls this every interval)."""
        if self.t0 is None:
            self._prime()
        now = time.perf_counter()
        with self._proc.oneshot():
            process_cpu = self._proc.cpu_percent(None)
            rss = self._proc.memory_info().rss
        cpu_now = psutil.cpu_times()
        system = _system_busy(self._cpu_before, cpu_now)
        self._cpu_before = cpu_now
        mem = device_memory(self.device) if self._has_device_memory else None
        return Sample(
            t=now - self.t0,
            process_cpu=float(process_cpu),
            system_cpu=float(system),
            rss_bytes=int(rss),
            children_cpu=self._children_cpu(now) if self.children else None,
            device_bytes=mem["bytes_in_use"] if mem else None,
            device_peak_bytes=mem["peak_bytes_in_use"] if mem else None,
            gpu_util=self._gpu_reader() if self._gpu_reader else None,
        )

    def sample_cost(self, n: int = 50) -> float:
        """Seconds one reading takes (median of ``n``): the sampler's own CPU cost."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if self.running:
            raise RuntimeError("measure the sample cost while the sampler is stopped")
        self._prime()
        times = []
        for _ in range(n):
            start = time.perf_counter()
            self.sample_once()
            times.append(time.perf_counter() - start)
        self.t0 = None
        return statistics.median(times)

    # -- the thread
    def _run(self) -> None:
        due = time.perf_counter() + self.interval
        try:
            while not self._stop.wait(max(0.0, due - time.perf_counter())):
                sample = self.sample_once()
                with self._lock:
                    self._samples.append(sample)
                due += self.interval
                if due < time.perf_counter():  # fell behind (a busy machine): no burst of catch-up readings
                    due = time.perf_counter() + self.interval
        except BaseException as exc:  # reported by stop(), not lost in the thread
            self.error = exc

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> Sampler:
        """Start sampling in a background thread (daemon: it never keeps Python alive)."""
        if self._thread is not None:
            raise RuntimeError("the sampler is already running")
        with self._lock:
            self._samples = []
        self.error = None
        self._stop.clear()
        self._prime()
        self._thread = threading.Thread(target=self._run, name="scalelab-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[Sample]:
        """Stop the thread, wait for it to end, and return the samples."""
        thread = self._thread
        if thread is None:
            return self.samples
        self._stop.set()
        thread.join(timeout=max(10.0, 10 * self.interval))
        if thread.is_alive():
            raise RuntimeError("the sampler thread did not stop within its timeout")
        self._thread = None
        if self.error is not None:
            raise RuntimeError(f"the sampler failed: {self.error!r}") from self.error
        return self.samples

    @property
    def samples(self) -> list[Sample]:
        """A copy of the samples so far (safe to read while sampling)."""
        with self._lock:
            return list(self._samples)

    def __enter__(self) -> Sampler:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _nonempty(samples: Sequence[Sample]) -> list[Sample]:
    samples = list(samples)
    if not samples:
        raise ValueError("no samples: the sampler ran for less than one interval (or was never started)")
    for s in samples:
        if not isinstance(s, Sample):
            raise TypeError(f"expected Sample objects, got {type(s).__name__}")
    return samples


def summarize(samples: Sequence[Sample]) -> dict[str, Any]:
    """Count, duration, mean and peak CPU, peak memory (bytes) of a list of samples."""
    samples = _nonempty(samples)
    out: dict[str, Any] = {
        "samples": len(samples),
        "seconds": samples[-1].t,
        "process_cpu_mean": float(np.mean([s.process_cpu for s in samples])),
        "process_cpu_max": max(s.process_cpu for s in samples),
        "system_cpu_mean": float(np.mean([s.system_cpu for s in samples])),
        "rss_peak_bytes": max(s.rss_bytes for s in samples),
    }
    for name in ("children_cpu", "device_bytes", "device_peak_bytes", "gpu_util"):
        values = [getattr(s, name) for s in samples if getattr(s, name) is not None]
        out[f"{name}_max"] = max(values) if values else None
    return out


# --------------------------------------------------------------------------- saving


def _parse(name: str, text: str) -> Any:
    if text == "":
        return None
    return int(text) if name in _INT_FIELDS else float(text)


def save_samples(samples: Sequence[Sample], path: str | os.PathLike) -> Path:
    """Write samples to ``path`` atomically: CSV for ``.csv``, JSON for ``.json``.

    Missing values (None) are empty CSV cells / JSON nulls. Floats are written with
    Python's shortest exact representation, so :func:`load_samples` gives back equal samples.
    """
    samples = _nonempty(samples)
    path = Path(path)
    if path.suffix == ".json":
        return io.write_json(path, {"fields": list(FIELDS), "samples": [dataclasses.asdict(s) for s in samples]})
    if path.suffix != ".csv":
        raise ValueError(f"save_samples writes .csv or .json files, got {path.name!r}")
    with io.atomic_open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(FIELDS)
        for s in samples:
            writer.writerow(["" if v is None else repr(v) for v in dataclasses.astuple(s)])
    return path


def load_samples(path: str | os.PathLike) -> list[Sample]:
    """Read samples written by :func:`save_samples`."""
    path = Path(path)
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or "samples" not in data:
            raise ValueError(f"{path} is not a samples file (no 'samples' list)")
        return [Sample(**row) for row in data["samples"]]
    if path.suffix != ".csv":
        raise ValueError(f"load_samples reads .csv or .json files, got {path.name!r}")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if not rows or tuple(rows[0]) != FIELDS:
        raise ValueError(f"{path} does not start with the header {','.join(FIELDS)}")
    return [Sample(**{k: _parse(k, v) for k, v in zip(FIELDS, row, strict=True)}) for row in rows[1:]]


# --------------------------------------------------------------------------- plotting


def _cores() -> int:
    from scalelab import env

    return env.cpu_cores()


def plot_samples(samples: Sequence[Sample], axes: Sequence[Any] | None = None, marks: Sequence[float] = (),
                 info: Any = None, title: str | None = None):
    """CPU (in cores busy) and memory over time; a GPU panel when NVML reported.

    ``marks`` are times (seconds since the sampler started) drawn as dotted lines, e.g.
    the ends of epochs. With ``axes`` given the panels are drawn into them (cleared first).
    """
    from scalelab import plot

    samples = _nonempty(samples)
    has_gpu = any(s.gpu_util is not None for s in samples)
    fig = None
    if axes is None:
        fig, axes = plot.figure(nrows=3 if has_gpu else 2, width=8, height=5.6 if has_gpu else 4.4, sharex=True)
    axes = list(np.atleast_1d(axes))
    for ax in axes:
        ax.clear()
    t = [s.t for s in samples]
    ax = axes[0]
    ax.step(t, [s.process_cpu / 100 for s in samples], where="pre", label="this process")
    if any(s.children_cpu is not None for s in samples):
        ax.step(t, [(s.children_cpu or 0.0) / 100 for s in samples], where="pre", label="child processes")
    cores = _cores()
    ax.step(t, [s.system_cpu / 100 * (psutil.cpu_count() or cores) for s in samples], where="pre",
            color="C2", lw=1, alpha=0.7, label="whole machine (all programs)")
    ax.axhline(cores, color="0.6", ls="--", lw=0.8)
    ax.set(ylabel="CPU cores busy", ylim=(0, cores * 1.1))
    if title:
        ax.set_title(title, fontsize=10, loc="left")
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=7, ncols=3)
    ax = axes[1]
    ax.plot(t, [s.rss_bytes / 2**20 for s in samples], label="resident (host)")
    if any(s.device_bytes is not None for s in samples):
        ax.plot(t, [(s.device_bytes or 0) / 2**20 for s in samples], label="device, in use")
        ax.plot(t, [(s.device_peak_bytes or 0) / 2**20 for s in samples], ":", label="device, peak")
    else:
        ax.text(0.01, 0.05, "device memory: not reported by this backend", transform=ax.transAxes,
                fontsize=7, color="0.4")
    ax.set(ylabel="memory (MiB)", ylim=(0, None))
    ax.legend(loc="lower right", fontsize=7, ncols=3)
    if has_gpu:
        axes[2].plot(t, [s.gpu_util if s.gpu_util is not None else np.nan for s in samples])
        axes[2].set(ylabel="GPU busy (%)", ylim=(0, 105))
    for ax in axes:
        for m in marks:
            ax.axvline(m, color="0.6", ls=":", lw=0.8)
    axes[-1].set_xlabel("seconds since the sampler started")
    if fig is not None:
        plot.label(fig, info)
    return fig or axes[0].figure


def interactive() -> bool:
    """True when a live display makes sense: a Jupyter kernel, and ``SCALELAB_PROGRESS``
    not set to 0 (the tests and headless runs set it, like for the progress bars)."""
    return "ipykernel" in sys.modules and os.environ.get("SCALELAB_PROGRESS", "1") != "0"


class LivePlot(train.Callback):
    """A :func:`scalelab.train.fit` callback that draws a sampler's readings as training runs.

    In an interactive notebook the figure is shown when training starts and redrawn at
    the end of an epoch (at most every ``every`` seconds) through an IPython display
    handle. Elsewhere (headless runs, tests, scripts) nothing is displayed while training
    and one static figure is drawn at the end: ``live_plot.figure``, shown by the notebook
    like any figure made in a cell. Epoch ends are marked on the time axis.
    """

    def __init__(self, sampler: Sampler, live: bool | str = "auto", every: float = 0.5,
                 info: Any = None, title: str | None = None):
        if live not in (True, False, "auto"):
            raise ValueError(f"live must be True, False or 'auto', got {live!r}")
        self.sampler = sampler
        self.live = interactive() if live == "auto" else bool(live)
        self.every = _check_interval(every)
        self.info, self.title = info, title
        self.marks: list[float] = []
        self.figure = None
        self._axes = None
        self._handle = None
        self._drawn_at = -math.inf
        self.redraws = 0

    def _ensure_figure(self) -> None:
        if self.figure is None:
            from scalelab import plot

            self.figure, self._axes = plot.figure(nrows=2, width=8, height=4.4, sharex=True)
            plot.label(self.figure, self.info)

    def draw(self) -> bool:
        """Redraw from the samples so far; False (nothing drawn) while there are none."""
        samples = self.sampler.samples
        if not samples:
            return False
        self._ensure_figure()
        plot_samples(samples, axes=self._axes, marks=self.marks, title=self.title)
        self.redraws += 1
        self._drawn_at = time.perf_counter()
        return True

    def on_train_begin(self, trainer, config):
        self.marks = []
        if self.live:
            from IPython.display import display

            from scalelab import plot

            self._ensure_figure()
            plot.plt.close(self.figure)  # shown through the handle only, not again at the end of the cell
            self._handle = display(self.figure, display_id=True)

    def on_epoch_end(self, trainer, epoch, metrics):
        if self.sampler.t0 is not None:
            self.marks.append(time.perf_counter() - self.sampler.t0)
        if self.live and time.perf_counter() - self._drawn_at >= self.every and self.draw():
            self._handle.update(self.figure)
        return False

    def on_train_end(self, trainer, history):
        if self.draw() and self.live and self._handle is not None:
            self._handle.update(self.figure)


# --------------------------------------------------------------------------- overhead


def _robust_spread(values: Sequence[float]) -> float:
    """Median absolute deviation scaled to a standard deviation, relative to the median."""
    med = statistics.median(values)
    if med == 0:
        return 0.0
    return 1.4826 * statistics.median(abs(v - med) for v in values) / med


@dataclasses.dataclass(frozen=True)
class Overhead:
    """Step times with and without the sampler (seconds per step), one pair per repeat.

    The two runs of a pair are back to back, so the ratio within a pair is little
    affected by the slow drifts of a shared machine; the overhead is the median ratio.
    """

    off_s: tuple[float, ...]
    on_s: tuple[float, ...]
    interval: float
    steps_per_repeat: int
    samples: int
    sample_cost_s: float

    @property
    def median_off(self) -> float:
        return statistics.median(self.off_s)

    @property
    def median_on(self) -> float:
        return statistics.median(self.on_s)

    @property
    def ratios(self) -> list[float]:
        return [on / off for on, off in zip(self.on_s, self.off_s, strict=True)]

    @property
    def fraction(self) -> float:
        """Relative slow-down of a step: median over pairs of (with / without) - 1.
        It can come out below zero: that is noise."""
        return statistics.median(self.ratios) - 1.0

    @property
    def noise(self) -> float:
        """Standard error of :attr:`fraction`, from the spread of the pair ratios
        (robust standard deviation x 1.25 / sqrt(pairs), the standard error of a median)."""
        r = self.ratios
        if len(r) < 2:
            return float("nan")
        med = statistics.median(r)
        mad = statistics.median(abs(v - med) for v in r)
        return 1.2533 * 1.4826 * mad / math.sqrt(len(r))

    @property
    def fraction_best(self) -> float:
        """Best with / best without - 1: interference from other programs only ever slows a
        run down, so the fastest runs are the least disturbed (the ``timeit`` convention)."""
        return min(self.on_s) / min(self.off_s) - 1.0

    @property
    def expected(self) -> float:
        """The sampler's CPU time per second of work: one reading's cost / interval."""
        return self.sample_cost_s / self.interval

    def as_dict(self) -> dict[str, Any]:
        return {"interval_s": self.interval, "pairs": len(self.off_s), "steps_per_repeat": self.steps_per_repeat,
                "step_s_without": self.median_off, "step_s_with": self.median_on,
                "step_s_without_all": list(self.off_s), "step_s_with_all": list(self.on_s),
                "fraction": self.fraction, "noise_fraction": self.noise, "fraction_best": self.fraction_best,
                "samples_taken": self.samples,
                "sample_cost_s": self.sample_cost_s, "expected_fraction": self.expected}


def _time_call(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def measure_overhead(run: Callable[[], Any], steps: int, repeats: int = 8, interval: float = 0.1,
                     **sampler_kwargs: Any) -> Overhead:
    """Seconds per step of ``run`` (which does ``steps`` steps and returns something to
    block on) with and without a :class:`Sampler` running, ``repeats`` pairs.

    The order within a pair alternates (off/on, then on/off, ...) so that a slow drift of
    the machine affects both conditions equally; the sampler is started before and
    stopped after the timed part, so only its running cost is measured.
    """
    interval = _check_interval(interval)
    if steps < 1 or repeats < 1:
        raise ValueError(f"steps and repeats must be >= 1, got {steps}, {repeats}")
    _time_call(run)  # warm-up: compilation, caches
    off, on, taken = [], [], 0
    for i in range(repeats):
        for sampling in ((False, True) if i % 2 == 0 else (True, False)):
            if sampling:
                with Sampler(interval, **sampler_kwargs) as sampler:
                    on.append(_time_call(run) / steps)
                taken += len(sampler.samples)
            else:
                off.append(_time_call(run) / steps)
    cost = Sampler(interval, **sampler_kwargs).sample_cost()
    return Overhead(tuple(off), tuple(on), interval, steps, taken, cost)


def steps_for(step: Callable[[], Any], seconds: float, block_every: int = 10, trials: int = 3) -> int:
    """How many calls of ``step`` last at least about ``seconds`` (a multiple of
    ``block_every``), from the fastest of ``trials`` timings of ``block_every`` calls: on a
    machine whose load changes, the count then errs towards runs that are too long."""
    _time_call(step)
    per_step = math.inf
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(block_every - 1):
            step()
        jax.block_until_ready(step())
        per_step = min(per_step, (time.perf_counter() - start) / block_every)
    return max(block_every, math.ceil(seconds / max(per_step, 1e-9) / block_every) * block_every)


def repeat_steps(step: Callable[[], Any], steps: int, block_every: int = 10) -> Callable[[], Any]:
    """A function running ``steps`` calls of ``step``, waiting for the result every
    ``block_every`` calls (never let too many steps queue up; see PITFALLS)."""
    def run():
        out = None
        for i in range(steps):
            out = step()
            if (i + 1) % block_every == 0:
                jax.block_until_ready(out)
        return out

    return run


# --------------------------------------------------------------------------- profiling


def trace_files(logdir: str | os.PathLike) -> list[dict[str, Any]]:
    """Files under ``logdir`` (paths relative to it, sizes in bytes), sorted by path."""
    root = Path(logdir)
    return [{"file": p.relative_to(root).as_posix(), "bytes": p.stat().st_size}
            for p in sorted(root.rglob("*")) if p.is_file()]


def profile_steps(step: Callable[[], Any], steps: int, logdir: str | os.PathLike,
                  perfetto: bool = True) -> list[dict[str, Any]]:
    """Record a ``jax.profiler`` trace of ``steps`` calls of ``step`` into ``logdir``.

    One warm-up call runs first, outside the trace, so compilation does not fill it.
    Each step is annotated (``StepTraceAnnotation``), which XProf uses for its step view.
    Returns the files this trace wrote (relative to ``logdir``): an ``.xplane.pb`` that
    TensorBoard's profile plugin / XProf reads (``xprof --logdir LOGDIR``) and, with
    ``perfetto``, a ``perfetto_trace.json.gz`` for https://ui.perfetto.dev. Each row also
    has ``shown``: the path with the run's folder as ``RUN`` and this machine's host name
    (which the profiler puts in file names) as ``HOST``, for printing.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    logdir = Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    before = {f["file"] for f in trace_files(logdir)}
    jax.block_until_ready(step())
    with jax.profiler.trace(str(logdir), create_perfetto_trace=perfetto):
        for i in range(steps):
            with jax.profiler.StepTraceAnnotation("train", step_num=i):
                jax.block_until_ready(step())
    return [f | {"shown": _shown_path(f["file"])} for f in trace_files(logdir) if f["file"] not in before]


def _shown_path(file: str) -> str:
    """``file`` (relative to a trace's logdir) as it may be shown: the run's timestamp folder
    becomes ``RUN`` and the host name the profiler puts in file names becomes ``HOST``."""
    import socket

    parts = file.split("/")
    if len(parts) >= 4 and parts[0] == "plugins" and parts[1] == "profile":
        parts[2] = "RUN"
    host = socket.gethostname()
    name = parts[-1]
    if host and name.startswith(host + "."):
        parts[-1] = "HOST" + name[len(host):]
    return "/".join(parts)


def _load_trace(path: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        data = json.load(handle)
    return data["traceEvents"] if isinstance(data, dict) else data


def trace_summary(path: str | os.PathLike, top: int = 8, python: bool = False) -> list[dict[str, Any]]:
    """The events that took the most time in a Chrome/Perfetto JSON trace (``.json.gz``):
    total milliseconds and count per event name, largest first. Python function events
    (named ``$file:line function`` by JAX's Python tracer) are left out unless ``python``."""
    total: dict[str, list[float]] = {}
    for e in _load_trace(path):
        if e.get("ph") == "X" and "dur" in e and (python or not str(e.get("name", "")).startswith("$")):
            total.setdefault(e.get("name", "?"), []).append(float(e["dur"]) / 1e3)
    rows = [{"event": k, "total ms": sum(v), "count": len(v)} for k, v in total.items()]
    return sorted(rows, key=lambda r: -r["total ms"])[:top]


@dataclasses.dataclass(frozen=True)
class TraceEvent:
    """One complete event of a profiler trace: on which thread, when (ms since the trace's
    first event), how long, its category (:data:`TRACE_CATEGORIES`) and its nesting depth
    on its thread (0 = not inside another event)."""

    thread: str
    name: str
    start_ms: float
    dur_ms: float
    category: str
    depth: int

    @property
    def end_ms(self) -> float:
        return self.start_ms + self.dur_ms


#: What :func:`trace_events` calls each kind of event, with its colour in :func:`plot_trace`.
TRACE_CATEGORIES: dict[str, tuple[str, str]] = {
    "step": ("step annotation (StepTraceAnnotation)", "0.85"),
    "dispatch": ("dispatch of the jitted call (PjitFunction)", "C1"),
    "program": ("XLA program run (ThunkExecutor; XlaModule on GPU)", "C0"),
    "kernel": ("operation / kernel (fusion, convolution, dot, ...)", "C3"),
    "runtime": ("runtime: transfers, waits, buffer bookkeeping", "C2"),
    "python": ("Python function (JAX's Python tracer)", "C7"),
}
_IGNORED_EVENTS = ("ThreadpoolListener::",)


def _category(name: str, step_name: str) -> str | None:
    if name == step_name:
        return "step"
    if name.startswith("$"):
        return "python"
    if name.startswith(_IGNORED_EVENTS) or name.startswith("end: "):
        return None
    if name.startswith("PjitFunction"):
        return "dispatch"
    if name.startswith(("ThunkExecutor", "XlaModule")):
        return "program"
    if name.startswith(("Wait for", "DevicePut", "CommonPjRt", "PjRt", "PythonRefManager", "ParseArguments", "Handle ",
                        "Allocate", "BufferFromPyval", "Transfer", "Memcpy", "cuStream", "cuLaunch", "cuda")):
        return "runtime"
    return "kernel"


def _thread_label(name: str) -> str:
    """``tf_XLAEigen/7681918819057525880`` -> ``XLAEigen`` (numbered later if repeated)."""
    base = name.split("/")[0] if "/" in name and name.split("/")[-1].lstrip("-").isdigit() else name
    return base.removeprefix("tf_") or "?"


def trace_events(path: str | os.PathLike, step_name: str = "train", python: bool = False) -> list[TraceEvent]:
    """The complete (``"ph": "X"``) events of a Chrome/Perfetto JSON trace, one
    :class:`TraceEvent` each, sorted by thread and start time.

    Threads are named from the trace's ``thread_name`` metadata (numeric suffixes dropped,
    repeated names numbered: ``XLAEigen #1``, ``XLAEigen #2``; a process's threads are
    prefixed by its name when the trace has several processes, e.g. a GPU's streams).
    Thread-pool bookkeeping events are left out, and Python function events unless
    ``python``. Times are milliseconds since the trace's first kept event.
    """
    raw = _load_trace(path)
    thread_names: dict[tuple[Any, Any], str] = {}
    sort_index: dict[tuple[Any, Any], float] = {}
    process_names: dict[Any, str] = {}
    for e in raw:
        if e.get("ph") != "M":
            continue
        key = (e.get("pid"), e.get("tid"))
        args = e.get("args") or {}
        if e.get("name") == "thread_name":
            thread_names[key] = str(args.get("name", "?"))
        elif e.get("name") == "thread_sort_index":
            sort_index[key] = float(args.get("sort_index", 0))
        elif e.get("name") == "process_name":
            process_names[e.get("pid")] = str(args.get("name", "?"))
    kept: list[tuple[tuple[Any, Any], str, float, float, str]] = []
    for e in raw:
        if e.get("ph") != "X" or "dur" not in e or "ts" not in e:
            continue
        name = str(e.get("name", "?"))
        category = _category(name, step_name)
        if category is None or (category == "python" and not python):
            continue
        kept.append(((e.get("pid"), e.get("tid")), name, float(e["ts"]), float(e["dur"]), category))
    if not kept:
        return []
    t0 = min(k[2] for k in kept)
    keys = sorted({k[0] for k in kept}, key=lambda key: (str(key[0]), sort_index.get(key, math.inf), str(key[1])))
    several = len({key[0] for key in keys}) > 1
    labels: dict[tuple[Any, Any], str] = {}
    counts: dict[str, int] = {}
    for key in keys:
        base = _thread_label(thread_names.get(key, f"thread {key[1]}"))
        if several:
            base = f"{process_names.get(key[0], key[0])}: {base}"
        counts[base] = counts.get(base, 0) + 1
        labels[key] = base
    seen: dict[str, int] = {}
    for key in keys:
        base = labels[key]
        if counts[base] > 1:
            seen[base] = seen.get(base, 0) + 1
            labels[key] = f"{base} #{seen[base]}"
    out: list[TraceEvent] = []
    order = {key: i for i, key in enumerate(keys)}
    kept.sort(key=lambda k: (order[k[0]], k[2], -k[3]))
    stack: list[float] = []
    current = None
    for key, name, ts, dur, category in kept:
        if key != current:
            current, stack = key, []
        while stack and stack[-1] <= ts:
            stack.pop()
        out.append(TraceEvent(labels[key], name, (ts - t0) / 1e3, dur / 1e3, category,
                              0 if category == "step" else len(stack)))
        if category != "step":  # steps shade the background; the depth counts the events inside them
            stack.append(ts + dur)
    return out


def trace_threads(events: Sequence[TraceEvent]) -> list[dict[str, Any]]:
    """Per thread (in the order of ``events``): milliseconds inside top-level events (the
    thread's busy time, steps left out), and the number and total milliseconds of its
    kernel events."""
    rows: dict[str, dict[str, Any]] = {}
    for e in events:
        row = rows.setdefault(e.thread, {"thread": e.thread, "busy ms": 0.0, "kernels": 0, "kernel ms": 0.0})
        if e.category == "step":
            continue
        if e.depth == 0:
            row["busy ms"] += e.dur_ms
        if e.category == "kernel":
            row["kernels"] += 1
            row["kernel ms"] += e.dur_ms
    return list(rows.values())


def plot_trace(events: Sequence[TraceEvent], info: Any = None, title: str | None = None,
               lanes: int = 3, window: tuple[float, float] | None = None):
    """A timeline (Gantt chart) of a profiler trace: one row per thread, time to the right,
    each event a bar coloured by its category. Nested events are drawn in thinner lanes
    under their parent (at most ``lanes`` levels; deeper ones share the last lane). The
    steps (``step`` events) shade the background, so each step's work lines up across the
    threads. ``window`` crops the time axis (ms)."""
    from matplotlib.patches import Patch

    from scalelab import plot

    events = list(events)
    if not events:
        raise ValueError("no trace events to plot")
    if lanes < 1:
        raise ValueError(f"lanes must be >= 1, got {lanes}")
    threads = list(dict.fromkeys(e.thread for e in events))
    fig, ax = plot.figure(width=9.5, height=1.2 + 0.42 * len(threads))
    steps = sorted((e for e in events if e.category == "step"), key=lambda e: e.start_ms)
    for i, s in enumerate(steps):
        ax.axvspan(s.start_ms, s.end_ms, color="0.93" if i % 2 == 0 else "0.86", zorder=0)
        ax.text(s.start_ms, -0.75, f"step {i}", fontsize=7, color="0.35", va="bottom")
    lane_h = 0.8 / lanes
    by_cat: dict[str, list[tuple[float, float, float]]] = {}
    for e in events:
        if e.category == "step":
            continue
        row = threads.index(e.thread)
        lane = min(e.depth, lanes - 1)
        y = row - 0.4 + lane * lane_h
        by_cat.setdefault(e.category, []).append((e.start_ms, max(e.dur_ms, 1e-3), y))
    for cat, bars in by_cat.items():
        colour = TRACE_CATEGORIES[cat][1]
        for y in sorted({b[2] for b in bars}):
            ax.broken_barh([(b[0], b[1]) for b in bars if b[2] == y], (y, lane_h * 0.92),
                           facecolors=colour, edgecolor="none")
    ax.set_yticks(range(len(threads)), threads, fontsize=8)
    ax.set_ylim(len(threads) - 0.4, -0.8)
    if window is not None:
        ax.set_xlim(*window)
    elif steps:
        ax.set_xlim(steps[0].start_ms - 0.02 * (steps[-1].end_ms - steps[0].start_ms), steps[-1].end_ms * 1.01)
    ax.set_xlabel("ms since the trace started")
    used = [c for c in TRACE_CATEGORIES if c in by_cat or (c == "step" and steps)]
    fig.legend(handles=[Patch(color=TRACE_CATEGORIES[c][1], label=TRACE_CATEGORIES[c][0]) for c in used],
               loc="outside upper center", ncols=min(3, len(used)), fontsize=7)
    if title:
        ax.set_title(title, fontsize=10, loc="left")
    plot.label(fig, info)
    return fig


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """Seconds of one step: getting the batch, dispatching the step (the call returns as
    soon as the work is queued, after tracing and compiling on the first call), and
    waiting for the device to finish (``block_until_ready``)."""

    input_s: float
    dispatch_s: float
    device_s: float

    @property
    def total_s(self) -> float:
        return self.input_s + self.dispatch_s + self.device_s


PARTS = ("input_s", "dispatch_s", "device_s")


class StepTimer:
    """Split each training step into input wait, dispatch and device time.

    ``step(batches, fn)`` takes the next batch from the iterator, calls ``fn(*batch)`` and
    waits for its result, timing the three phases. Waiting on every step removes the
    overlap of dispatch and compute that asynchronous dispatch normally gives, so this
    is a diagnosis tool, not a throughput measurement. ``clock`` and ``block`` can be
    replaced (the tests use a fake clock).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter,
                 block: Callable[[Any], Any] = jax.block_until_ready):
        self.clock, self.block = clock, block
        self.records: list[StepRecord] = []

    def step(self, batches: Iterator[Any], fn: Callable[..., Any]) -> Any:
        t0 = self.clock()
        batch = next(batches)
        t1 = self.clock()
        out = fn(*batch)
        t2 = self.clock()
        self.block(out)
        t3 = self.clock()
        self.records.append(StepRecord(t1 - t0, t2 - t1, t3 - t2))
        return out

    def run(self, batches: Iterable[Any], fn: Callable[..., Any], steps: int) -> list[StepRecord]:
        """Time ``steps`` steps; returns their records."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        it = iter(batches)
        first = len(self.records)
        for _ in range(steps):
            try:
                self.step(it, fn)
            except StopIteration:
                raise ValueError(f"the batches ran out after {len(self.records) - first} of {steps} steps") from None
        return self.records[first:]

    def totals(self) -> dict[str, float]:
        """Seconds spent in each phase over all steps, and their sum ``total_s``."""
        if not self.records:
            raise ValueError("no steps recorded")
        out = {p: sum(getattr(r, p) for r in self.records) for p in PARTS}
        out["total_s"] = sum(r.total_s for r in self.records)
        return out

    def breakdown(self) -> dict[str, Any]:
        """The first step, the steady state (median of each phase over the later steps)
        and the compile estimate: the first step's dispatch + device time minus the steady
        state's (the first call traces and compiles before it dispatches)."""
        if len(self.records) < 2:
            raise ValueError(f"need at least 2 steps (the first compiles), got {len(self.records)}")
        first = self.records[0]
        rest = self.records[1:]
        steady = {p: statistics.median(getattr(r, p) for r in rest) for p in PARTS}
        steady["total_s"] = sum(steady[p] for p in PARTS)
        compile_s = max(0.0, first.dispatch_s + first.device_s - steady["dispatch_s"] - steady["device_s"])
        return {"first": dataclasses.asdict(first) | {"total_s": first.total_s}, "steady": steady,
                "compile_s": compile_s, "steps": len(self.records)}


def slow_input(batches: Iterable[Any], seconds: float) -> Iterator[Any]:
    """The batches, each after ``seconds`` of waiting: an emulated slow input pipeline
    (like chapter 04's emulated step, it occupies no core)."""
    if seconds < 0:
        raise ValueError(f"seconds must be >= 0, got {seconds}")
    for batch in batches:
        time.sleep(seconds)
        yield batch


PART_COLORS = {"input_s": "C0", "compile": "C4", "dispatch_s": "C1", "device_s": "C3"}
PART_LABELS = {"input_s": "input wait", "compile": "compile (first call)", "dispatch_s": "dispatch",
               "device_s": "device compute (wait)"}


def plot_step_breakdown(breakdowns: dict[str, dict[str, Any]], info: Any = None):
    """Stacked bars: the first step (compile included) and the steady-state step of each
    variant, in two panels (seconds and milliseconds: they differ by orders of magnitude)."""
    from scalelab import plot

    if not breakdowns:
        raise ValueError("no breakdowns to plot")
    fig, (ax1, ax2) = plot.figure(ncols=2, width=9.5, height=3.6, gridspec_kw={"width_ratios": [1, 2]})
    names = list(breakdowns)
    for i, name in enumerate(names):
        b = breakdowns[name]
        first = b["first"]
        parts = [("input_s", first["input_s"]), ("compile", b["compile_s"]),
                 ("dispatch_s", max(0.0, first["dispatch_s"] - b["compile_s"])),
                 ("device_s", first["device_s"] if first["dispatch_s"] >= b["compile_s"]
                  else first["device_s"] + first["dispatch_s"] - b["compile_s"])]
        bottom = 0.0
        for part, value in parts:
            ax1.bar(i, value, bottom=bottom, color=PART_COLORS[part], label=PART_LABELS[part] if i == 0 else None)
            bottom += value
        bottom = 0.0
        for part in PARTS:
            value = 1e3 * b["steady"][part]
            ax2.bar(i, value, bottom=bottom, color=PART_COLORS[part], label=PART_LABELS[part] if i == 0 else None)
            bottom += value
    ax1.set_xticks(range(len(names)), names, fontsize=8)
    ax2.set_xticks(range(len(names)), names, fontsize=8)
    ax1.set(ylabel="seconds", title="First step")
    ax2.set(ylabel="milliseconds", title="Steady-state step (median)")
    handles, labels = ax1.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncols=len(labels), fontsize=8)
    plot.label(fig, info)
    return fig


# --------------------------------------------------------------------------- interleaving


@dataclasses.dataclass
class PipelineRun:
    """One input-pipeline run watched by a sampler: the stage timeline (cropped to the
    steady part), the samples in the same window, and what they add up to."""

    name: str
    timeline: Any
    samples: list[Sample]
    offset: float  # seconds from the timeline's first event to the sampler's start
    seconds_per_batch: float
    compute_busy: float  # fraction of the window the (emulated) accelerator computed
    host_cores: float  # mean cores busy in this process and its children


def busy_fraction(timeline: Any, stage: str, start: float, end: float) -> float:
    """Fraction of ``[start, end]`` covered by events of ``stage`` (overlaps counted once)."""
    if end <= start:
        raise ValueError(f"need end > start, got {start}, {end}")
    spans = sorted((max(e.start, start), min(e.end, end)) for e in timeline.events
                   if e.stage == stage and e.end > start and e.start < end)
    covered, cur_start, cur_end = 0.0, None, None
    for s, e in spans:
        if cur_end is None or s > cur_end:
            if cur_end is not None:
                covered += cur_end - cur_start
            cur_start, cur_end = s, e
        else:
            cur_end = max(cur_end, e)
    if cur_end is not None:
        covered += cur_end - cur_start
    return covered / (end - start)


def _crop(timeline: Any, start: float, end: float):
    from scalelab import pipeline as pl

    out = pl.Timeline()
    out.extend([e for e in timeline.events if e.start >= start and e.end <= end])
    return out


def _watched(name: str, timeline: Any, sampler: Sampler, start: float, end: float, batches: int) -> PipelineRun:
    cropped = _crop(timeline, start, end)
    events = cropped.events
    t_first = events[0].start if events else start
    samples = [s for s in sampler.samples if start <= sampler.t0 + s.t <= end + sampler.interval]
    host = [(s.process_cpu + (s.children_cpu or 0.0)) / 100 for s in samples]
    return PipelineRun(name, cropped, samples, sampler.t0 - t_first, (end - start) / batches,
                       busy_fraction(timeline, "compute", start, end), float(np.mean(host)) if host else float("nan"))


def pipeline_utilisation(source: Any, augment: Any, load: Callable[[Any], Any], step: Callable[[Any], Any],
                         batches: int, workers: int, interval: float = 0.025, skip: int = 3,
                         prefetch: int = 2, blas_threads: int | None = 1) -> dict[str, PipelineRun]:
    """Run chapter 04's sequential loop and its overlapped :class:`~scalelab.pipeline.Pipeline`
    with a sampler reading this process's and its workers' CPU; keep ``batches`` batches
    of each.

    The overlapped run leaves out its first ``skip`` batches (worker start-up) and runs
    ``workers + 3 x prefetch`` batches past the window, because the producers hand their
    timeline events over only when a batch leaves their queue: without the extra batches
    the workers' last bars would be missing. So the source must hold at least
    ``skip + batches + 2 x (workers + 3 x prefetch)`` batches (the producers also run that
    far ahead), or the producers idle at the end of the data, which is not the steady state.

    The sequential run limits NumPy's BLAS to ``blas_threads`` threads, like the
    pipeline's worker processes do: OpenBLAS's idle helper threads otherwise spin-wait for
    about 0.1 s after each call, and the CPU trace would show a busy core while the
    "accelerator" computes and the host does nothing useful.
    """
    from threadpoolctl import threadpool_limits

    from scalelab import pipeline as pl

    if batches < 2 or skip < 0:
        raise ValueError(f"need batches >= 2 and skip >= 0, got {batches}, {skip}")
    extra = workers + 3 * prefetch
    needed = skip + batches + 2 * extra
    if len(source) < needed:
        raise ValueError(f"the source has {len(source)} batches; {needed} are needed for {batches} batches "
                         f"in the steady state (skip={skip}, workers={workers}, prefetch={prefetch})")
    runs = {}
    tl = pl.Timeline()
    with threadpool_limits(blas_threads):
        pl.run_sequential(source, augment, load, step, 1)  # warm-up: file open, first transfer
        with Sampler(interval, children=True, gpu=False) as sampler:
            start = time.perf_counter()
            pl.run_sequential(source, augment, load, step, batches, timeline=tl)
            end = time.perf_counter()
    runs["sequential"] = _watched("sequential", tl, sampler, start, end, batches)
    tl = pl.Timeline()
    with Sampler(interval, children=True, children_refresh=0.25, gpu=False) as sampler, \
            pl.Pipeline(source, augment, load, workers=workers, prefetch=prefetch, timeline=tl) as pipe:
        pl.consume(iter(pipe), step, skip + batches + extra, timeline=tl, skip=skip)
    computes = sorted((e for e in tl.events if e.stage == "compute"), key=lambda e: e.start)
    start, end = computes[skip].start, computes[skip + batches - 1].end
    label = f"overlapped ({workers} worker{'s' if workers != 1 else ''})" if workers else "overlapped (1 thread)"
    runs["overlapped"] = _watched(label, tl, sampler, start, end, batches)
    return runs


def cpu_by_stage(run: PipelineRun, stage: str = "compute", interval: float = 0.025,
                 threshold: float = 0.5) -> dict[str, float]:
    """Mean host CPU (cores, this process + its workers) over the readings taken while
    ``stage`` ran and over the others.

    A reading covers the ``interval`` before it; it counts as "during ``stage``" when events
    of that stage cover at least ``threshold`` of its window. ``nan`` where no reading
    qualifies."""
    events = run.timeline.events
    if not events or not run.samples:
        raise ValueError(f"the run {run.name!r} has no events or no samples")
    t_first = events[0].start
    inside, outside = [], []
    for s in run.samples:
        end = t_first + run.offset + s.t
        cores = (s.process_cpu + (s.children_cpu or 0.0)) / 100
        (inside if busy_fraction(run.timeline, stage, end - interval, end) >= threshold else outside).append(cores)
    mean = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
    return {"during": mean(inside), "otherwise": mean(outside), "readings_during": len(inside),
            "readings_otherwise": len(outside)}


def plot_utilisation(runs: dict[str, PipelineRun], info: Any = None):
    """Side by side, one column per run: chapter 04's stage timeline above, the host CPU
    (this process + its worker processes, in cores) below, on the same time axis."""
    from scalelab import pipeline as pl
    from scalelab import plot

    cols = len(runs)
    fig, axes = plot.figure(ncols=cols, nrows=2, width=5.2 * cols, height=5.8,
                            gridspec_kw={"height_ratios": [3, 2]}, squeeze=False)
    cores = _cores()
    for j, run in enumerate(runs.values()):
        top, bottom = axes[0][j], axes[1][j]
        pl.plot_timeline(run.timeline, f"{run.name}: {run.seconds_per_batch * 1e3:.0f} ms per batch", ax=top)
        handles, labels = top.get_legend_handles_labels()
        legend = top.get_legend()
        if legend is not None:
            handles, labels = legend.legend_handles, [t.get_text() for t in legend.get_texts()]
            legend.remove()
        t = [(run.offset + s.t) * 1e3 for s in run.samples]
        bottom.step(t, [s.process_cpu / 100 for s in run.samples], where="pre", label="main process")
        bottom.step(t, [(s.children_cpu or 0.0) / 100 for s in run.samples], where="pre", label="worker processes")
        bottom.axhline(cores, color="k", ls="--", lw=0.8)
        bottom.set(xlabel="time (ms)", ylabel="CPU cores busy", ylim=(0, cores + 0.5))
        bottom.set_title(f"accelerator (compute) busy {run.compute_busy:.0%} | host CPU mean "
                         f"{run.host_cores:.2f} of {cores} cores", fontsize=9, loc="left")
        bottom.set_xlim(top.get_xlim())
        bottom.legend(fontsize=7, loc="upper right")
    fig.legend(handles, labels, loc="outside upper center", ncols=len(labels), fontsize=8)
    plot.label(fig, info)
    return fig


# --------------------------------------------------------------------------- FLOPs and step time


def _pure_train_step(graphdef: Any) -> Callable:
    """The chapter-05 training step as a pure function of the (model, optimiser) state."""

    def step(state, x, y):
        model, optimizer = nnx.merge(graphdef, state)
        metrics = train.train_step(model, optimizer, x, y)
        return nnx.state((model, optimizer)), metrics

    return step


def _abstract_batch(batch: int, features: int) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
    if batch < 1 or features < 1:
        raise ValueError(f"batch and features must be >= 1, got {batch}, {features}")
    return jax.ShapeDtypeStruct((batch, features), jnp.float32), jax.ShapeDtypeStruct((batch,), jnp.int32)


def train_step_flops(make_model: Callable[[], nnx.Module], batch: int, features: int,
                     tx: optax.GradientTransformation | None = None) -> float:
    """FLOPs of one training step (forward, backward, Adam update) from XLA's cost analysis.

    The model is only traced (``nnx.eval_shape``), never allocated, so this works for
    models far larger than the machine could train.
    """
    tx = tx or optax.adam(1e-3)

    def build():
        model = make_model()
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    graphdef, state = nnx.split(nnx.eval_shape(build))
    return memory.flops_of(jax.jit(_pure_train_step(graphdef)).lower(state, *_abstract_batch(batch, features)).compile())


class CompiledStep:
    """The chapter-05 training step for one batch shape, compiled ahead of time.

    ``flops`` comes from XLA's cost analysis of the compiled program and ``compile_s``
    is the time to lower and compile it; calling the object runs one step on a fixed
    random batch (the state is kept between calls) and returns the loss.
    """

    def __init__(self, model: nnx.Module, batch: int, features: int, classes: int = 10,
                 tx: optax.GradientTransformation | None = None, seed: int = 0):
        x, y = _abstract_batch(batch, features)
        graphdef, self.state = nnx.split((model, nnx.Optimizer(model, tx or optax.adam(1e-3), wrt=nnx.Param)))
        start = time.perf_counter()
        self._compiled = jax.jit(_pure_train_step(graphdef)).lower(self.state, x, y).compile()
        self.compile_s = time.perf_counter() - start
        self.flops = memory.flops_of(self._compiled)
        self.batch = batch
        rng = np.random.default_rng(seed)
        self.x = jnp.asarray(rng.random((batch, features), dtype=np.float32))
        self.y = jnp.asarray(rng.integers(0, classes, batch, dtype=np.int32))

    def __call__(self) -> jax.Array:
        self.state, metrics = self._compiled(self.state, self.x, self.y)
        return metrics["loss"]


# --------------------------------------------------------------------------- utilisation (MFU, HFU)


@dataclasses.dataclass(frozen=True)
class DevicePeak:
    """The peak FLOP/s a utilisation is measured against, and where it comes from.

    ``estimated`` is True for a CPU (:func:`scalelab.hardware.estimate_peak`: cores x clock x
    FLOPs per cycle, an estimate, not a published figure) and False for a published spec
    (:data:`scalelab.hardware.SPECS`). ``flops`` is None where neither is known.
    """

    device: str
    dtype: str
    flops: float | None
    estimated: bool
    source: str


#: Substrings of a JAX ``device_kind`` (lower case) and the spec they stand for. The SXM
#: figures are used for any form factor (PCIe parts run lower clocks: their peak is lower).
SPEC_FOR_DEVICE_KIND: tuple[tuple[str, str], ...] = (
    ("h200", "NVIDIA H200 SXM"), ("h100", "NVIDIA H100 SXM"), ("a100", "NVIDIA A100 SXM 80GB"),
    ("b200", "NVIDIA B200 (HGX)"), ("v100", "NVIDIA V100 SXM2"), ("v6", "TPU v6e (Trillium)"),
    ("v5 lite", "TPU v5e"), ("v5e", "TPU v5e"), ("v5p", "TPU v5p"), ("v4", "TPU v4"),
)


def device_peak(device: Any = None, dtype: str = "float32") -> DevicePeak:
    """The peak FLOP/s of ``device`` (default: the first local one) for matmuls in ``dtype``
    at JAX's default precision.

    - CPU: :func:`scalelab.hardware.estimate_peak` of this processor (all the cores this
      process may use: XLA's CPU backend spreads a program over them, also when the
      devices are simulated); float32, or its bf16 figure for 16-bit types;
    - GPU/TPU: the published spec whose name matches the device kind
      (:data:`SPEC_FOR_DEVICE_KIND`); float32 at default precision is TF32 on NVIDIA
      tensor cores (Ampere and later) and one bfloat16 pass on TPUs, so those peaks apply.
    """
    from scalelab import hardware

    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    device = device if device is not None else jax.local_devices()[0]
    kind = str(getattr(device, "device_kind", device.platform))
    if device.platform == "cpu":
        est = hardware.estimate_peak(hardware.cpu_info())
        flops = est.fp32 if dtype == "float32" else (est.bf16 or est.fp32)
        return DevicePeak(kind, dtype, flops, True,
                          f"estimate: {est.cores} cores x {est.clock_ghz or 0:.2f} GHz ({est.clock_source}) x "
                          f"{est.flops_per_cycle_fp32} float32 FLOPs/cycle ({est.microarchitecture})"
                          + ("" if dtype == "float32" else ", 16-bit rate"))
    lower = kind.lower()
    for needle, name in SPEC_FOR_DEVICE_KIND:
        if needle in lower:
            spec = next(s for s in hardware.SPECS if s.name == name)
            if dtype == "float32" and device.platform == "gpu":
                flops, what = spec.peak_tf32 or spec.peak_fp32, "TF32 dense" if spec.peak_tf32 else "fp32"
            else:
                flops, what = spec.peak_16bit, "16-bit dense"
            return DevicePeak(kind, dtype, flops, False, f"published spec of {name} ({what}): {spec.source}")
    return DevicePeak(kind, dtype, None, False, f"no spec listed for {kind!r}")


def utilisation(flops_per_step: float, step_s: float, peak_flops: float) -> float:
    """FLOPs per step / seconds per step / peak FLOP/s. With the model's FLOPs this is the
    **MFU** (model FLOP utilisation); with the FLOPs the hardware executed (recomputation
    included) it is the **HFU** (hardware FLOP utilisation)."""
    for name, value in (("flops_per_step", flops_per_step), ("step_s", step_s), ("peak_flops", peak_flops)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return flops_per_step / step_s / peak_flops


def scanned_flops(variant: str, depth: int, width: int, batch: int) -> dict[str, Any]:
    """FLOPs of one gradient step of the chapter-10 deep MLP (layers in ``lax.scan``) under
    remat ``variant``, from XLA's cost analysis.

    XLA's cost analysis counts a while loop's body **once**, whatever its trip count (a
    scanned model of 2 x ``depth`` layers reports the same FLOPs as one of ``depth``).
    The step is compiled at both depths: where the counts agree, the FLOPs of the step are
    ``depth`` x the count (exact for the layers; the few operations outside the loop, the
    loss's mean, are counted ``depth`` times too, an error of about 1 / (6 x width)); where
    they differ, the backend counted every iteration and the count is used as it is.
    """
    count = memory.flops_of(memory.grad_fn(variant).lower(*memory.shapes(depth, width, batch)).compile())
    deeper = memory.flops_of(memory.grad_fn(variant).lower(*memory.shapes(2 * depth, width, batch)).compile())
    once = math.isclose(count, deeper, rel_tol=1e-9)
    return {"variant": variant, "depth": depth, "counted": count, "counted_at_twice_the_depth": deeper,
            "body_counted_once": once, "flops": count * depth if once else count}


def remat_utilisation(depth: int, width: int, batch: int, repeat: int = 5,
                      peak: DevicePeak | None = None) -> dict[str, Any]:
    """MFU and HFU of the chapter-10 deep MLP's gradient step without remat and with
    per-layer remat (``jax.checkpoint`` on every layer), timed in turns.

    The model's FLOPs are those of the step without remat; the remat step executes more
    (each layer's forward again during the backward pass). MFU divides the model's FLOPs by
    the step time and the peak; HFU divides what the hardware executed."""
    peak = peak or device_peak()
    if not peak.flops:
        raise ValueError(f"no peak FLOP/s for {peak.device}: {peak.source}")
    ws, x = memory.init(depth, width, batch)
    steps = {v: memory.grad_fn(v).lower(ws, x).compile() for v in ("none", "full")}
    flops = {v: scanned_flops(v, depth, width, batch)["flops"] for v in steps}
    times = time_round_robin([lambda c=c: c(ws, x) for c in steps.values()], repeat=repeat)
    t = {v: min(ts) for v, ts in zip(steps, times, strict=True)}
    model = flops["none"]
    return {
        "depth": depth, "width": width, "batch": batch, "repeat": repeat,
        "model_flops": model, "remat_flops": flops["full"], "recompute_ratio": flops["full"] / model,
        "analytic_model_flops": 6 * batch * width * width * depth,
        "step_s": t["none"], "remat_step_s": t["full"], "slowdown": t["full"] / t["none"],
        "mfu": utilisation(model, t["none"], peak.flops),
        "remat_mfu": utilisation(model, t["full"], peak.flops),
        "remat_hfu": utilisation(flops["full"], t["full"], peak.flops),
        "peak_flops": peak.flops, "peak_estimated": peak.estimated, "peak_source": peak.source,
    }


# --------------------------------------------------------------------------- the linear model


@dataclasses.dataclass(frozen=True)
class LinearFit:
    """``seconds = a + b * work``: a fixed cost per step plus a cost per unit of work."""

    a: float
    b: float
    r2: float

    def predict(self, work: float | Sequence[float] | np.ndarray) -> Any:
        w = np.asarray(work, dtype=float)
        out = self.a + self.b * w
        return float(out) if out.ndim == 0 else out


def fit_linear(work: Sequence[float], seconds: Sequence[float]) -> LinearFit:
    """Least-squares fit of ``seconds = a + b * work`` (and its R^2)."""
    w = np.asarray(work, dtype=float)
    t = np.asarray(seconds, dtype=float)
    if w.ndim != 1 or t.ndim != 1 or len(w) != len(t):
        raise ValueError(f"work and seconds must be 1-D of equal length, got shapes {w.shape} and {t.shape}")
    if len(w) < 2 or len(np.unique(w)) < 2:
        raise ValueError(f"a line needs at least 2 distinct work values, got {w.tolist()}")
    if not (np.isfinite(w).all() and np.isfinite(t).all()):
        raise ValueError("work and seconds must be finite numbers")
    design = np.stack([np.ones_like(w), w], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, t, rcond=None)
    residual = float(np.sum((t - (a + b * w)) ** 2))
    spread = float(np.sum((t - t.mean()) ** 2))
    return LinearFit(float(a), float(b), 1.0 - residual / spread if spread > 0 else 1.0)


def relative_error(predicted: float, measured: float) -> float:
    """(predicted - measured) / measured."""
    if measured <= 0 or not math.isfinite(measured) or not math.isfinite(predicted):
        raise ValueError(f"need a finite predicted value and a positive measured one, got {predicted}, {measured}")
    return (predicted - measured) / measured


def mini_model(hidden: int = 512, features: int = 64, classes: int = 10, seed: int = 0) -> nnx.Module:
    """The chapter-05 MLP with two hidden layers of ``hidden`` units: its step time grows
    linearly with the batch on a CPU (the CNN's does not: XLA's convolutions switch
    strategy with the shape)."""
    from scalelab import models

    return models.MLP(features, classes, hidden=(hidden, hidden), rngs=nnx.Rngs(seed))


def _per_call(fn: Callable[[], Any], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        jax.block_until_ready(fn())
    return (time.perf_counter() - start) / number


def _calls_for(fn: Callable[[], Any], min_time: float) -> int:
    """Calls of ``fn`` that last at least ``min_time`` seconds together (a power of 2)."""
    number = 1
    while number < 2**16 and _per_call(fn, number) * number < min_time:
        number *= 2
    return number


def time_round_robin(fns: Sequence[Callable[[], Any]], repeat: int = 5, min_time: float = 0.05,
                     warmup: int = 2) -> list[list[float]]:
    """Seconds per call of each function, ``repeat`` times, taking turns: round ``r`` times
    every function once before round ``r + 1`` starts.

    On a machine whose load changes (other programs, a laptop's clock), taking turns
    spreads the changes over all functions instead of biasing whichever ran during a
    busy spell. Each timing lasts at least ``min_time`` seconds."""
    if repeat < 1 or warmup < 0 or min_time < 0:
        raise ValueError(f"need repeat >= 1, warmup >= 0, min_time >= 0; got {repeat}, {warmup}, {min_time}")
    for fn in fns:
        for _ in range(warmup):
            jax.block_until_ready(fn())
    numbers = [_calls_for(fn, min_time) for fn in fns]
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for fn, number, out in zip(fns, numbers, times, strict=True):
            out.append(_per_call(fn, number))
    return times


def prediction_experiment(sizes: Sequence[int], target: int, repeat: int = 5, hidden: int = 512,
                          features: int = 64) -> dict[str, Any]:
    """"Run a mini version locally first": time the training step at the small batch
    ``sizes``, fit ``seconds = a + b * FLOPs`` (FLOPs from XLA), predict the step at batch
    ``target``, and compare with its measured time.

    All sizes are timed in turns (:func:`time_round_robin`), ``repeat`` rounds; each
    size's time is its best round, the least disturbed by other programs (medians are
    reported beside them)."""
    sizes = [int(s) for s in sizes]
    if len(set(sizes)) < 2 or min(sizes) < 1 or target < 1:
        raise ValueError(f"need at least 2 distinct positive sizes and a positive target, got {sizes}, {target}")
    steps = [CompiledStep(mini_model(hidden, features), b, features) for b in [*sizes, target]]
    times = time_round_robin(steps, repeat=repeat)
    best = [min(t) for t in times]
    median = [statistics.median(t) for t in times]
    flops = [s.flops for s in steps]
    fit = fit_linear(flops[:-1], best[:-1])
    predicted = fit.predict(flops[-1])
    return {
        "model": f"MLP {features}-{hidden}-{hidden}-10, Adam", "sizes": sizes, "target": target,
        "flops": flops[:-1], "seconds": best[:-1], "seconds_median": median[:-1],
        "compile_s": [s.compile_s for s in steps], "repeat": repeat,
        "fit": {"a_s": fit.a, "b_s_per_flop": fit.b, "r2": fit.r2},
        "target_flops": flops[-1], "predicted_s": predicted, "measured_s": best[-1],
        "measured_median_s": median[-1],
        "prediction_error": relative_error(predicted, best[-1]),
        "achieved_flops_per_s": flops[-1] / best[-1],
    }


def plot_prediction(result: dict[str, Any], info: Any = None):
    """Measured step times of the small runs, the fitted line, and the larger run
    (predicted vs measured)."""
    from scalelab import plot

    fit = LinearFit(result["fit"]["a_s"], result["fit"]["b_s_per_flop"], result["fit"]["r2"])
    fig, ax = plot.figure(width=6.4, height=3.8)
    gf = np.asarray(result["flops"]) / 1e9
    ax.plot(gf, 1e3 * np.asarray(result["seconds"]), "o", label="small runs (measured)")
    xs = np.linspace(0, result["target_flops"] / 1e9, 50)
    ax.plot(xs, 1e3 * fit.predict(xs * 1e9), "k--", lw=1,
            label=f"fit: {1e3 * fit.a:.2f} ms + {1e3 * 1e9 * fit.b:.2f} ms/GFLOP")
    tx = result["target_flops"] / 1e9
    ax.plot([tx], [1e3 * result["predicted_s"]], "s", mfc="none", ms=9, label="larger run, predicted")
    ax.plot([tx], [1e3 * result["measured_s"]], "*", ms=11,
            label=f"larger run, measured ({result['prediction_error']:+.0%})")
    for b, f, t in zip(result["sizes"], gf, result["seconds"], strict=True):
        ax.annotate(f"batch {b}", (f, 1e3 * t), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.annotate(f"batch {result['target']}", (tx, 1e3 * result["measured_s"]), textcoords="offset points",
                xytext=(-50, 6), fontsize=7)
    ax.set(xlabel="GFLOP per step (XLA cost analysis)", ylabel="ms per step",
           title="Step time from small runs, checked on a larger one")
    ax.legend(fontsize=8)
    plot.label(fig, info)
    return fig


# --------------------------------------------------------------------------- cost


@dataclasses.dataclass(frozen=True)
class Price:
    """An on-demand list price per accelerator-hour, with where and when it was read.

    Each price is the one a public, dated record (``transcribed_by``) copied from the
    vendor's page (``vendor_url``) on ``read_on``. Prices change; check the vendor's page
    before spending money.
    """

    name: str
    provider: str
    chip: str  # the name of the chip in scalelab.hardware.SPECS (its peak FLOP/s)
    usd_per_chip_hour: float
    offer: str
    vendor_url: str
    read_on: str
    transcribed_by: str


_LAMBDA_RECORD = ("https://raw.githubusercontent.com/api-evangelist/lambda-labs/refs/heads/main/plans/"
                  "lambda-labs-plans-pricing.yml")
_AWS_RECORD = "https://raw.githubusercontent.com/datareceipts/data-receipts/main/109-gpu-pricing/hyperscalers.json"

PRICES: tuple[Price, ...] = (
    Price("Lambda A100 SXM 80GB", "Lambda", "NVIDIA A100 SXM 80GB", 2.79, "8x A100 SXM 80 GB instance, per GPU",
          "https://lambda.ai/instances", "2026-09-20", _LAMBDA_RECORD),
    Price("Lambda H100 SXM", "Lambda", "NVIDIA H100 SXM", 3.99, "8x H100 SXM instance, per GPU",
          "https://lambda.ai/instances", "2026-09-20", _LAMBDA_RECORD),
    Price("Lambda B200", "Lambda", "NVIDIA B200 (HGX)", 6.69, "8x B200 SXM6 instance, per GPU",
          "https://lambda.ai/instances", "2026-09-20", _LAMBDA_RECORD),
    Price("AWS p4de A100 80GB", "AWS", "NVIDIA A100 SXM 80GB", 27.44705 / 8,
          "p4de.24xlarge (8x A100 80 GB) at $27.44705/h, us-east-1, per GPU",
          "https://aws.amazon.com/ec2/pricing/on-demand/", "2026-11-09", _AWS_RECORD),
    Price("AWS p5 H100", "AWS", "NVIDIA H100 SXM", 55.04 / 8, "p5.48xlarge (8x H100) at $55.04/h, us-east-1, per GPU",
          "https://aws.amazon.com/ec2/pricing/on-demand/", "2026-11-09", _AWS_RECORD),
)


def price(name: str) -> Price:
    """The listed price called ``name`` (a clear error names the known ones)."""
    if not isinstance(name, str):
        raise TypeError(f"hardware name must be a string, got {type(name).__name__}")
    for p in PRICES:
        if p.name == name:
            return p
    raise ValueError(f"unknown hardware {name!r}; listed: {', '.join(p.name for p in PRICES)}")


def peak_flops(chip: str) -> float:
    """Published 16-bit dense peak FLOP/s of ``chip`` (from :data:`scalelab.hardware.SPECS`)."""
    from scalelab import hardware

    for spec in hardware.SPECS:
        if spec.name == chip:
            return spec.peak_16bit
    raise ValueError(f"no published spec for {chip!r}; known: {', '.join(s.name for s in hardware.SPECS)}")


def price_table() -> list[dict[str, Any]]:
    """The listed prices with their provenance, one row each."""
    return [{"hardware": p.name, "USD per chip-hour": round(p.usd_per_chip_hour, 4),
             "peak TFLOP/s (16-bit)": peak_flops(p.chip) / 1e12, "offer": p.offer,
             "vendor page": p.vendor_url, "read on": p.read_on} for p in PRICES]


def estimate_run(total_flops: float, hardware: str, mfu: float, chips: int = 1) -> dict[str, Any]:
    """Time and on-demand price of ``total_flops`` on ``chips`` chips of ``hardware`` at
    model FLOP utilisation ``mfu`` (achieved / peak FLOP/s).

    seconds = total_flops / (chips x peak x mfu); cost = hours x chips x price per
    chip-hour. Perfect scaling is assumed across chips, so the cost does not depend on
    ``chips`` (only the time does).
    """
    if isinstance(total_flops, bool) or not isinstance(total_flops, int | float) or not (
            math.isfinite(total_flops) and total_flops > 0):
        raise ValueError(f"total_flops must be a positive finite number, got {total_flops!r}")
    if isinstance(mfu, bool) or not isinstance(mfu, int | float) or not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu!r}")
    if isinstance(chips, bool) or not isinstance(chips, int) or chips < 1:
        raise ValueError(f"chips must be a positive integer, got {chips!r}")
    p = price(hardware)
    seconds = total_flops / (chips * peak_flops(p.chip) * mfu)
    hours = seconds / 3600
    return {"hardware": p.name, "chips": chips, "mfu": mfu, "hours": hours,
            "usd": hours * chips * p.usd_per_chip_hour, "usd_per_chip_hour": p.usd_per_chip_hour,
            "read_on": p.read_on}


def cost_table(total_flops: float, mfu: float, chips: int = 1) -> list[dict[str, Any]]:
    """:func:`estimate_run` for every listed price."""
    return [estimate_run(total_flops, p.name, mfu, chips) for p in PRICES]


# --------------------------------------------------------------------------- benchmark


def overhead_experiment(quick: bool = False, interval: float = 0.1) -> Overhead:
    """The sampler's overhead on the chapter-05 CNN training on the digits (batch 64).

    Each run lasts about a quarter of a second (half a second in full mode) whatever the
    backend, so the sampler takes a few readings during it."""
    from scalelab import data, models

    split = data.load_digits()
    trainer = train.Trainer(models.CNN(8, split.classes, rngs=nnx.Rngs(0)), optax.adam(1e-3))
    batches = list(train.array_batches(split.x_train, split.y_train, 64))
    cursor = iter(range(10**9))

    def step():
        xb, yb = batches[next(cursor) % len(batches)]
        return trainer.step(xb, yb)["loss"]

    steps = steps_for(step, 0.25 if quick else 0.5)
    return measure_overhead(repeat_steps(step, steps), steps, repeats=8 if quick else 16, interval=interval)


# The full-size run the mini version stands in for (for the cost estimate): the MLP of
# the mini runs widened 16x (8192 units), 90 epochs of an ImageNet-sized 1.28M examples.
FULL_RUN = {"hidden": 8192, "batch": 1024, "examples": 1_281_167, "epochs": 90}
#: The MFU PaLM 540B reached on TPU v4 (Chowdhery et al. 2022, https://arxiv.org/abs/2204.02311,
#: section 4.1 / table 3): a well-tuned large-model reference point, not a measurement here.
PALM_MFU = 0.462
#: PaLM 540B's hardware FLOP utilisation (rematerialisation included), same source.
PALM_HFU = 0.578
#: (depth, width, batch) of the MFU-vs-HFU experiment (the chapter-10 deep MLP), by quick mode
REMAT_SIZES = {True: (4, 512, 512), False: (8, 512, 512)}
# (small batch sizes, larger batch size) of the prediction experiment, by quick mode
PREDICTION_SIZES = {True: ((32, 64, 128, 256), 1024), False: ((64, 128, 256, 512), 2048)}


def full_run_flops(spec: dict[str, int] | None = None, features: int = 64) -> dict[str, Any]:
    """FLOPs of the full-size run described by ``spec`` (default :data:`FULL_RUN`)."""
    spec = dict(FULL_RUN if spec is None else spec)
    per_step = train_step_flops(lambda: mini_model(spec["hidden"], features), spec["batch"], features)
    steps = math.ceil(spec["examples"] * spec["epochs"] / spec["batch"])
    return {**spec, "flops_per_step": per_step, "steps": steps, "total_flops": per_step * steps}


def measured_mfu(pred: dict[str, Any], peak: DevicePeak | None = None) -> dict[str, Any]:
    """The MFU of the prediction experiment's larger measured step (model FLOPs from XLA /
    its best time / this device's peak); ``usable`` is it clipped to (0, 1] for
    :func:`estimate_run` (above 1 only if the peak is underestimated)."""
    peak = peak or device_peak()
    if not peak.flops:
        raise ValueError(f"no peak FLOP/s for {peak.device}: {peak.source}")
    value = utilisation(pred["target_flops"], pred["measured_s"], peak.flops)
    return {"mfu": value, "usable": min(value, 1.0), "peak_flops": peak.flops, "peak_estimated": peak.estimated,
            "peak_source": peak.source}


def bench_monitor(quick: bool = False) -> dict[str, Any]:
    """Benchmark ``monitor``: the sampler's overhead on a training step, the error of a
    step-time prediction made from small runs (checked on a larger measured run), the MFU
    of that run, MFU vs HFU with remat, and the cost of the full run at the measured MFU."""
    start = time.perf_counter()
    overhead = overhead_experiment(quick)
    sizes, target = PREDICTION_SIZES[quick]
    pred = prediction_experiment(sizes, target, repeat=7 if quick else 11)
    peak = device_peak()
    mfu = measured_mfu(pred, peak) if peak.flops else None
    remat = remat_utilisation(*REMAT_SIZES[quick], repeat=5 if quick else 9, peak=peak) if peak.flops else None
    full = full_run_flops()
    return {
        "sampler_overhead_fraction": overhead.fraction,
        "sampler_overhead_noise_fraction": overhead.noise,
        "sampler_expected_fraction": overhead.expected,
        "overhead": overhead.as_dict(),
        "prediction_error_fraction": abs(pred["prediction_error"]),
        "prediction": pred,
        "measured_mfu": mfu["mfu"] if mfu else None,
        "peak_flops": peak.flops, "peak_estimated": peak.estimated, "peak_source": peak.source,
        "remat_mfu": remat["remat_mfu"] if remat else None,
        "remat_hfu": remat["remat_hfu"] if remat else None,
        "remat": remat,
        "full_run": full,
        "cost_mfu": mfu["usable"] if mfu else PALM_MFU,
        "cost_estimates": cost_table(full["total_flops"], mfu["usable"] if mfu else PALM_MFU),
        "cost_estimates_at_palm_mfu": cost_table(full["total_flops"], PALM_MFU),
        "device_memory_reported": device_memory() is not None,
        "nvml_available": gpu_utilization_reader() is not None,
        "monitor_s": time.perf_counter() - start,
    }


__all__ = [
    "FIELDS", "FULL_RUN", "PALM_HFU", "PALM_MFU", "PREDICTION_SIZES", "PRICES", "REMAT_SIZES", "SPEC_FOR_DEVICE_KIND",
    "TRACE_CATEGORIES", "CompiledStep", "DevicePeak", "LinearFit", "LivePlot", "Overhead", "PipelineRun", "Price",
    "Sample", "Sampler", "StepRecord", "StepTimer", "TraceEvent", "bench_monitor", "busy_fraction", "cost_table", "cpu_by_stage",
    "device_memory", "device_peak", "estimate_run", "fit_linear", "full_run_flops", "gpu_utilization_reader",
    "interactive", "load_samples", "measure_overhead", "measured_mfu", "mini_model", "overhead_experiment",
    "peak_flops", "pipeline_utilisation", "plot_prediction", "plot_samples", "plot_step_breakdown", "plot_trace",
    "plot_utilisation", "prediction_experiment", "price", "price_table", "profile_steps", "relative_error",
    "remat_utilisation", "repeat_steps", "save_samples", "scanned_flops", "slow_input", "steps_for", "summarize",
    "time_round_robin", "trace_events", "trace_files", "trace_summary", "trace_threads", "utilisation",
]
