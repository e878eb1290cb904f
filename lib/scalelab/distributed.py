"""Chapter 06: distributed paradigms, from embarrassingly parallel work to all-reduce.

Sections (the last, a multi-process launcher, serves chapter 07):

1. **Decomposition** — a random forest trained by a pool of worker processes: each tree
   is an independent task, so the work splits without communication.
2. **MapReduce** — a pure-Python map -> shuffle -> reduce with an explicit shuffle by
   key, two jobs that need only partition sums (feature moments for normalisation and
   a least-squares fit from ``X^T X`` and ``X^T y``), and the same jobs on Dask
   (``dask.bag`` and a ``dask.distributed`` local cluster).
3. **Parameter server vs all-reduce** — N simulated workers train one softmax
   regression: synchronously (mean gradient every step) or through an asynchronous
   server whose updates were computed on parameters ``tau`` steps stale; plus a labelled
   *model* of per-step worker time with stragglers for the wall-clock side.
4. **Ring all-reduce** — reduce-scatter then all-gather written with ``lax.ppermute``
   inside ``jax.shard_map``, checked against ``lax.psum``; bytes on the wire for a ring
   and a parameter server.
5. **Collectives** — ``psum``, ``pmean``, ``all_gather``, ``psum_scatter``,
   ``all_to_all``, ``ppermute`` and a broadcast on small arrays, with the MPI names.
6. **Plots** for the chapter's figures.
7. **Launcher** (chapter 07) — ``launch`` starts one process per command, stops them all
   (SIGKILL) when one fails or a timeout passes, and names the failure;
   ``run_multiprocess_training`` runs ``python -m scalelab.dp_worker`` as several JAX
   processes forming one mesh.

JAX and matplotlib are imported lazily (inside the functions that use them) so that the
worker processes of sections 1 and 2 start quickly and nothing touches a device at import
time.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import heapq
import itertools
import logging
import math
import multiprocessing
import time
import zlib
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from scalelab import env

if TYPE_CHECKING:  # pragma: no cover
    import jax
    import matplotlib.pyplot as plt

    from scalelab.data import Split


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _split_evenly(n: int, parts: int) -> list[range]:
    """``parts`` contiguous ranges covering ``range(n)``, sizes differing by at most one."""
    bounds = np.linspace(0, n, parts + 1).round().astype(int)
    return [range(int(a), int(b)) for a, b in itertools.pairwise(bounds)]


# =========================================================================== 1. decomposition
#
# A random forest is T independent trees, each fitted to its own bootstrap sample. Tree t
# depends only on (seed, t), so any assignment of trees to workers gives the same forest,
# and majority votes are integer counts, so the ensemble's prediction does not depend on
# the order in which the workers' votes are added.

_FOREST_DATA: dict[str, np.ndarray] = {}


def forest_worker_init(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                       classes: int) -> None:
    """Pool initializer: each worker receives the data once, not with every task."""
    import sklearn.tree  # noqa: F401  (import once at start-up, not inside the first task)

    _FOREST_DATA.update(x_train=x_train, y_train=y_train, x_test=x_test,
                        classes=np.asarray(classes))


def _fit_tree(x: np.ndarray, y: np.ndarray, seed: int, tree: int):
    from sklearn.tree import DecisionTreeClassifier

    rng = np.random.default_rng([seed, tree])
    rows = rng.integers(0, len(y), len(y))  # bootstrap sample
    model = DecisionTreeClassifier(max_features="sqrt", random_state=(seed * 100_003 + tree) % 2**31)
    return model.fit(x[rows], y[rows])


def forest_votes(trees: Sequence[int], seed: int) -> np.ndarray:
    """Fit the trees numbered ``trees`` and return their votes on the test set.

    Runs in a worker (after :func:`forest_worker_init`) or in-process. Returns an integer array
    (test examples x classes) counting, for each example, how many trees chose each class.
    """
    d = _FOREST_DATA
    classes = int(d["classes"])
    votes = np.zeros((len(d["x_test"]), classes), dtype=np.int64)
    for t in trees:
        pred = _fit_tree(d["x_train"], d["y_train"], seed, t).predict(d["x_test"])
        votes[np.arange(len(pred)), pred] += 1
    return votes


@dataclasses.dataclass(frozen=True)
class ForestRun:
    """One forest trained with a given number of worker processes."""

    workers: int  # 0 = in this process, no pool
    trees: int
    seconds: float  # best wall time of the training (pool already started)
    startup_s: float  # starting the pool and sending it the data (0 without a pool)
    accuracy: float
    votes_checksum: int  # identical forests give identical votes

    def as_row(self) -> dict[str, Any]:
        return {"workers": self.workers or "in-process", "trees": self.trees,
                "seconds": self.seconds, "pool start-up s": self.startup_s,
                "test accuracy": self.accuracy}


def train_forest(split: Split, trees: int, workers: int, seed: int = 0, repeat: int = 1,
                 chunk: int = 8) -> ForestRun:
    """Train a ``trees``-tree random forest on ``split`` with ``workers`` processes.

    ``workers=0`` trains in this process (the baseline without any pool). Otherwise a
    ``spawn`` process pool is started and warmed up first (its start-up time is reported
    separately), then the trees are handed out in tasks of ``chunk`` trees and their votes
    summed. The training is timed ``repeat`` times (the best is kept); every repeat must
    produce the same votes.
    """
    trees = _positive_int("trees", trees)
    workers = _positive_int("workers", workers, minimum=0)
    repeat = _positive_int("repeat", repeat)
    chunk = _positive_int("chunk", chunk)
    args = (split.x_train, split.y_train, split.x_test, split.classes)
    tasks = [list(range(a, min(a + chunk, trees))) for a in range(0, trees, chunk)]
    times, results = [], []
    if workers == 0:
        saved = dict(_FOREST_DATA)
        try:
            forest_worker_init(*args)
            for _ in range(repeat):
                start = time.perf_counter()
                results.append(sum(forest_votes(t, seed) for t in tasks))
                times.append(time.perf_counter() - start)
        finally:
            _FOREST_DATA.clear()
            _FOREST_DATA.update(saved)
        startup = 0.0
    else:
        start = time.perf_counter()
        ctx = multiprocessing.get_context("spawn")  # fork is unsafe once JAX has started threads
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=forest_worker_init,
                                 initargs=args) as pool:
            list(pool.map(forest_votes, [[]] * workers, [seed] * workers))  # start every worker
            startup = time.perf_counter() - start
            for _ in range(repeat):
                start = time.perf_counter()
                results.append(sum(pool.map(forest_votes, tasks, [seed] * len(tasks))))
                times.append(time.perf_counter() - start)
    votes = results[0]
    if any(not np.array_equal(v, votes) for v in results[1:]):
        raise RuntimeError("repeated trainings of the same forest gave different votes")
    accuracy = float(np.mean(votes.argmax(axis=1) == split.y_test))
    return ForestRun(workers, trees, min(times), startup, accuracy, votes_checksum(votes))


def votes_checksum(votes: np.ndarray) -> int:
    """A checksum of a forest's vote counts: identical forests give identical checksums."""
    return zlib.crc32(np.ascontiguousarray(np.asarray(votes, dtype=np.int64)).tobytes())


