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


def gspmd_step(tx: optax.GradientTransformation, mesh, param_specs, batch_spec: P, opt_param_specs=None,
               grad_specs=None):
    """The reference step, with parameters laid out by ``param_specs``, Adam's moments by
    ``opt_param_specs`` (default: as the parameters), the gradients constrained to
    ``grad_specs`` (default: no constraint) and the batch by ``batch_spec``. XLA's
    partitioner inserts the collectives. Returns ``(step, place)``:
    ``place(params, opt_state, x, y)`` puts the arrays where the specs say."""
    p_shard = _named(mesh, param_specs)
    g_shard = _named(mesh, grad_specs) if grad_specs is not None else None
    b_shard = NamedSharding(mesh, batch_spec)
    opt_param_specs = param_specs if opt_param_specs is None else opt_param_specs

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(deep_loss)(params, x, y)
        if g_shard is not None:
            grads = jax.lax.with_sharding_constraint(grads, g_shard)
        params, opt_state = _adam_update(tx, params, grads, opt_state)
        params = jax.lax.with_sharding_constraint(params, p_shard)
        return params, opt_state, loss

    def place(params, opt_state, x, y):
        o_shard = _named(mesh, opt_state_specs(tx, params, opt_param_specs))
        return (jax.device_put(params, p_shard), jax.device_put(tx.init(params), o_shard),
                jax.device_put(x, b_shard), jax.device_put(y, b_shard))

    return step, place


