"""Chapter 04: input pipelines that overlap extraction, transformation and loading.

Three stages, each on the resource it uses:

- **extract**: contiguous batch reads from an HDF5 store (chapter 03), sharded by process;
  :class:`SlowReads` adds a modelled per-read wait (remote storage), which threads overlap;
- **transform**: image augmentation on the CPU (crop, flip, rotate, resize, grayscale),
  optionally in worker processes (Python code and h5py calls hold the GIL, so threads
  scale only the parts that release it: NumPy array work and waiting for I/O);
- **load**: transfer to the devices, sharded over a mesh when there are several.

:class:`Pipeline` overlaps them with bounded queues, records a per-batch timeline,
propagates worker errors with their original traceback within a bounded time, stops its
workers on exit or interrupt, and saves/restores its position for exact resume. Grain is
measured beside it as the well-kept peer.

This module imports JAX lazily so that worker processes start quickly.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import multiprocessing
import os
import pickle
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from multiprocessing import connection as mp_connection
from pathlib import Path
from typing import Any

import numpy as np

# --------------------------------------------------------------------------- timeline


@dataclasses.dataclass(frozen=True)
class Event:
    stage: str  # extract, transform, load, compute
    lane: str  # the thread or process that did the work
    batch: int
    start: float  # time.perf_counter() (CLOCK_MONOTONIC on Linux: comparable across processes)
    end: float


class Timeline:
    """Thread-safe record of which stage worked on which batch, where and when."""

    def __init__(self) -> None:
        self._events: list[Event] = []
        self._lock = threading.Lock()

    def record(self, stage: str, lane: str, batch: int, start: float, end: float) -> None:
        with self._lock:
            self._events.append(Event(stage, lane, batch, start, end))

    def extend(self, events: Sequence[Event]) -> None:
        with self._lock:
            self._events.extend(events)

    @property
    def events(self) -> list[Event]:
        with self._lock:
            return sorted(self._events, key=lambda e: e.start)

    def steady(self, skip: int) -> Timeline:
        """The events from the start of the ``skip``-th compute step on (start-up left out)."""
        computes = sorted(e.start for e in self.events if e.stage == "compute")
        if len(computes) <= skip:
            raise ValueError(f"only {len(computes)} compute steps for skip={skip}")
        out = Timeline()
        out.extend([e for e in self.events if e.start >= computes[skip]])
        return out

    def durations(self) -> dict[str, list[float]]:
        """Every recorded duration, by stage."""
        by: dict[str, list[float]] = {}
        for e in self.events:
            by.setdefault(e.stage, []).append(e.end - e.start)
        return by

    def mean_seconds(self) -> dict[str, float]:
        """Mean duration of each stage per batch."""
        return {k: float(np.mean(v)) for k, v in self.durations().items()}

    def median_seconds(self) -> dict[str, float]:
        """Median duration of each stage per batch (robust to a few disturbed batches)."""
        return {k: float(np.median(v)) for k, v in self.durations().items()}


@contextlib.contextmanager
def _timed(timeline: Timeline | None, stage: str, lane: str, batch: int):
    start = time.perf_counter()
    yield
    if timeline is not None:
        timeline.record(stage, lane, batch, start, time.perf_counter())


STAGE_COLORS = {"extract": "C0", "transform": "C1", "load": "C2", "compute": "C3"}


def plot_timeline(timeline: Timeline, title: str, info=None, ax=None):
    """A Gantt chart: one row per thread/process, one bar per (stage, batch)."""
    from scalelab import plot

    events = timeline.events
    if not events:
        raise ValueError("the timeline is empty")
    t0 = events[0].start
    # worker processes are named by pid; show them as worker 1, 2, ... in order of appearance
    workers = list(dict.fromkeys(e.lane for e in events if e.lane.startswith("worker ")))
    rename = {w: f"worker {i + 1}" for i, w in enumerate(workers)}
    events = [dataclasses.replace(e, lane=rename.get(e.lane, e.lane)) for e in events]
    lanes = sorted({e.lane for e in events}, key=lambda s: (s != "main", s))
    fig = None
    if ax is None:
        fig, ax = plot.figure(width=9, height=0.5 * len(lanes) + 1.6)
    for e in events:
        y = lanes.index(e.lane)
        ax.barh(y, (e.end - e.start) * 1e3, left=(e.start - t0) * 1e3, height=0.7,
                color=STAGE_COLORS.get(e.stage, "0.5"), edgecolor="white", linewidth=0.3)
    ax.set_yticks(range(len(lanes)), lanes)
    ax.invert_yaxis()
    ax.set_xlabel("time (ms)")
    ax.set_title(title, fontsize=10, loc="left")
    handles = [plot.plt.Rectangle((0, 0), 1, 1, color=c) for c in STAGE_COLORS.values()]
    # beside the axes, not above them: a long panel title would otherwise run under it
    ax.legend(handles, list(STAGE_COLORS), loc="upper left", bbox_to_anchor=(1.01, 1.0),
              fontsize=7, frameon=False)
    if fig is not None:
        plot.label(fig, info)
    return fig or ax.figure


# --------------------------------------------------------------------------- extract


def make_patch_store(path, rows: int, size: int = 64, seed: int = 0) -> Path:
    """An HDF5 store of ``rows`` RGB photo patches (chapter 03's data), contiguous layout."""
    from scalelab import data

    x = data.photo_patches(rows, size, seed=seed)
    return data.write_store(path, {"x": x}, provenance=f"{rows} random {size}x{size} crops of "
                            "scikit-learn's sample photos", version="1")


class _LazyStore:
    """Opens its HDF5 store on first use in whichever process reads, and pickles without
    the open handle (h5py objects cannot be pickled; Grain and worker pools pickle sources)."""

    path: Path
    _store: Any = None

    def _opened(self):
        from scalelab import data

        if self._store is None:
            self._store = data.Store(self.path)
        return self._store

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_store"] = None
        return state


class HDF5Batches(_LazyStore):
    """Contiguous batches of one HDF5 dataset, sharded across processes.

    Batch ``b`` is rows ``b*batch_size:(b+1)*batch_size``; this process owns the batches
    ``b`` with ``b % process_count == process_index``, so hosts read disjoint data. The
    file is opened lazily in whichever process reads, so the object pickles (h5py
    handles do not).
    """

    def __init__(self, path, batch_size: int, name: str = "x",
                 process_index: int = 0, process_count: int = 1, shuffle: bool = True):
        from scalelab import data

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}")
        self.path = Path(path)
        self.batch_size = batch_size
        self.name = name
        self.process_index = process_index
        self.process_count = process_count
        self.shuffle = shuffle
        with data.Store(self.path) as store:  # fail early on a missing or bad file
            if name not in store.schema:
                raise ValueError(f"{self.path} has no dataset {name!r}; it has {sorted(store.schema)}")
            self.rows = len(store)
        self.total_batches = self.rows // batch_size
        self.batches = list(range(process_index, self.total_batches, process_count))

    def __len__(self) -> int:
        return len(self.batches)

    def order(self, epoch: int, seed: int) -> list[int]:
        """This shard's batch ids for ``epoch``: shuffled by (seed, epoch) at batch level."""
        if not self.shuffle:
            return list(self.batches)
        rng = np.random.default_rng([seed, epoch])
        return [self.batches[i] for i in rng.permutation(len(self.batches))]

    def read(self, batch: int) -> np.ndarray:
        lo = batch * self.batch_size
        return self._opened().read(lo, lo + self.batch_size, (self.name,))[self.name]


class HDF5Records(_LazyStore):
    """Single rows of one HDF5 dataset, for record-level loaders such as Grain."""

    def __init__(self, path, name: str = "x"):
        from scalelab import data

        self.path = Path(path)
        self.name = name
        with data.Store(self.path) as store:
            self.rows = len(store)

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, index: int) -> np.ndarray:
        return self._opened().row(int(index), self.name)


