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

STORE_FORMAT = "scalelab-store/2"
CRC_GROUP = "_crc32"  # group holding one CRC-32 per row of every dataset (same name as the dataset)
# HDF5 file-format versions of 1.10 and later: the superblock, object headers (and so the attributes)
# and chunk indexes carry checksums, so HDF5 detects damaged metadata instead of parsing it
# (the default, "earliest", writes structures without checksums). Readable by HDF5 >= 1.10.
STORE_LIBVER = "v110"


class StoreError(ValueError):
    """A store file that exists but is not what was expected (schema, corruption).

    Errors raised by h5py/HDF5 while opening or reading a store are re-raised as a StoreError that
    names the file, the dataset and the rows (and chunk) involved; the original is ``__cause__``.
    """


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


def row_crc32(array: np.ndarray) -> np.ndarray:
    """The CRC-32 (``zlib.crc32``) of the bytes of every row of ``array`` (its first dimension), as uint32.

    A CRC-32 detects every change of up to 32 consecutive bits, so any flipped byte; a row is
    checked on its own, so a random single-row read verifies only the row it reads.
    """
    import zlib

    a = np.ascontiguousarray(array)
    if a.ndim == 0:
        raise ValueError("row_crc32 needs an array with a first (row) dimension")
    rows = a.view(np.uint8).reshape(len(a), a.itemsize * int(np.prod(a.shape[1:], dtype=np.int64)))
    return np.fromiter((zlib.crc32(r) for r in rows), dtype=np.uint32, count=len(rows))


def schema_of(arrays: dict[str, np.ndarray]) -> dict[str, dict[str, object]]:
    """Names, dtypes and per-row shapes of a set of arrays with a common first dimension."""
    return {k: {"dtype": str(v.dtype), "shape": list(v.shape[1:])} for k, v in sorted(arrays.items())}


