"""The capstone's first stages: a text corpus, its store and pipeline, and a small GPT with its accounting.

What is here (each piece reuses a chapter's code rather than forking it):

- **Corpus (chapter 03).** The Python standard library's own source files: on every machine that
  runs the course, offline, under a known licence (the PSF License). Tokens are **bytes** (UTF-8,
  256 symbols): no tokenizer to train or ship, nothing out of vocabulary, every text round-trips;
  the price is longer sequences than a BPE would give. The held-out split is by *file* (the last
  files in sorted order), so no window of validation text also appears in training.
  :func:`build_corpus` writes both splits with :func:`scalelab.data.write_store` (schema, SHA-256,
  per-row CRC-32, atomic) and a dataset card beside them.
- **Pipeline (chapter 04).** :func:`batches`: Grain over the store's rows (windows of
  ``seq_len + 1`` tokens), shuffled by a seed, sharded by process, with an iterator whose
  ``get_state()`` / ``set_state()`` resume it exactly.
- **Model and accounting (chapters 05, 08, 10).** :class:`GPT`, a decoder-only transformer in
  Flax NNX (pre-LayerNorm blocks, causal multi-head attention, a 4x MLP, tied embeddings) with
  float32 parameters and a configurable compute dtype; :func:`param_count` and
  :func:`flops_per_token` are the closed forms the tests check against the model and against
  XLA's cost analysis.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
import sysconfig
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

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
    ``card.json`` in ``folder``. The last files (about ``val_fraction`` of the bytes) are held out."""
    from scalelab import data, io

    if not 0 < val_fraction < 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
    files = stdlib_files(max_bytes)
    if len(files) < 2:
        raise ValueError("need at least two files to hold one out")
    texts = [p.read_bytes() for p in files]
    total = sum(map(len, texts))
    cut, acc = len(files), 0
    while cut > 1 and acc < val_fraction * total:  # hold out whole files from the end
        cut -= 1
        acc += len(texts[cut])
    sep = b"\n\n"
    splits = {"train": sep.join(texts[:cut]), "val": sep.join(texts[cut:])}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    version = ".".join(map(str, sys.version_info[:3]))
    card: dict[str, Any] = {
        "name": f"Python {version} standard library sources (top-level modules)",
        "provenance": f"{len(files)} files read from this interpreter's standard library, sorted by name",
        "licence": LICENCE, "tokenizer": "bytes (UTF-8), 256 symbols", "seq_len": seq_len,
        "split_by": "file: the last files in sorted order are held out", "splits": {},
    }
    paths = {}
    for name, raw in splits.items():
        tokens = encode(raw)
        rows = windows(tokens, seq_len)
        paths[name] = data.write_store(folder / f"{name}.h5", {"x": rows},
                                       provenance=f"{card['name']}, {name} split, byte tokens")
        names = [p.name for p in (files[:cut] if name == "train" else files[cut:])]
        card["splits"][name] = {"files": len(names), "first_file": names[0], "last_file": names[-1],
                                "bytes": len(raw), "windows": int(rows.shape[0]),
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


# --------------------------------------------------------------------------- model (chapters 05, 08, 10)


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """A small GPT: ``layers`` blocks of width ``d``, ``heads`` heads, context ``seq_len``."""

    d: int = 64
    layers: int = 2
    heads: int = 4
    seq_len: int = 64
    vocab: int = VOCAB
    dtype: str = "bfloat16"  # compute dtype; the parameters stay float32 (the master weights)
    remat: bool = True  # recompute each block's activations in the backward pass

    def __post_init__(self) -> None:
        for name in ("d", "layers", "heads", "seq_len", "vocab"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.d % self.heads:
            raise ValueError(f"d={self.d} must be divisible by heads={self.heads}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")


def param_count(cfg: GPTConfig) -> int:
    """Parameters of :class:`GPT`: per block 12 d^2 + 13 d (attention 4 d^2 + 4 d, MLP 8 d^2 + 5 d,
    two LayerNorms 4 d), plus token and position embeddings (V + T) d and the final LayerNorm 2 d
    (the output layer reuses the token embedding)."""
    d = cfg.d
    return cfg.layers * (12 * d * d + 13 * d) + (cfg.vocab + cfg.seq_len) * d + 2 * d


def flops_per_token(cfg: GPTConfig, training: bool = True) -> dict[str, int]:
    """Matmul FLOPs per token: ``dense`` = 2 x (the block matmul weights 12 L d^2 + the output layer
    V d), ``attention`` = 4 L T d (scores QK^T and the weighted sum over all T positions: the mask
    does not skip work); a training step costs 3x the forward (backward = 2x), without remat's
    recomputation (that is hardware FLOPs, not model FLOPs)."""
    d, L, T = cfg.d, cfg.layers, cfg.seq_len
    dense = 2 * (12 * L * d * d + cfg.vocab * d)
    attention = 4 * L * T * d
    k = 3 if training else 1
    return {"dense": k * dense, "attention": k * attention, "total": k * (dense + attention)}


def remat_flops_per_token(cfg: GPTConfig) -> int:
    """Hardware FLOPs per token of a training step with every block rematerialised: the model
    FLOPs plus one more forward of the blocks (the output layer is not recomputed)."""
    d, L, T = cfg.d, cfg.layers, cfg.seq_len
    return flops_per_token(cfg)["total"] + 2 * 12 * L * d * d + 4 * L * T * d


def kv_cache_bytes(cfg: GPTConfig, batch: int, length: int, itemsize: int | None = None) -> int:
    """Bytes of a KV cache: keys and values, every layer, ``length`` positions of width d."""
    itemsize = itemsize or jnp.dtype(cfg.dtype).itemsize
    return 2 * cfg.layers * batch * length * cfg.d * itemsize


class Block(nnx.Module):
    """Pre-LayerNorm transformer block: x + attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        d, dt = cfg.d, jnp.dtype(cfg.dtype)
        self.heads = cfg.heads
        self.ln1 = nnx.LayerNorm(d, dtype=dt, param_dtype=jnp.float32, rngs=rngs)
        self.qkv = nnx.Linear(d, 3 * d, dtype=dt, param_dtype=jnp.float32, rngs=rngs)
        self.proj = nnx.Linear(d, d, dtype=dt, param_dtype=jnp.float32, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, dtype=dt, param_dtype=jnp.float32, rngs=rngs)
        self.fc = nnx.Linear(d, 4 * d, dtype=dt, param_dtype=jnp.float32, rngs=rngs)
        self.out = nnx.Linear(4 * d, d, dtype=dt, param_dtype=jnp.float32, rngs=rngs)

    def attend(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        h = self.heads
        q, k, v = jnp.split(self.qkv(self.ln1(x)), 3, axis=-1)
        q, k, v = (a.reshape(b, t, h, d // h) for a in (q, k, v))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // h)
        causal = jnp.tril(jnp.ones((t, t), dtype=bool))
        scores = jnp.where(causal, scores.astype(jnp.float32), -1e30)
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        return self.proj(jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, d))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attend(x)
        return x + self.out(jax.nn.gelu(self.fc(self.ln2(x))))

    def cached(self, x: jax.Array, k_cache: jax.Array, v_cache: jax.Array, pos: jax.Array
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The block on ``t`` new tokens at positions ``pos .. pos + t - 1``: their keys and values
        are written into the caches (``(B, length, heads, d / heads)``), the queries attend to every
        cached position up to their own. Returns ``(x, k_cache, v_cache)``."""
        b, t, d = x.shape
        h = self.heads
        q, k, v = jnp.split(self.qkv(self.ln1(x)), 3, axis=-1)
        q, k, v = (a.reshape(b, t, h, d // h) for a in (q, k, v))
        k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, pos, 0, 0))
        v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, pos, 0, 0))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k_cache.astype(q.dtype)) / math.sqrt(d // h)
        visible = jnp.arange(k_cache.shape[1])[None, :] <= (pos + jnp.arange(t))[:, None]
        scores = jnp.where(visible, scores.astype(jnp.float32), -1e30)
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        x = x + self.proj(jnp.einsum("bhqk,bkhd->bqhd", weights, v_cache.astype(v.dtype)).reshape(b, t, d))
        return x + self.out(jax.nn.gelu(self.fc(self.ln2(x)))), k_cache, v_cache


class GPT(nnx.Module):
    """Token + position embeddings, ``layers`` blocks, a final LayerNorm, logits by the tied
    token embedding (float32 logits)."""

    def __init__(self, cfg: GPTConfig, seed: int = 0):
        rngs = nnx.Rngs(seed)
        self.cfg = cfg
        init = nnx.initializers.normal(0.02)
        self.embed = nnx.Embed(cfg.vocab, cfg.d, embedding_init=init, dtype=jnp.dtype(cfg.dtype),
                               param_dtype=jnp.float32, rngs=rngs)
        self.pos = nnx.Param(init(rngs.params(), (cfg.seq_len, cfg.d), jnp.float32))
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.layers)])
        self.ln_f = nnx.LayerNorm(cfg.d, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        t = tokens.shape[-1]
        if t > self.cfg.seq_len:
            raise ValueError(f"{t} tokens exceed the context of {self.cfg.seq_len}")
        dt = jnp.dtype(self.cfg.dtype)
        x = self.embed(tokens) + self.pos[...][:t].astype(dt)
        for block in self.blocks:
            x = nnx.remat(lambda b, y: b(y))(block, x) if self.cfg.remat else block(x)
        return self.embed.attend(self.ln_f(x)).astype(jnp.float32)


    def cached(self, tokens: jax.Array, cache: dict[str, jax.Array], pos: jax.Array
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Logits of ``tokens`` (``(B, t)``) placed at positions ``pos ..``, attending to the KV
        ``cache`` (:func:`init_cache`); returns ``(logits, the updated cache)``. ``t`` tokens at
        ``pos = 0`` is the prefill, one token at a time after it is the decode."""
        t = tokens.shape[-1]
        dt = jnp.dtype(self.cfg.dtype)
        x = self.embed(tokens) + jax.lax.dynamic_slice_in_dim(self.pos[...], pos, t).astype(dt)
        ks, vs = [], []
        for i, block in enumerate(self.blocks):
            x, k, v = block.cached(x, cache["k"][i], cache["v"][i], pos)
            ks.append(k)
            vs.append(v)
        logits = self.embed.attend(self.ln_f(x)).astype(jnp.float32)
        return logits, {"k": jnp.stack(ks), "v": jnp.stack(vs)}


def flat_params(tree: dict) -> dict[str, Any]:
    """A nested parameter dict as one flat dict keyed ``"blocks/0/qkv/kernel"``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in flat_params(value).items()})
        else:
            out[str(key)] = value
    return out