# The modelled wait of one remote read (a batch fetched from object storage or a cold disk).
# Real first-byte latencies of object stores are longer (of the order of 100 ms); a shorter
# wait keeps the chapter quick and shows the same mechanism.
READ_LATENCY_S = 0.02


class SlowReads:
    """A batch source whose every read first waits ``latency`` seconds: a *modelled* remote
    store (network or object storage, a cold disk), wrapped around :class:`HDF5Batches`.

    The wait is a ``time.sleep``, which releases the GIL and uses no core, as a process
    blocked on a socket or a disk does. Batches, order and sharding are those of ``source``;
    it pickles like ``source``, so worker processes and thread pools can read from it.
    """

    def __init__(self, source: HDF5Batches, latency: float = READ_LATENCY_S):
        if latency < 0:
            raise ValueError(f"latency must be >= 0 seconds, got {latency}")
        self.source = source
        self.latency = float(latency)
        for name in ("path", "name", "batch_size", "rows", "total_batches", "batches", "shuffle"):
            setattr(self, name, getattr(source, name))

    def __len__(self) -> int:
        return len(self.source)

    def order(self, epoch: int, seed: int) -> list[int]:
        return self.source.order(epoch, seed)

    def read(self, batch: int) -> np.ndarray:
        time.sleep(self.latency)  # waiting for the remote store: no core, no GIL held
        return self.source.read(batch)


def parallel_reads(source, ids: Sequence[int], readers: int) -> list[np.ndarray]:
    """Read the batches ``ids`` with ``readers`` threads, at most ``readers`` reads in
    flight, returned in the order of ``ids``."""
    from concurrent.futures import ThreadPoolExecutor

    if readers < 1:
        raise ValueError(f"readers must be >= 1, got {readers}")
    with ThreadPoolExecutor(readers) as pool:
        return list(pool.map(source.read, ids))


def read_scaling(source, readers: Sequence[int], batches: int) -> list[dict[str, Any]]:
    """Seconds per batch to read ``batches`` batches with each number of reader threads
    (1 = sequential reads), after one warm-up read (the file open)."""
    ids = source.batches[:batches]
    source.read(ids[0])
    rows = []
    for k in readers:
        start = time.perf_counter()
        parallel_reads(source, ids, k)
        rows.append({"readers": k, "s_per_batch": (time.perf_counter() - start) / len(ids)})
    return rows


# --------------------------------------------------------------------------- transform


def resize_weights(size_in: int, size_out: int) -> np.ndarray:
    """Bilinear interpolation as a (size_out x size_in) matrix (align-corners convention)."""
    if size_in < 1 or size_out < 1:
        raise ValueError(f"sizes must be >= 1, got {size_in}, {size_out}")
    w = np.zeros((size_out, size_in), dtype=np.float32)
    pos = np.linspace(0, size_in - 1, size_out) if size_out > 1 else np.zeros(1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, size_in - 1)
    frac = (pos - lo).astype(np.float32)
    w[np.arange(size_out), lo] += 1 - frac
    w[np.arange(size_out), hi] += frac
    return w


GRAY = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class Augment:
    """Random crop, horizontal flip, rotation by k x 90 degrees, bilinear resize, grayscale.

    Random choices depend only on (seed, epoch, batch id), so any batch can be
    reproduced exactly — the basis of deterministic order and exact resume.
    """

    crop: int = 56
    out: int = 64
    seed: int = 0

    def params(self, n: int, size_in: int, epoch: int, batch: int) -> dict[str, np.ndarray]:
        if self.crop > size_in:
            raise ValueError(f"crop {self.crop} is larger than the images ({size_in})")
        rng = np.random.default_rng([self.seed, epoch, batch])
        return {
            "top": rng.integers(0, size_in - self.crop + 1, n),
            "left": rng.integers(0, size_in - self.crop + 1, n),
            "flip": rng.random(n) < 0.5,
            "k": rng.integers(0, 4, n),
        }

    def numpy(self, images: np.ndarray, params: dict[str, np.ndarray]) -> np.ndarray:
        """The augmentation on the CPU with NumPy: (n, H, W, 3) uint8 -> (n, out, out) float32."""
        if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2]:
            raise ValueError(f"expected square RGB images (n, H, H, 3), got {images.shape}")
        c = self.crop
        crops = np.empty((len(images), c, c, 3), dtype=np.float32)
        for i, img in enumerate(images):
            t, left = params["top"][i], params["left"][i]
            patch = img[t:t + c, left:left + c]
            if params["flip"][i]:
                patch = patch[:, ::-1]
            crops[i] = np.rot90(patch, params["k"][i])
        w = resize_weights(c, self.out)
        resized = np.einsum("oh,nhwc,pw->nopc", w, crops, w, optimize=True)
        return (resized @ GRAY) / np.float32(255.0)

    def __call__(self, images: np.ndarray, epoch: int, batch: int) -> np.ndarray:
        """Augment one batch and return it as uint8 (0..255).

        Batches travel between processes and to the devices as uint8, four times fewer
        bytes than float32; the training step rescales them on the device.
        """
        x = self.numpy(images, self.params(len(images), images.shape[1], epoch, batch))
        return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def augment_jax(images, params: dict[str, Any], crop: int, out: int):
    """The same augmentation with JAX, vmapped over the batch (runs on the accelerator)."""
    import jax
    import jax.numpy as jnp

    w = jnp.asarray(resize_weights(crop, out))
    gray = jnp.asarray(GRAY)

    def one(img, top, left, flip, k):
        patch = jax.lax.dynamic_slice(img.astype(jnp.float32), (top, left, 0), (crop, crop, 3))
        patch = jnp.where(flip, patch[:, ::-1], patch)
        patch = jax.lax.switch(k, [lambda p, r=r: jnp.rot90(p, r) for r in range(4)], patch)
        resized = jnp.einsum("oh,hwc,pw->opc", w, patch, w)
        return (resized @ gray) / 255.0

    return jax.vmap(one)(images, params["top"], params["left"], params["flip"], params["k"])


@dataclasses.dataclass(frozen=True)
class FailingAugment(Augment):
    """An :class:`Augment` that raises on batch ``fail_at``: for demonstrating (and testing)
    how a pipeline reports a failure in a worker."""

    fail_at: int = 3

    def __call__(self, images: np.ndarray, epoch: int, batch: int) -> np.ndarray:
        if batch == self.fail_at:
            raise RuntimeError(f"augmentation failed on batch {batch} (injected fault)")
        return super().__call__(images, epoch, batch)


def _transform_task(batch: int) -> int:
    _WORKER["augment"](_WORKER["source"].read(batch), 0, batch)
    return batch


def _row_read_task(batch: int) -> int:
    source = _WORKER["source"]
    if "records" not in _WORKER:
        _WORKER["records"] = HDF5Records(source.path, source.name)
    records = _WORKER["records"]
    for i in range(batch * source.batch_size, (batch + 1) * source.batch_size):
        records[i]
    return batch


def _warm_task(fn: Callable[[int], int], batch: int) -> int:
    fn(batch)
    time.sleep(0.25)
    return batch


def _batch_read_task(batch: int) -> int:
    _WORKER["source"].read(batch)
    return batch


SCALING_TASKS = {"augment": _transform_task, "row reads": _row_read_task, "batch reads": _batch_read_task}
SCALING_KINDS = ("sequential", "thread", "process")