def forest_scaling(split: Split, trees: int, worker_counts: Sequence[int], seed: int = 0,
                   repeat: int = 2, baseline: bool = True) -> list[ForestRun]:
    """Train the same forest with each worker count (and in-process if ``baseline``).

    The ``repeat`` rounds are interleaved (every worker count once per round, a fresh pool
    each time) so that a burst of other activity on a shared machine hits all counts alike;
    each count keeps its best time. Only one pool exists at a time. Raises RuntimeError if
    two runs produce different forests: the decomposition must not change the result.
    """
    counts = [_positive_int("worker count", w) for w in worker_counts]
    if not counts:
        raise ValueError("worker_counts must not be empty")
    repeat = _positive_int("repeat", repeat)
    order = ([0] if baseline else []) + counts
    rounds = [[train_forest(split, trees, w, seed) for w in order] for _ in range(repeat)]
    runs = [min((r[i] for r in rounds), key=lambda run: run.seconds) for i in range(len(order))]
    runs = [dataclasses.replace(run, startup_s=min(r[i].startup_s for r in rounds))
            for i, run in enumerate(runs)]
    if len({(r.votes_checksum, r.accuracy) for rs in rounds for r in rs}) != 1:
        raise RuntimeError("different worker counts trained different forests")
    return runs


def speedups(runs: Sequence[ForestRun]) -> dict[int, float]:
    """Speed-up of each pool size over the 1-worker pool (time(1) / time(w))."""
    one = [r.seconds for r in runs if r.workers == 1]
    if not one:
        raise ValueError("speedups need a run with workers=1")
    return {r.workers: one[0] / r.seconds for r in runs if r.workers >= 1}


# =========================================================================== 2. MapReduce
#
# map:     every input split turns its records into (key, value) pairs;
# shuffle: every pair is routed to the reducer partition that owns its key
#          (hash(key) mod partitions) and grouped by key there;
# reduce:  each key's values are folded with a binary, associative and commutative
#          function (Spark's reduceByKey; Hadoop's reducer sees the whole list).

Pair = tuple[Hashable, Any]
Mapper = Callable[[Any], Iterable[Pair]]
Reducer = Callable[[Any, Any], Any]


def stable_partition(key: Hashable, partitions: int) -> int:
    """The reducer partition that owns ``key``: a hash that is the same in every process.

    (Python's ``hash`` of a string changes between processes, so a real shuffle cannot
    use it.)
    """
    return zlib.crc32(repr(key).encode()) % partitions


def split_records(records: Sequence[Any], partitions: int) -> list[list[Any]]:
    """Cut the input into ``partitions`` contiguous splits (HDFS blocks, in Hadoop)."""
    partitions = _positive_int("partitions", partitions)
    return [[records[i] for i in r] for r in _split_evenly(len(records), partitions)]


def map_phase(split: Iterable[Any], mapper: Mapper, reducer: Reducer | None = None) -> list[Pair]:
    """Apply ``mapper`` to every record of one split; with ``reducer``, combine per key first.

    Combining on the map side (Hadoop's *combiner*) sends one pair per key and split
    through the shuffle instead of one per record.
    """
    pairs = [pair for record in split for pair in mapper(record)]
    if reducer is None:
        return pairs
    combined: dict[Hashable, Any] = {}
    for key, value in pairs:
        combined[key] = reducer(combined[key], value) if key in combined else value
    return list(combined.items())


def shuffle(mapped: Sequence[Sequence[Pair]], partitions: int) -> list[dict[Hashable, list[Any]]]:
    """Route every pair to the partition owning its key and group values by key there."""
    partitions = _positive_int("partitions", partitions)
    buckets: list[dict[Hashable, list[Any]]] = [{} for _ in range(partitions)]
    for pairs in mapped:
        for key, value in pairs:
            buckets[stable_partition(key, partitions)].setdefault(key, []).append(value)
    return buckets


def reduce_phase(bucket: dict[Hashable, list[Any]], reducer: Reducer) -> dict[Hashable, Any]:
    """Fold each key's values with ``reducer`` (one reducer task per partition)."""
    out = {}
    for key, values in bucket.items():
        acc = values[0]
        for v in values[1:]:
            acc = reducer(acc, v)
        out[key] = acc
    return out


@dataclasses.dataclass(frozen=True)
class MapReduceResult:
    output: dict[Hashable, Any]
    pairs_mapped: int  # pairs the mappers emitted
    pairs_shuffled: int  # pairs that crossed the shuffle (fewer with a combiner)
    keys_per_partition: tuple[int, ...]  # the reducers' load


def run_map_reduce(records: Sequence[Any], mapper: Mapper, reducer: Reducer,
                   partitions: int = 4, combine: bool = False) -> MapReduceResult:
    """Run a MapReduce job in this process, phase by phase, and count the shuffle."""
    partitions = _positive_int("partitions", partitions)
    splits = split_records(records, partitions)
    raw = [map_phase(s, mapper) for s in splits]
    mapped = [map_phase(s, mapper, reducer) for s in splits] if combine else raw
    buckets = shuffle(mapped, partitions)
    output: dict[Hashable, Any] = {}
    for bucket in buckets:
        output.update(reduce_phase(bucket, reducer))
    return MapReduceResult(
        output=output,
        pairs_mapped=sum(len(p) for p in raw),
        pairs_shuffled=sum(len(p) for p in mapped),
        keys_per_partition=tuple(len(b) for b in buckets),
    )


def map_reduce(records: Sequence[Any], mapper: Mapper, reducer: Reducer,
               partitions: int = 4, combine: bool = False) -> dict[Hashable, Any]:
    """map -> shuffle by key -> reduce; returns ``{key: reduced value}``.

    ``mapper(record)`` yields ``(key, value)`` pairs; ``reducer(a, b)`` combines two values
    of one key and must be associative and commutative (the order values arrive in
    depends on the partitioning).
    """
    return run_map_reduce(records, mapper, reducer, partitions, combine).output


# --- the two jobs: everything they need is a sum over rows, so any partitioning works


def row_blocks(x: np.ndarray, partitions: int, y: np.ndarray | None = None) -> list[Any]:
    """Split rows into ``partitions`` blocks (with the matching rows of ``y`` if given)."""
    partitions = _positive_int("partitions", partitions)
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (rows x features), got shape {x.shape}")
    if y is not None and len(y) != len(x):
        raise ValueError(f"x and y must have the same number of rows, got {len(x)} and {len(y)}")
    ranges = _split_evenly(len(x), partitions)
    if y is None:
        return [x[r.start:r.stop] for r in ranges]
    return [(x[r.start:r.stop], np.asarray(y)[r.start:r.stop]) for r in ranges]


def moments_mapper(block: np.ndarray) -> list[Pair]:
    """One pair per feature j: ``(j, [count, sum, sum of squares])`` of the block (float64)."""
    b = np.asarray(block, dtype=np.float64)
    stats = np.stack([np.full(b.shape[1], len(b), dtype=np.float64), b.sum(0), (b * b).sum(0)], 1)
    return [(j, stats[j]) for j in range(b.shape[1])]


def add(a: Any, b: Any) -> Any:
    """The reducer of both jobs (and of word count): ``a + b``."""
    return a + b


