"""Chapter 08: model parallelism on a deep residual MLP, each step checked against one device.

Tensor parallelism (Megatron's column/row split), FSDP / ZeRO-3, a 2-D data x model mesh and
GPipe pipelines, each training step checked against the unsharded one; memory and
communication per device.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from scalelab.parallel.data_parallel import COLLECTIVES, max_abs_diff


@dataclasses.dataclass(frozen=True)
class DeepMLP:
    """Sizes of the chapter-08 model: ``embed`` -> ``layers`` residual MLP blocks -> ``head``.

    Each block is Megatron's MLP: ``x + relu(x @ w1 + b1) @ w2 + b2`` with ``w1`` of shape
    (width, hidden) and ``w2`` of shape (hidden, width).
    """

    features: int = 64
    width: int = 64
    hidden: int = 256
    layers: int = 8
    classes: int = 10

    def __post_init__(self):
        if min(self.features, self.width, self.hidden, self.layers, self.classes) < 1:
            raise ValueError(f"all DeepMLP sizes must be >= 1, got {self}")

    def init(self, key: jax.Array) -> dict[str, Any]:
        """Parameters (float32): ``embed``, stacked ``blocks`` and ``head``."""
        k = jax.random.split(key, 4)
        d, h, n = self.width, self.hidden, self.layers

        def dense(key, fan_in, shape):
            return jax.random.normal(key, shape, jnp.float32) / np.sqrt(fan_in)

        return {
            "embed": {"w": dense(k[0], self.features, (self.features, d)), "b": jnp.zeros((d,))},
            "blocks": {"w1": dense(k[1], d, (n, d, h)), "b1": jnp.zeros((n, h)),
                       "w2": dense(k[2], h, (n, h, d)) * 0.5, "b2": jnp.zeros((n, d))},
            "head": {"w": dense(k[3], d, (d, self.classes)), "b": jnp.zeros((self.classes,))},
        }

    def param_count(self) -> int:
        d, h = self.width, self.hidden
        return (self.features * d + d) + self.layers * (2 * d * h + h + d) + (d * self.classes + self.classes)


def mlp_block(x: jax.Array, w1: jax.Array, b1: jax.Array, w2: jax.Array, b2: jax.Array) -> jax.Array:
    """One residual MLP block: the unit that tensor parallelism splits."""
    return x + jax.nn.relu(x @ w1 + b1) @ w2 + b2


def _layer(blocks: dict[str, jax.Array], i: int) -> tuple[jax.Array, ...]:
    return blocks["w1"][i], blocks["b1"][i], blocks["w2"][i], blocks["b2"][i]


def deep_forward(params: dict[str, Any], x: jax.Array) -> jax.Array:
    """Logits of the deep MLP (layers unrolled)."""
    h = x @ params["embed"]["w"] + params["embed"]["b"]
    for i in range(params["blocks"]["w1"].shape[0]):
        h = mlp_block(h, *_layer(params["blocks"], i))
    return h @ params["head"]["w"] + params["head"]["b"]


def deep_loss(params: dict[str, Any], x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(deep_forward(params, x), y).mean()


def adam(lr: float = 1e-3) -> optax.GradientTransformation:
    """The optimiser of every chapter-08 strategy (Adam keeps two moments per parameter)."""
    return optax.adam(lr)


def _adam_update(tx, params, grads, opt_state):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def unsharded_step(tx: optax.GradientTransformation):
    """The reference: one device, whole batch, Adam."""

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(deep_loss)(params, x, y)
        params, opt_state = _adam_update(tx, params, grads, opt_state)
        return params, opt_state, loss

    return step


def deep_batches(batch: int, steps: int, features: int = 64, seed: int = 0):
    """``steps`` batches of the digits training set (64 features, 10 classes)."""
    from scalelab import data

    if batch < 1 or steps < 1:
        raise ValueError(f"batch and steps must be >= 1, got {batch}, {steps}")
    split = data.load_digits()
    if split.features != features:
        raise ValueError(f"the digits have {split.features} features, the model expects {features}")
    rng = np.random.default_rng(seed)
    return [(split.x_train[idx], split.y_train[idx])
            for idx in (rng.integers(0, len(split.x_train), batch) for _ in range(steps))]


# --------------------------------------------------------------------------- meshes that adapt to the device count


def model_mesh(devices: Sequence[Any], axes: tuple[str, ...] = ("model",), shape: tuple[int, ...] | None = None):
    """A mesh with named ``axes`` over ``devices`` (Auto axes: GSPMD propagation).

    With two axes and no ``shape``, the first (data) axis gets 2 devices when there are
    at least 4, else 1, and the second axis the rest: 8 -> 2 x 4, 4 -> 2 x 2, 2 -> 1 x 2.
    """
    n = len(devices)
    if shape is None:
        if len(axes) == 1:
            shape = (n,)
        elif len(axes) == 2:
            first = 2 if n >= 4 and n % 2 == 0 else 1
            shape = (first, n // first)
        else:
            raise ValueError(f"give a shape for a mesh with {len(axes)} axes")
    if len(shape) != len(axes) or int(np.prod(shape)) != n:
        raise ValueError(f"mesh shape {shape} does not fit axes {axes} and {n} devices")
    return jax.make_mesh(tuple(shape), tuple(axes), axis_types=(AxisType.Auto,) * len(axes), devices=list(devices))


# --------------------------------------------------------------------------- 1. tensor parallelism of one block


def tp_block_specs(axis: str = "model") -> dict[str, P]:
    """Megatron's split: ``w1`` by columns (each device a slice of the hidden units),
    ``w2`` by rows (the matching slice of its inputs); the block's input and output are
    replicated, so one all-reduce joins the partial outputs."""
    return {"w1": P(None, axis), "b1": P(axis), "w2": P(axis, None), "b2": P()}


def tp_block_shard_map(mesh, axis: str = "model"):
    """The same block written per device with ``shard_map``: a local slice of the hidden
    layer, a partial output, and an explicit ``psum`` over ``axis`` (Megatron's *g*)."""
    specs = tp_block_specs(axis)

    def local(x, w1, b1, w2, b2):
        partial = jax.nn.relu(x @ w1 + b1) @ w2  # (batch, width), a partial sum
        return x + jax.lax.psum(partial, axis) + b2

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), specs["w1"], specs["b1"], specs["w2"], specs["b2"]),
                                 out_specs=P()))