def nested_params(flat: dict[str, Any]) -> dict:
    """The inverse of :func:`flat_params` (integer parts of a key become list indices' int keys)."""
    tree: dict = {}
    for key, value in flat.items():
        parts = [int(p) if p.isdigit() else p for p in key.split("/")]
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


def init_cache(cfg: GPTConfig, batch: int, length: int | None = None) -> dict[str, jax.Array]:
    """An empty KV cache: ``k`` and ``v`` of shape ``(layers, batch, length, heads, d / heads)``
    in the compute dtype (:func:`kv_cache_bytes` is its size)."""
    length = cfg.seq_len if length is None else length
    if not 1 <= length <= cfg.seq_len:
        raise ValueError(f"cache length must be in 1..{cfg.seq_len} (the context), got {length}")
    shape = (cfg.layers, batch, length, cfg.heads, cfg.d // cfg.heads)
    return {"k": jnp.zeros(shape, cfg.dtype), "v": jnp.zeros(shape, cfg.dtype)}


def decode_fns(model: GPT):
    """``(prefill, decode, recompute)``, jitted, over the model's split state:
    ``prefill(state, prompt, cache) -> (last logits, cache)``, ``decode(state, token, cache, pos)
    -> (logits, cache)`` (one token with the cache), ``recompute(state, tokens) -> last logits``
    (the whole prefix again, no cache: what generation without a cache does every token)."""
    graphdef, state = nnx.split(model)
    state = flat_params(nnx.to_pure_dict(state))  # one flat dict of strings: jax.export serialises it

    def merged(state):
        return nnx.merge(graphdef, nnx.State(nested_params(state)))

    @jax.jit
    def prefill(state, prompt, cache):
        logits, cache = merged(state).cached(prompt, cache, jnp.int32(0))
        return logits[:, -1], cache

    @jax.jit
    def decode(state, token, cache, pos):
        logits, cache = merged(state).cached(token[:, None], cache, pos)
        return logits[:, -1], cache

    @jax.jit
    def recompute(state, tokens):
        return merged(state)(tokens)[:, -1]

    return state, prefill, decode, recompute


def generate(model: GPT, prompt: np.ndarray, new_tokens: int, use_cache: bool = True) -> np.ndarray:
    """Greedy continuation of ``prompt`` (``(B, P)`` tokens) by ``new_tokens`` tokens, with the KV
    cache or by recomputing the whole prefix for every token; both give the same tokens."""
    prompt = np.asarray(prompt, dtype=np.int32)
    b, p = prompt.shape
    if p < 1 or p + new_tokens > model.cfg.seq_len:
        raise ValueError(f"prompt of {p} + {new_tokens} new tokens must fit the context of {model.cfg.seq_len}")
    state, prefill, decode, recompute = decode_fns(model)
    out = [prompt]
    if use_cache:
        logits, cache = prefill(state, jnp.asarray(prompt), init_cache(model.cfg, b))
        for i in range(new_tokens):
            token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            out.append(np.asarray(token)[:, None])
            if i + 1 < new_tokens:
                logits, cache = decode(state, token, cache, jnp.int32(p + i))
    else:
        tokens = jnp.asarray(prompt)
        for _ in range(new_tokens):
            token = jnp.argmax(recompute(state, tokens), axis=-1).astype(jnp.int32)
            out.append(np.asarray(token)[:, None])
            tokens = jnp.concatenate([tokens, token[:, None]], axis=1)
    return np.concatenate(out, axis=1)


def export_decode(model: GPT, batch: int) -> bytes:
    """The decode step (one token, full-length cache) exported with ``jax.export`` and serialised:
    a server can run it with no Python model code (:func:`run_exported_decode`)."""
    from jax import export

    state, _, decode, _ = decode_fns(model)
    cache = init_cache(model.cfg, batch)
    def spec(tree):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)

    args = (spec(state), jax.ShapeDtypeStruct((batch,), jnp.int32), spec(cache), jax.ShapeDtypeStruct((), jnp.int32))
    return bytes(export.export(decode)(*args).serialize())


