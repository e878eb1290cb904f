"""The capstone's model: a small GPT in Flax NNX, its accounting (parameters, FLOPs, KV cache) and decoding."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from scalelab.capstone.data import VOCAB

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


def generate(model: GPT, prompt: np.ndarray, new_tokens: int, use_cache: bool = True, fns=None) -> np.ndarray:
    """Greedy continuation of ``prompt`` (``(B, P)`` tokens) by ``new_tokens`` tokens, with the KV
    cache or by recomputing the whole prefix for every token; both give the same tokens. Pass
    ``fns = decode_fns(model)`` to reuse its compiled steps over many calls."""
    prompt = np.asarray(prompt, dtype=np.int32)
    b, p = prompt.shape
    if p < 1 or p + new_tokens > model.cfg.seq_len:
        raise ValueError(f"prompt of {p} + {new_tokens} new tokens must fit the context of {model.cfg.seq_len}")
    state, prefill, decode, recompute = fns or decode_fns(model)
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
