"""Datasets used across the course (chapter 03 extends this with synthetic data and HDF5).

Everything here ships with an installed package: no downloads at run time.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np


@dataclasses.dataclass(frozen=True)
class Split:
    """A train/test split of features ``x`` (float32) and integer labels ``y``."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int

    @property
    def features(self) -> int:
        return int(self.x_train.shape[1])


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> Split:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes).

    Pixels are scaled from 0..16 to 0..1 and flattened to 64 features; the split is
    stratified by class and reproducible for a given ``seed``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    bunch = _load()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return Split(x_tr, y_tr, x_te, y_te, classes=int(y.max()) + 1)


def dataset_card(split: Split, name: str = "scikit-learn digits") -> dict[str, object]:
    """Size, classes, balance and provenance of a split, as a dict (a dataset card)."""
    y = np.concatenate([split.y_train, split.y_test])
    counts = np.bincount(y, minlength=split.classes)
    return {
        "name": name,
        "examples": len(y),
        "train / test": f"{len(split.y_train)} / {len(split.y_test)}",
        "features": split.features,
        "image shape": "8 x 8, 17 grey levels (0..16), scaled to [0, 1]",
        "classes": split.classes,
        "examples per class (min..max)": f"{counts.min()}..{counts.max()}",
        "balance (min/max)": round(float(counts.min() / counts.max()), 3),
        "bytes (float32)": int(len(y) * split.features * 4),
        "provenance": "UCI ML hand-written digits (Alpaydin & Kaynak, 1998), test set of the "
                      "UCI release, bundled with scikit-learn",
        "license": "CC BY 4.0 (UCI Machine Learning Repository)",
    }


def sample_photos() -> list[np.ndarray]:
    """scikit-learn's two bundled photos (china.jpg, flower.jpg; CC BY 2.0), uint8 HxWx3."""
    from sklearn.datasets import load_sample_images

    return [np.asarray(img) for img in load_sample_images().images]


def photo_patches(count: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """``count`` random ``size`` x ``size`` RGB crops (uint8) of the bundled photos.

    Real pixels (unlike random noise) compress like real image data, which matters for
    the storage-format measurements.
    """
    if count < 1 or size < 1:
        raise ValueError(f"count and size must be >= 1, got {count}, {size}")
    photos = sample_photos()
    h, w = photos[0].shape[:2]
    if size > min(h, w):
        raise ValueError(f"size must be <= {min(h, w)} (the photos are {h} x {w}), got {size}")
    rng = np.random.default_rng(seed)
    which = rng.integers(0, len(photos), count)
    top = rng.integers(0, h - size + 1, count)
    left = rng.integers(0, w - size + 1, count)
    out = np.empty((count, size, size, 3), dtype=np.uint8)
    for i in range(count):
        out[i] = photos[which[i]][top[i]:top[i] + size, left[i]:left[i] + size]
    return out


# --------------------------------------------------------------------------- synthetic data


@dataclasses.dataclass
class VAERun:
    """A trained generator and what it cost."""

    model: object
    losses: list[float]
    steps: int
    train_s: float
    flops_per_step: float

    @property
    def train_flops(self) -> float:
        return self.flops_per_step * self.steps


def train_vae(x: np.ndarray, y: np.ndarray, classes: int, steps: int = 3000, batch: int = 128,
              lr: float = 2e-3, latent: int = 8, seed: int = 0) -> VAERun:
    """Train a class-conditional VAE (``scalelab.models.ConditionalVAE``) with Adam."""
    import time

    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from scalelab.abstractions import lowering
    from scalelab.models import ConditionalVAE, vae_loss

    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"x must be (n, features) with one label per row; got {x.shape}, {y.shape}")
    if steps < 1 or batch < 1:
        raise ValueError(f"steps and batch must be >= 1, got {steps}, {batch}")
    model = ConditionalVAE(x.shape[1], classes, latent=latent, rngs=nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, xb, yb, key):
        loss, grads = nnx.value_and_grad(vae_loss)(model, xb, yb, key)
        optimizer.update(model, grads)
        return loss

    xj, yj = jnp.asarray(x), jnp.asarray(y)
    key = jax.random.key(seed)
    batch = min(batch, len(x))
    graph, state = nnx.split(model)

    def loss_of(state, xb, yb, k):
        return jax.grad(lambda s: vae_loss(nnx.merge(graph, s), xb, yb, k))(state)

    flops = lowering(loss_of, state, xj[:batch], yj[:batch], key).flops
    rng = np.random.default_rng(seed)
    losses = []
    start = time.perf_counter()
    for i in range(steps):
        idx = rng.integers(0, len(x), batch)
        loss = step(model, optimizer, xj[idx], yj[idx], jax.random.fold_in(key, i))
        if i % 100 == 0 or i == steps - 1:
            losses.append(float(loss))
    return VAERun(model, losses, steps, time.perf_counter() - start, flops)