def run_exported_decode(blob: bytes, state: Any, token: Any, cache: Any, pos: Any):
    """Deserialise an exported decode step and run it."""
    from jax import export

    return export.deserialize(bytearray(blob)).call(state, token, cache, pos)


def count_params(model: nnx.Module) -> int:
    """Parameters the model holds (every ``nnx.Param`` element)."""
    return int(sum(np.size(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def next_token_loss(model: GPT, rows: jax.Array) -> jax.Array:
    """Mean cross-entropy (nats) of predicting ``rows[:, 1:]`` from ``rows[:, :-1]``."""
    rows = rows.astype(jnp.int32)
    logits = model(rows[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, rows[:, 1:]).mean()


def xla_flops(cfg: GPTConfig, batch: int, training: bool = True) -> float:
    """FLOPs XLA's cost analysis counts for one forward (or one gradient step) on ``batch`` rows."""
    model = GPT(cfg)
    graphdef, state = nnx.split(model)
    rows = jax.ShapeDtypeStruct((batch, cfg.seq_len + 1), jnp.int32)

    def loss(state, rows):
        return next_token_loss(nnx.merge(graphdef, state), rows)

    fn = jax.grad(loss) if training else loss
    cost = jax.jit(fn).lower(state, rows).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost["flops"])



# --------------------------------------------------------------------------- training on a 2-D mesh (ch. 07, 08, 10, 11)


def mesh_shape(devices: int) -> tuple[int, int]:
    """(data, model) for ``devices`` devices: tensor parallelism over 2 when the count is even,
    data parallelism (with FSDP) over the rest: 1 -> (1, 1), 2 -> (1, 2), 4 -> (2, 2), 8 -> (4, 2)."""
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ValueError(f"devices must be a positive integer, got {devices!r}")
    model = 2 if devices % 2 == 0 else 1
    return devices // model, model


def make_mesh(devices) -> jax.sharding.Mesh:
    """A ``("data", "model")`` mesh of ``devices`` shaped by :func:`mesh_shape`."""
    devices = list(devices)
    return jax.sharding.Mesh(np.array(devices).reshape(mesh_shape(len(devices))), ("data", "model"))


# How each parameter is laid out on the mesh. Megatron's tensor parallelism: the first matmul of
# attention (qkv) and of the MLP (fc) split their output columns over "model", the second (proj,
# out) their input rows, so each block needs one all-reduce forward; FSDP: the other dimension of
# every matrix is split over "data" (gathered just before use, gradients reduce-scattered).
PARAM_RULES: dict[str, tuple[str | None, ...]] = {
    "qkv/kernel": ("data", "model"), "fc/kernel": ("data", "model"),
    "qkv/bias": ("model",), "fc/bias": ("model",),
    "proj/kernel": ("model", "data"), "out/kernel": ("model", "data"),
    "embed/embedding": ("model", "data"), "pos": (None, "data"),
}


def param_spec(path: tuple, shape: tuple[int, ...]) -> jax.sharding.PartitionSpec:
    """The PartitionSpec of one parameter (by the last parts of its path); replicated otherwise."""
    P = jax.sharding.PartitionSpec
    keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
    for rule, spec in PARAM_RULES.items():
        parts = rule.split("/")
        if keys[-len(parts):] == parts and len(spec) == len(shape):
            return P(*spec)
    return P()


def state_shardings(state: Any, mesh: jax.sharding.Mesh) -> Any:
    """NamedShardings for a training state: parameters and the optimiser's moments by
    :func:`param_spec` (the moments have the parameters' paths inside the optimiser state),
    scalars replicated."""
    def one(path, leaf):
        shape = tuple(np.shape(leaf))
        spec = param_spec(tuple(path), shape) if shape else jax.sharding.PartitionSpec()
        for axis, name in zip(shape, spec, strict=False):  # a dimension the mesh axis does not divide stays whole
            if name is not None and axis % mesh.shape[name]:
                spec = jax.sharding.PartitionSpec()
                break
        return jax.sharding.NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, state)


def init_train_state(cfg: GPTConfig, lr: float = 3e-3, seed: int = 0, warmup: int = 20,
                     steps: int = 1000) -> tuple[dict[str, Any], Any, optax.GradientTransformation]:
    """``(state, graphdef, tx)``: the state is a plain pytree (float32 ``params``, AdamW moments,
    ``step``), the learning rate warms up over ``warmup`` steps then decays (cosine) to ``steps``."""
    graphdef, params = nnx.split(GPT(cfg, seed), nnx.Param)
    params = nnx.to_pure_dict(params)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, warmup), max(steps, warmup + 1), lr / 10)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    return state, graphdef, tx