# --------------------------------------------------------------------------- 2. GSPMD strategies: the same step, other specs


def _leaf_specs(params: dict[str, Any], rule: Callable[[str, str, tuple[int, ...]], P]) -> dict[str, Any]:
    return {group: {name: rule(group, name, leaf.shape) for name, leaf in leaves.items()}
            for group, leaves in params.items()}


def dp_specs(params: dict[str, Any]) -> dict[str, Any]:
    """Data parallelism: every parameter replicated."""
    return _leaf_specs(params, lambda g, n, s: P())


def tp_specs(params: dict[str, Any], axis: str = "model") -> dict[str, Any]:
    """Tensor parallelism: each block's ``w1``/``b1`` split by hidden columns, ``w2`` by rows
    (the stacked layer axis stays whole); embedding and head replicated."""
    block = tp_block_specs(axis)
    return _leaf_specs(params, lambda g, n, s: P(None, *block[n]) if g == "blocks" else P())


def fsdp_specs(params: dict[str, Any], size: int, axis: str = "data") -> dict[str, Any]:
    """FSDP / ZeRO-3: each parameter split over ``axis`` along its first dimension that
    ``size`` divides (after the stacked layer axis); too-small leaves stay replicated."""

    def rule(group, name, shape):
        start = 1 if group == "blocks" else 0
        for dim in range(start, len(shape)):
            if shape[dim] % size == 0 and shape[dim] >= size:
                return P(*([None] * dim), axis)
        return P()

    return _leaf_specs(params, rule)


def _named(mesh, specs):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))


def opt_state_specs(tx: optax.GradientTransformation, params, param_specs):
    """PartitionSpecs for the optimiser state: every part shaped like the parameters
    (Adam's two moments) takes the parameters' specs; scalars (the step count) replicate."""
    structure = jax.tree.structure(params)

    def like_params(node) -> bool:
        return jax.tree.structure(node) == structure

    state = jax.eval_shape(tx.init, params)
    return jax.tree.map(lambda node: param_specs if like_params(node) else P(), state, is_leaf=like_params)