def synthesize(run: VAERun, per_class: int, classes: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Generate ``per_class`` images of every class from a trained VAE (pixel means in [0, 1])."""
    import jax
    import jax.numpy as jnp

    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    y = np.repeat(np.arange(classes, dtype=np.int32), per_class)
    x = run.model.generate(jnp.asarray(y), jax.random.key(seed))
    return np.asarray(x, dtype=np.float32), y


def synthetic_value(split: Split, synth_x: np.ndarray, synth_y: np.ndarray,
                    seeds: tuple[int, ...] = (0, 1, 2)) -> list[dict[str, object]]:
    """Test accuracy on the *real* test set of a classifier trained on real, synthetic, both.

    The classifier is scikit-learn's logistic regression: fast, deterministic and the same
    for every training set, so only the data differs. Each row reports the mean and
    spread over ``seeds`` (different subsamples of 90% of the training set).
    """
    from sklearn.linear_model import LogisticRegression

    sets = {
        "real": (split.x_train, split.y_train),
        "synthetic": (synth_x, synth_y),
        "real + synthetic": (np.concatenate([split.x_train, synth_x]),
                             np.concatenate([split.y_train, synth_y])),
    }
    rows = []
    for name, (x, y) in sets.items():
        accs = []
        for s in seeds:
            idx = np.random.default_rng(s).permutation(len(x))[: int(0.9 * len(x))]
            clf = LogisticRegression(max_iter=2000).fit(x[idx], y[idx])
            accs.append(float(np.mean(clf.predict(split.x_test) == split.y_test)))
        rows.append({"training data": name, "examples": len(x),
                     "real test accuracy": float(np.mean(accs)), "spread (std)": float(np.std(accs))})
    return rows


def class_diversity(x: np.ndarray, y: np.ndarray) -> float:
    """Mean over classes of the average per-pixel standard deviation within the class.

    A generator that collapses towards one prototype per class scores low.
    """
    return float(np.mean([x[y == c].std(axis=0).mean() for c in np.unique(y)]))


# --------------------------------------------------------------------------- HDF5 store

STORE_FORMAT = "scalelab-store/1"


class StoreError(ValueError):
    """A store file that exists but is not what was expected (schema, corruption)."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a store's datasets are laid out on disk.

    ``chunk_rows``: None = contiguous; otherwise rows per chunk. ``compression``: None,
    "lzf" or "gzip" (needs chunks; ``level`` for gzip).
    """

    chunk_rows: int | None = None
    compression: str | None = None
    level: int | None = None

    def __post_init__(self):
        if self.compression not in (None, "lzf", "gzip"):
            raise ValueError(f"compression must be None, 'lzf' or 'gzip', got {self.compression!r}")
        if self.compression and self.chunk_rows is None:
            raise ValueError("compression needs chunking: set chunk_rows")
        if self.chunk_rows is not None and self.chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {self.chunk_rows}")

    def h5_kwargs(self, shape: tuple[int, ...]) -> dict[str, object]:
        if self.chunk_rows is None:
            return {}
        kw: dict[str, object] = {"chunks": (min(self.chunk_rows, shape[0]), *shape[1:])}
        if self.compression:
            kw["compression"] = self.compression
            if self.compression == "gzip":
                kw["compression_opts"] = 4 if self.level is None else self.level
        return kw


def _checksum(array: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def schema_of(arrays: dict[str, np.ndarray]) -> dict[str, dict[str, object]]:
    """Names, dtypes and per-row shapes of a set of arrays with a common first dimension."""
    return {k: {"dtype": str(v.dtype), "shape": list(v.shape[1:])} for k, v in sorted(arrays.items())}


def write_store(path, arrays: dict[str, np.ndarray], provenance: str, layout: Layout | None = None,
                version: str = "1", checksum: bool = True) -> Path:
    """Write arrays (same number of rows) to an HDF5 file atomically.

    Attributes record the format, the dataset version, provenance, creation time, the
    schema and (unless ``checksum=False``) a SHA-256 checksum per dataset. The file is written under a temporary
    name in the same folder and renamed into place only when complete, so a crash never
    leaves a half-written file at ``path``.
    """
    import datetime as dt
    import json
    import os
    import tempfile

    import h5py

    if not arrays:
        raise ValueError("write_store needs at least one array")
    rows = {k: (np.asarray(v).shape[0] if np.asarray(v).ndim else None) for k, v in arrays.items()}
    if None in rows.values() or len(set(rows.values())) != 1:
        raise ValueError(f"all arrays need the same number of rows (first dimension), got {rows}")
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    for k, v in arrays.items():
        if v.dtype.kind not in "biuf":
            raise ValueError(f"array {k!r} has dtype {v.dtype}; expected a numeric or bool dtype")
    layout = layout or Layout()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = STORE_FORMAT
            f.attrs["version"] = version
            f.attrs["provenance"] = provenance
            f.attrs["created"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            f.attrs["schema"] = json.dumps(schema_of(arrays))
            f.attrs["rows"] = next(iter(rows.values()))
            for name, arr in arrays.items():
                ds = f.create_dataset(name, data=arr, **layout.h5_kwargs(arr.shape))
                if checksum:
                    ds.attrs["sha256"] = _checksum(arr)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


class Store:
    """Read access to a file written by :func:`write_store`.

    Dataset handles are opened once and cached; :meth:`read` returns contiguous row
    slices (the fast path in HDF5). Use as a context manager or call :meth:`close`.
    """

    def __init__(self, path, schema: dict[str, dict[str, object]] | None = None,
                 cache_bytes: int | None = None, verify: bool = False):
        import json

        import h5py

        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"no store at {self.path}")
        kwargs = {"rdcc_nbytes": cache_bytes, "rdcc_nslots": 10007} if cache_bytes else {}
        try:
            self._file = h5py.File(self.path, "r", **kwargs)
        except OSError as exc:
            raise StoreError(f"{self.path} is not a readable HDF5 file (truncated or corrupt?): {exc}") from None
        try:
            if self._file.attrs.get("format") != STORE_FORMAT:
                raise StoreError(f"{self.path} is not a scalelab store (attribute format="
                                 f"{self._file.attrs.get('format')!r}, expected {STORE_FORMAT!r})")
            self.schema = json.loads(self._file.attrs["schema"])
            if schema is not None and schema != self.schema:
                raise StoreError(f"{self.path} has schema {self.schema}, expected {schema}")
            self.rows = int(self._file.attrs["rows"])
            self._datasets = {name: self._file[name] for name in self.schema}
            if verify:
                self.verify()
        except (OSError, KeyError) as exc:
            self._file.close()
            raise StoreError(f"{self.path} is damaged (truncated or corrupt?): {exc}") from None
        except BaseException:
            self._file.close()
            raise

    @property
    def attrs(self) -> dict[str, object]:
        return {k: (v.item() if hasattr(v, "item") else v) for k, v in self._file.attrs.items()}

    def __len__(self) -> int:
        return self.rows

    def read(self, start: int, stop: int, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """Rows ``start:stop`` of every dataset (or of ``names``)."""
        if not 0 <= start <= stop <= self.rows:
            raise IndexError(f"slice {start}:{stop} outside 0:{self.rows}")
        names = names or tuple(self._datasets)
        return {n: self._datasets[n][start:stop] for n in names}

    def row(self, index: int, name: str) -> np.ndarray:
        """One row of one dataset (a random access)."""
        if not 0 <= index < self.rows:
            raise IndexError(f"row {index} outside 0:{self.rows}")
        return self._datasets[name][index]

    def verify(self) -> None:
        """Recompute every dataset's checksum; raise StoreError on a mismatch."""
        for name, ds in self._datasets.items():
            try:
                data = ds[...]
            except OSError as exc:
                raise StoreError(f"{self.path}: dataset {name!r} cannot be read ({exc})") from None
            if "sha256" not in ds.attrs:
                raise StoreError(f"{self.path}: dataset {name!r} was written without a checksum")
            if _checksum(data) != ds.attrs["sha256"]:
                raise StoreError(f"{self.path}: dataset {name!r} does not match its checksum")

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- storage layouts

NPY = "npy memmap"


def storage_layouts(rows_per_chunk: int = 64) -> dict[str, Layout | str]:
    """The layouts compared in chapter 03 (HDF5 variants and a NumPy memory-map peer)."""
    return {
        "contiguous": Layout(),
        "chunk 1 row": Layout(1),
        f"chunk {rows_per_chunk} rows": Layout(rows_per_chunk),
        "chunk 512 rows": Layout(512),
        f"lzf, chunk {rows_per_chunk}": Layout(rows_per_chunk, "lzf"),
        f"gzip-4, chunk {rows_per_chunk}": Layout(rows_per_chunk, "gzip", 4),
        NPY: NPY,
    }


class _NpyReader:
    """The same read interface as :class:`Store`, over a ``.npy`` memory map."""

    def __init__(self, path):
        self._x = np.load(path, mmap_mode="r")
        self.rows = len(self._x)

    def read(self, start, stop, names=None):
        return {"x": np.array(self._x[start:stop])}

    def row(self, index, name):
        return np.array(self._x[index])

    def close(self):
        del self._x


def _write_layout(path: Path, x: np.ndarray, layout: Layout | str) -> Path:
    import os

    if layout == NPY:
        target = path.with_suffix(".npy")
        tmp = target.with_name(f".{target.name}.tmp.npy")
        np.save(tmp, x)
        os.replace(tmp, target)
        return target
    return write_store(path.with_suffix(".h5"), {"x": x}, provenance="storage benchmark",
                       layout=layout, checksum=False)


def _open_layout(path: Path, layout: Layout | str, cache_bytes: int | None = None):
    return _NpyReader(path) if layout == NPY else Store(path, cache_bytes=cache_bytes)


def measure_layout(x: np.ndarray, layout: Layout | str, folder, name: str = "data",
                   random_reads: int = 1000, batch: int = 256, block: int = 64,
                   tuned_cache_bytes: int | None = None, seed: int = 0) -> dict[str, float]:
    """Write ``x`` with ``layout`` and time the access patterns a training job uses.

    - write: bytes of raw data per second (file created, written, renamed into place);
    - sequential read: every row, in contiguous batches of ``batch``;
    - random read: ``random_reads`` single rows at random indices (default chunk cache,
      and again with ``tuned_cache_bytes`` of chunk cache when given);
    - random block read: contiguous blocks of ``block`` rows at random offsets.

    The file was just written, so it is in the operating system's page cache: these are
    format and decoding costs, not disk speed.
    """
    import time

    folder = Path(folder)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    path = _write_layout(folder / name, x, layout)
    write_s = time.perf_counter() - start
    n = len(x)
    out: dict[str, float] = {"bytes": float(path.stat().st_size),
                             "write_bytes_per_s": x.nbytes / write_s}
    reader = _open_layout(path, layout)
    try:
        start = time.perf_counter()
        for lo in range(0, n, batch):
            reader.read(lo, min(lo + batch, n))
        out["seq_read_samples_per_s"] = n / (time.perf_counter() - start)
        idx = rng.integers(0, n, random_reads)
        start = time.perf_counter()
        for i in idx:
            reader.row(int(i), "x")
        out["random_read_samples_per_s"] = random_reads / (time.perf_counter() - start)
        offsets = rng.integers(0, max(n - block, 0) + 1, max(random_reads // block, 4))
        start = time.perf_counter()
        for lo in offsets:
            reader.read(int(lo), int(lo) + block)
        out["random_block_read_samples_per_s"] = len(offsets) * block / (time.perf_counter() - start)
    finally:
        reader.close()
    if tuned_cache_bytes and isinstance(layout, Layout) and layout.chunk_rows:
        reader = _open_layout(path, layout, cache_bytes=tuned_cache_bytes)
        try:
            for i in idx[: random_reads // 2]:  # warm the chunk cache, as an epoch would
                reader.row(int(i), "x")
            start = time.perf_counter()
            for i in idx:
                reader.row(int(i), "x")
            out["random_read_tuned_samples_per_s"] = random_reads / (time.perf_counter() - start)
        finally:
            reader.close()
    path.unlink()
    return out


def storage_benchmark(rows: int, size: int = 64, random_reads: int = 1000,
                      folder=None) -> dict[str, dict[str, float]]:
    """Measure every layout of :func:`storage_layouts` on ``rows`` photo patches."""
    import tempfile

    x = photo_patches(rows, size)
    results = {}
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        measure_layout(x[:64], Layout(), tmp, name="warmup", random_reads=16)  # one-time costs
        for name, layout in storage_layouts().items():
            results[name] = measure_layout(x, layout, tmp, random_reads=random_reads,
                                           tuned_cache_bytes=x.nbytes + (16 << 20))
    return results


def bench_storage(quick: bool = False) -> dict[str, object]:
    """Benchmark ``storage``: HDF5 layouts and a .npy memory map on the same photo patches."""
    rows = 1024 if quick else 8192
    layouts = storage_benchmark(rows, random_reads=500 if quick else 2000)
    return {
        "rows": rows,
        "row_bytes": 64 * 64 * 3,
        "raw_bytes": rows * 64 * 64 * 3,
        "layouts": layouts,
        "note": "files were in the OS page cache: format and decoding costs, not disk speed",
    }


STORAGE_METRICS = (
    ("write_bytes_per_s", "write (MB/s of raw data)", 1e-6),
    ("seq_read_samples_per_s", "sequential read (samples/s)", 1.0),
    ("random_block_read_samples_per_s", "random 64-row blocks (samples/s)", 1.0),
    ("random_read_samples_per_s", "random single rows (samples/s)", 1.0),
    ("random_read_tuned_samples_per_s", "random rows, big chunk cache (samples/s)", 1.0),
)


def storage_table(result: dict[str, object]) -> list[dict[str, object]]:
    """Rows for a table of a ``storage`` benchmark result."""
    raw = float(result["raw_bytes"])
    rows = []
    for name, m in result["layouts"].items():
        row: dict[str, object] = {"layout": name, "size vs raw": m["bytes"] / raw}
        for key, label, scale in STORAGE_METRICS:
            row[label] = m[key] * scale if key in m else None
        rows.append(row)
    return rows


def plot_storage(result: dict[str, object], info=None):
    """One panel per access pattern: each layout's throughput (log scale)."""
    import matplotlib as mpl

    from scalelab import plot

    names = list(result["layouts"])
    fig, axes = plot.figure(ncols=len(STORAGE_METRICS), width=15, height=3.6, sharey=True)
    for ax, (key, label, scale) in zip(axes, STORAGE_METRICS, strict=True):
        vals = [result["layouts"][n].get(key, np.nan) * scale for n in names]
        # dots, not bars: a bar's length on a log axis depends on an arbitrary baseline
        ax.scatter(vals, names, c=[f"C{i}" for i in range(len(names))], s=40, zorder=3)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(mpl.ticker.NullFormatter())
        finite = [v for v in vals if np.isfinite(v)]
        ax.set_xlim(min(finite) / 3, max(finite) * 3)
        ax.set_title(label, fontsize=9)
    axes[0].invert_yaxis()  # first layout on top (the y axis is shared)
    plot.label(fig, info)
    return fig