def make_train_step(graphdef: Any, tx: optax.GradientTransformation, shardings: Any = None):
    """The jitted step ``(state, rows) -> (state, loss)``; with ``shardings`` (of the state) the
    new state keeps the old one's layout, so a sharded state stays sharded step after step."""
    def loss_fn(params, rows):
        model = nnx.merge(graphdef, nnx.State(params))
        return next_token_loss(model, rows)

    def step(state, rows):
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], rows)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
                "step": state["step"] + 1}, loss

    if shardings is None:
        return jax.jit(step, donate_argnums=0)
    return jax.jit(step, out_shardings=(shardings, None), donate_argnums=0)


def place(state: Any, mesh: jax.sharding.Mesh | None) -> tuple[Any, Any, Any]:
    """``(state, its shardings, the rows' sharding)`` on ``mesh`` (rows split over "data"), or on
    the first device (no state shardings)."""
    if mesh is None:
        dev = jax.devices()[0]
        return jax.device_put(state, dev), None, dev
    shardings = state_shardings(state, mesh)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))
    return jax.device_put(state, shardings), shardings, rows


def sharded_vs_single(cfg: GPTConfig, rows: np.ndarray, devices, steps: int = 3) -> dict[str, Any]:
    """The same steps from the same state on one device and on a mesh of ``devices``: the
    largest difference of the parameters and of the losses afterwards."""
    results = []
    for mesh in (None, make_mesh(devices)):
        state, graphdef, tx = init_train_state(cfg)
        state, shardings, rows_sharding = place(state, mesh)
        x = jax.device_put(jnp.asarray(rows), rows_sharding)
        step = make_train_step(graphdef, tx, shardings)
        losses = []
        for _ in range(steps):
            state, loss = step(state, x)
            losses.append(float(loss))
        results.append((jax.device_get(state["params"]), losses))
    (p1, l1), (p2, l2) = results
    from scalelab.parallel.data_parallel import max_abs_diff

    return {"mesh": dict(zip(("data", "model"), mesh_shape(len(list(devices))), strict=True)),
            "params_max_abs_diff": max_abs_diff(p1, p2),
            "loss_max_abs_diff": float(np.max(np.abs(np.array(l1) - np.array(l2)))), "losses": l1}


