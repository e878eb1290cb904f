"""The capstone's text: a corpus of the standard library's sources, its HDF5 store and Grain pipeline."""

from __future__ import annotations

import dataclasses
import hashlib
import sys
import sysconfig
from pathlib import Path
from typing import Any

import jax
import numpy as np

VOCAB = 256  # byte-level tokens
LICENCE = "PSF-2.0 (Python Software Foundation License)"

# --------------------------------------------------------------------------- corpus (chapter 03)


def stdlib_files(max_bytes: int) -> list[Path]:
    """The standard library's top-level ``.py`` files in sorted order, up to ``max_bytes`` in all.

    Only the top level (no ``test``/``idlelib`` packages, no site-packages): the same files on
    every install of one Python version."""
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1024:
        raise ValueError(f"max_bytes must be an integer >= 1024, got {max_bytes!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(root.glob("*.py")):
        size = path.stat().st_size
        if size == 0:
            continue
        if total + size > max_bytes and files:
            break
        files.append(path)
        total += size
    if not files:
        raise RuntimeError(f"no standard-library source files found under {root}")
    return files


def encode(text: str | bytes) -> np.ndarray:
    """Byte-level tokens (uint8) of a text (UTF-8)."""
    raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(raw, dtype=np.uint8).copy()


def decode(tokens: Any) -> str:
    """Text of byte tokens (invalid UTF-8, e.g. a sample cut inside a character, is replaced)."""
    arr = np.asarray(tokens)
    if arr.size and (arr.min() < 0 or arr.max() >= VOCAB):
        raise ValueError(f"byte tokens must lie in [0, {VOCAB}), got {int(arr.min())}..{int(arr.max())}")
    return bytes(arr.astype(np.uint8).tolist()).decode("utf-8", errors="replace")


def windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Rows of ``seq_len + 1`` tokens at stride ``seq_len`` (each row: inputs and next-token targets)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    n = (len(tokens) - 1) // seq_len
    if n < 1:
        raise ValueError(f"{len(tokens)} tokens make no window of {seq_len + 1}")
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return np.asarray(tokens)[idx]


@dataclasses.dataclass(frozen=True)
class Corpus:
    """The stores and card :func:`build_corpus` wrote."""

    train: Path
    val: Path
    card: dict[str, Any]


def build_corpus(folder, max_bytes: int, seq_len: int, val_fraction: float = 0.1) -> Corpus:
    """Tokenise the standard library's sources, split by file, write ``train.h5``, ``val.h5`` and
    ``card.json`` in ``folder``. Whole files from the end of the sorted list, about ``val_fraction``
    of the bytes, are held out; a file larger than twice that share stays in training (one huge
    module would otherwise be the whole validation set)."""
    from scalelab import data, io

    if not 0 < val_fraction < 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
    files = stdlib_files(max_bytes)
    if len(files) < 2:
        raise ValueError("need at least two files to hold one out")
    texts = [p.read_bytes() for p in files]
    total = sum(map(len, texts))
    held, acc = [], 0  # hold out whole files from the end; one too big for the held-out share stays in training
    for k in range(len(files) - 1, 0, -1):
        if acc >= val_fraction * total:
            break
        if acc + len(texts[k]) <= 2 * val_fraction * total:
            held.append(k)
            acc += len(texts[k])
    if not held:
        raise ValueError(f"no file is small enough to hold out {val_fraction:.0%} of {total} bytes")
    held = sorted(held)
    kept = [k for k in range(len(files)) if k not in set(held)]
    sep = b"\n\n"
    splits = {"train": sep.join(texts[k] for k in kept), "val": sep.join(texts[k] for k in held)}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    version = ".".join(map(str, sys.version_info[:3]))
    card: dict[str, Any] = {
        "name": f"Python {version} standard library sources (top-level modules)",
        "provenance": f"{len(files)} files read from this interpreter's standard library, sorted by name",
        "licence": LICENCE, "tokenizer": "bytes (UTF-8), 256 symbols", "seq_len": seq_len,
        "split_by": "file: files from the end of the sorted list are held out (one larger than twice the "
                    "held-out share stays in training)", "splits": {},
    }
    paths = {}
    for name, raw in splits.items():
        tokens = encode(raw)
        rows = windows(tokens, seq_len)
        paths[name] = data.write_store(folder / f"{name}.h5", {"x": rows},
                                       provenance=f"{card['name']}, {name} split, byte tokens")
        names = [files[k].name for k in (kept if name == "train" else held)]
        card["splits"][name] = {"files": len(names), "first_file": names[0], "last_file": names[-1],
                                "file_names": names, "bytes": len(raw), "windows": int(rows.shape[0]),
                                "sha256": hashlib.sha256(raw).hexdigest()}
    io.write_json(folder / "card.json", card)
    return Corpus(paths["train"], paths["val"], card)


def store_rows(path) -> np.ndarray:
    """Every window of a store (rows of ``seq_len + 1`` tokens), checksums verified."""
    from scalelab import data

    with data.Store(path) as store:
        return store.read(0, len(store), ("x",))["x"]


def store_tokens(path) -> np.ndarray:
    """Every token of a store's windows once (the windows overlap by one token)."""
    rows = store_rows(path)
    return np.concatenate([rows[:, :-1].reshape(-1), rows[-1, -1:]])


def unigram_loss(train_tokens: np.ndarray, val_tokens: np.ndarray) -> float:
    """Cross-entropy (nats per token) of the validation tokens under the training tokens' byte
    frequencies (add-one smoothed): the loss of a model that ignores all context."""
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=VOCAB).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[np.asarray(val_tokens, dtype=np.int64)].mean())


# --------------------------------------------------------------------------- pipeline (chapter 04)


def batches(path, batch_size: int, seed: int = 0, process_index: int | None = None,
            process_count: int | None = None, epochs: int = 1000, prefetch: int = 2):
    """A Grain iterator of ``(batch_size, seq_len + 1)`` uint8 batches of the store at ``path``.

    Rows are shuffled by ``seed`` (each epoch of the ``epochs`` repeats in a new order), and this
    process reads every ``process_count``-th row from ``process_index`` (default: JAX's process
    index and count), so processes never read the same row. ``it.get_state()`` is a small dict
    (JSON) and ``it.set_state(state)`` on a fresh iterator continues from exactly that batch."""
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    import grain

    from scalelab import pipeline

    pi = jax.process_index() if process_index is None else int(process_index)
    pc = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= pi < pc:
        raise ValueError(f"need 0 <= process_index < process_count, got {pi}, {pc}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ds = grain.MapDataset.source(pipeline.HDF5Records(path, "x"))
    if len(ds) // pc < batch_size:
        raise ValueError(f"{len(ds)} rows over {pc} process(es) do not fill one batch of {batch_size}")
    ds = ds[pi::pc].repeat(epochs).shuffle(seed=seed).batch(batch_size, drop_remainder=True)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch)))


def pipeline_rate(train_path, batch: int, batches_n: int = 50, seed: int = 0) -> float:
    """Batches per second the input pipeline alone delivers (read, shuffle, batch)."""
    import time

    it = batches(train_path, batch, seed=seed)
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches_n):
        next(it)
    return batches_n / (time.perf_counter() - t0)