def gspmd_step(tx: optax.GradientTransformation, mesh, param_specs, batch_spec: P):
    """The reference step, with parameters (and so Adam's moments) laid out by
    ``param_specs`` and the batch by ``batch_spec``. XLA's partitioner inserts the
    collectives. Returns ``(step, place)``: ``place(params, opt_state, x, y)`` puts the
    arrays where the specs say."""
    p_shard = _named(mesh, param_specs)
    b_shard = NamedSharding(mesh, batch_spec)

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(deep_loss)(params, x, y)
        params, opt_state = _adam_update(tx, params, grads, opt_state)
        params = jax.lax.with_sharding_constraint(params, p_shard)
        return params, opt_state, loss

    def place(params, opt_state, x, y):
        o_shard = _named(mesh, opt_state_specs(tx, params, param_specs))
        return (jax.device_put(params, p_shard), jax.device_put(tx.init(params), o_shard),
                jax.device_put(x, b_shard), jax.device_put(y, b_shard))

    return step, place


# --------------------------------------------------------------------------- 3. FSDP written out


def fsdp_step(tx: optax.GradientTransformation, mesh, params: dict[str, Any], axis: str = "data"):
    """FSDP / ZeRO-3 per device with ``shard_map``: each device keeps 1/n of every
    parameter and of Adam's moments, gathers a layer's weights just before using them
    (``all_gather``) and drops them after (``jax.checkpoint``: the backward pass gathers
    them again); autodiff turns each gather into a reduce-scatter of the gradients, so
    each device receives only its shard's gradient.
    Returns ``(step, place)`` as :func:`gspmd_step`."""
    size = mesh.shape[axis]
    specs = fsdp_specs(params, size, axis)

    def gather(leaf, spec, drop_layer_axis=False):
        if axis not in tuple(spec):
            return leaf
        dim = tuple(spec).index(axis) - (1 if drop_layer_axis else 0)
        return jax.lax.all_gather(leaf, axis, axis=dim, tiled=True)

    @jax.checkpoint  # keep only the shards: the backward pass gathers the layer again
    def layer(h, shards):
        w = {k: gather(v, specs["blocks"][k], drop_layer_axis=True) for k, v in shards.items()}
        return mlp_block(h, w["w1"], w["b1"], w["w2"], w["b2"])

    def local_loss(p, x, y, global_batch):
        e = {k: gather(v, specs["embed"][k]) for k, v in p["embed"].items()}
        h = x @ e["w"] + e["b"]
        for i in range(p["blocks"]["w1"].shape[0]):
            h = layer(h, {k: v[i] for k, v in p["blocks"].items()})
        o = {k: gather(v, specs["head"][k]) for k, v in p["head"].items()}
        logits = h @ o["w"] + o["b"]
        # a sum over the local examples / the global batch: summed over devices, the mean loss
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).sum() / global_batch

    def local_step(p, opt_state, x, y):
        global_batch = x.shape[0] * size
        loss, grads = jax.value_and_grad(local_loss)(p, x, y, global_batch)
        p, opt_state = _adam_update(tx, p, grads, opt_state)
        return p, opt_state, jax.lax.psum(loss, axis)

    opt_specs = opt_state_specs(tx, params, specs)
    sm = jax.shard_map(local_step, mesh=mesh, in_specs=(specs, opt_specs, P(axis), P(axis)),
                       out_specs=(specs, opt_specs, P()))
    return jax.jit(sm), gspmd_step(tx, mesh, specs, P(axis))[1]



# --------------------------------------------------------------------------- 4. pipeline parallelism (GPipe)


def gpipe_schedule(stages: int, microbatches: int) -> np.ndarray:
    """GPipe's schedule as a table: ``out[s, t]`` is the micro-batch stage ``s`` works on
    at tick ``t`` (forward ticks first, then the mirrored backward ticks), -1 when idle.

    Forward: stage s runs micro-batch j at tick s + j. Backward runs in reverse, the last
    stage first. Each half takes m + p - 1 ticks, of which each stage is busy m.
    """
    if stages < 1 or microbatches < 1:
        raise ValueError(f"stages and microbatches must be >= 1, got {stages}, {microbatches}")
    ticks = microbatches + stages - 1
    fwd = np.full((stages, ticks), -1)
    for s in range(stages):
        fwd[s, s:s + microbatches] = np.arange(microbatches)
    bwd = fwd[::-1, :]  # the last stage starts the backward pass
    return np.concatenate([fwd, bwd], axis=1)