def transform_scaling(source, augment: Augment, batches: int, workers: int, kind: str,
                      task: str = "augment", repeats: int = 1) -> float:
    """Seconds per batch of ``task`` done by ``kind``: "sequential" (a plain loop in one
    thread: the common baseline, ``workers`` must be 1), or a pool of ``workers`` threads or
    processes.

    ``task``: "augment" (read a batch, augment it: NumPy array work with a Python loop over
    the images), "row reads" (read the batch's rows one by one: many small h5py calls) or
    "batch reads" (one read per batch: with :class:`SlowReads`, mostly waiting). Pool
    start-up is excluded, and NumPy's BLAS is limited to one thread everywhere, so the
    parallelism measured is the pool's. With ``repeats`` > 1 the timed part runs that many
    times (in the same pool) and the median is returned: a short task is easily disturbed."""
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    if kind not in SCALING_KINDS:
        raise ValueError(f"kind must be one of {SCALING_KINDS}, got {kind!r}")
    if task not in SCALING_TASKS:
        raise ValueError(f"task must be one of {sorted(SCALING_TASKS)}, got {task!r}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if workers < 1 or (kind == "sequential" and workers != 1):
        raise ValueError(f"need workers >= 1 (exactly 1 for 'sequential'), got {workers}")
    fn = SCALING_TASKS[task]
    ids = source.batches[:batches]
    if kind == "sequential":  # a plain loop in one thread, as each thread of a pool runs it

        def loop() -> float:
            fn(ids[0])  # first file open
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                for b in ids:
                    fn(b)
                times.append((time.perf_counter() - start) / len(ids))
            return float(np.median(times))

        _init_worker(source, augment, limit_threads=False)
        with threadpool_limits(1):
            return in_thread(loop)
    if kind == "thread":
        _init_worker(source, augment, limit_threads=False)  # threads share this process's state
        pool = ThreadPoolExecutor(workers)
    else:
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(source, augment))
    with threadpool_limits(1), pool:
        # start-up: every worker runs one task and then sleeps, so each takes exactly one
        # (none is still starting, importing or opening the file while the clock runs)
        list(pool.map(_warm_task, [fn] * workers, ids[:1] * workers))
        # hand each process several batches per message, so the pool's per-task overhead
        # does not swamp a short task (threads ignore chunksize)
        chunk = max(1, len(ids) // (2 * workers))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(fn, ids, chunksize=chunk))
            times.append((time.perf_counter() - start) / len(ids))
        return float(np.median(times))


# --------------------------------------------------------------------------- load


def make_loader(devices: Sequence[Any] | None = None) -> Callable[[np.ndarray], Any]:
    """Return ``load(batch)``: host -> devices, split along the batch axis over a 1-D mesh.

    With one device it is a plain ``device_put``. The returned array is ready (the
    transfer is waited for), so the time of this stage is the transfer's.
    """
    import jax
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    devices = list(devices or jax.devices())
    if len(devices) == 1:
        target: Any = devices[0]
    else:
        mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(AxisType.Auto,),
                             devices=devices)
        target = NamedSharding(mesh, P("data"))

    def load(batch: np.ndarray):
        if len(devices) > 1 and batch.shape[0] % len(devices):
            raise ValueError(f"batch of {batch.shape[0]} cannot be split over {len(devices)} devices")
        return jax.device_put(batch, target).block_until_ready()

    return load


def emulated_step(seconds: float) -> Callable[[Any], None]:
    """Stand-in for an accelerator training step that takes ``seconds``.

    On a CPU-only machine the "accelerator" would be the very cores the pipeline runs on,
    so a real step would measure core contention, not pipelining. A sleeping step models
    a device busy with its own work while the host prepares data; on a GPU or TPU use a
    real jitted step instead.
    """
    if seconds < 0:
        raise ValueError(f"seconds must be >= 0, got {seconds}")

    def step(batch) -> None:
        time.sleep(seconds)

    return step


# --------------------------------------------------------------------------- pipelines


def _produce(source: HDF5Batches, augment: Augment, epoch: int, batch: int):
    """Extract + transform one batch (runs in a worker process or a thread)."""
    lane = f"worker {os.getpid()}" if multiprocessing.parent_process() else "producer"
    t0 = time.perf_counter()
    raw = source.read(batch)
    t1 = time.perf_counter()
    out = augment(raw, epoch, batch)
    t2 = time.perf_counter()
    return out, [Event("extract", lane, batch, t0, t1), Event("transform", lane, batch, t1, t2)]


_WORKER: dict[str, Any] = {}


def _init_worker(source: HDF5Batches, augment: Augment, limit_threads: bool = True) -> None:
    """Runs once per worker process: keep the source (and its open file) for every task,
    and limit NumPy's BLAS to one thread — the parallelism comes from the processes, and
    several multi-threaded workers on the same cores only get in each other's way."""
    from threadpoolctl import threadpool_limits

    _WORKER["source"], _WORKER["augment"] = source, augment
    _WORKER.pop("records", None)
    if limit_threads:  # for the life of the worker process
        _WORKER["limits"] = threadpool_limits(1)


def run_sequential(source: HDF5Batches, augment: Augment, load, step, batches: int,
                   epoch: int = 0, timeline: Timeline | None = None) -> float:
    """Extract, transform, load and compute one batch after another; returns seconds."""
    order = source.order(epoch, augment.seed)[:batches]
    start = time.perf_counter()
    for b in order:
        with _timed(timeline, "extract", "main", b):
            raw = source.read(b)
        with _timed(timeline, "transform", "main", b):
            x = augment(raw, epoch, b)
        with _timed(timeline, "load", "main", b):
            dev = load(x)
        with _timed(timeline, "compute", "main", b):
            step(dev)
    return time.perf_counter() - start


def _put_until(q: queue.Queue, item: Any, stop: threading.Event,
               check: Callable[[], None] | None = None) -> bool:
    """Put ``item`` on a bounded queue, giving up (False) once ``stop`` is set; while the
    queue is full, ``check()`` runs every tick (it raises to abandon the wait)."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            if check is not None:
                check()
    return False


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


_DONE = object()


class WorkerTraceback(Exception):
    """The formatted traceback of an exception raised in a worker process: attached in the
    consumer as that exception's ``__cause__`` (stack frames cannot cross processes)."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


def _ending(exitcode: int | None) -> tuple[str, str | None]:
    """How a process ended, in words, and the name of the signal that ended it (if one did)."""
    if exitcode is None:
        return "stopped responding", None
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"died with signal {name}", name
    return f"exited with code {exitcode}", None


class WorkerDiedError(RuntimeError):
    """A worker process of a :class:`Pipeline` ended without being asked to: killed by a
    signal (SIGKILL is what the out-of-memory killer sends) or exited on its own.

    ``worker`` is its number (1, 2, ...), ``pid`` its process id, ``exitcode`` as
    :attr:`multiprocessing.Process.exitcode` reports it (minus the signal number for a
    signal), ``signal`` the signal's name (None if it exited), ``batch`` the batch it was
    producing (None if it was idle)."""

    def __init__(self, worker: int, pid: int, exitcode: int | None, batch: int | None):
        self.worker, self.pid, self.exitcode, self.batch = worker, pid, exitcode, batch
        how, self.signal = _ending(exitcode)
        doing = "while idle" if batch is None else f"while producing batch {batch}"
        hint = " (SIGKILL: often the out-of-memory killer)" if self.signal == "SIGKILL" else ""
        super().__init__(f"worker {worker} (pid {pid}) {how} {doing}{hint}; the pipeline stopped its other "
                         "workers: iterate again to resume after the last batch delivered, with new workers")

    def __reduce__(self):
        return type(self), (self.worker, self.pid, self.exitcode, self.batch)