def zero_step(tx: optax.GradientTransformation, mesh, params: dict[str, Any], stage: int, axis: str = "data"):
    """ZeRO stage 1 or 2 (Rajbhandari et al. 2020): parameters replicated, Adam's moments
    sharded over ``axis``; each device updates its shard and the new parameters are
    all-gathered. Returns ``(step, place)`` as :func:`gspmd_step`.

    Stage 1 is a layout of the data-parallel step (XLA all-reduces the whole gradients,
    then each device uses its slice). Stage 2 is written per device with ``shard_map``:
    the gradients are reduce-scattered (``psum_scatter``), so each device only ever
    receives its shard's summed gradient. Stage 3 is :func:`fsdp_step`."""
    if stage not in (1, 2):
        raise ValueError(f"zero_step builds ZeRO stages 1 and 2 (stage 3 is fsdp_step), got {stage}")
    size = mesh.shape[axis]
    sharded = fsdp_specs(params, size, axis)
    replicated = dp_specs(params)
    place = gspmd_step(tx, mesh, replicated, P(axis), opt_param_specs=sharded)[1]
    if stage == 1:
        return gspmd_step(tx, mesh, replicated, P(axis), opt_param_specs=sharded)[0], place

    def dim(spec):
        return tuple(spec).index(axis) if axis in tuple(spec) else None

    def local_step(prm, opt_state, x, y):
        global_batch = x.shape[0] * size

        def local_loss(prm):  # summed over devices: the mean loss of the global batch
            return optax.softmax_cross_entropy_with_integer_labels(deep_forward(prm, x), y).sum() / global_batch

        loss, grads = jax.value_and_grad(local_loss)(prm)
        index = jax.lax.axis_index(axis)

        def scatter(g, spec):  # this device's shard of the summed gradient
            d = dim(spec)
            return jax.lax.psum(g, axis) if d is None else jax.lax.psum_scatter(g, axis, scatter_dimension=d, tiled=True)

        def own(v, spec):  # this device's shard of a replicated parameter
            d = dim(spec)
            return v if d is None else jax.lax.dynamic_slice_in_dim(v, index * (v.shape[d] // size), v.shape[d] // size, d)

        def gather(v, spec):
            d = dim(spec)
            return v if d is None else jax.lax.all_gather(v, axis, axis=d, tiled=True)

        shard, opt_state = _adam_update(tx, jax.tree.map(own, prm, sharded), jax.tree.map(scatter, grads, sharded),
                                        opt_state)
        return jax.tree.map(gather, shard, sharded), opt_state, jax.lax.psum(loss, axis)

    opt_specs = opt_state_specs(tx, params, sharded)
    sm = jax.shard_map(local_step, mesh=mesh, in_specs=(replicated, opt_specs, P(axis), P(axis)),
                       out_specs=(replicated, opt_specs, P()), check_vma=False)
    return jax.jit(sm), place


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



# --------------------------------------------------------------------------- 4. pipeline parallelism (GPipe and 1F1B)


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


IDLE, FWD, BWD = 0, 1, 2


def one_f_one_b_schedule(stages: int, microbatches: int) -> tuple[np.ndarray, np.ndarray]:
    """The 1F1B schedule (PipeDream-Flush, Narayanan et al. 2021) with a forward and a
    backward each taking one slot: ``(kind, micro)``, two (p, slots) tables; ``kind`` is
    IDLE, FWD or BWD, ``micro`` the micro-batch (-1 when idle).

    Stage s first runs ``min(p - 1 - s, m)`` forwards (warm-up), then alternates one
    forward and one backward, then drains the backwards. Each operation starts in the first
    slot in which its stage is free and its input exists (the forward of the stage before,
    or the backward of the stage after), so the table is the earliest schedule of that order.
    """
    if stages < 1 or microbatches < 1:
        raise ValueError(f"stages and microbatches must be >= 1, got {stages}, {microbatches}")
    p, m = stages, microbatches
    orders = []
    for s in range(p):
        warm = min(p - 1 - s, m)
        order = [(FWD, j) for j in range(warm)]
        for i in range(m - warm):
            order += [(FWD, warm + i), (BWD, i)]
        order += [(BWD, j) for j in range(m - warm, m)]
        orders.append(order)
    done = {}  # (kind, stage, micro) -> slot in which it ran
    nxt = [0] * p
    kind, micro = [], []
    slot = 0
    while any(nxt[s] < len(orders[s]) for s in range(p)):
        k_col, j_col = [IDLE] * p, [-1] * p
        for s in range(p):
            if nxt[s] == len(orders[s]):
                continue
            k, j = orders[s][nxt[s]]
            if k == FWD:
                ready = s == 0 or done.get((FWD, s - 1, j), slot) < slot
            else:
                ready = (done.get((FWD, s, j), slot) < slot if s == p - 1
                         else done.get((BWD, s + 1, j), slot) < slot)
            if ready:
                k_col[s], j_col[s] = k, j
        for s in range(p):
            if k_col[s] != IDLE:
                done[(k_col[s], s, j_col[s])] = slot
                nxt[s] += 1
        kind.append(k_col)
        micro.append(j_col)
        slot += 1
    return np.array(kind).T, np.array(micro).T


def gpipe_kinds(stages: int, microbatches: int) -> tuple[np.ndarray, np.ndarray]:
    """GPipe's schedule in the ``(kind, micro)`` form of :func:`one_f_one_b_schedule`."""
    micro = gpipe_schedule(stages, microbatches)
    half = micro.shape[1] // 2
    kind = np.where(micro < 0, IDLE, FWD)
    kind[:, half:] = np.where(micro[:, half:] < 0, IDLE, BWD)
    return kind, micro


def in_flight(kind: np.ndarray, micro: np.ndarray) -> np.ndarray:
    """Per stage, the most micro-batches whose forward has run and whose backward has not:
    the activations that stage must keep at once."""
    kind, micro = np.asarray(kind), np.asarray(micro)
    out = []
    for s in range(kind.shape[0]):
        live, most = set(), 0
        for k, j in zip(kind[s], micro[s], strict=True):
            if k == FWD:
                live.add(int(j))
            elif k == BWD:
                live.discard(int(j))
            most = max(most, len(live) + (k == BWD))  # the backward still reads its activation
        out.append(most)
    return np.array(out)


def bubble_fraction(schedule: np.ndarray) -> float:
    """Share of (stage, slot) places in which a stage is idle."""
    schedule = np.asarray(schedule)
    return float(np.mean(schedule < 0))


def predicted_bubble(stages: int, microbatches: int) -> float:
    """GPipe's bubble share, (p - 1) / (m + p - 1)."""
    return (stages - 1) / (microbatches + stages - 1)


def predicted_time_ratio(stages: int, microbatches: int) -> float:
    """Step time with m micro-batches over the time with no bubble, (m + p - 1) / m, for a
    fixed global batch: m + p - 1 ticks, each 1/m of the batch."""
    return (microbatches + stages - 1) / microbatches


def pipeline_specs(params: dict[str, Any], axis: str = "stage") -> dict[str, Any]:
    """Pipeline parallelism: consecutive layers on consecutive stages (the stacked layer
    axis split over ``axis``); the small embedding and head replicated."""
    return _leaf_specs(params, lambda g, n, s: P(axis) if g == "blocks" else P())


def stage_forward(blocks: dict[str, jax.Array], h: jax.Array) -> jax.Array:
    """One pipeline stage: its consecutive blocks, in order."""
    for i in range(blocks["w1"].shape[0]):
        h = mlp_block(h, *_layer(blocks, i))
    return h


def gpipe_loss(prm, x, y, microbatches: int, axis: str = "stage"):
    """Per stage: GPipe's forward over m + p - 1 ticks and the loss of the batch (on the
    last stage; 0 elsewhere). Every stage computes on every tick, as an SPMD program must
    (in the bubble on zeros or on stale activations): stage 0 embeds a fresh micro-batch,
    the others take what the previous stage sent; the last stage adds each finished
    micro-batch's loss."""
    p = jax.lax.axis_size(axis)
    stage = jax.lax.axis_index(axis)
    m, batch = microbatches, x.shape[0]
    mb = batch // m
    state = jnp.zeros((mb, prm["embed"]["w"].shape[1]), x.dtype)
    loss = jnp.zeros(())
    for t in range(m + p - 1):
        j = min(t, m - 1)
        fresh = x[j * mb:(j + 1) * mb] @ prm["embed"]["w"] + prm["embed"]["b"]
        h = stage_forward(prm["blocks"], jnp.where(stage == 0, fresh, state))
        if t >= p - 1:  # on the last stage: micro-batch k = t - (p - 1) is done
            k = t - (p - 1)
            logits = h @ prm["head"]["w"] + prm["head"]["b"]
            loss += optax.softmax_cross_entropy_with_integer_labels(logits, y[k * mb:(k + 1) * mb]).sum() / batch
        state = jax.lax.ppermute(h, axis, [(i, i + 1) for i in range(p - 1)])
    return jnp.where(stage == p - 1, loss, 0.0)


def _check_pipeline(layers: int, stages: int, batch: int | None = None, microbatches: int | None = None):
    if layers % stages:
        raise ValueError(f"{layers} layers cannot be split evenly over {stages} pipeline stages")
    if batch is not None and batch % microbatches:
        raise ValueError(f"a batch of {batch} cannot be split into {microbatches} micro-batches")


def gpipe_grads(mesh, params: dict[str, Any], microbatches: int, axis: str = "stage"):
    """``(loss, grads)`` of GPipe on ``mesh``: ``jax.grad`` of :func:`gpipe_loss` is the
    mirrored backward pipeline (the transpose of a ``ppermute`` forward is a ``ppermute``
    back). Gradients of the replicated embedding and head are summed over the stages."""
    stages = mesh.shape[axis]
    _check_pipeline(params["blocks"]["w1"].shape[0], stages)
    specs = pipeline_specs(params, axis)

    def local(prm, x, y):
        _check_pipeline(params["blocks"]["w1"].shape[0], stages, x.shape[0], microbatches)
        loss, grads = jax.value_and_grad(gpipe_loss)(prm, x, y, microbatches, axis)
        return jax.lax.psum(loss, axis), grads

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(specs, P(), P()), out_specs=(P(), specs)))