def bubble_fraction(schedule: np.ndarray) -> float:
    """Share of (stage, tick) slots in which a stage is idle."""
    schedule = np.asarray(schedule)
    return float(np.mean(schedule < 0))


def predicted_bubble(stages: int, microbatches: int) -> float:
    """GPipe's bubble, (p - 1) / (m + p - 1)."""
    return (stages - 1) / (microbatches + stages - 1)


def pipeline_specs(params: dict[str, Any], axis: str = "stage") -> dict[str, Any]:
    """Pipeline parallelism: consecutive layers on consecutive stages (the stacked layer
    axis split over ``axis``); the small embedding and head replicated."""
    return _leaf_specs(params, lambda g, n, s: P(axis) if g == "blocks" else P())


def _gpipe_forward(prm, x, microbatches: int, axis: str):
    """Per stage: GPipe's forward over m + p - 1 ticks. Returns the activations leaving
    the last stage (meaningful there only) and the executed busy mask, one per tick."""
    p = jax.lax.axis_size(axis)
    stage = jax.lax.axis_index(axis)
    m = microbatches
    xm = (x @ prm["embed"]["w"] + prm["embed"]["b"]).reshape(m, x.shape[0] // m, -1)
    state, valid = jnp.zeros_like(xm[0]), jnp.zeros((), jnp.int32)
    shift = [(i, i + 1) for i in range(p - 1)]  # stage i sends to stage i + 1
    outs, busy = [], []
    for t in range(m + p - 1):
        h = jnp.where(stage == 0, xm[min(t, m - 1)], state)  # stage 0 takes a fresh micro-batch
        v = jnp.where(stage == 0, jnp.int32(t < m), valid)  # does h hold a real micro-batch?
        for i in range(prm["blocks"]["w1"].shape[0]):  # this stage's layers
            h = mlp_block(h, *_layer(prm["blocks"], i))
        busy.append(v)
        if t >= p - 1:
            outs.append(h)  # on the last stage: micro-batch t - (p - 1)
        if p > 1:
            state = jax.lax.ppermute(h, axis, shift)
            valid = jax.lax.ppermute(v, axis, shift)
    return jnp.concatenate(outs), jnp.stack(busy)


def gpipe_step(tx: optax.GradientTransformation, mesh, params: dict[str, Any], microbatches: int,
               axis: str = "stage"):
    """Pipeline-parallel training step (GPipe) with ``shard_map`` and ``ppermute``: the
    layers are split into p consecutive stages, the batch into m micro-batches that flow
    through the stages; autodiff of the forward schedule gives the mirrored backward
    schedule. Returns ``(step, place)``; ``step`` also returns the busy mask (p, ticks)
    of the forward schedule it executed."""
    stages = mesh.shape[axis]
    layers = params["blocks"]["w1"].shape[0]
    if layers % stages:
        raise ValueError(f"{layers} layers cannot be split evenly over {stages} pipeline stages")
    specs = pipeline_specs(params, axis)

    def local_loss(prm, x, y):
        out, busy = _gpipe_forward(prm, x, microbatches, axis)
        logits = out @ prm["head"]["w"] + prm["head"]["b"]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        last = jax.lax.axis_index(axis) == stages - 1
        return jnp.where(last, loss, 0.0), busy  # only the last stage's loss counts

    def local_step(prm, opt_state, x, y):
        if x.shape[0] % microbatches:
            raise ValueError(f"a batch of {x.shape[0]} cannot be split into {microbatches} micro-batches")
        (loss, busy), grads = jax.value_and_grad(local_loss, has_aux=True)(prm, x, y)
        prm, opt_state = _adam_update(tx, prm, grads, opt_state)
        return prm, opt_state, jax.lax.psum(loss, axis), busy[None]

    opt_specs = opt_state_specs(tx, params, specs)
    sm = jax.shard_map(local_step, mesh=mesh, in_specs=(specs, opt_specs, P(), P()),
                       out_specs=(specs, opt_specs, P(), P(axis)))
    return jax.jit(sm), gspmd_step(tx, mesh, specs, P())[1]


def executed_bubble(mesh, microbatches: int, cfg: DeepMLP | None = None, axis: str = "stage") -> tuple[float, np.ndarray]:
    """Run GPipe's forward on ``mesh`` and read the bubble off the busy mask the program
    itself produced (not from the formula)."""
    cfg = cfg or DeepMLP()
    params = cfg.init(jax.random.key(0))
    specs = pipeline_specs(params, axis)
    fwd = jax.jit(jax.shard_map(lambda prm, x: _gpipe_forward(prm, x, microbatches, axis)[1][None],
                                mesh=mesh, in_specs=(specs, P()), out_specs=P(axis)))
    x = jnp.zeros((microbatches * 2, cfg.features))
    busy = np.asarray(fwd(jax.device_put(params, _named(mesh, specs)), x))
    return 1.0 - float(busy.mean()), busy


# --------------------------------------------------------------------------- 5. memory and communication per device

_DTYPE_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s16": 2,
                "u16": 2, "s8": 1, "u8": 1, "pred": 1, "f8e4m3fn": 1, "f8e5m2": 1}