# --------------------------------------------------------------------------- the measured chain


def evaluate(graphdef: Any, params: Any, rows: np.ndarray, batch: int = 32) -> float:
    """Mean next-token loss (nats) over ``rows`` (whole batches; the remainder is dropped)."""
    @jax.jit
    def loss(params, x):
        return next_token_loss(nnx.merge(graphdef, nnx.State(params)), x)

    n = (len(rows) // batch) * batch
    if n == 0:
        raise ValueError(f"{len(rows)} rows make no batch of {batch}")
    return float(np.mean([float(loss(params, jnp.asarray(rows[i:i + batch]))) for i in range(0, n, batch)]))


def train(cfg: GPTConfig, train_path, steps: int, batch: int, devices, lr: float = 3e-3, seed: int = 0,
          log_every: int = 0) -> dict[str, Any]:
    """Train on a mesh of ``devices`` for ``steps`` steps from the store at ``train_path``.

    Returns the state, graphdef, losses and the seconds of each step after the first (the first
    compiles); each step waits for its loss, so a step's time includes its input."""
    import time

    mesh = make_mesh(devices) if len(list(devices)) > 1 else None
    state, graphdef, tx = init_train_state(cfg, lr=lr, seed=seed, steps=steps)
    it = batches(train_path, batch, seed=seed)
    state, shardings, data_sharding = place(state, mesh)
    step = make_train_step(graphdef, tx, shardings)
    losses, seconds = [], []
    for i in range(steps):
        t0 = time.perf_counter()
        rows = jax.device_put(np.asarray(next(it)), data_sharding)
        state, loss = step(state, rows)
        losses.append(float(loss))
        if i:
            seconds.append(time.perf_counter() - t0)
        if log_every and (i + 1) % log_every == 0:
            print(f"step {i + 1}/{steps}: loss {losses[-1]:.3f}")
    return {"state": state, "graphdef": graphdef, "losses": losses, "step_s": seconds, "mesh": mesh_shape(len(list(devices)))}


def pipeline_rate(train_path, batch: int, batches_n: int = 50, seed: int = 0) -> float:
    """Batches per second the input pipeline alone delivers (read, shuffle, batch)."""
    import time

    it = batches(train_path, batch, seed=seed)
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches_n):
        next(it)
    return batches_n / (time.perf_counter() - t0)