def one_f_one_b_grads(mesh, params: dict[str, Any], microbatches: int, axis: str = "stage"):
    """``(loss, grads)`` with the 1F1B schedule: :func:`scheduled_grads` of
    :func:`one_f_one_b_schedule`."""
    return scheduled_grads(mesh, params, microbatches, "1f1b", axis)


def scheduled_grads(mesh, params: dict[str, Any], microbatches: int, schedule: str = "1f1b", axis: str = "stage"):
    """``(loss, grads)`` of a pipeline run slot by slot from a schedule table, the backward
    written out: each slot a stage runs the forward or the backward (``jax.vjp`` of its
    blocks, recomputed from the stashed stage input) that the table gives it, then sends
    activations on and gradients back with ``ppermute``. A stage keeps its stage inputs in
    a ring buffer of ``in_flight + 1`` micro-batches. ``schedule``: ``"1f1b"``
    (:func:`one_f_one_b_schedule`) or ``"gpipe"`` (:func:`gpipe_kinds`)."""
    tables = {"1f1b": one_f_one_b_schedule, "gpipe": gpipe_kinds}
    if schedule not in tables:
        raise ValueError(f"schedule must be one of {sorted(tables)}, got {schedule!r}")
    p = mesh.shape[axis]
    layers = params["blocks"]["w1"].shape[0]
    _check_pipeline(layers, p)
    m = microbatches
    kind, micro = tables[schedule](p, m)
    slots = kind.shape[1]
    depth = int(in_flight(kind, micro).max()) + 1  # + the activation received before its forward
    # tables per slot with a zero column either side: the stage before / after a stage
    pad = lambda a: np.pad(a, ((1, 1), (0, 0)), constant_values=(IDLE if a is kind else -1))  # noqa: E731
    k_tab, j_tab = jnp.asarray(pad(kind).T), jnp.asarray(pad(micro).T)  # (slots, p + 2)
    specs = pipeline_specs(params, axis)
    fwd_perm = [(i, i + 1) for i in range(p - 1)]
    bwd_perm = [(i + 1, i) for i in range(p - 1)]

    def local(prm, x, y):
        _check_pipeline(layers, p, x.shape[0], m)
        s = jax.lax.axis_index(axis)
        first, last = s == 0, s == p - 1
        batch, mb = x.shape[0], x.shape[0] // m
        xs, ys = x.reshape(m, mb, -1), y.reshape(m, mb)
        width = prm["embed"]["w"].shape[1]

        def head_loss(blocks, head, h, yj):
            logits = stage_forward(blocks, h) @ head["w"] + head["b"]
            return optax.softmax_cross_entropy_with_integer_labels(logits, yj).sum() / batch

        def body(carry, t):
            stash, grads_in, g, loss = carry
            k, j = k_tab[t, s + 1], jnp.maximum(j_tab[t, s + 1], 0)
            slot_j = j % depth
            h_in = jnp.where(first, xs[j] @ prm["embed"]["w"] + prm["embed"]["b"], stash[slot_j])  # stage 0 embeds

            def forward(_):
                return stash.at[slot_j].set(h_in), stage_forward(prm["blocks"], h_in), jnp.zeros_like(h_in), g, loss

            def backward(_):
                def at_last(_):
                    lj, (gb, gh, gx) = jax.value_and_grad(head_loss, argnums=(0, 1, 2))(
                        prm["blocks"], prm["head"], h_in, ys[j])
                    return lj, gb, gh, gx

                def in_middle(_):
                    _, pull = jax.vjp(stage_forward, prm["blocks"], h_in)
                    gb, gx = pull(grads_in[slot_j])
                    return jnp.zeros(()), gb, jax.tree.map(jnp.zeros_like, prm["head"]), gx

                lj, gb, gh, gx = jax.lax.cond(last, at_last, in_middle, None)
                ge = {"w": jnp.where(first, xs[j].T @ gx, 0.0), "b": jnp.where(first, gx.sum(0), 0.0)}
                g2 = {"blocks": jax.tree.map(jnp.add, g["blocks"], gb), "head": jax.tree.map(jnp.add, g["head"], gh),
                      "embed": jax.tree.map(jnp.add, g["embed"], ge)}
                return stash, jnp.zeros_like(h_in), gx, g2, loss + lj

            def idle(_):
                return stash, jnp.zeros_like(h_in), jnp.zeros_like(h_in), g, loss

            stash, send_f, send_b, g, loss = jax.lax.switch(k, [idle, forward, backward], None)
            recv_f = jax.lax.ppermute(send_f, axis, fwd_perm)  # from stage s - 1
            recv_b = jax.lax.ppermute(send_b, axis, bwd_perm)  # from stage s + 1
            jf, jb = j_tab[t, s] % depth, j_tab[t, s + 2] % depth
            stash = stash.at[jf].set(jnp.where(k_tab[t, s] == FWD, recv_f, stash[jf]))
            grads_in = grads_in.at[jb].set(jnp.where(k_tab[t, s + 2] == BWD, recv_b, grads_in[jb]))
            return (stash, grads_in, g, loss), None

        buf = jnp.zeros((depth, mb, width), x.dtype)
        g0 = jax.tree.map(jnp.zeros_like, prm)
        (_, _, g, loss), _ = jax.lax.scan(body, (buf, buf, g0, jnp.zeros(())), jnp.arange(slots))
        # the replicated embedding and head: sum their gradients over the stages
        g = {**g, "embed": jax.lax.psum(g["embed"], axis), "head": jax.lax.psum(g["head"], axis)}
        return jax.lax.psum(loss, axis), g

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(specs, P(), P()), out_specs=(P(), specs),
                                 check_vma=False))