def _exit_with_parent(parent_pid: int, deathsig: bool) -> None:
    """Make this worker process end when the process that started it dies (a consumer
    killed with SIGKILL runs no clean-up, and a worker stuck in a transform would otherwise
    live on). Two mechanisms:

    - on Linux, ``prctl(PR_SET_PDEATHSIG, SIGKILL)``: the kernel kills the worker when the
      *thread* that started it ends, so it is used only when that thread is the main thread
      (``deathsig``); it works even while the worker is stuck in C code holding the GIL;
    - everywhere, a watchdog thread that polls ``os.getppid()``: a dead parent's children are
      re-parented, so the id changes; it needs the worker to release the GIL now and then
      (sleeping, I/O, NumPy and pure-Python loops all do).
    """
    if deathsig and sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before the line above ran
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _worker_main(conn, source, augment: Augment, parent_pid: int, deathsig: bool) -> None:
    """A pipeline worker process. Tasks ``(generation, position, epoch, batch)`` arrive on
    its own pipe (``None``: stop); each result, or the exception with its formatted
    traceback, goes back on the same pipe, in task order."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the consumer, which then stops us
    _exit_with_parent(parent_pid, deathsig)
    _init_worker(source, augment)
    try:
        conn.send("ready")
    except (EOFError, OSError):
        return
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):  # the consumer closed the pipe or died
            return
        if task is None:
            return
        gen, pos, epoch, batch = task
        try:
            reply = (gen, pos, True, _produce(source, augment, epoch, batch))
        except BaseException as exc:
            tb = traceback.format_exc()
            try:
                pickle.dumps(exc)
            except Exception:  # an exception that cannot travel: send its description
                exc = RuntimeError(f"{type(exc).__name__}: {exc} (the original exception does not pickle)")
            reply = (gen, pos, False, (exc, tb))
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return


class _Workers:
    """The worker processes of one :class:`Pipeline`, each with a pipe of its own.

    Nothing is shared between workers: no common task queue, no lock. A worker killed at
    any moment (idle, busy, while sending a result, during ``close()``) therefore cannot
    leave the others or the consumer waiting on something it held, and its death is seen at
    once: its pipe reaches end-of-file and its process sentinel becomes ready. (A
    ``multiprocessing.Pool`` shares one task queue behind a lock; a worker killed while
    holding it deadlocks the pool, and the pool does not report a dead worker to the task
    it was running.) A receiver thread reads every result as soon as it arrives, so a
    worker never waits to hand one over, and watches the workers' sentinels."""

    DEPTH = 2  # tasks sent to one worker at a time: one running and the next, so no idle gap

    def __init__(self, count: int, source, augment: Augment):
        ctx = multiprocessing.get_context("spawn")
        deathsig = threading.current_thread() is threading.main_thread()
        self.procs: list[Any] = []
        self.conns: list[Any] = []
        self.tasks: list[collections.deque] = []  # per worker: (generation, position, batch), in order
        self.ready: list[bool] = []  # whether each worker has started (imported, opened its source)
        self.replies: queue.Queue = queue.Queue()  # (generation, position, ok, payload), from the receiver
        self.error: WorkerDiedError | None = None
        self._closing = threading.Event()
        try:
            for i in range(count):
                here, there = ctx.Pipe(duplex=True)
                proc = ctx.Process(target=_worker_main, name=f"pipeline-worker-{i + 1}", daemon=True,
                                   args=(there, source, augment, os.getpid(), deathsig))
                proc.start()
                there.close()  # the worker's end: only the worker holds it now, so its death is EOF here
                self.procs.append(proc)
                self.conns.append(here)
                self.tasks.append(collections.deque())
                self.ready.append(False)
        except BaseException:
            self.close()
            raise
        self._receiver = threading.Thread(target=self._receive, daemon=True, name="pipeline-results")
        self._receiver.start()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def free(self) -> int | None:
        """The worker with the fewest tasks, if it has room for another."""
        i = min(range(len(self.tasks)), key=lambda k: len(self.tasks[k]))
        return i if len(self.tasks[i]) < self.DEPTH else None

    def send(self, i: int, gen: int, pos: int, epoch: int, batch: int) -> bool:
        """Send a task to worker ``i``; False if it is dead (the receiver reports it)."""
        self.check()
        if mp_connection.wait([self.procs[i].sentinel], 0):
            return False
        self.tasks[i].append((gen, pos, batch))
        try:
            self.conns[i].send((gen, pos, epoch, batch))
        except OSError:  # it died meanwhile
            return False
        return True

    def holder(self, pos: int, gen: int) -> int | None:
        """The worker that has the task at ``pos`` of iteration ``gen``."""
        for i, tasks in enumerate(self.tasks):
            if any(t[0] == gen and t[1] == pos for t in list(tasks)):
                return i
        return None

    def get(self, timeout: float) -> tuple | None:
        """The next reply ``(generation, position, ok, payload)``, or None after ``timeout``
        seconds; raises :class:`WorkerDiedError` once a worker has died."""
        self.check()
        try:
            return self.replies.get(timeout=timeout)
        except queue.Empty:
            self.check()
            return None

    def check(self) -> None:
        """Raise :class:`WorkerDiedError` if a worker has died (returns at once)."""
        if self.error is not None:
            raise self.error

    def check_now(self) -> None:
        """:meth:`check`, also for a death the receiver has not yet had time to see."""
        if any(mp_connection.wait([p.sentinel], 0) for p in self.procs):
            self._receiver.join(2.0)  # it reports the death, then ends
        self.check()

    # -- the receiver thread
    def _take(self, i: int, reply) -> None:
        if reply == "ready":
            self.ready[i] = True
            return
        self.tasks[i].popleft()  # a worker answers its tasks in the order it got them
        self.replies.put(reply)

    def _receive(self) -> None:
        sentinels = [p.sentinel for p in self.procs]
        while not self._closing.is_set():
            try:
                ready = set(mp_connection.wait(self.conns + sentinels, 0.1))
            except OSError:  # closed under us by close()
                return
            for i, (conn, sentinel) in enumerate(zip(self.conns, sentinels, strict=True)):
                if conn not in ready and sentinel not in ready:
                    continue
                if self._closing.is_set():
                    return
                try:
                    while conn.poll():
                        self._take(i, conn.recv())
                except (EOFError, OSError):
                    self.error = self._died(i)
                    return
                if sentinel in ready:
                    self.error = self._died(i)
                    return

    def _died(self, i: int) -> WorkerDiedError:
        proc, conn = self.procs[i], self.conns[i]
        with contextlib.suppress(EOFError, OSError):  # results it sent before it died
            while conn.poll():
                self._take(i, conn.recv())
        proc.join(1.0)  # a dead process is reaped at once; this gives its exit code
        batch = self.tasks[i][0][2] if self.tasks[i] else None
        return WorkerDiedError(i + 1, proc.pid, proc.exitcode, batch)

    def close(self, timeout: float = 5.0) -> None:
        """Stop every worker within about ``timeout`` seconds, whatever state each is in:
        idle ones are asked to stop, busy ones get SIGTERM at once, and any still alive
        after ``timeout`` seconds get SIGKILL."""
        self._closing.set()
        receiver = getattr(self, "_receiver", None)
        if receiver is not None and receiver is not threading.current_thread():
            receiver.join(2.0)
        idle = [p for p, t in zip(self.procs, self.tasks, strict=True) if not t]
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        deadline = time.monotonic() + min(0.5, timeout)
        for p in idle:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.exitcode is None:
                with contextlib.suppress(OSError):
                    p.terminate()
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.exitcode is None:  # ignored SIGTERM (e.g. hung in native code)
                with contextlib.suppress(OSError):
                    p.kill()
                p.join(1.0)
        for conn in self.conns:
            conn.close()
        self.procs, self.conns, self.tasks = [], [], []