def write_store(path, arrays: dict[str, np.ndarray], provenance: str, layout: Layout | None = None,
                version: str = "1", checksum: bool = True, row_checksums: bool = True) -> Path:
    """Write arrays (same number of rows) to an HDF5 file atomically.

    Attributes (fixed-length strings, see :func:`text_attr`) record the format, the dataset
    version, provenance, creation time, the schema and (unless ``checksum=False``) a SHA-256 checksum per dataset (checked by
    ``Store(..., verify=True)``: one full read). Unless ``row_checksums=False``, the group
    ``_crc32`` holds one CRC-32 per row of every dataset, which :class:`Store` checks on every
    read by default. The file is written under a temporary name in the same folder and renamed
    into place only when complete, so a crash never leaves a half-written file at ``path``.
    """
    import datetime as dt
    import json
    import os
    import tempfile

    import h5py

    if not arrays:
        raise ValueError("write_store needs at least one array")
    if CRC_GROUP in arrays:
        raise ValueError(f"the name {CRC_GROUP!r} is reserved for the row checksums")
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
        with h5py.File(tmp, "w", libver=STORE_LIBVER) as f:
            f.attrs["format"] = text_attr(STORE_FORMAT)
            f.attrs["version"] = text_attr(version)
            f.attrs["provenance"] = text_attr(provenance)
            f.attrs["created"] = text_attr(dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
            f.attrs["schema"] = text_attr(json.dumps(schema_of(arrays)))
            f.attrs["rows"] = next(iter(rows.values()))
            for name, arr in arrays.items():
                ds = f.create_dataset(name, data=arr, **layout.h5_kwargs(arr.shape))
                if checksum:
                    ds.attrs["sha256"] = text_attr(_checksum(arr))
                if row_checksums:
                    f[f"{CRC_GROUP}/{name}"] = row_crc32(arr)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def text_attr(value: str) -> np.bytes_:
    """``value`` as a fixed-length UTF-8 string attribute.

    h5py stores a Python ``str`` as a variable-length string, whose bytes live in the file's
    *global heap*, a structure without a checksum in every HDF5 format version (a damaged length
    there can make HDF5 loop or crash). A fixed-length string is kept in the attribute itself,
    inside the object header, which the store's format version checksums. Read back, it is
    ``bytes``: :attr:`Store.attrs` decodes it.
    """
    raw = value.encode("utf-8")
    return np.array(raw, dtype=f"S{max(len(raw), 1)}")[()]


def _text(value) -> object:
    """An attribute value as read by h5py, with fixed-length strings decoded to ``str``."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value.item() if hasattr(value, "item") else value


def _valid_schema(schema) -> bool:
    return isinstance(schema, dict) and bool(schema) and all(
        isinstance(name, str) and isinstance(spec, dict) and isinstance(spec.get("dtype"), str)
        and isinstance(spec.get("shape"), list) and all(isinstance(d, int) and d >= 0 for d in spec["shape"])
        for name, spec in schema.items())


class Store:
    """Read access to a file written by :func:`write_store`.

    On open the store checks what the file claims against what it holds: the format tag, the
    schema (and ``schema`` if given), and every dataset's dtype, row shape and row count against
    the schema and the ``rows`` attribute; a disagreement is refused with a StoreError.

    ``verify_reads`` (default True): every :meth:`read` and :meth:`row` recomputes the CRC-32 of
    each row it returns and compares it with the one stored at write time, so a damaged byte is
    never returned silently; a file written with ``row_checksums=False`` is then refused (open it
    with ``verify_reads=False`` to read it unverified). ``verify=True`` additionally checks every
    dataset's SHA-256 at open (one full read). Any h5py/HDF5 error becomes a StoreError naming
    the file, dataset and rows.

    Dataset handles are opened once and cached; :meth:`read` returns contiguous row
    slices (the fast path in HDF5). Use as a context manager or call :meth:`close`.
    """

    def __init__(self, path, schema: dict[str, dict[str, object]] | None = None,
                 cache_bytes: int | None = None, verify: bool = False, verify_reads: bool = True):
        import h5py

        self.path = Path(path)
        self.verify_reads = bool(verify_reads)
        if not self.path.exists():
            raise FileNotFoundError(f"no store at {self.path}")
        kwargs = {"rdcc_nbytes": cache_bytes, "rdcc_nslots": 10007} if cache_bytes else {}
        try:
            self._file = h5py.File(self.path, "r", **kwargs)
        except Exception as exc:
            raise StoreError(f"{self.path} is not a readable HDF5 file (truncated or corrupt?): {exc}") from exc
        try:
            self._check_file(schema)
            if verify:
                self.verify()
        except StoreError:
            self._file.close()
            raise
        except Exception as exc:  # h5py/HDF5 errors from damaged metadata: OSError, RuntimeError, ...
            self._file.close()
            raise StoreError(f"{self.path} is damaged (truncated or corrupt?): "
                             f"{type(exc).__name__}: {exc}") from exc
        except BaseException:
            self._file.close()
            raise

    def _check_file(self, schema) -> None:
        """Check the file's attributes and datasets against each other; cache the dataset handles."""
        import json

        import h5py

        attrs = self._file.attrs
        fmt = _text(attrs.get("format"))
        if fmt != STORE_FORMAT:
            raise StoreError(f"{self.path} is not a scalelab store (attribute format={fmt!r}, "
                             f"expected {STORE_FORMAT!r})")
        for key in ("schema", "rows"):
            if key not in attrs:
                raise StoreError(f"{self.path}: the attribute {key!r} is missing")
        try:
            recorded = json.loads(_text(attrs["schema"]))
        except (TypeError, ValueError) as exc:
            raise StoreError(f"{self.path}: the attribute 'schema' is not valid JSON ({exc})") from exc
        if not _valid_schema(recorded):
            raise StoreError(f"{self.path}: the attribute 'schema' is not a schema: {recorded!r}")
        self.schema = recorded
        if schema is not None and schema != self.schema:
            raise StoreError(f"{self.path} has schema {self.schema}, expected {schema}")
        rows = np.asarray(attrs["rows"])
        if rows.ndim != 0 or rows.dtype.kind not in "iu" or int(rows) < 0:
            raise StoreError(f"{self.path}: the attribute 'rows' is {_text(attrs['rows'])!r}, expected a "
                             "non-negative integer")
        self.rows = int(rows)
        self._datasets: dict[str, h5py.Dataset] = {}
        self._crc_sets: dict[str, h5py.Dataset] = {}
        self._crc: dict[str, np.ndarray] = {}
        for name, spec in self.schema.items():
            ds = self._open_object(name)
            if not isinstance(ds, h5py.Dataset):
                raise StoreError(f"{self.path}: the schema lists dataset {name!r}, but the file has "
                                 f"{'no such dataset' if ds is None else 'a group of that name'}")
            if str(ds.dtype) != spec["dtype"]:
                raise StoreError(f"{self.path}: dataset {name!r} has dtype {ds.dtype}, but the schema "
                                 f"records {spec['dtype']}")
            if ds.ndim == 0 or list(ds.shape[1:]) != spec["shape"]:
                raise StoreError(f"{self.path}: dataset {name!r} has shape {ds.shape}, but the schema "
                                 f"records rows of shape {tuple(spec['shape'])}")
            if ds.shape[0] != self.rows:
                raise StoreError(f"{self.path}: dataset {name!r} has {ds.shape[0]} rows, but the "
                                 f"attribute 'rows' records {self.rows}")
            self._datasets[name] = ds
            if not self.verify_reads:
                continue
            crc = self._open_object(f"{CRC_GROUP}/{name}")
            if not isinstance(crc, h5py.Dataset):
                raise StoreError(f"{self.path}: dataset {name!r} has no row checksums (written with "
                                 "row_checksums=False?); open it with verify_reads=False to read it "
                                 "unverified")
            if crc.shape != (self.rows,) or crc.dtype != np.uint32:
                raise StoreError(f"{self.path}: the row checksums of dataset {name!r} have shape "
                                 f"{crc.shape} and dtype {crc.dtype}, expected ({self.rows},) uint32")
            self._crc_sets[name] = crc

    def _open_object(self, name: str):
        """The object at ``name``; None if there is no link of that name. A link whose object cannot be
        opened (a damaged object header) is a StoreError, not a missing object."""
        parent, _, leaf = name.rpartition("/")
        if parent and (parent not in self._file):
            return None
        if leaf not in (self._file[parent] if parent else self._file):
            return None
        try:
            return self._file[name]
        except Exception as exc:
            raise StoreError(f"{self.path}: {name!r} cannot be opened ({type(exc).__name__}: {exc}); "
                             "the file is corrupt") from exc

    @property
    def attrs(self) -> dict[str, object]:
        try:
            return {k: _text(v) for k, v in self._file.attrs.items()}
        except Exception as exc:
            raise StoreError(f"{self.path}: the file's attributes cannot be read "
                             f"({type(exc).__name__}: {exc})") from exc

    def __len__(self) -> int:
        return self.rows

    def _dataset(self, name: str):
        try:
            return self._datasets[name]
        except KeyError:
            raise KeyError(f"{self.path} has no dataset {name!r}; it has {sorted(self._datasets)}") from None

    def _where(self, name: str, start: int, stop: int) -> str:
        """``rows a:b`` and, for a chunked dataset, the chunks they fall in."""
        chunks = self._datasets[name].chunks
        text = f"row {start}" if stop == start + 1 else f"rows {start}:{stop}"
        if chunks and stop > start:
            first, last = start // chunks[0], (stop - 1) // chunks[0]
            lo, hi = first * chunks[0], min((last + 1) * chunks[0], self.rows)
            if first == last and (lo, hi) == (start, stop):
                return f"chunk {first} (rows {lo}:{hi})"
            text += (f" (chunk {first}: rows {lo}:{hi})" if first == last
                     else f" (chunks {first}..{last}: rows {lo}:{hi})")
        return text

    def _read_error(self, name: str, start: int, stop: int, exc: BaseException) -> StoreError:
        """A StoreError for an h5py failure reading rows start:stop, narrowed to the first failing chunk."""
        ds = self._datasets[name]
        lo, hi = start, stop
        if ds.chunks:
            step = ds.chunks[0]
            for c in range(start // step, (max(stop, start + 1) - 1) // step + 1):
                a, b = max(c * step, start), min((c + 1) * step, stop)
                try:
                    ds[a:b]
                except Exception:
                    lo, hi = a, b
                    break
        return StoreError(f"{self.path}: dataset {name!r}, {self._where(name, lo, hi)}: HDF5 cannot read "
                          f"them ({type(exc).__name__}: {exc}); the file is corrupt")

    def _check_rows(self, name: str, start: int, block: np.ndarray) -> None:
        """Compare the CRC-32 of each row of ``block`` (rows start:start+len) with the stored one."""
        expected = self._crc.get(name)
        if expected is None:
            try:
                expected = self._crc[name] = self._crc_sets[name][...]
            except Exception as exc:
                raise StoreError(f"{self.path}: the row checksums of dataset {name!r} cannot be read "
                                 f"({type(exc).__name__}: {exc}); the file is corrupt") from exc
        bad = np.flatnonzero(row_crc32(block) != expected[start:start + len(block)])
        if bad.size:
            first = start + int(bad[0])
            raise StoreError(f"{self.path}: dataset {name!r}, {self._where(name, first, first + 1)}: "
                             f"{bad.size} of the {len(block)} rows read ({start}:{start + len(block)}) "
                             "do not match their CRC-32 checksums; the file is corrupt")

    def read(self, start: int, stop: int, names: tuple[str, ...] | None = None,
             verify: bool | None = None) -> dict[str, np.ndarray]:
        """Rows ``start:stop`` of every dataset (or of ``names``), each row checked against its
        CRC-32 unless ``verify`` (default: the store's ``verify_reads``) is False."""
        if not 0 <= start <= stop <= self.rows:
            raise IndexError(f"slice {start}:{stop} outside 0:{self.rows}")
        check = self.verify_reads if verify is None else verify
        if check and not self.verify_reads:
            raise ValueError("this store was opened with verify_reads=False")
        out = {}
        for n in names or tuple(self._datasets):
            ds = self._dataset(n)
            try:
                block = ds[start:stop]
            except Exception as exc:
                raise self._read_error(n, start, stop, exc) from exc
            if check:
                self._check_rows(n, start, block)
            out[n] = block
        return out

    def row(self, index: int, name: str, verify: bool | None = None) -> np.ndarray:
        """One row of one dataset (a random access), checked against its CRC-32 like :meth:`read`."""
        if not 0 <= index < self.rows:
            raise IndexError(f"row {index} outside 0:{self.rows}")
        check = self.verify_reads if verify is None else verify
        if check and not self.verify_reads:
            raise ValueError("this store was opened with verify_reads=False")
        ds = self._dataset(name)
        try:
            value = ds[index]
        except Exception as exc:
            raise self._read_error(name, index, index + 1, exc) from exc
        if check:
            self._check_rows(name, index, np.asarray(value)[None])
        return value

    def verify(self) -> None:
        """Recompute every dataset's SHA-256 (one full read); raise StoreError on a mismatch."""
        for name, ds in self._datasets.items():
            try:
                data = ds[...]
            except Exception as exc:
                raise self._read_error(name, 0, self.rows, exc) from exc
            if "sha256" not in ds.attrs:
                raise StoreError(f"{self.path}: dataset {name!r} was written without a checksum")
            if _checksum(data) != _text(ds.attrs["sha256"]):
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

    def read(self, start, stop, names=None, verify=None):
        return {"x": np.array(self._x[start:stop])}

    def row(self, index, name, verify=None):
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
                       layout=layout, checksum=False)  # row checksums on, as by default


def _open_layout(path: Path, layout: Layout | str, cache_bytes: int | None = None):
    return _NpyReader(path) if layout == NPY else Store(path, cache_bytes=cache_bytes)


def measure_layout(x: np.ndarray, layout: Layout | str, folder, name: str = "data",
                   random_reads: int = 1000, batch: int = 256, block: int = 64,
                   tuned_cache_bytes: int | None = None, seed: int = 0) -> dict[str, float]:
    """Write ``x`` with ``layout`` and time the access patterns a training job uses.

    - write: bytes of raw data per second (file created, written, renamed into place);
    - sequential read: every row, in contiguous batches of ``batch`` (best of three passes);
    - random read: ``random_reads`` single rows at random indices (default chunk cache);
    - with ``tuned_cache_bytes`` of chunk cache (chunked layouts only): a shuffled first
      epoch over every row (``random_read_tuned_epoch1_samples_per_s``, the cache filling),
      then ``random_reads`` rows of a *fresh* permutation (``random_read_tuned_samples_per_s``,
      a second epoch: the cache was not warmed on the indices it is timed on);
    - random block read: contiguous blocks of ``block`` rows at random offsets;
    - for HDF5 layouts, the sequential and random single-row reads again with every row checked
      against its CRC-32 (``seq_read_verified_samples_per_s``, ``random_read_verified_samples_per_s``:
      the store's default). The unverified figures are the format's own cost, comparable with the
      memory map (which has no checksums); a verified and an unverified pass alternate, so load on
      the machine affects both alike.

    The write includes computing the row checksums (the store's default). The file was just written, so it is in the operating system's page cache: these are
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
    hdf5 = isinstance(layout, Layout)
    checks = (False, True) if hdf5 else (False,)
    reader = _open_layout(path, layout)
    try:
        seq_s: dict[bool, list[float]] = {c: [] for c in checks}
        for _ in range(3):  # best of three passes: one pass of a fast layout is short and noisy
            for check in checks:
                start = time.perf_counter()
                for lo in range(0, n, batch):
                    reader.read(lo, min(lo + batch, n), verify=check)
                seq_s[check].append(time.perf_counter() - start)
        out["seq_read_samples_per_s"] = n / min(seq_s[False])
        idx = rng.integers(0, n, random_reads)
        start = time.perf_counter()
        for i in idx:
            reader.row(int(i), "x", verify=False)
        out["random_read_samples_per_s"] = random_reads / (time.perf_counter() - start)
        if hdf5:
            out["seq_read_verified_samples_per_s"] = n / min(seq_s[True])
            idx = rng.integers(0, n, random_reads)  # other rows: not the ones just cached
            start = time.perf_counter()
            for i in idx:
                reader.row(int(i), "x", verify=True)
            out["random_read_verified_samples_per_s"] = random_reads / (time.perf_counter() - start)
        offsets = rng.integers(0, max(n - block, 0) + 1, max(random_reads // block, 4))
        start = time.perf_counter()
        for lo in offsets:
            reader.read(int(lo), int(lo) + block, verify=False)
        out["random_block_read_samples_per_s"] = len(offsets) * block / (time.perf_counter() - start)
    finally:
        reader.close()
    if tuned_cache_bytes and isinstance(layout, Layout) and layout.chunk_rows:
        reader = _open_layout(path, layout, cache_bytes=tuned_cache_bytes)
        try:
            # epoch 1: every row once, in a shuffled order; the cache fills as chunks are touched
            start = time.perf_counter()
            for i in rng.permutation(n):
                reader.row(int(i), "x", verify=False)
            out["random_read_tuned_epoch1_samples_per_s"] = n / (time.perf_counter() - start)
            # epoch 2: a fresh permutation (not the indices that warmed the cache)
            idx2 = rng.permutation(n)[:random_reads]
            start = time.perf_counter()
            for i in idx2:
                reader.row(int(i), "x", verify=False)
            out["random_read_tuned_samples_per_s"] = len(idx2) / (time.perf_counter() - start)
        finally:
            reader.close()
    path.unlink()
    return out


# --------------------------------------------------------------------------- parallel readers

READERS = (1, 2, 4)  # reader counts of the parallel-read measurement
PARALLEL_TIMEOUT_S = 120.0  # a reader that has not reported by then is killed


def _host() -> list:
    """The device host-side work (NumPy, h5py) runs on, for figure footers."""
    import jax

    return jax.devices("cpu")[:1]


def _read_slice(path: str, start: int, stop: int, batch: int, epochs: int, barrier, results,
                rank: int) -> None:
    """One reader: open the file, wait for the others, read rows ``start:stop`` in batches.

    Runs in a worker process (or thread); reports ``(rank, t0, t1, rows, checksum)`` where
    ``t0``/``t1`` are ``time.perf_counter()`` values (CLOCK_MONOTONIC: comparable across
    processes on one machine) and ``checksum`` the sum of every byte read (so the reads cannot
    be skipped, and the parent can check that the readers covered the data exactly once).
    """
    import time

    import h5py

    try:
        with h5py.File(path, "r") as f:
            ds = f["x"]  # the dataset handle, looked up once
            barrier.wait()
            t0 = time.perf_counter()
            total = 0
            for _ in range(epochs):
                for lo in range(start, stop, batch):
                    total += int(ds[lo:min(lo + batch, stop)].sum(dtype=np.uint64))
            t1 = time.perf_counter()
        results.put((rank, t0, t1, (stop - start) * epochs, total))
    except BaseException as exc:  # report instead of hanging the parent
        try:
            barrier.abort()
        finally:
            results.put((rank, None, None, 0, repr(exc)))


def parallel_read(paths, readers: int, batch: int = 64, epochs: int = 1,
                  mode: str = "processes", timeout_s: float = PARALLEL_TIMEOUT_S) -> dict:
    """Aggregate read throughput of ``readers`` concurrent readers of HDF5 dataset ``x``.

    ``paths`` is one file (``[shared]``: reader ``r`` reads the ``r``-th contiguous slice of
    its rows, a disjoint shard) or one file per reader (reader ``r`` reads all of
    ``paths[r]``). ``mode`` is ``"processes"`` (spawned worker processes, each with its own
    h5py) or ``"threads"`` (threads of this process, which h5py serialises behind one lock).
    Readers open their file first and start together at a barrier; the time is from the
    first start to the last finish, so process start-up is not counted.
    """
    import multiprocessing as mp
    import queue
    import threading
    import time

    paths = [str(p) for p in ([paths] if isinstance(paths, str | Path) else paths)]
    if isinstance(readers, bool) or not isinstance(readers, int) or readers < 1:
        raise ValueError(f"readers must be a positive integer, got {readers!r}")
    if len(paths) not in (1, readers):
        raise ValueError(f"give one shared file or one file per reader ({readers}), got {len(paths)}")
    if mode not in ("processes", "threads"):
        raise ValueError(f"mode must be 'processes' or 'threads', got {mode!r}")
    import h5py

    sizes = []
    for p in paths:
        with h5py.File(p, "r") as f:
            sizes.append(len(f["x"]))
    if len(paths) == 1:
        bounds = np.linspace(0, sizes[0], readers + 1).astype(int)
        jobs = [(paths[0], int(bounds[r]), int(bounds[r + 1])) for r in range(readers)]
    else:
        jobs = [(paths[r], 0, sizes[r]) for r in range(readers)]
    if mode == "processes":
        ctx = mp.get_context("spawn")  # never fork a process that runs JAX threads
        barrier, results = ctx.Barrier(readers), ctx.Queue()
        workers = [ctx.Process(target=_read_slice, args=(*job, batch, epochs, barrier, results, r),
                               daemon=True) for r, job in enumerate(jobs)]
    else:
        barrier, results = threading.Barrier(readers), queue.Queue()
        workers = [threading.Thread(target=_read_slice, args=(*job, batch, epochs, barrier, results, r),
                                    daemon=True) for r, job in enumerate(jobs)]
    for w in workers:
        w.start()
    reports = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(reports) < readers:
            try:
                reports.append(results.get(timeout=0.2))
            except queue.Empty:
                dead = [w for w in workers if mode == "processes" and w.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"a reader process exited with code {dead[0].exitcode} "
                                       "before reporting") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{readers} readers did not finish within {timeout_s} s") from None
    finally:
        for w in workers:
            w.join(timeout=10)
            if mode == "processes" and w.is_alive():
                w.kill()
                w.join()
    failed = [r for r in reports if r[1] is None]
    if failed:
        raise RuntimeError(f"a reader failed: {failed[0][4]}")
    t0, t1 = min(r[1] for r in reports), max(r[2] for r in reports)
    rows = sum(r[3] for r in reports)
    return {"readers": readers, "mode": mode, "files": len(paths), "rows": rows,
            "seconds": t1 - t0, "samples_per_s": rows / (t1 - t0),
            "reader_seconds": [r[2] - r[1] for r in sorted(reports)],
            "byte_sum": sum(r[4] for r in reports)}


def write_shards(folder, x: np.ndarray, shards: int, layout: Layout, name: str = "shard") -> list[Path]:
    """``x`` split into ``shards`` contiguous parts, one store per part (``name-i-of-n.h5``)."""
    bounds = np.linspace(0, len(x), shards + 1).astype(int)
    return [write_store(Path(folder) / f"{name}-{i}-of-{shards}.h5", {"x": x[bounds[i]:bounds[i + 1]]},
                        provenance=f"shard {i} of {shards}", layout=layout, checksum=False)
            for i in range(shards)]


def parallel_read_benchmark(rows: int, readers=READERS, layout: Layout | None = None,
                            epochs: int = 1, batch: int = 64, threads: bool = True,
                            folder=None, size: int = 64) -> dict:
    """Throughput of 1, 2, 4 ... readers on ``rows`` photo patches stored with ``layout``.

    Three ways to read the same rows: processes reading disjoint slices of **one shared**
    chunked file, processes reading **one file per reader** (shards), and (``threads``)
    threads of one process reading slices of the shared file. Every configuration reads
    every row ``epochs`` times; ``byte_sum`` checks that.
    """
    import os
    import tempfile

    layout = layout or Layout(64, "gzip", 4)
    x = photo_patches(rows, size)
    expected = int(x.sum(dtype=np.uint64)) * epochs
    out: dict = {"rows": rows, "row_bytes": int(x[0].nbytes), "epochs": epochs, "batch": batch,
                 "layout": dataclasses.asdict(layout), "cpu_count": os.cpu_count(),
                 "readers": list(readers), "shared": [], "per_reader_files": [], "threads": []}
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        shared = write_store(Path(tmp) / "shared.h5", {"x": x}, provenance="parallel read benchmark",
                             layout=layout, checksum=False)
        parallel_read([shared], 1, batch=batch, epochs=1, mode="threads")  # warm the page cache
        for n in readers:
            out["shared"].append(parallel_read([shared], n, batch=batch, epochs=epochs))
            shards = write_shards(tmp, x, n, layout)
            out["per_reader_files"].append(parallel_read(shards, n, batch=batch, epochs=epochs))
            if threads:
                out["threads"].append(parallel_read([shared], n, batch=batch, epochs=epochs,
                                                    mode="threads"))
            for s in shards:
                s.unlink()
    for kind in ("shared", "per_reader_files", "threads"):
        for r in out[kind]:
            if r["byte_sum"] != expected:
                raise RuntimeError(f"{kind} readers read {r['byte_sum']}, expected {expected}: "
                                   "rows were skipped or read twice")
    return out


def parallel_table(result: dict) -> list[dict[str, object]]:
    """One row per reader count: samples/s of each configuration and the speed-up over one reader."""
    rows = []
    base = result["shared"][0]["samples_per_s"]
    for i, n in enumerate(result["readers"]):
        row: dict[str, object] = {"readers": n}
        for kind, label in (("shared", "one shared file"), ("per_reader_files", "one file per reader"),
                            ("threads", "threads, shared file")):
            if result[kind]:
                row[f"{label} (samples/s)"] = result[kind][i]["samples_per_s"]
        row["shared file vs 1 reader"] = result["shared"][i]["samples_per_s"] / base
        rows.append(row)
    return rows


def plot_parallel(result: dict, info=None):
    """Aggregate samples/s against the number of readers, for each way of reading."""
    from scalelab import plot

    fig, ax = plot.figure(width=6.4, height=3.8)
    n = result["readers"]
    for kind, label, marker in (("shared", "processes, one shared file", "o-"),
                                ("per_reader_files", "processes, one file per reader", "s--"),
                                ("threads", "threads of one process, shared file", "^:")):
        if result[kind]:
            ax.plot(n, [r["samples_per_s"] for r in result[kind]], marker, label=label)
    one = result["shared"][0]["samples_per_s"]
    cores = result["cpu_count"] or 1
    ax.plot(n, [one * min(k, cores) for k in n], color="0.6", linewidth=0.8,
            label=f"ideal on {cores} cores (1 reader x min(readers, cores))")
    ax.set(xlabel="readers", ylabel="samples per second (all readers)", xticks=n,
           title=f"{result['rows']:,} rows, {_layout_name(result['layout'])}: readers of disjoint slices")
    ax.set_ylim(0, None)
    ax.legend(fontsize=8, loc="lower right")
    plot.label(fig, info, source=f"measured with {', '.join(map(str, n))} readers (host CPU, {cores} cores)",
               devices=_host())
    return fig


def _layout_name(layout: dict) -> str:
    if layout.get("chunk_rows") is None:
        return "contiguous"
    comp = layout.get("compression")
    level = layout.get("level")
    comp = f"{comp}-{level}" if comp == "gzip" and level is not None else comp
    return f"{comp + ', ' if comp else ''}chunks of {layout['chunk_rows']} rows"


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
    """Benchmark ``storage``: HDF5 layouts and a .npy memory map on the same photo patches, and
    1, 2, 4 reader processes on disjoint slices of one gzip file vs one file per reader
    (:func:`parallel_read_benchmark`)."""
    rows = 1024 if quick else 8192
    layouts = storage_benchmark(rows, random_reads=500 if quick else 2000)
    parallel = parallel_read_benchmark(1024 if quick else 4096, epochs=2)
    return {
        "rows": rows,
        "row_bytes": 64 * 64 * 3,
        "raw_bytes": rows * 64 * 64 * 3,
        "layouts": layouts,
        "verify": verify_cost(layouts),
        "parallel": parallel,
        "note": "files were in the OS page cache: format and decoding costs, not disk speed",
    }


def verify_cost(layouts: dict[str, dict[str, float]]) -> dict[str, object]:
    """Verified vs unverified read throughput per HDF5 layout (1.0 = verification is free)."""
    checked = {k: m for k, m in layouts.items() if "seq_read_verified_samples_per_s" in m}
    return {
        "check": "CRC-32 of every row read, compared with the one stored at write time (Store's default)",
        "seq_verified_vs_unverified": {k: m["seq_read_verified_samples_per_s"] / m["seq_read_samples_per_s"]
                                       for k, m in checked.items()},
        "random_verified_vs_unverified": {
            k: m["random_read_verified_samples_per_s"] / m["random_read_samples_per_s"] for k, m in checked.items()},
    }


def verify_table(result: dict[str, object]) -> list[dict[str, object]]:
    """One row per HDF5 layout: reads with and without the row checksums checked, and their ratio."""
    rows = []
    for name, m in result["layouts"].items():
        if "seq_read_verified_samples_per_s" not in m:
            continue
        rows.append({"layout": name,
                     "sequential (samples/s)": m["seq_read_samples_per_s"],
                     "sequential, verified": m["seq_read_verified_samples_per_s"],
                     "verified / not": m["seq_read_verified_samples_per_s"] / m["seq_read_samples_per_s"],
                     "random rows (samples/s)": m["random_read_samples_per_s"],
                     "random rows, verified": m["random_read_verified_samples_per_s"],
                     "verified / not ": m["random_read_verified_samples_per_s"] / m["random_read_samples_per_s"]})
    return rows


STORAGE_METRICS = (
    ("write_bytes_per_s", "write (MB/s of raw data)", 1e-6),
    ("seq_read_samples_per_s", "sequential read (samples/s)", 1.0),
    ("random_block_read_samples_per_s", "random 64-row blocks (samples/s)", 1.0),
    ("random_read_samples_per_s", "random single rows (samples/s)", 1.0),
    ("random_read_tuned_epoch1_samples_per_s", "random rows, big cache, epoch 1 (samples/s)", 1.0),
    ("random_read_tuned_samples_per_s", "random rows, big cache, epoch 2 (samples/s)", 1.0),
)


def storage_table(result: dict[str, object]) -> list[dict[str, object]]:
    """Rows for a table of a ``storage`` benchmark result (reads unverified, plus the ``verify`` column:
    verified / unverified sequential throughput; :func:`verify_table` has both access patterns)."""
    raw = float(result["raw_bytes"])
    rows = []
    for name, m in result["layouts"].items():
        row: dict[str, object] = {"layout": name, "size vs raw": m["bytes"] / raw}
        for key, label, scale in STORAGE_METRICS:
            row[label] = m[key] * scale if key in m else None
        row["verify: sequential, verified / not"] = (m["seq_read_verified_samples_per_s"] / m["seq_read_samples_per_s"]
                                                     if "seq_read_verified_samples_per_s" in m else None)
        rows.append(row)
    return rows


def plot_storage(result: dict[str, object], info=None):
    """One panel per access pattern: each layout's throughput (log scale)."""
    import matplotlib as mpl

    from scalelab import plot

    names = list(result["layouts"])
    fig, grid = plot.figure(ncols=3, nrows=2, width=13, height=5.6, sharey=True)
    axes = grid.flat
    for ax, (key, label, scale) in zip(axes, STORAGE_METRICS, strict=True):
        vals = [result["layouts"][n].get(key, np.nan) * scale for n in names]
        # dots, not bars: a bar's length on a log axis depends on an arbitrary baseline
        ax.scatter(vals, names, c=[f"C{i}" for i in range(len(names))], s=40, zorder=3)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(mpl.ticker.NullFormatter())
        finite = [v for v in vals if np.isfinite(v)]
        ax.set_xlim(min(finite) / 3, max(finite) * 3)
        ax.set_title(label, fontsize=9)
    grid[0, 0].invert_yaxis()  # first layout on top (the y axis is shared)
    plot.label(fig, info, devices=_host())
    return fig