def _pipeline_step(tx, mesh, params, grads_fn, axis: str = "stage"):
    specs = pipeline_specs(params, axis)
    opt_specs = opt_state_specs(tx, params, specs)

    def local_update(prm, opt_state, grads):
        return _adam_update(tx, prm, grads, opt_state)

    update = jax.shard_map(local_update, mesh=mesh, in_specs=(specs, opt_specs, specs), out_specs=(specs, opt_specs))

    @jax.jit
    def step(prm, opt_state, x, y):
        loss, grads = grads_fn(prm, x, y)
        prm, opt_state = update(prm, opt_state, grads)
        return prm, opt_state, loss

    return step, gspmd_step(tx, mesh, specs, P())[1]


def gpipe_step(tx: optax.GradientTransformation, mesh, params: dict[str, Any], microbatches: int,
               axis: str = "stage"):
    """Pipeline-parallel training step (GPipe): :func:`gpipe_grads` then Adam on each
    stage's layers. Returns ``(step, place)`` as :func:`gspmd_step`."""
    return _pipeline_step(tx, mesh, params, gpipe_grads(mesh, params, microbatches, axis), axis)


def one_f_one_b_step(tx: optax.GradientTransformation, mesh, params: dict[str, Any], microbatches: int,
                     axis: str = "stage"):
    """Pipeline-parallel training step with the 1F1B schedule (:func:`one_f_one_b_grads`)."""
    return _pipeline_step(tx, mesh, params, one_f_one_b_grads(mesh, params, microbatches, axis), axis)


def stage_count(devices: Sequence[Any], layers: int) -> int:
    """The most pipeline stages that divide ``layers`` among ``devices``."""
    return max(k for k in range(1, len(devices) + 1) if layers % k == 0)


def pipeline_time_sweep(devices: Sequence[Any], cfg: DeepMLP, batch: int, microbatches: Sequence[int],
                        repeat: int = 3, stages: int | None = None) -> list[dict[str, Any]]:
    """GPipe's step time against the number of micro-batches m at a fixed global batch, on
    ``stages`` stages (default: as many as divide the layers). Per m: the best step time,
    its ratio to the time at the largest m, and the predicted ratio ((m+p-1)/m) / ((M+p-1)/M)."""
    from scalelab import bench

    p = stages or stage_count(devices, cfg.layers)
    if p > len(devices) or cfg.layers % p:
        raise ValueError(f"{p} stages do not fit {len(devices)} devices and {cfg.layers} layers")
    mesh = model_mesh(list(devices)[:p], ("stage",))
    tx = adam()
    params = cfg.init(jax.random.key(0))
    x, y = deep_batches(batch, 1, cfg.features)[0]
    rows = []
    for m in microbatches:
        step, place = gpipe_step(tx, mesh, params, m)
        args = place(params, None, x, y)
        timing = bench.timeit(step, *args, repeat=repeat, number=1)  # blocks on every step (HANG)
        rows.append({"stages": p, "microbatches": m, "step_s": timing.best,
                     "predicted (m+p-1)/m": predicted_time_ratio(p, m), "bubble share": predicted_bubble(p, m)})
    last = rows[-1]
    for r in rows:
        r["time / time at largest m"] = r["step_s"] / last["step_s"]
        r["predicted ratio"] = r["predicted (m+p-1)/m"] / last["predicted (m+p-1)/m"]
    return rows


