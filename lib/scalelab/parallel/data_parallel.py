"""Chapter 07: data parallelism, each strategy checked against one device.

`jax.pmap` (legacy), `jax.jit` with `NamedSharding`, and `jax.shard_map` on the chapter-05
model. Every data-parallel step computes gradients on a shard of the global batch per device
and averages them across devices (an all-reduce), so that all replicas apply the same update:
after k steps the parameters equal those of one device training on the whole batch.

Training loops here block on a result every step (see PITFALLS: queueing many multi-device
steps without waiting can hang XLA's CPU runtime on small machines).
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

# --------------------------------------------------------------------------- the model, functionally


@dataclasses.dataclass(frozen=True)
class Problem:
    """A model as (graphdef, params) plus a data set, so steps can be plain JAX functions."""

    graphdef: Any
    params: Any
    rest: Any  # non-parameter state (e.g. an unused dropout RNG), held constant
    x: np.ndarray
    y: np.ndarray

    def loss(self, params, x, y):
        logits = nnx.merge(self.graphdef, params, self.rest)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def digits_problem(hidden: tuple[int, ...] = (128, 64), seed: int = 0) -> Problem:
    """The chapter-05 MLP (no dropout) and the digits training set."""
    from scalelab import data, models

    split = data.load_digits()
    model = models.MLP(split.features, split.classes, hidden=hidden, rngs=nnx.Rngs(seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return Problem(graphdef, params, rest, split.x_train, split.y_train)


def global_batches(problem: Problem, batch: int, steps: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``steps`` global batches of ``batch`` examples (the same for every strategy)."""
    if batch < 1 or steps < 1:
        raise ValueError(f"batch and steps must be >= 1, got {batch}, {steps}")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        idx = rng.integers(0, len(problem.x), batch)
        out.append((problem.x[idx], problem.y[idx]))
    return out


def _sgd(params, grads, lr):
    return jax.tree.map(lambda p, g: p - lr * g, params, grads)