class Pipeline:
    """Overlapped extract -> transform -> load, consumed by the training loop.

    - ``workers=0``: one producer thread extracts and transforms; ``workers=n``: ``n``
      worker processes do, ``prefetch`` batches ahead, results kept in order; each worker
      has its own pipe (see :class:`_Workers`), so no worker can block another;
    - a loader thread transfers the next batches to the devices while the consumer
      computes on the current one;
    - an exception in any stage is re-raised in the consumer at once, as the same
      exception object (a worker's carries its original traceback as ``__cause__``);
    - a worker process that dies (killed by a signal, or exited) raises
      :class:`WorkerDiedError` in the consumer at once, naming the worker, its pid, the
      signal or exit code and the batch it was producing (or that it was idle);
    - a stage that produces nothing for ``timeout`` seconds raises TimeoutError saying
      where the batch is stuck;
    - after any of these errors the workers are stopped, and the position is that of the
      last batch delivered: iterating again resumes there, with new workers;
    - ``close()`` (also on ``with`` exit, on ``break`` and on KeyboardInterrupt)
      stops the workers within a bounded time and joins the threads (a transform stuck
      inside a *thread*, ``workers=0``, cannot be killed by Python: use worker processes for
      code that may hang); workers whose consumer dies without closing exit by themselves;
    - ``get_state()``/``set_state()`` save and restore the position: the batch after a
      restore is identical to the one that would have come next.
    """

    def __init__(self, source: HDF5Batches, augment: Augment, load: Callable[[np.ndarray], Any],
                 workers: int = 0, prefetch: int = 2, timeout: float = 60.0,
                 timeline: Timeline | None = None):
        if workers < 0 or prefetch < 1 or timeout <= 0:
            raise ValueError(f"need workers >= 0, prefetch >= 1, timeout > 0; got {workers}, {prefetch}, {timeout}")
        self.source, self.augment, self.load = source, augment, load
        self.workers, self.prefetch, self.timeout = workers, prefetch, timeout
        self.timeline = timeline
        self.epoch = 0
        self.position = 0
        self._pool: _Workers | None = None
        self._generation = 0  # tags worker tasks, so results of an abandoned iteration are dropped
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._status = {"producer": "starting", "loader": "waiting for the producer"}

    @property
    def worker_pids(self) -> list[int]:
        """The process ids of the running worker processes (empty before the first batch)."""
        pool = self._pool
        return pool.pids if pool is not None else []

    # -- state
    def get_state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.augment.seed}

    def set_state(self, state: dict[str, int]) -> None:
        if state.get("seed") != self.augment.seed:
            raise ValueError(f"state was saved with seed {state.get('seed')}, this pipeline uses {self.augment.seed}")
        if not 0 <= state["position"] <= len(self.source):
            raise ValueError(f"position {state['position']} outside 0..{len(self.source)}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    # -- running
    def _fail(self, exc: BaseException, out: queue.Queue) -> None:
        """Report a stage's failure: the consumer raises it at its next wait."""
        if self._error is None:
            self._error = exc
        self._put(out, _Failure(exc))

    def _put(self, q: queue.Queue, item: Any, check: Callable[[], None] | None = None) -> bool:
        return _put_until(q, item, self._stop, check)

    def _producer(self, order: list[int], out: queue.Queue) -> None:
        try:
            if self._pool is None:
                for b in order:
                    if self._stop.is_set():
                        return
                    self._status["producer"] = f"the producer thread is extracting and transforming batch {b}"
                    x, events = _produce(self.source, self.augment, self.epoch, b)
                    if self.timeline:
                        self.timeline.extend(events)
                    self._status["producer"] = "the producer thread waits for the loader"
                    if not self._put(out, x):
                        return
            elif not self._produce_with_workers(order, out):
                return
            self._put(out, _DONE)
        except BaseException as exc:
            self._fail(exc, out)

    def _produce_with_workers(self, order: list[int], out: queue.Queue) -> bool:
        """Keep up to ``workers + prefetch`` batches in flight, hand them on in order; False
        if stopped."""
        pool, gen, epoch = self._pool, self._generation, self.epoch
        window = self.workers + self.prefetch
        ready: dict[int, Any] = {}
        sent = delivered = 0
        while delivered < len(order):
            if self._stop.is_set():
                return False
            while sent < len(order) and sent - delivered < window and (i := pool.free()) is not None:
                if not pool.send(i, gen, sent, epoch, order[sent]):
                    break  # that worker is dead: the receiver reports it in a moment
                sent += 1
            if delivered in ready:
                x, events = ready.pop(delivered)
                if self.timeline:
                    self.timeline.extend(events)
                self._status["producer"] = "the producer waits for the loader"
                if not self._put(out, x, check=pool.check):
                    return False
                delivered += 1
                continue
            holder = pool.holder(delivered, gen)
            if holder is None:
                where = f"batch {order[delivered]} waits for a free worker (all are busy)"
            elif not pool.ready[holder]:
                where = (f"batch {order[delivered]} is with worker {holder + 1} (pid {pool.pids[holder]}), "
                         "still starting (importing, opening the source)")
            else:
                where = (f"batch {order[delivered]} is with worker {holder + 1} (pid {pool.pids[holder]}), alive "
                         "but not finished (a transform that never returns?)")
            self._status["producer"] = where
            reply = pool.get(0.1)
            while reply is not None:
                rgen, pos, ok, payload = reply
                if rgen == gen:  # else a result for an iteration that was abandoned (break)
                    if not ok:
                        exc, tb = payload
                        exc.__cause__ = WorkerTraceback(tb)
                        raise exc
                    ready[pos] = payload
                reply = pool.get(0) if not pool.replies.empty() else None
        return True

    def _loader(self, order: list[int], inp: queue.Queue, out: queue.Queue) -> None:
        i = 0
        while not self._stop.is_set():
            self._status["loader"] = "the loader waits for the producer"
            try:
                item = inp.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is _DONE or isinstance(item, _Failure):
                self._put(out, item)
                return
            try:
                self._status["loader"] = f"the loader is copying batch {order[i]} to the devices"
                with _timed(self.timeline, "load", "loader", order[i]):
                    dev = self.load(item)
            except BaseException as exc:
                self._fail(exc, out)
                return
            i += 1
            if not self._put(out, dev):
                return

    def _stuck(self) -> TimeoutError:
        return TimeoutError(f"the input pipeline produced no batch for {self.timeout:g} s: "
                            f"{self._status['producer']}; {self._status['loader']}")

    def __iter__(self) -> Iterator[Any]:
        order = self.source.order(self.epoch, self.augment.seed)[self.position:]
        self._stop.clear()
        self._error = None
        self._generation += 1
        self._status = {"producer": "starting", "loader": "the loader waits for the producer"}
        failed = False
        try:
            if self.workers:
                if self._pool is None:
                    self._pool = _Workers(self.workers, self.source, self.augment)
                else:
                    self._pool.check_now()  # a worker that died between iterations
            q1: queue.Queue = queue.Queue(self.prefetch)
            q2: queue.Queue = queue.Queue(self.prefetch)
            self._threads = [
                threading.Thread(target=self._producer, args=(order, q1), daemon=True, name="producer"),
                threading.Thread(target=self._loader, args=(order, q1, q2), daemon=True, name="loader"),
            ]
            for t in self._threads:
                t.start()
            since = time.monotonic()
            while True:
                if self._error is not None:  # a stage failed: raise now, not after the queued batches
                    raise self._error
                try:
                    item = q2.get(timeout=0.05)
                except queue.Empty:
                    if time.monotonic() - since > self.timeout:
                        raise self._stuck() from None
                    continue
                if item is _DONE:
                    self.epoch += 1
                    self.position = 0
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                self.position += 1
                yield item
                since = time.monotonic()
        except GeneratorExit:  # the consumer stopped early (break, close): keep the workers
            raise
        except BaseException:
            failed = True
            raise
        finally:
            self._shutdown_threads()
            if failed:  # dead, stuck or failed workers are not reused: the next iteration starts new ones
                self._close_workers()

    def _shutdown_threads(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        self._threads = []

    def _close_workers(self, timeout: float = 5.0) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the threads and the worker processes: idle workers exit when asked, busy
        ones get SIGTERM at once, and any still alive ``timeout`` seconds later SIGKILL (a
        stuck or dying worker must not hang the caller)."""
        self._shutdown_threads()
        self._close_workers(timeout)

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def consume(pipeline_iter, step, batches: int, timeline: Timeline | None = None,
            skip: int = 0) -> float:
    """Run ``step`` on ``batches`` batches; seconds per batch after the first ``skip``."""
    start = None
    count = 0
    for i, dev in enumerate(pipeline_iter):
        if i == skip:
            start = time.perf_counter()
        with _timed(timeline, "compute", "main", i):
            step(dev)
        count += 1
        if count >= batches:
            break
    if start is None or count <= skip:
        raise ValueError(f"only {count} batches for skip={skip}")
    return (time.perf_counter() - start) / (count - skip)


def steady_skip(workers: int, prefetch: int) -> int:
    """Batches to leave out before timing a pipeline: worker processes start unevenly, and
    the results the others finished meanwhile (up to ``workers + prefetch`` in flight)
    arrive in a burst once the late one delivers; timing that burst would overstate the
    throughput, more so the more workers there are."""
    return workers + prefetch + 4


def workers_sweep(source: HDF5Batches, augment: Augment, load, step, workers: Sequence[int],
                  batches: int, skip: int | None = None, prefetch: int = 4) -> list[dict[str, Any]]:
    """Seconds per batch of the overlapped pipeline for each worker count (0 = one thread),
    after ``skip`` batches (default :func:`steady_skip`)."""
    rows = []
    for w in workers:
        seconds, _ = pipeline_seconds(source, augment, load, step, w, batches, skip, prefetch)
        rows.append({"workers": w, "s_per_batch": seconds})
    return rows


# --------------------------------------------------------------------------- Grain


class BatchAugment:
    """``augment`` as Grain's ``map_with_index`` transform: ``(batch index, batch) -> batch``.

    It lives in a module, not in a notebook cell, because Grain's worker processes are
    spawned: they unpickle the transform by importing it by name, and a function defined in
    a notebook's ``__main__`` cannot be found there."""

    def __init__(self, augment: Augment):
        self.augment = augment

    def __call__(self, index: int, batch: np.ndarray) -> np.ndarray:
        return self.augment(batch, 0, index)


def limit_blas_threads(worker_index: int = 0, worker_count: int = 1) -> None:
    """Limit NumPy's BLAS to one thread for the life of this process: Grain's
    ``worker_init_fn``, so its workers run the transform as :class:`Pipeline`'s do."""
    from threadpoolctl import threadpool_limits

    _WORKER["limits"] = threadpool_limits(1)


def grain_iterator(path, batch_size: int, augment: Augment, workers: int, prefetch: int = 4):
    """The same extract + transform with Grain: record source -> batch -> map, in workers.

    Grain's defaults read ahead with 16 threads and a 500-element buffer per process, which
    keeps working in the background as long as the iterator lives; here each process reads
    with one thread and ``prefetch`` batches ahead, like :class:`Pipeline`. Close the
    iterator (``it.close()``) when done with it.
    """
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # Grain's worker processes read absl flags
    import grain

    ds = (grain.MapDataset.source(HDF5Records(path))
          .batch(batch_size, drop_remainder=True)
          .map_with_index(BatchAugment(augment)))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))
    if workers:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers), worker_init_fn=limit_blas_threads)
    return iter(it)