def pipeline_memory(devices: Sequence[Any], cfg: DeepMLP, batch: int, microbatches: int) -> dict[str, Any]:
    """Compiled temporaries (XLA's memory analysis) of the gradient programs of GPipe by
    autodiff (every tick's residuals kept), and of GPipe's and 1F1B's tables run by
    :func:`scheduled_grads` (stage inputs kept, the backward recomputes), on as many stages
    as divide the layers; with the micro-batches each table keeps in flight."""
    p = stage_count(devices, cfg.layers)
    mesh = model_mesh(list(devices)[:p], ("stage",))
    params = cfg.init(jax.random.key(0))
    x, y = deep_batches(batch, 1, cfg.features)[0]
    placed = jax.device_put(params, _named(mesh, pipeline_specs(params)))
    out = {"stages": p, "microbatches": microbatches, "batch": batch}
    for name, fn in (("gpipe_autodiff", gpipe_grads(mesh, params, microbatches)),
                     ("gpipe", scheduled_grads(mesh, params, microbatches, "gpipe")),
                     ("1f1b", scheduled_grads(mesh, params, microbatches, "1f1b"))):
        out[f"{name}_temp_bytes"] = compiled_memory(fn.lower(placed, x, y).compile())["temp"]
    out["gpipe_in_flight"] = int(in_flight(*gpipe_kinds(p, microbatches)).max())
    out["1f1b_in_flight"] = int(in_flight(*one_f_one_b_schedule(p, microbatches)).max())
    out["micro_batch_activation_bytes"] = batch // microbatches * cfg.width * 4
    return out


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
    - ``zero1`` (as :func:`zero_step` builds it): all-reduce of the gradients and all-gather
      of the updated parameters, 3(n-1)/n x P; ``zero2``: reduce-scatter instead of the
      all-reduce, 2(n-1)/n x P, the same as DP;
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
    if strategy in ("zero1", "zero2"):
        n = mesh_shape["data"]  # all-reduce (1) or reduce-scatter (2) the gradients, all-gather the parameters
        return (3 if strategy == "zero1" else 2) * (n - 1) / n * params * b
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
    raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGY_NAMES}")


# Published link bandwidth, one direction, of the link a ring along one mesh axis uses.
# A TPU chip has several ICI links (v5e: 4, a 2-D torus; v5p: 6, a 3-D torus); a ring along
# one axis uses one link each way, so the per-chip totals of the spec sheets (v5e 1,600 Gbps,
# v5p 4,800 Gbps = 1,200 GB/s bidirectional) overstate it. An NVLink GPU reaches every other
# GPU of its board through NVSwitch with all its links.
INTERCONNECTS: tuple[dict[str, Any], ...] = (
    {"system": "NVIDIA H100 SXM, NVLink 4 (8-GPU board)", "bytes_per_s": 450e9, "chip": "NVIDIA H100 SXM",
     "note": "900 GB/s total bidirectional per GPU (18 links), 450 GB/s each way",
     "source": "https://www.nvidia.com/en-us/data-center/h100/"},
    {"system": "Google TPU v5p, ICI (one axis)", "bytes_per_s": 9e10, "chip": "TPU v5p",
     "note": "9e10 B/s per link one way (1.8e11 both ways); 6 links per chip",
     "source": "https://jax-ml.github.io/scaling-book/tpus/"},
    {"system": "Google TPU v5e, ICI (one axis)", "bytes_per_s": 4.5e10, "chip": "TPU v5e",
     "note": "4.5e10 B/s per link one way (9e10 both ways); 4 links per chip",
     "source": "https://jax-ml.github.io/scaling-book/tpus/"},
    {"system": "PCIe 5.0 x16 (GPUs without NVLink)", "bytes_per_s": 64e9, "chip": "NVIDIA H100 SXM",
     "note": "about 64 GB/s each way", "source": "https://pcisig.com/specifications"},
    {"system": "400 Gb/s InfiniBand NDR (between hosts)", "bytes_per_s": 50e9, "chip": "NVIDIA H100 SXM",
     "note": "one 400 Gb/s port per GPU, 50 GB/s each way",
     "source": "https://www.nvidia.com/en-us/networking/infiniband-adapters/"},
)


def chip_peak(chip: str) -> float:
    """Published dense 16-bit peak FLOP/s of ``chip`` (from :data:`scalelab.hardware.SPECS`)."""
    from scalelab import hardware

    for spec in hardware.SPECS:
        if spec.name == chip:
            return spec.peak_16bit
    raise ValueError(f"no published peak for {chip!r}")