def compiled_memory(compiled) -> dict[str, int]:
    """Bytes one device needs for a compiled program, from XLA's memory analysis:
    arguments, outputs, temporaries, and the total ``argument + output + temp - alias``."""
    ma = compiled.memory_analysis()
    if ma is None:
        raise RuntimeError(f"the {jax.default_backend()} backend gives no compiled memory analysis")
    out = {"argument": int(ma.argument_size_in_bytes), "output": int(ma.output_size_in_bytes),
           "temp": int(ma.temp_size_in_bytes), "alias": int(ma.alias_size_in_bytes)}
    out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def bytes_per_device(tree, specs, mesh) -> int:
    """Bytes of ``tree`` held by one device when laid out by ``specs`` on ``mesh``
    (each sharded dimension divided by the size of its mesh axes)."""
    leaves = jax.tree.leaves(tree)
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P))
    if len(leaves) != len(flat_specs):
        raise ValueError(f"{len(leaves)} arrays but {len(flat_specs)} PartitionSpecs")
    total = 0
    for leaf, spec in zip(leaves, flat_specs, strict=True):
        div = 1
        for names in tuple(spec):
            for name in (names if isinstance(names, tuple) else (names,)):
                if name is not None:
                    div *= mesh.shape[name]
        total += int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize // div
    return total


def _group_size(line: str, default: int) -> int:
    m = re.search(r"replica_groups=\{\{([\d,]+)\}", line)
    if m:
        return len(m.group(1).split(","))
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)  # mesh['a'=2,'b'=4] {'a'}
    if m:
        sizes = {k: int(v) for k, v in re.findall(r"'(\w+)'=(\d+)", m.group(1))}
        return int(np.prod([sizes[a] for a in re.findall(r"'(\w+)'", m.group(2))]))
    return default