def kv_speedups(model: GPT, lengths, new_tokens: int = 8, repeat: int = 3) -> list[dict[str, float]]:
    """Seconds per generated token with the KV cache and by recomputing the prefix, after a
    prompt of each length (the compiled functions warmed up first); the speed-up is their ratio."""
    from scalelab import bench

    state, prefill, decode, recompute = decode_fns(model)
    out = []
    for length in lengths:
        if length + new_tokens > model.cfg.seq_len:
            raise ValueError(f"length {length} + {new_tokens} exceeds the context {model.cfg.seq_len}")
        prompt = jnp.ones((1, length), jnp.int32)
        logits, cache = prefill(state, prompt, init_cache(model.cfg, 1))
        token = jnp.argmax(logits, -1).astype(jnp.int32)
        cached = bench.timeit(decode, state, token, cache, jnp.int32(length), repeat=repeat).best
        full = bench.timeit(recompute, state, jnp.ones((1, length + 1), jnp.int32), repeat=repeat).best
        pre = bench.timeit(prefill, state, prompt, init_cache(model.cfg, 1), repeat=repeat).best
        out.append({"length": int(length), "cached_s_per_token": cached, "recompute_s_per_token": full,
                    "speedup": full / cached, "prefill_s_per_token": pre / length})
    return out