def train_flops(cfg: DeepMLP, batch: int) -> float:
    """FLOPs of one training step of the whole model: 2 per multiply-add forward and twice
    that backward, 6 x (matrix parameters) x batch."""
    matrix = cfg.features * cfg.width + cfg.layers * 2 * cfg.width * cfg.hidden + cfg.width * cfg.classes
    return 6.0 * matrix * batch


def compute_vs_communication(flops_per_device: float, bytes_per_device: float, link: dict[str, Any]) -> dict[str, Any]:
    """One step's compute at the chip's published peak beside its communication over
    ``link`` (one direction). Communication can hide behind compute when it is shorter and
    independent of it (DP's and FSDP's gradient reductions overlap the backward pass; TP's
    all-reduces sit between the matmuls that need them)."""
    compute = flops_per_device / chip_peak(link["chip"])
    comm = bytes_per_device / link["bytes_per_s"]
    return {"compute_s": compute, "comm_s": comm, "comm / compute": comm / compute if compute else float("inf")}


def overlap_batch(link: dict[str, Any], bytes_per_value: int = 2) -> float:
    """The per-device batch (examples, or tokens) above which DP's ring all-reduce of the
    gradients takes less time than the step's compute, at the chip's peak: compute
    6 P b / F against 2 x bytes_per_value x P / W (n large), so b > bytes_per_value x F / (3 W).
    The roofline argument of "How to Scale Your Model" (part 5)."""
    return bytes_per_value * chip_peak(link["chip"]) / (3 * link["bytes_per_s"])


def bytes_per_param(stage: int, devices: int, precision: str = "mixed") -> float:
    """Bytes per parameter on each device for parameters, gradients and Adam state under
    ZeRO stage 0 (plain DP) to 3 (FSDP), after Rajbhandari et al. 2020, section 3.1.

    ``mixed``: bf16 parameters (2) and gradients (2), float32 master weights (4) and two
    float32 moments (8): 16 bytes. ``float32`` (this chapter's programs): parameters (4),
    gradients (4), two moments (8): also 16. Stage 1 shards the optimiser state (master
    weights and moments), stage 2 also the gradients, stage 3 also the parameters."""
    if stage not in (0, 1, 2, 3) or devices < 1:
        raise ValueError(f"stage must be 0-3 and devices >= 1, got {stage}, {devices}")
    sizes = {"mixed": (2, 2, 12), "float32": (4, 4, 8)}
    if precision not in sizes:
        raise ValueError(f"precision must be one of {sorted(sizes)}, got {precision!r}")
    param, grad, opt = sizes[precision]
    n = devices
    return (param / (n if stage >= 3 else 1) + grad / (n if stage >= 2 else 1) + opt / (n if stage >= 1 else 1))


# --------------------------------------------------------------------------- 6. the strategies side by side


STRATEGY_NAMES = ("dp", "zero1", "zero2", "fsdp", "tp", "dp_tp", "pp")
_AXES = {"dp": ("data",), "zero1": ("data",), "zero2": ("data",), "fsdp": ("data",), "tp": ("model",),
         "dp_tp": ("data", "model"), "pp": ("stage",)}


def strategy_mesh(name: str, devices: Sequence[Any], layers: int = 8):
    """The mesh each strategy uses on ``devices`` (any count; a pipeline takes as many
    stages as divide ``layers``)."""
    if name not in _AXES:
        raise ValueError(f"unknown strategy {name!r}; expected one of {STRATEGY_NAMES}")
    if name == "pp":
        devices = list(devices)[:stage_count(devices, layers)]
    return model_mesh(devices, _AXES[name])


def build_strategy(name: str, tx, params, mesh, microbatches: int = 4):
    """``(step, place, specs)`` for strategy ``name`` on ``mesh``; ``specs`` are the
    parameters' layout."""
    if name == "dp":
        specs = dp_specs(params)
        return (*gspmd_step(tx, mesh, specs, P("data")), specs)
    if name in ("zero1", "zero2"):
        return (*zero_step(tx, mesh, params, int(name[-1])), dp_specs(params))
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
    raise ValueError(f"unknown strategy {name!r}; expected one of {STRATEGY_NAMES}")


def donated_memory(step, *args) -> dict[str, int]:
    """:func:`compiled_memory` of ``step`` with the parameters and optimiser state donated
    (``donate_argnums=(0, 1)``), as a training loop runs it: the new state reuses the old
    one's buffers, so ``total`` = arguments + outputs + temporaries - aliased is the
    memory one device needs for the step. Compiles only; nothing runs or is donated."""
    return compiled_memory(jax.jit(step, donate_argnums=(0, 1)).lower(*args).compile())