def device_prefetch(iterator, load, size: int = 2, timeline: Timeline | None = None,
                    timeout: float = 60.0):
    """Load the next ``size`` batches onto the devices in a thread while the consumer computes."""
    q: queue.Queue = queue.Queue(size)
    stop = threading.Event()

    def run():
        try:
            for i, x in enumerate(iterator):
                with _timed(timeline, "load", "loader", i):
                    dev = load(x)
                if not _put_until(q, dev, stop):
                    return
            q.put(_DONE)
        except BaseException as exc:
            q.put(_Failure(exc))

    thread = threading.Thread(target=run, daemon=True, name="loader")
    thread.start()
    try:
        while True:
            item = q.get(timeout=timeout)
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


# --------------------------------------------------------------------------- benchmark


def in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` in a new thread and return its result (or raise its error).

    The same NumPy work can take a different time in the main thread of a long-lived
    interpreter (a notebook kernel) than in a fresh thread. A pipeline's producer is a
    thread, so its baseline is measured in one too."""
    out: dict[str, Any] = {}

    def run():
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=run, name="measure")
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def stage_seconds(source: HDF5Batches, augment: Augment, load, batches: int = 16,
                  repeats: int = 2, thread: bool = False) -> dict[str, float]:
    """Seconds per batch of extract, transform and load, each measured alone.

    The median over ``batches`` batches, and the best of ``repeats`` such runs: the
    least-disturbed estimate, as ``timeit`` does (a machine still busy with the previous
    cell's processes would otherwise inflate it). ``thread=True`` measures in a fresh
    thread, as a pipeline's producer runs (see :func:`in_thread`)."""
    if thread:
        return in_thread(stage_seconds, source, augment, load, batches, repeats)
    run_sequential(source, augment, load, emulated_step(0.0), 1)  # warm-up: first read, compile
    best: dict[str, float] = {}
    for _ in range(repeats):
        tl = Timeline()
        run_sequential(source, augment, load, emulated_step(0.0), batches, timeline=tl)
        for k, v in tl.median_seconds().items():
            if k != "compute":
                best[k] = min(v, best.get(k, float("inf")))
    return best


def bound_seconds(stages: dict[str, float], compute_s: float, workers: int,
                 cores: int | None = None, wait_s: float = 0.0) -> float:
    """The slowest stage per batch, given its parallelism: extract + transform run together
    in each of ``workers`` processes (or one thread, ``workers=0``), load and compute one at
    a time.

    With ``cores``, the host's *CPU* work per batch (extract + transform + load, minus
    ``wait_s``, the part of a read spent waiting, which uses no core) cannot go faster than
    ``cores`` at a time: past the core count, more workers help only by overlapping waits."""
    producer = (stages["extract"] + stages["transform"]) / max(workers, 1)
    if cores is not None:
        if cores < 1:
            raise ValueError(f"cores must be >= 1, got {cores}")
        cpu = max(stages["extract"] + stages["transform"] + stages["load"] - wait_s, 0.0)
        producer = max(producer, cpu / cores)
    return max(producer, stages["load"], compute_s)


# Chapter 13 watches the host while a pipeline feeds a step as long as extract + transform.
COMPUTE_FRACTION = 1.0
# Chapter 04's emulated accelerator step lasts this fraction of the time per batch that
# the worker processes deliver, measured inside the pipeline with no step
# (:func:`calibrate_step`): the accelerator is as fast as the workers can feed it, so they
# are accelerator-bound, and one producer thread, slower by the workers' speed-up, is not.
STEP_FRACTION = 1.0


def producer_seconds(source, augment: Augment, load, workers: int, batches: int = 24,
                     repeats: int = 2, prefetch: int = 4) -> float:
    """Seconds per batch that :class:`Pipeline` with ``workers`` (0 = one producer thread)
    delivers to a step that takes no time: its producer's cost measured the way the pipeline
    runs it (threads, processes, hand-over and loads included), after :func:`steady_skip`
    start-up batches; the best of ``repeats`` runs, the least-disturbed estimate."""
    skip = steady_skip(workers, prefetch)
    return min(pipeline_seconds(source, augment, load, emulated_step(0.0), workers, skip + batches,
                                skip, prefetch)[0] for _ in range(repeats))


def calibrate_step(source, augment: Augment, load, workers: int, batches: int = 24,
                   repeats: int = 2) -> dict[str, float]:
    """The producers' costs in the pipeline and the emulated step chosen from them.

    Returns ``thread`` and ``workers`` (seconds per batch with no step, see
    :func:`producer_seconds`) and ``step`` = :data:`STEP_FRACTION` x ``workers``. The
    prediction: one thread is producer-bound, the accelerator busy step / thread of the time;
    the workers are accelerator-bound; their speed-up over the thread is thread / step."""
    thread = producer_seconds(source, augment, load, 0, batches, repeats)
    procs = producer_seconds(source, augment, load, workers, batches, repeats)
    return {"thread": thread, "workers": procs, "step": STEP_FRACTION * procs}


def pipeline_seconds(source, augment: Augment, load, step, workers: int, batches: int,
                     skip: int | None = None, prefetch: int = 4) -> tuple[float, Timeline]:
    """Seconds per batch of :class:`Pipeline` with ``workers`` (0 = one producer thread)
    feeding ``step``, after ``skip`` start-up batches (default :func:`steady_skip`), and its
    timeline."""
    skip = steady_skip(workers, prefetch) if skip is None else skip
    timeline = Timeline()
    with Pipeline(source, augment, load, workers=workers, prefetch=prefetch, timeline=timeline) as pipe:
        seconds = consume(iter(pipe), step, batches, skip=skip, timeline=timeline)
    return seconds, timeline


def bench_pipeline(quick: bool = False, folder=None) -> dict[str, Any]:
    """Benchmark ``pipeline``: sequential vs one producer thread vs worker processes vs
    Grain on the same work, their bounds, and reads from a latency-injected source with
    1..8 reader threads.

    NumPy's BLAS is limited to one thread throughout, as in the worker processes, so every
    stage time is one core's and the parallelism measured is the pipeline's."""
    import tempfile

    import jax
    from threadpoolctl import threadpool_limits

    from scalelab import env

    rows = 4096 if quick else 16384
    batch = 128
    workers = max(1, min(2, env.cpu_cores()))
    augment = Augment(seed=0)
    load = make_loader(jax.devices())
    with tempfile.TemporaryDirectory(dir=folder) as tmp, threadpool_limits(1):
        path = make_patch_store(Path(tmp) / "patches.h5", rows)
        source = HDF5Batches(path, batch, shuffle=False)
        stages = stage_seconds(source, augment, load, thread=True)
        calib = calibrate_step(source, augment, load, workers)
        compute_s = calib["step"]
        step = emulated_step(compute_s)
        n = len(source)
        seq = run_sequential(source, augment, load, step, n) / n
        thread_s, _ = pipeline_seconds(source, augment, load, step, 0, n)
        overlapped, timeline = pipeline_seconds(source, augment, load, step, workers, n)
        # the step's real duration (a sleep overshoots by the time to wake and retake the GIL)
        compute_measured = float(np.median(timeline.durations()["compute"]))
        it = grain_iterator(path, batch, augment, workers)
        try:
            grain_s = consume(device_prefetch(it, load, 4), step, n, skip=steady_skip(workers, 4))
        finally:
            with contextlib.suppress(Exception):
                it.close()
        slow = SlowReads(source, READ_LATENCY_S)
        reads = read_scaling(slow, [1, 2, 4, 8], min(n, 16 if quick else 32))
    bound_thread = bound_seconds(stages, compute_measured, 0)
    bound = bound_seconds(stages, compute_measured, workers)
    by_readers = {r["readers"]: r["s_per_batch"] for r in reads}
    return {
        "rows": rows, "batch_size": batch, "batches": n, "workers": workers,
        "stage_s_per_batch": {**stages, "compute": compute_measured},
        "step_fraction": STEP_FRACTION,
        "producer_in_pipeline_s_per_batch": {"thread": calib["thread"], "workers": calib["workers"]},
        "emulated_compute_s_per_batch": compute_s,
        "sequential_s_per_batch": seq,
        "thread_s_per_batch": thread_s, "bound_thread_s_per_batch": bound_thread,
        "overlapped_s_per_batch": overlapped, "bound_s_per_batch": bound,
        "grain_s_per_batch": grain_s,
        "overlap_efficiency": bound / overlapped, "thread_efficiency": bound_thread / thread_s,
        "speedup_vs_sequential": seq / overlapped, "speedup_workers_vs_thread": thread_s / overlapped,
        "ratio_vs_grain": grain_s / overlapped,
        "read_latency_s": READ_LATENCY_S,
        "read_s_per_batch_by_readers": by_readers,
        "read_speedup_8_readers": by_readers[1] / by_readers[8],
        "note": (f"compute is an emulated accelerator step (sleep) of {STEP_FRACTION:g} x the time per batch "
                 f"{workers} worker processes deliver in the pipeline with no step; reads of the latency-injected source wait {READ_LATENCY_S * 1e3:g} ms each "
                 "(a modelled remote store)"),
    }


# --------------------------------------------------------------------------- explorer


def _stage_ms(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number of milliseconds >= 0, got {value!r}")
    return float(value)


def pipeline_model(extract_ms: float, transform_ms: float, load_ms: float, step_ms: float, workers: int,
                   prefetch: int, batches: int = 64, show: int = 12) -> dict[str, Any]:
    """A discrete-event model of an input pipeline (pure and deterministic: the explorer's model).

    ``workers`` producers each extract + transform one batch at a time (a batch goes to the
    producer free first); one consumer takes the batches in order, loads each to the devices and
    then steps on it. At most ``workers + prefetch`` batches are in flight, from the start of
    their extract to the end of their step: ``workers=1, prefetch=0`` is the sequential loop;
    with room enough, the slowest of producer time / workers and load + step sets the pace.

    Returns the steady throughput (batches/s, over the second half of ``batches``) and its
    inverse in ms, the sequential loop's throughput and the speed-up over it, the fraction of
    time the step runs, the ``bound`` (``"producers"``, ``"consumer"`` or ``"prefetch depth"``:
    the largest of producer / workers, load + step, and the in-flight window
    (producer + load + step) / (workers + prefetch)), and ``spans``: the Gantt bars of the first
    ``show`` batches, ``[lane, stage, batch, start_ms, end_ms]`` (stage: extract, transform,
    load, compute; lane: ``worker i`` or ``main``, the consumer).
    """
    e, t = _stage_ms("extract_ms", extract_ms), _stage_ms("transform_ms", transform_ms)
    ld, s = _stage_ms("load_ms", load_ms), _stage_ms("step_ms", step_ms)
    for name, value, lo in (("workers", workers, 1), ("prefetch", prefetch, 0), ("batches", batches, 8),
                            ("show", show, 1)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    workers, prefetch, batches, show = int(workers), int(prefetch), int(batches), int(show)
    produce, consume_ms = e + t, ld + s
    if produce + consume_ms <= 0:
        raise ValueError("at least one stage time must be positive (all four are 0 ms)")
    window = workers + prefetch
    free = [0.0] * workers  # when each producer is next free
    done: list[float] = []  # end of each batch's step
    spans: list[list[Any]] = []
    for b in range(batches):
        w = min(range(workers), key=lambda i: (free[i], i))
        start = max(free[w], done[b - window] if b >= window else 0.0)
        produced = start + produce
        free[w] = produced
        begin = max(produced, done[-1] if done else 0.0)
        done.append(begin + consume_ms)
        if b < show:
            lane = f"worker {w + 1}"
            spans += [[lane, "extract", b, start, start + e], [lane, "transform", b, start + e, produced],
                      ["main", "load", b, begin, begin + ld], ["main", "compute", b, begin + ld, done[-1]]]
    half = batches // 2
    ms_per_batch = (done[-1] - done[half - 1]) / (batches - half)
    limits = {"producers": produce / workers, "consumer": consume_ms, "prefetch depth": (produce + consume_ms) / window}
    sequential_ms = produce + consume_ms
    return {
        "batches_per_s": 1e3 / ms_per_batch, "ms_per_batch": ms_per_batch,
        "sequential_batches_per_s": 1e3 / sequential_ms, "speedup_vs_sequential": sequential_ms / ms_per_batch,
        "step_utilisation": s / ms_per_batch,
        "bound": max(limits, key=lambda k: limits[k]),  # ties: the first (producers, then consumer)
        "spans": spans,
    }


def model_timeline(spans: Sequence[Sequence[Any]]) -> Timeline:
    """A :class:`Timeline` of :func:`pipeline_model`'s spans (ms), to draw with :func:`plot_timeline`."""
    tl = Timeline()
    tl.extend([Event(stage, lane, int(batch), start / 1e3, end / 1e3) for lane, stage, batch, start, end in spans])
    return tl


class SleepBatches:
    """A synthetic batch source: ``batches`` tiny batches, each read waits ``extract_s`` (a sleep)."""

    def __init__(self, batches: int, extract_s: float = 0.0):
        if batches < 1 or extract_s < 0:
            raise ValueError(f"need batches >= 1 and extract_s >= 0, got {batches}, {extract_s}")
        self.batches, self.extract_s = list(range(batches)), float(extract_s)

    def __len__(self) -> int:
        return len(self.batches)

    def order(self, epoch: int, seed: int) -> list[int]:
        return list(self.batches)

    def read(self, batch: int) -> np.ndarray:
        time.sleep(self.extract_s)
        return np.full((1, 1, 1, 3), batch, dtype=np.uint8)


@dataclasses.dataclass(frozen=True)
class SleepAugment(Augment):
    """A synthetic transform that waits ``transform_s`` (a sleep) and returns the batch as is."""

    transform_s: float = 0.0

    def __call__(self, images: np.ndarray, epoch: int, batch: int) -> np.ndarray:
        time.sleep(self.transform_s)
        return images


def measure_pipeline_point(extract_ms: float, transform_ms: float, load_ms: float, step_ms: float,
                           workers: int, prefetch: int, seconds: float = 1.0) -> dict[str, float]:
    """Run :class:`Pipeline` with synthetic sleeping stages at one setting of :func:`pipeline_model`.

    ``workers`` worker processes extract (:class:`SleepBatches`) and transform
    (:class:`SleepAugment`); the consumer loads and steps (two sleeps), as the model's consumer
    does. The pipeline's prefetch is at least 1 (``prefetch=0`` runs with 1), and it holds more
    batches in flight than the model's window (its queues: see :class:`Pipeline`), so the two
    agree where producers or consumer bound, less where the prefetch depth does. About
    ``seconds`` of steady state is timed, after :func:`steady_skip` start-up batches."""
    pred = pipeline_model(extract_ms, transform_ms, load_ms, step_ms, workers, prefetch)
    depth = max(int(prefetch), 1)
    skip = steady_skip(int(workers), depth)
    timed = int(min(max(seconds * pred["batches_per_s"], 8), 400))
    source = SleepBatches(skip + timed, extract_ms / 1e3)
    augment = SleepAugment(transform_s=transform_ms / 1e3)
    load_s, step_s = load_ms / 1e3, step_ms / 1e3

    def step(batch) -> None:
        time.sleep(load_s)
        time.sleep(step_s)

    with Pipeline(source, augment, lambda x: x, workers=int(workers), prefetch=depth, timeout=60) as pipe:
        s = consume(iter(pipe), step, skip + timed, skip=skip)
    return {"workers": int(workers), "prefetch": depth, "batches_per_s": 1.0 / s}


def pipeline_explorer(info=None):
    """The pipeline explorer: stage times, workers and prefetch depth -> the modelled timeline (Gantt)
    and throughput; "measure this point" runs :class:`Pipeline` with sleeping stages at that setting."""
    from scalelab import env, plot, widgets

    def draw(settings, pred, points):
        fig, (gantt, curve) = plot.figure(ncols=2, width=10.5, height=3.9, width_ratios=[2.2, 1])
        plot_timeline(model_timeline(pred["spans"]), f"Model: first batches, {pred['ms_per_batch']:.3g} ms per "
                      f"batch, {pred['bound']}-bound", ax=gantt)
        ws = list(range(1, 9))
        others = {k: v for k, v in settings.items() if k != "workers"}
        curve.plot(ws, [pipeline_model(workers=w, **others)["batches_per_s"] for w in ws], color="k", marker=".",
                   label="model")
        curve.scatter([settings["workers"]], [pred["batches_per_s"]], s=60, color="C0", zorder=3,
                      label="this setting")
        same = [p for p in points if {k: v for k, v in p["settings"].items() if k != "workers"} == others]
        for i, p in enumerate(same):
            curve.scatter([p["settings"]["workers"]], [p["result"]["batches_per_s"]], marker="*", s=120,
                          color="C3", zorder=4, label="measured (sleeping stages)" if i == 0 else None)
        curve.set(xlabel="workers", ylabel="batches / s", title="Throughput", ylim=(0, None))
        curve.legend(fontsize=7, loc="lower right")
        plot.label(fig, info or env.describe(), source="model; stars: Pipeline with sleeping stages, host only",
                   devices=1)
        return fig

    ms = {"extract_ms": ("extract (ms)", 2.0), "transform_ms": ("transform (ms)", 12.0),
          "load_ms": ("load (ms)", 2.0), "step_ms": ("step (ms)", 4.0)}
    controls = {"workers": widgets.dropdown("workers", [1, 2, 3, 4, 6, 8], 2)}
    controls |= {k: widgets.slider(d, v, 0.0, 40.0, 0.5) for k, (d, v) in ms.items()}
    controls["prefetch"] = widgets.slider("prefetch", 2, 0, 8, 1, integer=True)
    return widgets.Explorer(
        "pipeline", "Input pipeline explorer", controls, pipeline_model, draw,
        measure=measure_pipeline_point,
        shown=["batches_per_s", "ms_per_batch", "bound", "step_utilisation", "speedup_vs_sequential"],
        labels={"batches_per_s": "batches/s", "ms_per_batch": "ms per batch", "step_utilisation": "step busy",
                "speedup_vs_sequential": "speed-up vs sequential"},
        note="'measure this point' runs the library's Pipeline for about a second with worker processes that "
             "sleep through extract and transform and a consumer that sleeps through load and step.")


__all__ = [
    "READ_LATENCY_S",
    "STEP_FRACTION",
    "Augment",
    "BatchAugment",
    "Event",
    "FailingAugment",
    "HDF5Batches",
    "HDF5Records",
    "Pipeline",
    "SleepAugment",
    "SleepBatches",
    "SlowReads",
    "Timeline",
    "WorkerDiedError",
    "WorkerTraceback",
    "augment_jax",
    "bench_pipeline",
    "bound_seconds",
    "calibrate_step",
    "consume",
    "device_prefetch",
    "emulated_step",
    "grain_iterator",
    "in_thread",
    "limit_blas_threads",
    "make_loader",
    "make_patch_store",
    "measure_pipeline_point",
    "model_timeline",
    "parallel_reads",
    "pipeline_explorer",
    "pipeline_model",
    "pipeline_seconds",
    "plot_timeline",
    "producer_seconds",
    "read_scaling",
    "resize_weights",
    "run_sequential",
    "stage_seconds",
    "steady_skip",
    "transform_scaling",
    "workers_sweep",
]