def _result_bytes(line: str) -> int:
    head = line.split("=", 1)[1]
    head = re.split(r"\s(?:all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(", head)[0]
    shapes = re.findall(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]", head)
    sizes = [_DTYPE_BYTES.get(dt, 4) * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
             for dt, dims in shapes]
    if "-start(" in line and len(sizes) > 1:
        sizes = sizes[len(sizes) // 2:]  # async start: (operands, results); count the results
    return sum(sizes)


def hlo_communication(hlo: str, default_group: int) -> dict[str, Any]:
    """Collectives in a compiled program and the bytes one device sends for them with
    ring algorithms: all-reduce 2(g-1)/g x size, all-gather and all-to-all (g-1)/g x
    size, reduce-scatter (g-1) x its (scattered) result, collective-permute its size.
    Collectives inside loops count once (the chapter's programs are unrolled)."""
    counts = dict.fromkeys(COLLECTIVES, 0)
    sent = 0.0
    for line in hlo.splitlines():
        m = re.search(r"\s(" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
        if not m:
            continue
        kind = m.group(1)
        counts[kind] += 1
        size, g = _result_bytes(line), _group_size(line, default_group)
        factor = {"all-reduce": 2 * (g - 1) / g, "all-gather": (g - 1) / g, "all-to-all": (g - 1) / g,
                  "reduce-scatter": g - 1, "collective-permute": 1.0}[kind]
        sent += factor * size
    return {"counts": counts, "bytes": int(sent)}


def communication_model(strategy: str, cfg: DeepMLP, batch: int, mesh_shape: dict[str, int],
                        microbatches: int = 1, bytes_per_value: int = 4, regather: bool = True) -> float:
    """Bytes one device sends per training step under ``strategy``, by the textbook
    cost model (ring collectives, fp32 unless ``bytes_per_value`` says otherwise):

    - ``dp``: all-reduce of every gradient, 2(n-1)/n x P values;
    - ``fsdp``: all-gather of the weights forward and again backward (ZeRO-3 frees them
      in between), reduce-scatter of the gradients: 3(n-1)/n x P; ``regather=False``
      keeps the gathered weights for the backward pass, 2(n-1)/n x P;
    - ``tp``: per layer one all-reduce of the (batch, width) activations forward and one
      of their gradients backward: L x 2 x 2(m-1)/m x B x d, plus a data-parallel
      all-reduce of each device's parameter shard if the mesh has a ``data`` axis;
    - ``pp``: on each of the m + p - 1 ticks a stage passes a (B/m, d) activation on and
      its gradient back, bubbles included, plus an all-reduce of the replicated embedding
      and head gradients. (Only m of those transfers carry real data: 2 x B x d.)
    """
    b, d = bytes_per_value, cfg.width
    params = cfg.param_count()
    if strategy == "dp":
        n = mesh_shape["data"]
        return 2 * (n - 1) / n * params * b
    if strategy == "fsdp":
        n = mesh_shape["data"]
        return (3 if regather else 2) * (n - 1) / n * params * b
    if strategy in ("tp", "dp_tp"):
        m, a = mesh_shape["model"], mesh_shape.get("data", 1)
        local_batch = batch // a
        acts = cfg.layers * 2 * 2 * (m - 1) / m * local_batch * d * b
        block = cfg.layers * (2 * d * cfg.hidden + cfg.hidden)
        shard = (params - block) + block / m
        return acts + 2 * (a - 1) / a * shard * b
    if strategy == "pp":
        p, m = mesh_shape["stage"], microbatches
        if p == 1:
            return 0.0
        rest = params - cfg.layers * (2 * d * cfg.hidden + cfg.hidden + d)  # embedding + head, replicated
        # every tick each stage passes a micro-batch's activations on (forward) and their
        # gradient back (backward), bubbles included; the replicated parameters' gradients
        # are summed over the stages
        return 2 * (m + p - 1) * (batch // m) * d * b + 2 * (p - 1) / p * rest * b
    raise ValueError(f"unknown strategy {strategy!r}; expected one of dp, fsdp, tp, dp_tp, pp")


# Published per-chip interconnect bandwidth, one direction (vendor figures).
INTERCONNECTS: tuple[dict[str, Any], ...] = (
    {"system": "NVIDIA H100 SXM, NVLink 4 (8-GPU board)", "bytes_per_s": 450e9,
     "note": "900 GB/s total per GPU, half each way",
     "source": "https://www.nvidia.com/en-us/data-center/h100/"},
    {"system": "Google TPU v5p, ICI", "bytes_per_s": 600e9,
     "note": "4,800 Gbps per chip", "source": "https://cloud.google.com/tpu/docs/v5p"},
    {"system": "Google TPU v5e, ICI", "bytes_per_s": 200e9,
     "note": "1,600 Gbps per chip", "source": "https://cloud.google.com/tpu/docs/v5e"},
    {"system": "PCIe 5.0 x16 (GPUs without NVLink)", "bytes_per_s": 64e9,
     "note": "about 64 GB/s each way", "source": "https://pcisig.com/specifications"},
    {"system": "400 Gb/s InfiniBand NDR (between hosts)", "bytes_per_s": 50e9,
     "note": "one 400 Gb/s port per GPU",
     "source": "https://www.nvidia.com/en-us/networking/infiniband-adapters/"},
)


# --------------------------------------------------------------------------- 6. the strategies side by side


def strategy_mesh(name: str, devices: Sequence[Any]):
    """The mesh each strategy uses on ``devices`` (any count)."""
    axes = {"dp": ("data",), "fsdp": ("data",), "tp": ("model",), "dp_tp": ("data", "model"), "pp": ("stage",)}
    if name not in axes:
        raise ValueError(f"unknown strategy {name!r}; expected one of {sorted(axes)}")
    return model_mesh(devices, axes[name])


def build_strategy(name: str, tx, params, mesh, microbatches: int = 4):
    """``(step, place, specs)`` for strategy ``name`` on ``mesh``."""
    if name == "dp":
        specs = dp_specs(params)
        return (*gspmd_step(tx, mesh, specs, P("data")), specs)
    if name == "tp":
        specs = tp_specs(params)
        return (*gspmd_step(tx, mesh, specs, P()), specs)
    if name == "dp_tp":
        specs = tp_specs(params)
        return (*gspmd_step(tx, mesh, specs, P("data")), specs)
    if name == "fsdp":
        return (*fsdp_step(tx, mesh, params), fsdp_specs(params, mesh.shape["data"]))
    if name == "pp":
        return (*gpipe_step(tx, mesh, params, microbatches), pipeline_specs(params))
    raise ValueError(f"unknown strategy {name!r}; expected one of dp, fsdp, tp, dp_tp, pp")


STRATEGY_NAMES = ("dp", "fsdp", "tp", "dp_tp", "pp")


def compare_strategies(devices: Sequence[Any], cfg: DeepMLP | None = None, batch: int = 64, steps: int = 3,
                       microbatches: int = 4, names: Sequence[str] = STRATEGY_NAMES, lr: float = 1e-3,
                       time_repeat: int = 3) -> list[dict[str, Any]]:
    """Train ``steps`` Adam steps with each strategy and with the unsharded reference from
    the same start on the same batches; per strategy: the largest parameter difference,
    bytes per device (analytic and from the compiled program), communication (cost
    model and read from the HLO), and the step time."""
    from scalelab import bench

    cfg = cfg or DeepMLP()
    tx = adam(lr)
    params = cfg.init(jax.random.key(0))
    batches = deep_batches(batch, steps, cfg.features)
    ref_step, ref = unsharded_step(tx), (params, tx.init(params))
    for x, y in batches:
        *ref, _ = ref_step(*ref, x, y)
    rows = []
    for name in names:
        mesh = strategy_mesh(name, devices)
        step, place, specs = build_strategy(name, tx, params, mesh, microbatches)
        state = place(params, None, *batches[0])[:2]
        for x, y in batches:
            _, _, xs, ys = place(params, None, x, y)
            state = step(*state, xs, ys)[:2]
        args = (*state, xs, ys)
        compiled = step.lower(*args).compile()
        mem = compiled_memory(compiled)
        comm = hlo_communication(compiled.as_text(), mesh.devices.size)
        timing = bench.timeit(step, *args, repeat=time_repeat, number=3)
        opt_specs = opt_state_specs(tx, params, specs)
        rows.append({
            "strategy": name, "mesh": dict(mesh.shape),
            "max_abs_diff_vs_unsharded": max_abs_diff(state[0], ref[0]),
            "param_bytes": bytes_per_device(params, specs, mesh),
            "opt_state_bytes": bytes_per_device(tx.init(params), opt_specs, mesh),
            "argument_bytes": mem["argument"], "temp_bytes": mem["temp"], "bytes_per_device": mem["total"],
            "comm_bytes_model": communication_model(name, cfg, batch, dict(mesh.shape), microbatches),
            "comm_bytes_hlo": comm["bytes"],
            "collectives": {k: v for k, v in comm["counts"].items() if v},
            "step_s": timing.best,
        })
    return rows


def bubble_table(stages: Sequence[int], microbatches: Sequence[int]) -> list[dict[str, Any]]:
    """Bubble fraction read from GPipe's schedule table against (p-1)/(m+p-1)."""
    return [{"stages": p, "microbatches": m, "bubble (schedule)": bubble_fraction(gpipe_schedule(p, m)),
             "bubble (p-1)/(m+p-1)": predicted_bubble(p, m)} for p in stages for m in microbatches]


def adam_dp_bytes_per_param(param_bytes: int = 2, moment_bytes: int = 4) -> int:
    """Bytes each parameter costs on every device under pure data parallelism with Adam,
    not counting gradients and activations: the parameter plus two moments."""
    return param_bytes + 2 * moment_bytes


# --------------------------------------------------------------------------- figures


def plot_schedule(schedule: np.ndarray, ax=None, title: str | None = None):
    """Draw a pipeline schedule: one row per stage, forward (F) then backward (B) ticks,
    each slot labelled with its micro-batch; idle slots (the bubble) left blank."""
    from scalelab import plot

    schedule = np.asarray(schedule)
    stages, ticks = schedule.shape
    if ax is None:
        _, ax = plot.figure(width=min(12, 1.0 + 0.42 * ticks), height=0.9 + 0.42 * stages)
    half = ticks // 2
    cmap = _colormap(int(schedule.max()) + 1)
    for s in range(stages):
        for t in range(ticks):
            j = schedule[s, t]
            if j < 0:
                continue
            ax.add_patch(_rect(t, s, cmap(j), hatch="//" if t >= half else None))
            ax.text(t + 0.5, s + 0.5, f"{'B' if t >= half else 'F'}{j}", ha="center", va="center", fontsize=7)
    ax.set_xlim(0, ticks)
    ax.set_xticks(np.arange(0, ticks + 1, max(1, ticks // 12)))
    ax.set_ylim(stages, 0)
    ax.set_yticks(np.arange(stages) + 0.5, [f"stage {s}" for s in range(stages)])
    ax.set_xlabel("tick")
    ax.grid(False)
    ax.set_title(title or f"GPipe: {stages} stages, {int(schedule.max()) + 1} micro-batches, "
                          f"bubble {bubble_fraction(schedule):.0%}")
    return ax


def _colormap(n: int):
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab20" if n > 10 else "tab10")
    return lambda j: cmap(j % cmap.N)


def _rect(t: int, s: int, color, hatch=None):
    from matplotlib.patches import Rectangle

    return Rectangle((t + 0.04, s + 0.08), 0.92, 0.84, facecolor=color, alpha=0.55, edgecolor="0.3",
                     linewidth=0.5, hatch=hatch)


def plot_memory(rows: Sequence[dict[str, Any]], ax=None):
    """Stacked bars of bytes per device for each strategy: parameters, Adam state, and the
    rest of the compiled program's temporaries (activations, gradients, buffers)."""
    from scalelab import plot

    if ax is None:
        _, ax = plot.figure(width=6.4, height=3.4)
    names = [r["strategy"] for r in rows]
    params = np.array([r["param_bytes"] for r in rows]) / 1e6
    opt = np.array([r["opt_state_bytes"] for r in rows]) / 1e6
    temp = np.array([r["temp_bytes"] for r in rows]) / 1e6
    ax.bar(names, params, label="parameters")
    ax.bar(names, opt, bottom=params, label="Adam moments")
    ax.bar(names, temp, bottom=params + opt, label="temporaries (activations, gradients)")
    ax.set_ylabel("MB per device")
    ax.legend()
    return ax


# --------------------------------------------------------------------------- benchmark


def bench_model_parallel(quick: bool = False) -> dict[str, Any]:
    """Benchmark ``model_parallel``: DP, FSDP, TP (and 2-D DP x TP) and GPipe training
    steps on every available device, each against the unsharded step; bytes per device,
    communication, step time; and GPipe's bubble read from the executed program against
    (p-1)/(m+p-1)."""
    devices = jax.devices()
    cfg = DeepMLP(layers=8, hidden=128 if quick else 256)
    rows = compare_strategies(devices, cfg, batch=64, steps=2 if quick else 3, microbatches=4,
                              time_repeat=2 if quick else 5)
    strategies = {r["strategy"]: {k: v for k, v in r.items() if k != "strategy"} for r in rows}
    measured, predicted = {}, {}
    p = len(devices) if cfg.layers % len(devices) == 0 else 1
    mesh = model_mesh(devices, ("stage",)) if p == len(devices) else model_mesh(devices[:1], ("stage",))
    for m in (1, 2, 4, 8) if quick else (1, 2, 4, 8, 16):
        key = f"p{p}_m{m}"
        measured[key] = executed_bubble(mesh, m, cfg)[0]
        predicted[key] = predicted_bubble(p, m)
    return {
        "devices": len(devices), "params": cfg.param_count(), "layers": cfg.layers, "batch": 64,
        "strategies": strategies,
        "max_abs_diff_vs_unsharded": max(r["max_abs_diff_vs_unsharded"] for r in rows),
        "bubble_measured": measured, "bubble_predicted": predicted,
        "adam_dp_bytes_per_param": adam_dp_bytes_per_param(),
    }