def compare_strategies(devices: Sequence[Any], cfg: DeepMLP | None = None, batch: int = 64, steps: int = 3,
                       microbatches: int = 4, names: Sequence[str] = STRATEGY_NAMES, lr: float = 1e-3,
                       time_repeat: int = 3) -> list[dict[str, Any]]:
    """Train ``steps`` Adam steps with each strategy and with the unsharded reference from
    the same start on the same batches; per strategy: the largest parameter difference,
    bytes per device (analytic, and from the compiled program with the state donated),
    communication (cost model and read from the HLO), and the step time."""
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
        mesh = strategy_mesh(name, devices, cfg.layers)
        step, place, specs = build_strategy(name, tx, params, mesh, microbatches)
        state = place(params, None, *batches[0])[:2]
        for x, y in batches:  # a few steps, each one read back (PITFALLS: HANG)
            _, _, xs, ys = place(params, None, x, y)
            *state, loss = step(*state, xs, ys)
            float(loss)
        args = (*state, xs, ys)
        compiled = step.lower(*args).compile()
        mem = donated_memory(step, *args)
        comm = hlo_communication(compiled.as_text(), mesh.devices.size)
        timing = bench.timeit(step, *args, repeat=time_repeat, number=3)
        opt_specs = opt_state_specs(tx, params, specs if name not in ("zero1", "zero2")
                                    else fsdp_specs(params, mesh.shape["data"]))
        rows.append({
            "strategy": name, "mesh": dict(mesh.shape),
            "max_abs_diff_vs_unsharded": max_abs_diff(state[0], ref[0]),
            "param_bytes": bytes_per_device(params, specs, mesh),
            "opt_state_bytes": bytes_per_device(tx.init(params), opt_specs, mesh),
            "argument_bytes": mem["argument"], "output_bytes": mem["output"], "temp_bytes": mem["temp"],
            "alias_bytes": mem["alias"], "bytes_per_device": mem["total"],
            "comm_bytes_model": communication_model(name, cfg, batch, dict(mesh.shape), microbatches),
            "comm_bytes_hlo": comm["bytes"],
            "collectives": {k: v for k, v in comm["counts"].items() if v},
            "flops_per_device": flops_per_device(name, cfg, batch, mesh.devices.size, microbatches),
            "step_s": timing.best,
        })
    return rows


def flops_per_device(strategy: str, cfg: DeepMLP, batch: int, devices: int, microbatches: int = 4) -> float:
    """FLOPs one device computes per step: an even share of :func:`train_flops`, and for a
    pipeline its stage's share on all m + p - 1 ticks (bubble ticks compute too)."""
    share = train_flops(cfg, batch) / devices
    return share * predicted_time_ratio(devices, microbatches) if strategy == "pp" else share


def gathered_weight_reuse(hlo: str) -> dict[str, int]:
    """In a compiled FSDP program: how many all-gathers there are and how many of them feed
    both a forward op and a backward (``transpose``) op, i.e. gathered weights that XLA
    kept from the forward to the backward pass instead of gathering them again."""
    names = re.findall(r"(%all[-_]gather[\w.-]*) = ", hlo)
    both = 0
    for name in names:
        users = [line for line in hlo.splitlines() if re.search(re.escape(name) + r"[,)]", line)
                 and not line.lstrip().startswith(name + " ")]
        tags = " ".join(re.findall(r'op_name="([^"]*)"', " ".join(users)))
        if "transpose(" in tags and re.search(r"/jvp\(\)/", tags):
            both += 1
    return {"all_gathers": len(names), "used_forward_and_backward": both}


# --------------------------------------------------------------------------- figures