def max_abs_diff(a, b) -> float:
    """Largest absolute difference between two parameter trees."""
    return max(float(jnp.max(jnp.abs(jnp.asarray(u) - jnp.asarray(v))))
               for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


# --------------------------------------------------------------------------- single device (reference)


def train_single(problem: Problem, batches, lr: float = 0.1) -> tuple[Any, list[float]]:
    """Plain SGD on one device over the global batches: the reference result."""

    @jax.jit
    def step(params, x, y):
        loss, grads = jax.value_and_grad(problem.loss)(params, x, y)
        return _sgd(params, grads, lr), loss

    params, losses = problem.params, []
    for x, y in batches:
        params, loss = step(params, x, y)
        losses.append(float(loss))  # blocks every step
    return params, losses


def _check_divisible(batch: int, n: int) -> None:
    if batch % n:
        raise ValueError(f"a global batch of {batch} cannot be split evenly over {n} devices")


# --------------------------------------------------------------------------- 1. pmap (legacy)


def train_pmap(problem: Problem, batches, devices: Sequence[Any], lr: float = 0.1) -> tuple[Any, list[float]]:
    """Data parallelism with ``jax.pmap``: replicated parameters, a leading device axis on
    the batch, ``lax.pmean`` of the gradients. (Since JAX 0.8 pmap is built on jit +
    shard_map; it remains for existing code.)"""
    n = len(devices)

    def step(params, x, y):
        loss, grads = jax.value_and_grad(problem.loss)(params, x, y)
        grads = jax.lax.pmean(grads, axis_name="data")  # the all-reduce
        return _sgd(params, grads, lr), jax.lax.pmean(loss, axis_name="data")

    pstep = jax.pmap(step, axis_name="data", devices=list(devices))
    # one copy of the parameters per device, stacked on a leading axis that pmap maps over
    params = jax.tree.map(lambda p: jnp.broadcast_to(p, (n, *p.shape)), problem.params)
    losses = []
    for x, y in batches:
        _check_divisible(len(x), n)
        xs = x.reshape(n, len(x) // n, *x.shape[1:])
        ys = y.reshape(n, len(y) // n)
        params, loss = pstep(params, xs, ys)
        losses.append(float(loss[0]))
    return jax.tree.map(lambda p: p[0], params), losses


# --------------------------------------------------------------------------- 2. jit + NamedSharding


def data_mesh(devices: Sequence[Any]) -> jax.sharding.Mesh:
    """A 1-D mesh named ``data`` (Auto axis types: classic GSPMD propagation)."""
    return jax.make_mesh((len(devices),), ("data",), axis_types=(AxisType.Auto,), devices=list(devices))


def jit_sharded_step(problem: Problem, mesh, lr: float = 0.1):
    """A ``jax.jit`` step whose batch is sharded over ``data`` and parameters replicated:
    XLA partitions the computation and inserts the all-reduce of the gradients itself."""
    replicated = NamedSharding(mesh, P())
    sharded = NamedSharding(mesh, P("data"))

    @jax.jit
    def step(params, x, y):
        loss, grads = jax.value_and_grad(problem.loss)(params, x, y)
        return _sgd(params, grads, lr), loss

    return step, replicated, sharded


def _train_on_mesh(step, problem: Problem, batches, mesh) -> tuple[Any, list[float]]:
    """Replicate the parameters, shard each global batch over ``data``, run ``step``,
    and block on the loss every step."""
    n = mesh.devices.size
    sharded = NamedSharding(mesh, P("data"))
    params = jax.device_put(problem.params, NamedSharding(mesh, P()))
    losses = []
    for x, y in batches:
        _check_divisible(len(x), n)
        params, loss = step(params, jax.device_put(x, sharded), jax.device_put(y, sharded))
        losses.append(float(loss))
    return params, losses


def train_jit(problem: Problem, batches, devices: Sequence[Any], lr: float = 0.1) -> tuple[Any, list[float]]:
    mesh = data_mesh(devices)
    return _train_on_mesh(jit_sharded_step(problem, mesh, lr)[0], problem, batches, mesh)


# --------------------------------------------------------------------------- 3. shard_map


def shard_map_step(problem: Problem, mesh, lr: float = 0.1, reduce: bool = True):
    """The per-device program written out with ``jax.shard_map``: local gradients, then an
    explicit ``lax.pmean`` over ``data``. ``reduce=False`` drops the all-reduce (each device
    keeps its local update) — only to measure what the communication costs."""

    def local(params, x, y):
        loss, grads = jax.value_and_grad(problem.loss)(params, x, y)
        if reduce:
            grads = jax.lax.pmean(grads, "data")
            loss = jax.lax.pmean(loss, "data")
        return _sgd(params, grads, lr), loss

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                                 out_specs=(P(), P()), check_vma=False))


def train_shard_map(problem: Problem, batches, devices: Sequence[Any], lr: float = 0.1) -> tuple[Any, list[float]]:
    mesh = data_mesh(devices)
    return _train_on_mesh(shard_map_step(problem, mesh, lr), problem, batches, mesh)


STRATEGIES: dict[str, Callable[..., tuple[Any, list[float]]]] = {
    "pmap": train_pmap, "jit + NamedSharding": train_jit, "shard_map": train_shard_map,
}


# --------------------------------------------------------------------------- inspection and scaling


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE_RE = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")


def compiled_collectives(jitted: Callable[..., Any], *args: Any) -> tuple[dict[str, int], list[str]]:
    """The collective operations in the compiled program of ``jitted(*args)`` (arrays or
    ``jax.ShapeDtypeStruct`` with shardings): a count per kind, and the whole HLO lines that
    define them (source locations removed, ``replica_groups`` and all)."""
    from scalelab.abstractions import strip_debug_info

    hlo = strip_debug_info(jitted.lower(*args).compile().as_text())
    lines = [ln.strip() for ln in hlo.splitlines() if _COLLECTIVE_RE.search(ln)]
    counts = {k: sum(bool(re.search(rf"\s{k}(-start)?\(", ln)) for ln in lines) for k in COLLECTIVES}
    return counts, lines


def abstract_inputs(problem: Problem, mesh, batch: int) -> tuple[Any, Any, Any]:
    """Shapes and shardings of (params, x, y) for a global batch: parameters replicated,
    the batch split over ``data``. Enough to compile a step without any data."""
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    x = jax.ShapeDtypeStruct((batch, problem.x.shape[1]), jnp.float32, sharding=sharded)
    y = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharded)
    params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=replicated), problem.params)
    return params, x, y


def collectives_in_hlo(problem: Problem, devices: Sequence[Any], batch: int) -> tuple[dict[str, int], list[str]]:
    """The collective operations XLA inserted in the compiled jit + NamedSharding step:
    a count per kind, and the HLO lines that define them (source locations removed)."""
    mesh = data_mesh(devices)
    step, _, _ = jit_sharded_step(problem, mesh)
    return compiled_collectives(step, *abstract_inputs(problem, mesh, batch))


_SHAPE_RE = re.compile(r"\b(?:pred|[subf]\d+|bf16|f8\w*)\[([\d,]*)\]")


def hlo_elements(line: str) -> int:
    """Elements in the result of one HLO instruction line (a tuple result counts every
    member): e.g. the number of values an all-reduce carries."""
    head = line.split("=", 1)[1] if "=" in line else line
    match = re.match(r"\s*(\(.*?\)|\S+)\s", head)
    if match is None:
        raise ValueError(f"not an HLO instruction line: {line[:80]!r}")
    total = 0
    for dims in _SHAPE_RE.findall(match.group(1)):
        total += int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
    return total