def finish_moments(reduced: dict[Hashable, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and (population) variance from the reduced sums.

    var = E[x^2] - E[x]^2 is fine for data of unit scale like pixels in [0, 1]; for data far
    from zero use a shifted or pairwise (Chan et al.) update instead.
    """
    stats = np.stack([reduced[j] for j in sorted(reduced)])
    count, total, squares = stats[:, 0], stats[:, 1], stats[:, 2]
    mean = total / count
    return mean, np.maximum(squares / count - mean**2, 0.0)


def lstsq_mapper(block: tuple[np.ndarray, np.ndarray]) -> list[Pair]:
    """``("xtx", X_b^T X_b)`` and ``("xty", X_b^T Y_b)`` of one block (float64)."""
    xb, yb = (np.asarray(a, dtype=np.float64) for a in block)
    return [("xtx", xb.T @ xb), ("xty", xb.T @ yb)]


def finish_lstsq(reduced: dict[Hashable, np.ndarray], ridge: float = 0.0) -> np.ndarray:
    """Solve the normal equations ``(X^T X + ridge I) W = X^T Y``."""
    xtx, xty = reduced["xtx"], reduced["xty"]
    return np.linalg.solve(xtx + ridge * np.eye(len(xtx)), xty)


def with_bias(x: np.ndarray) -> np.ndarray:
    """Append a column of ones (the intercept) to ``x``."""
    x = np.asarray(x, dtype=np.float64)
    return np.hstack([x, np.ones((len(x), 1))])


def one_hot(y: np.ndarray, classes: int) -> np.ndarray:
    """Targets of a least-squares classifier: one column per class."""
    return np.eye(classes)[np.asarray(y)]


def numpy_moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The single-machine reference: ``x.mean(0)``, ``x.var(0)`` in float64."""
    x = np.asarray(x, dtype=np.float64)
    return x.mean(0), x.var(0)


def numpy_lstsq(x: np.ndarray, y: np.ndarray, ridge: float = 0.0) -> np.ndarray:
    """The single-machine reference: ``np.linalg.lstsq`` on the ridge-augmented system."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same number of rows, got {len(x)} and {len(y)}")
    d = x.shape[1]
    xa = np.vstack([x, math.sqrt(ridge) * np.eye(d)])
    ya = np.vstack([y.reshape(len(y), -1), np.zeros((d, y.reshape(len(y), -1).shape[1]))])
    w = np.linalg.lstsq(xa, ya, rcond=None)[0]
    return w if y.ndim > 1 else w[:, 0]


def moments_job(x: np.ndarray, partitions: int = 4, engine: str = "python",
                scheduler: Any = "sync") -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and variance as a MapReduce job on ``engine`` ("python" or "dask")."""
    blocks = row_blocks(x, partitions)
    return finish_moments(_run(engine, blocks, moments_mapper, partitions, scheduler))


def lstsq_job(x: np.ndarray, y: np.ndarray, partitions: int = 4, ridge: float = 0.0,
              engine: str = "python", scheduler: Any = "sync") -> np.ndarray:
    """Least squares from partition sums of X^T X and X^T Y on ``engine``."""
    blocks = row_blocks(x, partitions, y)
    return finish_lstsq(_run(engine, blocks, lstsq_mapper, partitions, scheduler), ridge)


def _run(engine: str, records: Sequence[Any], mapper: Mapper, partitions: int,
         scheduler: Any) -> dict[Hashable, Any]:
    if engine == "python":
        return map_reduce(records, mapper, add, partitions, combine=True)
    if engine == "dask":
        return dask_bag_map_reduce(records, mapper, add, partitions, scheduler)
    raise ValueError(f"engine must be 'python' or 'dask', got {engine!r}")


# --- the same jobs on Dask


def _first(pair: Pair) -> Hashable:
    return pair[0]


def _fold_pairs(reducer: Reducer) -> Callable[[Pair, Pair], Pair]:
    def fold(a: Pair, b: Pair) -> Pair:
        return (a[0], reducer(a[1], b[1]))

    return fold


def dask_bag_map_reduce(records: Sequence[Any], mapper: Mapper, reducer: Reducer,
                        partitions: int = 4, scheduler: Any = "sync") -> dict[Hashable, Any]:
    """The same job with ``dask.bag``: ``map`` + ``flatten`` + ``foldby`` (reduceByKey).

    ``scheduler`` is passed to ``compute``: "sync" (one thread, for debugging and tests),
    "threads", "processes", or a ``distributed.Client``.
    """
    import dask.bag as db

    partitions = _positive_int("partitions", partitions)
    bag = db.from_sequence(list(records), npartitions=partitions)
    fold = _fold_pairs(reducer)
    folded = bag.map(mapper).flatten().foldby(_first, fold, combine=fold)
    result = folded.compute(scheduler=scheduler)
    return {key: pair[1] for key, pair in result}


@contextlib.contextmanager
def local_cluster(workers: int = 2) -> Iterator[Any]:
    """A ``dask.distributed`` cluster of ``workers`` local processes and its client.

    One thread per worker, no dashboard, quiet logs; both are closed on leaving the block.
    Usage: ``with local_cluster(2) as client: ...``.
    """
    from distributed import Client, LocalCluster

    workers = _positive_int("workers", workers)
    with (
        LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                     dashboard_address=None, silence_logs=logging.ERROR, timeout="60s") as cluster,
        Client(cluster, timeout="60s") as client,
    ):
        yield client


def _block_moments(block: np.ndarray) -> np.ndarray:
    """count, per-feature sums and per-feature sums of squares of one block (float64)."""
    b = np.asarray(block, dtype=np.float64)
    return np.stack([np.full(b.shape[1], len(b), dtype=np.float64), b.sum(0), (b * b).sum(0)])


def _sum_all(parts: Sequence[np.ndarray]) -> np.ndarray:
    return np.sum(np.stack(list(parts)), axis=0)


def futures_moments(client: Any, x: np.ndarray, partitions: int = 4
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance with the futures API: scatter blocks, map, reduce on a worker."""
    # fresh keys every call (hash/pure=False): identical data scattered twice would otherwise
    # share keys with futures that are being released
    blocks = client.scatter(row_blocks(x, partitions), hash=False)
    partial = client.map(_block_moments, blocks, pure=False)
    stats = client.submit(_sum_all, partial, pure=False).result(timeout=120)
    count, total, squares = stats
    mean = total / count
    return mean, np.maximum(squares / count - mean**2, 0.0)


# =========================================================================== 3. PS vs all-reduce
#
# N workers train one softmax regression (64 pixels + bias -> 10 classes) on the digits,
# worker w sampling mini-batches from its own shard of the training set.
#
# sync all-reduce: every step, every worker computes a gradient at the current parameters;
#     the mean is applied (what an all-reduce computes).
# async parameter server: every step the server applies ONE worker's gradient, computed on
#     the parameters of `tau` steps ago (workers take turns). A ring buffer keeps the last
#     tau + 1 parameter versions.


@dataclasses.dataclass(frozen=True)
class Task:
    """The data of the simulation: features with a bias column, labels, worker shards."""

    x: np.ndarray  # float64, train rows x (features + 1)
    y: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int
    shards: tuple[np.ndarray, ...]  # row indices of each worker

    @property
    def workers(self) -> int:
        return len(self.shards)


def make_task(split: Split, workers: int, seed: int = 0) -> Task:
    """Shuffle the training rows and deal them into ``workers`` equal shards."""
    workers = _positive_int("workers", workers)
    if workers > len(split.y_train):
        raise ValueError(f"{workers} workers but only {len(split.y_train)} training rows")
    order = np.random.default_rng(seed).permutation(len(split.y_train))
    shards = tuple(order[r.start:r.stop] for r in _split_evenly(len(order), workers))
    return Task(with_bias(split.x_train), np.asarray(split.y_train), with_bias(split.x_test),
                np.asarray(split.y_test), split.classes, shards)


def softmax_loss_grad(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of softmax regression ``x @ w`` and its gradient in ``w``."""
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0] or len(x) != len(y):
        raise ValueError(f"shapes do not fit: x {x.shape}, w {w.shape}, y {np.shape(y)}")
    z = x @ w
    z = z - z.max(axis=1, keepdims=True)
    logsum = np.log(np.exp(z).sum(axis=1))
    rows = np.arange(len(y))
    loss = float(np.mean(logsum - z[rows, y]))
    p = np.exp(z - logsum[:, None])
    p[rows, y] -= 1.0
    return loss, x.T @ p / len(y)


def _evaluate(task: Task, w: np.ndarray) -> tuple[float, float]:
    loss = softmax_loss_grad(w, task.x, task.y)[0]
    acc = float(np.mean((task.x_test @ w).argmax(axis=1) == task.y_test))
    return loss, acc


class _Sampler:
    """Each worker draws its k-th mini-batch from its own generator: reproducible and
    independent of how the workers' turns interleave."""

    def __init__(self, task: Task, batch: int, seed: int):
        self.task, self.batch = task, _positive_int("batch", batch)
        self.rngs = [np.random.default_rng([seed, w]) for w in range(task.workers)]

    def grad(self, worker: int, w: np.ndarray) -> np.ndarray:
        shard = self.task.shards[worker]
        rows = shard[self.rngs[worker].integers(0, len(shard), self.batch)]
        return softmax_loss_grad(w, self.task.x[rows], self.task.y[rows])[1]


@dataclasses.dataclass(frozen=True)
class Curve:
    """Training loss (whole training set) and test accuracy after the given steps."""

    label: str
    workers: int
    tau: float  # staleness (mean staleness for a modelled schedule; 0 for sync)
    steps: np.ndarray  # server updates applied
    loss: np.ndarray
    accuracy: np.ndarray
    gradients: np.ndarray  # worker gradients computed so far
    time: np.ndarray | None = None  # modelled wall-clock (time units), where a model was used

    @property
    def final_loss(self) -> float:
        return float(self.loss[-1])


def _check_training(steps: int, lr: float, eval_every: int) -> tuple[int, int]:
    steps = _positive_int("steps", steps)
    eval_every = _positive_int("eval_every", eval_every)
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    return steps, eval_every


def _eval_steps(steps: int, eval_every: int) -> list[int]:
    return sorted({0, *range(eval_every, steps + 1, eval_every), steps})


def train_sync(task: Task, steps: int, lr: float, batch: int = 32, eval_every: int = 10,
               seed: int = 0) -> Curve:
    """Synchronous data parallelism: apply the mean of all workers' gradients every step."""
    steps, eval_every = _check_training(steps, lr, eval_every)
    sampler = _Sampler(task, batch, seed)
    w = np.zeros((task.x.shape[1], task.classes))
    marks = set(_eval_steps(steps, eval_every))
    rec: list[tuple[int, float, float]] = [(0, *_evaluate(task, w))]
    for t in range(1, steps + 1):
        g = np.mean([sampler.grad(k, w) for k in range(task.workers)], axis=0)  # the all-reduce
        w = w - lr * g
        if t in marks:
            rec.append((t, *_evaluate(task, w)))
    s, loss, acc = (np.array(c) for c in zip(*rec, strict=True))
    return Curve(f"sync all-reduce, N={task.workers}", task.workers, 0.0, s, loss, acc,
                 s * task.workers)


def train_async(task: Task, steps: int, lr: float, tau: int = 0, batch: int = 32,
                eval_every: int = 10, seed: int = 0,
                schedule: Sequence[tuple[int, int]] | None = None) -> Curve:
    """Asynchronous parameter server with stale gradients.

    Step t applies the gradient of worker ``t mod N`` computed on the parameters of step
    ``t - tau`` (step 0's before that). With ``schedule`` — one ``(worker, staleness)`` per
    step, e.g. from :func:`async_schedule` — the order and staleness vary per step.
    """
    steps, eval_every = _check_training(steps, lr, eval_every)
    modelled = schedule is not None
    if schedule is None:
        tau = _positive_int("tau", tau, minimum=0)
        schedule = [(t % task.workers, tau) for t in range(steps)]
    elif len(schedule) < steps:
        raise ValueError(f"schedule has {len(schedule)} entries for {steps} steps")
    stale = [int(s) for _, s in schedule[:steps]]
    if min(stale) < 0:
        raise ValueError("staleness must be >= 0")
    sampler = _Sampler(task, batch, seed)
    w = np.zeros((task.x.shape[1], task.classes))
    history: collections.deque[np.ndarray] = collections.deque([w], maxlen=max(stale) + 1)
    marks = set(_eval_steps(steps, eval_every))
    rec: list[tuple[int, float, float]] = [(0, *_evaluate(task, w))]
    for t in range(1, steps + 1):
        worker, s = schedule[t - 1]
        if not 0 <= worker < task.workers:
            raise ValueError(f"schedule names worker {worker}; there are {task.workers}")
        old = history[max(len(history) - 1 - s, 0)]  # the parameters of step t-1-s
        w = w - lr * sampler.grad(worker, old)
        history.append(w)
        if t in marks:
            rec.append((t, *_evaluate(task, w)))
    s_, loss, acc = (np.array(c) for c in zip(*rec, strict=True))
    label = "async PS" if modelled else f"async PS, N={task.workers}, tau={tau}"
    return Curve(label, task.workers, float(np.mean(stale)), s_, loss, acc, s_.copy())


def staleness_sweep(split: Split, workers: Sequence[int] = (2, 8),
                    taus: Sequence[int] = (0, 2, 8, 32), steps: int = 400, lr: float = 0.5,
                    batch: int = 32, eval_every: int = 10, seed: int = 0) -> list[Curve]:
    """For each N: the sync curve, then async curves for each tau (same seed and lr)."""
    curves = []
    for n in workers:
        task = make_task(split, n, seed)
        curves.append(train_sync(task, steps, lr, batch, eval_every, seed))
        for tau in taus:
            c = train_async(task, steps, lr, tau, batch, eval_every, seed)
            curves.append(dataclasses.replace(c, label=f"async, tau={tau}"))
    return curves


def steps_to_loss(curve: Curve, target: float) -> int | None:
    """The first evaluated step at which the training loss is <= target (None: never)."""
    hit = np.nonzero(curve.loss <= target)[0]
    return int(curve.steps[hit[0]]) if len(hit) else None


def time_to_loss(curve: Curve, target: float) -> float | None:
    """The modelled time at which the training loss first is <= target (None: never).

    Needs a curve with modelled times (from :func:`wallclock_comparison`).
    """
    if curve.time is None:
        raise ValueError(f"curve {curve.label!r} has no modelled time")
    hit = np.nonzero(curve.loss <= target)[0]
    return float(curve.time[hit[0]]) if len(hit) else None


# --- a MODEL of wall-clock time: worker step times with stragglers


@dataclasses.dataclass(frozen=True)
class StepTimeModel:
    """A model, not a measurement: one gradient takes ``base * LogNormal(0, sigma)`` time
    units, and with probability ``p_straggler`` it is ``slowdown`` times slower (a busy
    host, a preempted VM, a slow disk)."""

    base: float = 1.0
    sigma: float = 0.2
    p_straggler: float = 0.05
    slowdown: float = 5.0

    def __post_init__(self) -> None:
        if self.base <= 0 or self.sigma < 0 or self.slowdown < 1 or not 0 <= self.p_straggler <= 1:
            raise ValueError(f"invalid step-time model: {self}")

    def draw(self, rng: np.random.Generator, size: int | tuple[int, ...]) -> np.ndarray:
        t = self.base * rng.lognormal(0.0, self.sigma, size)
        return np.where(rng.random(size) < self.p_straggler, t * self.slowdown, t)


def sync_step_times(model: StepTimeModel, workers: int, steps: int, seed: int = 0,
                    allreduce_time: float = 0.0) -> np.ndarray:
    """Modelled duration of each synchronous step: the slowest worker plus the all-reduce."""
    rng = np.random.default_rng([seed, 1])
    draws = model.draw(rng, (_positive_int("steps", steps), _positive_int("workers", workers)))
    return draws.max(axis=1) + allreduce_time


def async_schedule(model: StepTimeModel, workers: int, steps: int, seed: int = 0
                   ) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Event simulation of an asynchronous server.

    Every worker reads the current parameters, computes for a modelled time, pushes its
    gradient and starts again. Returns one ``(worker, staleness)`` per server update —
    staleness = updates applied by others since that worker read the parameters — and the
    modelled time of each update.
    """
    workers, steps = _positive_int("workers", workers), _positive_int("steps", steps)
    rng = np.random.default_rng([seed, 2])
    events = [(float(model.draw(rng, 1)[0]), w, 0) for w in range(workers)]  # (finish, worker, read version)
    heapq.heapify(events)
    schedule, times = [], []
    for version in range(steps):
        finish, w, read = heapq.heappop(events)
        schedule.append((w, version - read))
        times.append(finish)
        heapq.heappush(events, (finish + float(model.draw(rng, 1)[0]), w, version + 1))
    return schedule, np.array(times)


def straggler_table(model: StepTimeModel, worker_counts: Sequence[int], steps: int = 2000,
                    seed: int = 0) -> list[dict[str, Any]]:
    """Modelled time per synchronous step (the slowest of N) against the mean gradient time.

    ``sync step`` is the mean over ``steps`` of the maximum of N draws; ``async: N updates``
    is the time an asynchronous server takes to apply N gradients (nobody waits).
    """
    rows = []
    for n in worker_counts:
        sync = sync_step_times(model, n, steps, seed)
        _, times = async_schedule(model, n, steps * n, seed)
        mean = float(model.draw(np.random.default_rng([seed, 3]), 100_000).mean())
        rows.append({"workers N": n, "mean gradient time": mean, "sync step (slowest of N)":
                     float(sync.mean()), "async: time per N updates": float(times[-1] / steps),
                     "sync utilisation": mean / float(sync.mean())})
    return rows


def wallclock_comparison(split: Split, workers: int, steps: int, lr: float,
                         model: StepTimeModel | None = None, batch: int = 32,
                         eval_every: int = 10, seed: int = 0) -> list[Curve]:
    """Curves against *modelled* wall-clock time for the same number of gradients.

    Returns three curves: synchronous steps with ``lr``; synchronous steps with
    ``lr * workers`` (the linear scaling rule for an N-times larger batch, Goyal et al.
    2017); and an asynchronous server with ``lr`` running ``steps * workers`` updates whose
    order and staleness come from the event simulation :func:`async_schedule`.
    """
    model = model or StepTimeModel()
    task = make_task(split, workers, seed)
    step_t = np.concatenate([[0.0], np.cumsum(sync_step_times(model, workers, steps, seed))])
    curves = []
    for rate, label in ((lr, f"sync, lr={lr:g}"), (lr * workers, f"sync, lr={lr * workers:g} (x N)")):
        c = train_sync(task, steps, rate, batch, eval_every, seed)
        curves.append(dataclasses.replace(c, label=label, time=step_t[c.steps]))
    schedule, times = async_schedule(model, workers, steps * workers, seed)
    asy = train_async(task, steps * workers, lr, batch=batch, eval_every=eval_every,
                      seed=seed, schedule=schedule)
    t = np.concatenate([[0.0], times])
    curves.append(dataclasses.replace(
        asy, label=f"async, lr={lr:g} (mean staleness {asy.tau:.1f})", time=t[asy.steps]))
    return curves


# --- the explorer: workers, staleness and learning rate -> sync vs async convergence
#
# The simulation above is cheap (a few hundred NumPy steps of a 65 x 10 softmax regression),
# so the explorer's model IS the chapter's training: both runs, at the chosen setting, on the
# chapter's digits split. There is no separate "real" run to measure: nothing here is an
# estimate of something else (the wall-clock side of section 3 is itself a model).


@functools.lru_cache(maxsize=1)
def _explorer_split() -> Split:
    """The chapter's digits split, loaded once per process (it is never modified)."""
    from scalelab import data

    return data.load_digits()


def _one_blas_thread() -> Any:
    """A context in which NumPy's BLAS uses one thread."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1)


def staleness_model(workers: int, tau: int, lr: float, steps: int = 400, seed: int = 0,
                    target: float = 0.35, batch: int = 32, eval_every: int = 10) -> dict[str, Any]:
    """Synchronous all-reduce against an asynchronous server with staleness ``tau`` (pure:
    the explorer's model).

    Trains the chapter's softmax regression on the digits split, shared into ``workers``
    shards, for ``steps`` server updates at learning rate ``lr``: once with :func:`train_sync`
    (the mean of the N workers' gradients each step) and once with :func:`train_async` (one
    worker's gradient per step, computed on the parameters of ``tau`` steps ago). Returns each
    run's final training loss and test accuracy, the first evaluated step at which its loss is
    <= ``target`` (None: never), the gradients each computed by then, whether the async run
    diverged (ended above the loss it started from, ln(classes)), and the loss curves (lists).
    Deterministic: the same arguments give the same numbers.
    """
    workers = _positive_int("workers", workers)
    tau = _positive_int("tau (steps of staleness)", tau, minimum=0)
    steps = _positive_int("steps", steps)
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if isinstance(target, bool) or not isinstance(target, int | float) or not target > 0:
        raise ValueError(f"target must be a loss > 0, got {target!r}")
    split = _explorer_split()
    task = make_task(split, workers, seed)
    with _one_blas_thread():  # thousands of tiny matmuls: threads only add overhead (same result)
        sync = train_sync(task, steps, float(lr), batch, eval_every, seed)
        asy = train_async(task, steps, float(lr), tau, batch, eval_every, seed)
    start = float(math.log(split.classes))
    hit_sync, hit_async = steps_to_loss(sync, target), steps_to_loss(asy, target)
    return {
        "sync_final_loss": sync.final_loss, "async_final_loss": asy.final_loss,
        "sync_accuracy": float(sync.accuracy[-1]), "async_accuracy": float(asy.accuracy[-1]),
        "sync_steps_to_target": hit_sync, "async_steps_to_target": hit_async,
        "sync_gradients_to_target": None if hit_sync is None else hit_sync * workers,
        "async_gradients_to_target": hit_async,
        "async_diverged": bool(not math.isfinite(asy.final_loss) or asy.final_loss > start),
        "start_loss": start, "target": float(target),
        "steps": [int(s) for s in sync.steps],
        "sync_loss": [float(v) for v in sync.loss], "async_loss": [float(v) for v in asy.loss],
    }


def staleness_explorer(info: env.EnvInfo | None = None, steps: int = 400, target: float = 0.35):
    """The staleness explorer: workers N, staleness tau and learning rate -> the loss curves of
    synchronous all-reduce and an asynchronous parameter server, trained at that setting."""
    from scalelab import plot, widgets

    def draw(settings, pred, points):
        fig, ax = plot.figure(width=7.0, height=3.8)
        s = pred["steps"]
        ax.plot(s, pred["sync_loss"], color="k", lw=2, label=f"sync all-reduce, N={settings['workers']}")
        ax.plot(s, pred["async_loss"], color="C3", lw=1.6,
                label=f"async PS, tau={settings['tau']}" + (" (diverged)" if pred["async_diverged"] else ""))
        ax.axhline(pred["start_loss"], color="0.6", ls=":", lw=1, label="loss at the start (ln 10)")
        ax.axhline(pred["target"], color="C2", ls="--", lw=1, label=f"target loss {pred['target']:g}")
        for key, colour in (("sync_steps_to_target", "k"), ("async_steps_to_target", "C3")):
            if pred[key] is not None:
                ax.scatter([pred[key]], [pred["target"]], s=50, color=colour, zorder=4)
        ax.set(yscale="log", xlabel="server steps (updates applied)", ylabel="training loss (log)",
               title=f"N = {settings['workers']} workers, tau = {settings['tau']}, lr = {settings['lr']:.3g}")
        _plain_log_y(ax)
        ax.legend(fontsize=7, loc="upper right")
        host_footer(fig, info, "trained in NumPy at this setting (the model is the training)")
        return fig

    controls = {
        "workers": widgets.dropdown("workers N", [1, 2, 4, 8], value=4),
        "tau": widgets.slider("staleness tau (steps)", 8, 0, 64, step=1, integer=True),
        "lr": widgets.slider("learning rate", 0.5, 0.01, 5.0, log=True),
    }
    return widgets.Explorer(
        "staleness", "Staleness explorer: sync all-reduce vs async parameter server", controls,
        staleness_model, draw, context={"steps": int(steps), "target": float(target)},
        shown=["sync_final_loss", "async_final_loss", "sync_steps_to_target", "async_steps_to_target",
               "async_diverged"],
        labels={"sync_final_loss": "sync final loss", "async_final_loss": "async final loss",
                "sync_steps_to_target": "sync steps to target", "async_steps_to_target": "async steps to target",
                "async_diverged": "async diverged"},
        note="Both runs are the chapter's real training (NumPy, the digits split) at this setting, so there is "
             "no 'measure' button: the curves are already the measurement, not a prediction of it.")


# =========================================================================== 4. ring all-reduce
#
# n devices in a ring; each holds a vector cut into n chunks.
# reduce-scatter (n-1 steps): at step s device i sends its running sum of chunk (i-s) mod n
#     to device i+1, which adds its own copy of that chunk. Afterwards device i holds the
#     complete sum of chunk (i+1) mod n.
# all-gather (n-1 steps): the complete chunks travel once more around the ring.
# Each step moves size/n per device: 2(n-1)/n * size in all, whatever n.


def ring_schedule(n: int) -> list[dict[str, Any]]:
    """Which chunk each device sends at every step of a ring all-reduce of n devices.

    Pure bookkeeping (no devices needed): one row per step, one column per device.
    """
    n = _positive_int("n", n)
    rows = []
    for s in range(n - 1):
        rows.append({"phase": "reduce-scatter", "step": s + 1,
                     **{f"device {i}": f"chunk {(i - s) % n} (partial sum)" for i in range(n)}})
    for s in range(n - 1):
        rows.append({"phase": "all-gather", "step": n + s,
                     **{f"device {i}": f"chunk {(i + 1 - s) % n} (complete)" for i in range(n)}})
    return rows


def ring_allreduce_local(x: jax.Array, axis_name: str) -> jax.Array:
    """Ring all-reduce of the local block ``x`` (1-D, length divisible by the axis size).

    Call inside ``jax.shard_map``; it returns the sum over ``axis_name`` of every device's
    ``x``, like ``lax.psum(x, axis_name)``, using only neighbour-to-neighbour ``ppermute``.
    """
    import jax.numpy as jnp
    from jax import lax

    n = lax.axis_size(axis_name)
    if n == 1:
        return x
    if x.ndim != 1 or x.shape[0] % n:
        raise ValueError(f"the local block must be 1-D with a length divisible by {n}, "
                         f"got shape {x.shape}")
    me = lax.axis_index(axis_name)
    chunks = x.reshape(n, -1)
    right = [(i, (i + 1) % n) for i in range(n)]
    send = chunks[me]
    for s in range(n - 1):  # reduce-scatter
        received = lax.ppermute(send, axis_name, right)
        send = received + chunks[(me - s - 1) % n]
    out = jnp.zeros_like(chunks).at[(me + 1) % n].set(send)
    for s in range(n - 1):  # all-gather
        send = lax.ppermute(send, axis_name, right)
        out = out.at[(me - s) % n].set(send)
    return out.reshape(x.shape)


def mesh_1d(n: int, axis_name: str = "i") -> jax.sharding.Mesh:
    """A 1-D mesh of ``n`` devices (``env.devices``) with classic (Auto) axis semantics."""
    import jax

    devices = env.devices(_positive_int("device count", n))
    return jax.make_mesh((n,), (axis_name,), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=devices)


def _per_device(values: np.ndarray, n: int) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim != 2 or values.shape[0] != n:
        raise ValueError(f"expected one row per device: shape ({n}, length), got {values.shape}")
    return values


def _padded(values: np.ndarray, n: int) -> tuple[np.ndarray, int]:
    length = values.shape[1]
    pad = (-length) % n
    return np.pad(values, ((0, 0), (0, pad))), length


def ring_allreduce(values: np.ndarray, n: int | None = None) -> np.ndarray:
    """All-reduce the rows of ``values`` (row i lives on device i) with the ring algorithm.

    ``values`` has shape (n, length), any length: it is zero-padded to a multiple of n and
    the padding removed afterwards. Returns an (n, length) array in which every row is
    the sum of all rows — each device's result. Blocks until the result is ready.
    """
    return _allreduce(values, n, "ring")


def psum_allreduce(values: np.ndarray, n: int | None = None) -> np.ndarray:
    """The reference: the same all-reduce with ``lax.psum`` (XLA chooses the algorithm)."""
    return _allreduce(values, n, "psum")


@functools.lru_cache(maxsize=32)
def _allreduce_fn(n: int, kind: str) -> Any:
    """The jitted shard_map program (cached: one compilation per device count and shape)."""
    import jax
    from jax import lax
    from jax.sharding import PartitionSpec as P

    mesh = mesh_1d(n)

    def local(block):
        if kind == "ring":
            return ring_allreduce_local(block[0], "i")[None]
        return lax.psum(block, "i")

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("i"), out_specs=P("i")))


def _allreduce(values: np.ndarray, n: int | None, kind: str) -> np.ndarray:
    values = np.asarray(values)
    n = len(values) if n is None else n
    values = _per_device(values, _positive_int("device count", n))
    padded, length = _padded(values, n)
    out = _allreduce_fn(n, kind)(padded)
    return np.asarray(out.block_until_ready())[:, :length]


def count_ppermute_bytes(values: np.ndarray, n: int | None = None) -> tuple[int, int]:
    """(number of ppermutes, bytes each device sends) in the compiled ring all-reduce.

    Read from the program (its jaxpr), not from the formula, so the two can be compared.
    """
    import jax

    values = np.asarray(values)
    n = len(values) if n is None else n
    padded, _ = _padded(_per_device(values, _positive_int("device count", n)), n)
    count, sent = 0, 0
    for eqn in _walk(jax.make_jaxpr(_allreduce_fn(n, "ring"))(padded).jaxpr):
        if eqn.primitive.name == "ppermute":
            count += 1
            aval = eqn.invars[0].aval
            sent += int(np.prod(aval.shape)) * aval.dtype.itemsize
    return count, sent


def _walk(jaxpr: Any) -> Iterator[Any]:
    """Every equation of a jaxpr, descending into sub-jaxprs (jit, shard_map, ...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _walk(inner)


def allreduce_bytes(size: float, n: int) -> dict[str, float]:
    """Bytes moved to all-reduce ``size`` bytes held by each of ``n`` devices.

    - ``ring_per_device``: sent (and received) by every device, 2(n-1)/n * size;
    - ``ps_server``: received by a single parameter server from n workers, n * size
      (it sends as much back);
    - ``ps_per_worker``: sent plus received by each worker, 2 * size;
    - ``direct_per_device``: the direct all-reduce, in which everyone sends its whole vector
      to everyone else and adds what it receives, (n-1) * size. (Not ``lax.all_to_all``,
      which sends a different 1/n slice to each device: a transpose, not a sum.)
    """
    n = _positive_int("n", n)
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    return {
        "ring_per_device": 2 * (n - 1) / n * size,
        "ps_server": n * size,
        "ps_per_worker": 2 * size,
        "direct_per_device": (n - 1) * size,
    }


def ring_seconds(size: float, n: int, bandwidth: float, latency: float = 0.0) -> float:
    """Time of a ring all-reduce: 2(n-1) steps, each ``latency`` + (size/n) / bandwidth."""
    n = _positive_int("n", n)
    if bandwidth <= 0 or latency < 0:
        raise ValueError(f"bandwidth must be > 0 and latency >= 0, got {bandwidth}, {latency}")
    return 2 * (n - 1) * (latency + size / n / bandwidth)


# =========================================================================== 5. collectives

MPI_TO_JAX: tuple[dict[str, str], ...] = (
    {"MPI": "MPI_Allreduce (sum)", "JAX (inside shard_map)": "lax.psum(x, 'i')",
     "every device ends with": "the sum of all blocks"},
    {"MPI": "MPI_Allreduce + divide", "JAX (inside shard_map)": "lax.pmean(x, 'i')",
     "every device ends with": "the mean of all blocks"},
    {"MPI": "MPI_Allgather", "JAX (inside shard_map)": "lax.all_gather(x, 'i')",
     "every device ends with": "all blocks, stacked"},
    {"MPI": "MPI_Reduce_scatter", "JAX (inside shard_map)": "lax.psum_scatter(x, 'i', tiled=True)",
     "every device ends with": "its 1/n slice of the sum"},
    {"MPI": "MPI_Alltoall", "JAX (inside shard_map)": "lax.all_to_all(x, 'i', 0, 0, tiled=True)",
     "every device ends with": "slice i of every block (a transpose)"},
    {"MPI": "MPI_Sendrecv (ring shift)", "JAX (inside shard_map)": "lax.ppermute(x, 'i', perm)",
     "every device ends with": "its left neighbour's block"},
    {"MPI": "MPI_Bcast", "JAX (inside shard_map)": "lax.psum(where(axis_index == root, x, 0), 'i')",
     "every device ends with": "the root's block"},
)


def demo_blocks(n: int) -> np.ndarray:
    """Device i holds the n numbers ``10 i + j`` (j = 0..n-1): easy to follow by eye."""
    n = _positive_int("n", n)
    return (10 * np.arange(n)[:, None] + np.arange(n)[None, :]).astype(np.float32)


def collectives(n: int, root: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Run each collective on :func:`demo_blocks` over ``n`` devices.

    Returns ``{name: (what device i holds afterwards, stacked over i; NumPy's expected)}``.
    """
    import jax
    import jax.numpy as jnp
    from jax import lax
    from jax.sharding import PartitionSpec as P

    n = _positive_int("n", n)
    if not 0 <= root < n:
        raise ValueError(f"root must be in 0..{n - 1}, got {root}")
    mesh = mesh_1d(n)
    x = demo_blocks(n)
    right = [(i, (i + 1) % n) for i in range(n)]
    ops: dict[str, Callable[[Any], Any]] = {
        "psum": lambda b: lax.psum(b, "i"),
        "pmean": lambda b: lax.pmean(b, "i"),
        "all_gather": lambda b: lax.all_gather(b, "i", axis=1, tiled=True),
        "psum_scatter": lambda b: lax.psum_scatter(b, "i", scatter_dimension=1, tiled=True),
        "all_to_all": lambda b: lax.all_to_all(b, "i", 1, 1, tiled=True),
        "ppermute": lambda b: lax.ppermute(b, "i", right),
        "broadcast": lambda b: lax.psum(jnp.where(lax.axis_index("i") == root, b, 0.0), "i"),
    }
    total = x.sum(0)
    expected = {
        "psum": np.tile(total, (n, 1)),
        "pmean": np.tile(total / n, (n, 1)),
        "all_gather": np.tile(x.reshape(1, -1), (n, 1)),
        "psum_scatter": total.reshape(n, 1),
        "all_to_all": x.T.copy(),
        "ppermute": np.roll(x, 1, axis=0),
        "broadcast": np.tile(x[root], (n, 1)),
    }
    out = {}
    for name, op in ops.items():
        fn = jax.jit(jax.shard_map(op, mesh=mesh, in_specs=P("i"), out_specs=P("i")))
        got = np.asarray(fn(x).block_until_ready())  # block: never queue many collectives
        out[name] = (got, expected[name])
    return out


# =========================================================================== 6. plots


def _plain_log_y(ax: Any) -> None:
    """Label a log y-axis with plain numbers (0.2, 0.5, 1, 2, 5) rather than 2 x 10^-1."""
    from matplotlib.ticker import FuncFormatter

    def minor(value: float, _: Any) -> str:
        lead = round(value / 10 ** math.floor(math.log10(value))) if value > 0 else 0
        return f"{value:g}" if lead in (2, 5) else ""

    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def host_footer(fig: plt.Figure, info: env.EnvInfo | None, what: str) -> str:
    """Footer for work that ran on the host CPU (NumPy, worker processes), not on the JAX
    devices: e.g. ``simulated in NumPy on the host CPU (2 cores), full mode``.

    Same place and style as :func:`scalelab.plot.label`; returns the text.
    """
    from scalelab import plot  # matplotlib only when drawing

    info = info or env.describe()
    return plot.footer(fig, f"{what} on the host CPU ({env.cpu_cores()} cores), "
                            f"{'quick' if info.quick else 'full'} mode")


def plot_speedup(runs: Sequence[ForestRun], info: env.EnvInfo | None = None) -> plt.Figure:
    """Forest training time and speed-up against the number of worker processes."""
    from scalelab import plot  # matplotlib only when drawing

    pool = [r for r in runs if r.workers >= 1]
    sp = speedups(runs)
    fig, (a, b) = plot.figure(ncols=2, width=9.0)
    ws = [r.workers for r in pool]
    a.bar([str(w) for w in ws], [r.seconds for r in pool], color="C0", label="training")
    a.bar([str(w) for w in ws], [r.startup_s for r in pool], bottom=[r.seconds for r in pool],
          color="C0", alpha=0.35, label="pool start-up")
    inproc = [r.seconds for r in runs if r.workers == 0]
    if inproc:
        a.axhline(inproc[0], color="k", ls=":", label="in-process, no pool")
    top = max([r.seconds + r.startup_s for r in pool] + inproc)
    a.set(xlabel="worker processes", ylabel="seconds", title=f"Random forest, {pool[0].trees} trees",
          ylim=(0, 1.45 * top))
    a.legend(loc="upper left", ncols=2, fontsize=8)
    b.plot(ws, [sp[w] for w in ws], "o-", label="measured")
    b.plot(ws, ws, "k--", label="ideal (linear)")
    b.axvline(env.cpu_cores(), color="0.6", ls=":", label=f"{env.cpu_cores()} CPU cores")
    b.set(xlabel="worker processes", ylabel="speed-up over 1 worker", xticks=ws,
          ylim=(0, 1.15 * max(max(ws), *sp.values())), title="Embarrassingly parallel: speed-up")
    b.legend(loc="upper left")
    host_footer(fig, info, "measured with worker processes (scikit-learn)")
    return fig


def plot_convergence(curves: Sequence[Curve], info: env.EnvInfo | None = None,
                     source: str = "simulated in NumPy") -> plt.Figure:
    """Training loss and test accuracy against server steps, one row of panels per N."""
    from scalelab import plot  # matplotlib only when drawing

    ns = sorted({c.workers for c in curves})
    fig, axes = plot.figure(ncols=2, nrows=len(ns), width=9.5, height=0.6 + 2.9 * len(ns),
                            squeeze=False)
    for row, n in zip(axes, ns, strict=True):
        for i, c in enumerate(c for c in curves if c.workers == n):
            sync = c.label.startswith("sync")
            style = {"color": "k", "lw": 2.0, "zorder": 3} if sync else {"color": f"C{i}"}
            name = "sync all-reduce" if sync else c.label
            row[0].plot(c.steps, c.loss, label=name if n == ns[0] else None, **style)
            row[1].plot(c.steps, c.accuracy, **style)
        row[0].set(yscale="log", ylabel="training loss (log)", title=f"N = {n} workers")
        _plain_log_y(row[0])
        row[1].set(ylabel="test accuracy", ylim=(0, 1), title=f"N = {n} workers")
    for ax in axes[-1]:
        ax.set_xlabel("server steps (updates applied)")
    fig.legend(loc="outside upper center", ncols=5)
    host_footer(fig, info, source)
    return fig


def plot_wallclock(groups: Sequence[Sequence[Curve]], info: env.EnvInfo | None = None
                   ) -> plt.Figure:
    """Loss against *modelled* wall-clock time, one panel per N (curves from
    :func:`wallclock_comparison`)."""
    from scalelab import plot  # matplotlib only when drawing

    fig, axes = plot.figure(ncols=len(groups), width=4.8 * len(groups), squeeze=False)
    colours = ("k", "0.55", "C3")
    for ax, curves in zip(axes[0], groups, strict=True):
        for c, colour in zip(curves, itertools.cycle(colours), strict=False):
            ax.plot(c.time, c.loss, color=colour, lw=2 if colour == "k" else 1.5, label=c.label)
        ax.set(yscale="log", xlabel="modelled time (units of one gradient)",
               ylabel="training loss (log)", title=f"N = {curves[0].workers} workers")
        _plain_log_y(ax)
        ax.legend(fontsize=8)
    host_footer(fig, info, "step times modelled, training simulated in NumPy")
    return fig


def plot_bytes(ns: Sequence[int], size: float = 1.0, info: env.EnvInfo | None = None
               ) -> plt.Figure:
    """Bytes each party moves to all-reduce ``size`` against the number of devices."""
    from scalelab import plot  # matplotlib only when drawing

    ns = [_positive_int("n", n) for n in ns if n > 1]  # with one device nothing moves
    if not ns:
        raise ValueError("plot_bytes needs at least one device count > 1")
    rows = [allreduce_bytes(size, n) for n in ns]
    fig, ax = plot.figure(width=6.4)
    ax.plot(ns, [r["ps_server"] for r in rows], "o-", color="C3",
            label="parameter server: received at the server (n x size)")
    ax.plot(ns, [r["direct_per_device"] for r in rows], "^-", color="C1",
            label="direct all-reduce, everyone sends to everyone: per device ((n-1) x size)")
    ax.plot(ns, [r["ps_per_worker"] for r in rows], "s--", color="C2",
            label="parameter server: per worker (2 x size)")
    ax.plot(ns, [r["ring_per_device"] for r in rows], "o-", color="C0",
            label="ring all-reduce: per device (2(n-1)/n x size)")
    ax.set(xscale="log", yscale="log", xlabel="devices n", ylabel="bytes moved / gradient size",
           title="Traffic to all-reduce one gradient of a given size")
    ax.set_xticks(ns, [str(n) for n in ns])
    _plain_log_y(ax)
    ax.legend(fontsize=8)
    mode = "quick" if (info or env.describe()).quick else "full"
    plot.footer(fig, f"computed from the formulas, nothing measured, {mode} mode")
    return fig


def plot_latency(sizes: Sequence[int], dask_s: Sequence[float], psum_s: Sequence[float],
                 workers: int, info: env.EnvInfo | None = None) -> plt.Figure:
    """Seconds per exchange against message size: Dask task rounds and ``lax.psum`` calls."""
    from scalelab import plot  # matplotlib only when drawing

    if not len(sizes) == len(dask_s) == len(psum_s) or not len(sizes):
        raise ValueError("plot_latency needs one Dask and one psum time per message size")
    info = info or env.describe()
    fig, (a, b) = plot.figure(ncols=2, width=9.0)
    a.plot(sizes, 1e6 * np.asarray(dask_s), "o-", color="C3", label="Dask: one task round")
    a.plot(sizes, 1e6 * np.asarray(psum_s), "s-", color="C0", label="lax.psum: one collective")
    a.set(xscale="log", yscale="log", xlabel="message bytes per participant",
          ylabel="microseconds per exchange", title="Latency of one exchange")
    a.legend(fontsize=8)
    b.plot(sizes, np.asarray(dask_s) / np.asarray(psum_s), "o-", color="k")
    b.axhline(1.0, color="0.6", ls=":")
    b.set(xscale="log", yscale="log", xlabel="message bytes per participant",
          ylabel="Dask time / psum time", title="How much more a task round costs")
    _plain_log_y(b)
    devices = info.label.rsplit(", ", 1)[0]
    plot.footer(fig, f"measured: psum on {devices}; Dask with {workers} worker process(es) on the "
                     f"host CPU, {'quick' if info.quick else 'full'} mode")
    return fig


# =========================================================================== 7. multi-process launcher (chapter 07)


class LaunchError(RuntimeError):
    """A launched process failed or the group ran past its timeout; all were stopped."""


def _kill(proc) -> None:
    import contextlib
    import os
    import signal

    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: a hung JAX process ignores SIGTERM
    proc.wait()


def launch(commands: list[list[str]], timeout: float, env: dict[str, str] | None = None,
           poll: float = 0.1) -> list[str]:
    """Run one process per command, all at once; return their standard outputs.

    If any process exits non-zero, the others are killed (SIGKILL: hung XLA processes
    ignore SIGTERM) and :class:`LaunchError` names the process, its exit code and the end
    of its standard error. If they are not all done within ``timeout`` seconds, all are
    killed and the error names the ones still running.
    """
    import subprocess
    import tempfile
    import time

    if not commands:
        raise ValueError("launch needs at least one command")
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0, got {timeout}")
    logs = [tempfile.TemporaryFile(mode="w+") for _ in commands]
    outs = [tempfile.TemporaryFile(mode="w+") for _ in commands]
    procs = [subprocess.Popen(cmd, stdout=out, stderr=log, env=env, start_new_session=True)
             for cmd, out, log in zip(commands, outs, logs, strict=True)]

    def tail(i: int) -> str:
        logs[i].seek(0)
        return "\n".join(logs[i].read().strip().splitlines()[-8:])

    deadline = time.monotonic() + timeout
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i = failed[0]
                for p in procs:
                    _kill(p)
                raise LaunchError(f"process {i} of {len(procs)} exited with code {codes[i]}; "
                                  f"the others were stopped. Its last output:\n{tail(i)}")
            if all(c == 0 for c in codes):
                break
            if time.monotonic() > deadline:
                running = [i for i, c in enumerate(codes) if c is None]
                for p in procs:
                    _kill(p)
                raise LaunchError(f"timed out after {timeout:.0f} s; processes {running} were still "
                                  "running and were killed")
            time.sleep(poll)
        results = []
        for out in outs:
            out.seek(0)
            results.append(out.read())
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                _kill(p)
        for f in logs + outs:
            f.close()


def free_port() -> int:
    """A TCP port on localhost that is free right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_multiprocess_training(processes: int = 2, devices_per_process: int = 4, steps: int = 20,
                              batch: int = 128, lr: float = 0.1, timeout: float = 240,
                              fail: str | None = None) -> dict[str, object]:
    """Train the chapter-07 model as ``processes`` JAX processes on one machine (the
    ``scalelab.dp_worker`` script) and return process 0's losses and parameters."""
    import json
    import os
    import sys
    import tempfile
    from pathlib import Path

    if processes < 1 or devices_per_process < 1:
        raise ValueError(f"processes and devices_per_process must be >= 1, got {processes}, {devices_per_process}")
    if batch % (processes * devices_per_process):
        raise ValueError(f"batch {batch} must divide evenly over {processes * devices_per_process} devices")
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "SCALELAB_CPU_DEVICES", "XLA_FLAGS")}
    env["JAX_PLATFORMS"] = "cpu"
    coordinator = f"localhost:{free_port()}"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        commands = [[sys.executable, "-m", "scalelab.dp_worker", "--coordinator", coordinator,
                     "--processes", str(processes), "--process-id", str(i),
                     "--devices-per-process", str(devices_per_process), "--steps", str(steps),
                     "--batch", str(batch), "--lr", str(lr), "--out", str(out)]
                    + (["--fail", fail] if fail else []) for i in range(processes)]
        launch(commands, timeout=timeout, env=env)
        result = json.loads(out.read_text())
    result["ok"] = True
    return result