QUICK = {"cfg": GPTConfig(d=64, layers=2, heads=4, seq_len=128), "steps": 60, "batch": 16, "max_bytes": 400_000}
FULL = {"cfg": GPTConfig(d=128, layers=4, heads=4, seq_len=256), "steps": 600, "batch": 32, "max_bytes": 4_000_000}


def bench_capstone(quick: bool = False, folder=None) -> dict[str, Any]:
    """The stages built so far, measured: corpus, pipeline headroom, training on every device
    (tokens/s, MFU), validation loss against the unigram baseline, sharded == single, the KV cache."""
    import tempfile

    from scalelab import monitor

    p = QUICK if quick else FULL
    cfg: GPTConfig = p["cfg"]
    with tempfile.TemporaryDirectory() as tmp:
        corpus = build_corpus(Path(folder or tmp) / "corpus", p["max_bytes"], cfg.seq_len)
        devices = jax.devices()
        run = train(cfg, corpus.train, p["steps"], p["batch"], devices)
        step_s = float(np.median(run["step_s"][len(run["step_s"]) // 2:]))
        tokens_per_step = p["batch"] * cfg.seq_len
        peak = monitor.device_peak(devices[0], cfg.dtype)
        flops = flops_per_token(cfg)["total"] * tokens_per_step
        params = jax.device_get(run["state"]["params"])
        val_loss = evaluate(run["graphdef"], params, store_rows(corpus.val), batch=p["batch"])
        unigram = unigram_loss(store_tokens(corpus.train), store_tokens(corpus.val))
        rate = pipeline_rate(corpus.train, p["batch"])
        rows = np.asarray(next(batches(corpus.train, 8, seed=1)))[:, : 33]
        small = GPTConfig(d=32, layers=2, heads=4, seq_len=32, dtype="float32")
        eq = sharded_vs_single(small, rows, devices) if len(devices) > 1 else {"params_max_abs_diff": None}  # nothing to compare on one device
        model = nnx.merge(run["graphdef"], nnx.State(params))
        lengths = [n for n in (16, 64, 128, 192) if n + 8 <= cfg.seq_len]
        kv = kv_speedups(model, lengths)
    return {
        "config": dataclasses.asdict(cfg), "steps": p["steps"], "batch": p["batch"],
        "corpus": corpus.card, "mesh": dict(zip(("data", "model"), run["mesh"], strict=True)),
        "step_s": step_s, "tokens_per_s": tokens_per_step / step_s,
        "model_flops_per_step": flops, "peak_flops": peak.flops, "peak_source": peak.source,
        "mfu": monitor.utilisation(flops, step_s, peak.flops) if peak.flops else None,
        "first_loss": run["losses"][0], "last_loss": float(np.mean(run["losses"][-5:])),
        "val_loss": val_loss, "unigram_val_loss": unigram,
        "pipeline_batches_per_s": rate, "training_batches_per_s": 1 / step_s, "pipeline_headroom": rate * step_s,
        "sharded_vs_single_max_abs_diff": eq["params_max_abs_diff"],
        "kv_cache": kv, "kv_cache_speedup": {str(r["length"]): r["speedup"] for r in kv},
        "prefill_s_per_token": kv[-1]["prefill_s_per_token"], "decode_s_per_token": kv[-1]["cached_s_per_token"],
        "not_yet_measured": ["resume_bitwise_equal", "serve_tokens_per_s", "serve_p99_ms"],
    }