def replica_group_sizes(line: str) -> list[int]:
    """Sizes of the device groups of a collective's ``replica_groups`` attribute, in each of
    the forms XLA prints: explicit ``{{0,1,2,3}}``, iota ``[2,4]<=[8]`` and mesh
    ``mesh['axis_0'=8,'axis_1'=1] {'axis_0'}`` (a group per value of the other axes)."""
    match = re.search(r"replica_groups=(\{\{.*?\}\}|\{\}|\[[\d,]+\]<=\[[\d,]+\]\S*|mesh\[[^\]]*\]\s*\{[^}]*\})", line)
    if match is None:
        raise ValueError("the line has no replica_groups attribute")
    groups = match.group(1)
    if groups.startswith("{{"):
        return [len([t for t in g.split(",") if t.strip()]) for g in re.findall(r"\{([\d,\s]*)\}", groups[1:-1])]
    if groups == "{}":
        return []
    if groups.startswith("["):
        count, size = (int(v) for v in re.match(r"\[([\d,]+)\]", groups).group(1).split(","))
        return [size] * count
    axes = dict((k, int(v)) for k, v in re.findall(r"'([^']+)'=(\d+)", groups))
    reduced = re.findall(r"'([^']+)'", groups.split("]", 1)[1])
    size = int(np.prod([axes[a] for a in reduced]))
    return [size] * (int(np.prod(list(axes.values()))) // size)


def param_count(problem: Problem) -> int:
    """Number of trainable parameters (= gradient values each step all-reduces)."""
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(problem.params))


def step_time(problem: Problem, devices: Sequence[Any], global_batch: int, reduce: bool = True,
              repeat: int = 5) -> float:
    """Seconds per shard_map step on ``devices`` for a global batch (best of ``repeat``)."""
    from scalelab import bench

    mesh = data_mesh(devices)
    step = shard_map_step(problem, mesh, reduce=reduce)
    sharded = NamedSharding(mesh, P("data"))
    x, y = global_batches(problem, global_batch, 1)[0]
    params = jax.device_put(problem.params, NamedSharding(mesh, P()))
    xs, ys = jax.device_put(x, sharded), jax.device_put(y, sharded)
    return bench.timeit(step, params, xs, ys, repeat=repeat, number=3).best


def scaling(problem: Problem, counts: Sequence[int], per_device_batch: int, global_batch: int) -> list[dict[str, Any]]:
    """Step time for strong scaling (fixed global batch) and weak scaling (fixed per-device
    batch) at each device count, and the ``pmean share``: the part of the strong-scaling step
    that goes away when the ``pmean`` is removed. That is a different program (the replicas
    drift apart), so the share is what the synchronisation costs *on this runtime*: on
    simulated CPU devices mostly the rendezvous of device threads sharing the cores, not
    bytes on a link."""
    from scalelab import env

    rows = []
    for n in counts:
        devs = env.devices(n)
        strong = step_time(problem, devs, global_batch)
        strong_local = step_time(problem, devs, global_batch, reduce=False)
        weak = step_time(problem, devs, per_device_batch * n)
        rows.append({
            "devices": n, "strong: step s": strong, "strong: samples/s": global_batch / strong,
            "weak: step s": weak, "weak: samples/s": per_device_batch * n / weak,
            "strong: step s without pmean": strong_local,
            "pmean share": max(0.0, (strong - strong_local) / strong),
        })
    return rows


# --------------------------------------------------------------------------- benchmark


def bench_data_parallel(quick: bool = False) -> dict[str, Any]:
    """Benchmark ``data_parallel``: equivalence of the three strategies with single-device
    training, step time per device count, and a 2-process x 4-device run."""
    from scalelab import distributed, env

    problem = digits_problem()
    n_max = len(env.all_devices())
    counts = [n for n in (1, 2, 4, 8) if n <= n_max]
    steps, batch = (10, 64) if quick else (20, 128)
    batches = global_batches(problem, batch, steps)
    reference, ref_losses = train_single(problem, batches)
    diffs = {}
    for name, fn in STRATEGIES.items():
        params, _ = fn(problem, batches, env.devices(n_max))
        diffs[name] = max_abs_diff(params, reference)
    step_s = {str(n): step_time(problem, env.devices(n), batch) for n in counts}
    start = time.perf_counter()
    mp = distributed.run_multiprocess_training(processes=2, devices_per_process=4, steps=steps,
                                               batch=batch, timeout=240)
    mp_wall = time.perf_counter() - start
    mp_diff = float(np.max(np.abs(np.asarray(mp["losses"]) - np.asarray(ref_losses))))
    return {
        "devices": n_max, "steps": steps, "global_batch": batch,
        "max_abs_diff_vs_single": max(diffs.values()), "max_abs_diff_by_strategy": diffs,
        "step_s": step_s,
        "multiprocess_ok": bool(mp["ok"]), "multiprocess_max_abs_diff": mp_diff,
        "multiprocess_param_max_abs_diff": max_abs_diff(
            jax.tree.unflatten(jax.tree.structure(reference), [np.asarray(a) for a in mp["params"]]), reference),
        "multiprocess_wall_s": mp_wall, "multiprocess_devices": mp["devices"],
    }


# =========================================================================== Chapter 08: model parallelism
#
# A deep residual MLP as a plain pytree, so that every weight can be given its own
# PartitionSpec. The layers are stacked on a leading axis (what pipeline stages split)
# and applied in a Python loop, so each collective appears once per use in the compiled
# program and its bytes can be read off the HLO.