def plot_schedule(schedule, ax=None, title: str | None = None):
    """Draw a pipeline schedule: one row per stage, one column per slot, each busy slot
    labelled F or B (hatched) with its micro-batch; idle slots (the bubble) left blank.
    ``schedule`` is GPipe's table (:func:`gpipe_schedule`) or a ``(kind, micro)`` pair
    (:func:`one_f_one_b_schedule`)."""
    from scalelab import plot

    if isinstance(schedule, tuple):
        kind, micro = (np.asarray(a) for a in schedule)
        name = "1F1B"
    else:
        micro = np.asarray(schedule)
        half = micro.shape[1] // 2
        kind = np.where(micro < 0, IDLE, FWD)
        kind[:, half:] = np.where(micro[:, half:] < 0, IDLE, BWD)
        name = "GPipe"
    stages, ticks = micro.shape
    if ax is None:
        _, ax = plot.figure(width=min(12, 1.0 + 0.42 * ticks), height=0.9 + 0.42 * stages)
    cmap = _colormap(int(micro.max()) + 1)
    for s in range(stages):
        for t in range(ticks):
            j = micro[s, t]
            if kind[s, t] == IDLE:
                continue
            back = kind[s, t] == BWD
            ax.add_patch(_rect(t, s, cmap(j), hatch="//" if back else None))
            ax.text(t + 0.5, s + 0.5, f"{'B' if back else 'F'}{j}", ha="center", va="center", fontsize=7)
    ax.set_xlim(0, ticks)
    ax.set_xticks(np.arange(0, ticks + 1, max(1, ticks // 12)))
    ax.set_ylim(stages, 0)
    ax.set_yticks(np.arange(stages) + 0.5, [f"stage {s}" for s in range(stages)])
    ax.set_xlabel("slot (one forward or one backward)")
    ax.grid(False)
    ax.set_title(title or f"{name}: {stages} stages, {int(micro.max()) + 1} micro-batches, "
                          f"idle {np.mean(kind == IDLE):.0%} of slots")
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
    """Stacked bars of bytes per device for each strategy (the compiled step, state donated):
    parameters, Adam state, and the rest (batch, gradients, activations, buffers)."""
    from scalelab import plot

    if ax is None:
        _, ax = plot.figure(width=6.4, height=3.4)
    names = [r["strategy"] for r in rows]
    params = np.array([r["param_bytes"] for r in rows]) / 1e6
    opt = np.array([r["opt_state_bytes"] for r in rows]) / 1e6
    rest = np.array([r["bytes_per_device"] for r in rows]) / 1e6 - params - opt
    ax.bar(names, params, label="parameters")
    ax.bar(names, opt, bottom=params, label="Adam moments")
    ax.bar(names, rest, bottom=params + opt, label="the rest: batch, gradients, activations")
    ax.set_ylabel("MB per device")
    ax.legend()
    return ax


def plot_bubble_times(rows: Sequence[dict[str, Any]], ax=None):
    """Measured step time over the time at the largest m, against (m+p-1)/m normalised the same way."""
    from scalelab import plot

    if ax is None:
        _, ax = plot.figure(width=6.4, height=3.4)
    ms = [r["microbatches"] for r in rows]
    ax.plot(ms, [r["time / time at largest m"] for r in rows], "o-", label="measured step time")
    ax.plot(ms, [r["predicted ratio"] for r in rows], "k:", label=f"(m+p-1)/m, p = {rows[0]['stages']}")
    ax.set(xscale="log", xlabel="micro-batches m (fixed global batch)", ylabel="time / time at largest m")
    ax.set_xticks(ms, [str(m) for m in ms])
    ax.legend()
    return ax


# --------------------------------------------------------------------------- benchmark

# The pipeline sweeps: activations large against the weights (memory), and per-tick compute
# large against per-tick overhead on simulated CPU devices (time).
# (cfg, global batch): at m = 16 a micro-batch still has 128-256 rows.
PIPE_TIME = {"full": (DeepMLP(width=64, hidden=256), 4096), "quick": (DeepMLP(width=64, hidden=256), 2048)}
PIPE_TIME_STAGES = 4  # at most: more simulated stages than cores only add thread overhead
PIPE_MEMORY = (DeepMLP(width=64, hidden=256), 2048, 16)  # cfg, batch, micro-batches
MICROBATCHES = (1, 2, 4, 8, 16)


def time_sweep_stages(devices: Sequence[Any], layers: int = 8) -> int:
    """Stages for the bubble-time sweep: the most that divide ``layers``, at most
    :data:`PIPE_TIME_STAGES` on simulated CPU devices."""
    cap = PIPE_TIME_STAGES if next(iter(devices)).platform == "cpu" else len(devices)
    return stage_count(list(devices)[:cap], layers)


def bench_model_parallel(quick: bool = False) -> dict[str, Any]:
    """Benchmark ``model_parallel``: DP, ZeRO-1/2, FSDP (ZeRO-3), TP, 2-D DP x TP and GPipe
    training steps on every available device, each against the unsharded step; bytes per
    device (compiled, state donated), communication, step time; GPipe's step time against
    the number of micro-batches at a fixed global batch beside (m+p-1)/m; GPipe's and
    1F1B's compiled activation memory."""
    from scalelab import env

    devices = env.all_devices()
    cfg = DeepMLP(layers=8, hidden=128 if quick else 256)
    rows = compare_strategies(devices, cfg, batch=64, steps=2 if quick else 3, microbatches=4,
                              time_repeat=2 if quick else 5)
    strategies = {r["strategy"]: {k: v for k, v in r.items() if k != "strategy"} for r in rows}
    tcfg, tbatch = PIPE_TIME["quick" if quick else "full"]
    sweep = pipeline_time_sweep(devices, tcfg, tbatch, MICROBATCHES, repeat=2 if quick else 3,
                                stages=time_sweep_stages(devices, tcfg.layers))
    mcfg, mbatch, mm = PIPE_MEMORY
    mem = pipeline_memory(devices, mcfg, mbatch, mm)
    n = strategies["fsdp"]["mesh"]["data"]
    return {
        "devices": len(devices), "params": cfg.param_count(), "layers": cfg.layers, "batch": 64,
        "strategies": strategies,
        "max_abs_diff_vs_unsharded": max(r["max_abs_diff_vs_unsharded"] for r in rows),
        "zero_bytes_per_device": {name: strategies[name]["bytes_per_device"] for name in ("dp", "zero1", "zero2", "fsdp")},
        "bubble_time": {"stages": sweep[0]["stages"], "batch": tbatch, "width": tcfg.width, "hidden": tcfg.hidden,
                        "step_s": {r["microbatches"]: r["step_s"] for r in sweep},
                        "measured_ratio": {r["microbatches"]: r["time / time at largest m"] for r in sweep},
                        "predicted_ratio": {r["microbatches"]: r["predicted ratio"] for r in sweep},
                        "bubble_share": {r["microbatches"]: r["bubble share"] for r in sweep}},
        "pipeline_activation_memory": mem,
        "bytes_per_param": {f"zero{s}": {"mixed": bytes_per_param(s, n), "float32": bytes_per_param(s, n, "float32")}
                            for s in range(4)},
    }
