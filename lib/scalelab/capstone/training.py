"""The capstone's training on a 2-D (data x model) mesh."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from scalelab.capstone.data import batches
from scalelab.capstone.model import GPT, GPTConfig, next_token_loss

# --------------------------------------------------------------------------- training on a 2-D mesh (ch. 07, 08, 10, 11)


def mesh_shape(devices: int) -> tuple[int, int]:
    """(data, model) for ``devices`` devices: tensor parallelism over 2 when the count is even,
    data parallelism (with FSDP) over the rest: 1 -> (1, 1), 2 -> (1, 2), 4 -> (2, 2), 8 -> (4, 2)."""
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ValueError(f"devices must be a positive integer, got {devices!r}")
    model = 2 if devices % 2 == 0 else 1
    return devices // model, model


def make_mesh(devices, shape: tuple[int, int] | None = None) -> jax.sharding.Mesh:
    """A ``("data", "model")`` mesh of ``devices``, shaped ``shape`` or by :func:`mesh_shape`."""
    devices = list(devices)
    shape = mesh_shape(len(devices)) if shape is None else tuple(shape)
    if len(shape) != 2 or shape[0] * shape[1] != len(devices):
        raise ValueError(f"a (data, model) mesh of {len(devices)} devices, got shape {shape}")
    return jax.sharding.Mesh(np.array(devices).reshape(shape), ("data", "model"))


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


def optimizer(warmup: int = 20, steps: int = 1000) -> optax.GradientTransformation:
    """Gradient clipping and AdamW (weight decay 0.01) under a warm-up + cosine schedule of peak 1:
    the step multiplies the updates by the state's ``lr``, so one compiled step serves every
    learning rate (a sweep compiles once)."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1.0, max(1, warmup), max(steps, warmup + 1), 0.1)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))


def init_train_state(cfg: GPTConfig, lr: float = 3e-3, seed: int = 0, warmup: int = 20,
                     steps: int = 1000) -> tuple[dict[str, Any], Any, optax.GradientTransformation]:
    """``(state, graphdef, tx)``: the state is a plain pytree (float32 ``params``, AdamW moments,
    ``step``, the peak learning rate ``lr``); the rate warms up over ``warmup`` steps, then decays
    (cosine) to a tenth of its peak at ``steps``."""
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    graphdef, params = nnx.split(GPT(cfg, seed), nnx.Param)
    params = nnx.to_pure_dict(params)
    tx = optimizer(warmup, steps)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
             "lr": jnp.asarray(lr, jnp.float32)}
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
        updates = jax.tree.map(lambda u: state["lr"] * u, updates)
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
                "step": state["step"] + 1, "lr": state["lr"]}, loss

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


@functools.lru_cache(maxsize=16)
def _loss_fn(graphdef: Any):
    """The jitted mean next-token loss of parameters on rows (compiled once per model structure)."""
    @jax.jit
    def loss(params, x):
        return next_token_loss(nnx.merge(graphdef, nnx.State(params)), x)

    return loss


def evaluate(graphdef: Any, params: Any, rows: np.ndarray, batch: int = 32) -> float:
    """Mean next-token loss (nats) over ``rows`` (whole batches; the remainder is dropped)."""
    n = (len(rows) // batch) * batch
    if n == 0:
        raise ValueError(f"{len(rows)} rows make no batch of {batch}")
    loss = _loss_fn(graphdef)
    return float(np.mean([float(loss(params, jnp.asarray(rows[i:i + batch]))) for i in range(0, n, batch)]))


@dataclasses.dataclass
class Run:
    """A training run's pieces on a mesh: the placed ``state``, its ``graphdef``, the compiled
    ``step``, the ``rows`` sharding a batch is put with, the ``mesh`` (None on one device) and
    ``fresh(lr, seed)``: a new state with the same layout (a sweep's next trial, same compiled step)."""

    cfg: GPTConfig
    state: Any
    graphdef: Any
    step: Any
    rows: Any
    mesh: Any
    shardings: Any
    warmup: int
    steps: int

    def fresh(self, lr: float, seed: int = 0) -> Any:
        state, _, _ = init_train_state(self.cfg, lr=lr, seed=seed, warmup=self.warmup, steps=self.steps)
        return place(state, self.mesh)[0]

    def put(self, batch: Any) -> jax.Array:
        """A batch from the pipeline, on the devices (rows split over "data")."""
        return jax.device_put(np.asarray(batch), self.rows)


def setup(cfg: GPTConfig, devices, lr: float = 3e-3, seed: int = 0, steps: int = 1000, warmup: int = 20,
          shape: tuple[int, int] | None = None) -> Run:
    """Everything a run needs on a mesh of ``devices`` (one device: no mesh)."""
    devices = list(devices)
    mesh = make_mesh(devices, shape) if len(devices) > 1 else None
    state, graphdef, tx = init_train_state(cfg, lr=lr, seed=seed, warmup=warmup, steps=steps)
    state, shardings, rows = place(state, mesh)
    return Run(cfg, state, graphdef, make_train_step(graphdef, tx, shardings), rows, mesh, shardings, warmup, steps)


def train(cfg: GPTConfig, train_path, steps: int, batch: int, devices, lr: float = 3e-3, seed: int = 0,
          log_every: int = 0, ckpt_dir=None, every: int = 0, on_save=None, on_log=None) -> dict[str, Any]:
    """Train on a mesh of ``devices`` for ``steps`` steps from the store at ``train_path``.

    With ``ckpt_dir`` an Orbax manager saves the state and the pipeline's position every ``every``
    steps (asynchronously: training goes on while it writes), and a run that finds a checkpoint
    there resumes from the newest complete one. ``on_save(step)`` is called as each save starts,
    ``on_log(step, loss)`` every ``log_every`` steps. Returns the state, graphdef, losses (of the
    steps this call ran) and the seconds of each step after the first (the first compiles); each
    step waits for its loss, so a step's time includes its input."""
    import time

    from scalelab import checkpoint

    run = setup(cfg, devices, lr=lr, seed=seed, steps=steps)
    state, it = run.state, batches(train_path, batch, seed=seed)
    mngr = checkpoint.manager(ckpt_dir, every=every, keep=None) if ckpt_dir is not None else None
    if mngr is not None and mngr.latest_step() is not None:
        state = checkpoint.restore(mngr, state, it)  # the state onto this run's layout, the pipeline where it was
    losses, seconds = [], []
    for i in range(int(state["step"]), steps):
        t0 = time.perf_counter()
        state, loss = run.step(state, run.put(next(it)))
        losses.append(float(loss))
        if len(losses) > 1:
            seconds.append(time.perf_counter() - t0)
        if mngr is not None and checkpoint.save(mngr, state, it) and on_save is not None:
            on_save(i + 1)
        if log_every and (i + 1) % log_every == 0:
            (on_log or _print_loss)(i + 1, losses[-1])
    if mngr is not None:
        mngr.wait_until_finished()
        mngr.close()
    return {"state": state, "graphdef": run.graphdef, "losses": losses, "step_s": seconds,
            "mesh": mesh_shape(len(list(devices)))}


def _print_loss(step: int, loss: float) -> None:
    print(f"step {step}: loss {loss:.3f}", flush=True)


# --------------------------------------------------------------------------- checkpoints (ch. 12)


def worker(argv: list[str] | None = None) -> None:
    """``python -m scalelab.capstone``: a training process for the crash test (prints ``saving
    STEP`` as each save starts, ``done STEP`` at the end)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m scalelab.capstone")
    ap.add_argument("--store", required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--config", required=True, help="GPTConfig as JSON")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--every", type=int, required=True)
    ap.add_argument("--lr", type=float, default=3e-3)
    a = ap.parse_args(argv)
    cfg = GPTConfig(**json.loads(a.config))
    run = train(cfg, a.store, a.steps, a.batch, jax.devices(), lr=a.lr, ckpt_dir=a.dir, every=a.every,
                on_save=lambda s: print(f"saving {s}", flush=True))
    print(f"done {int(run['state']['step'])}", flush=True)


def worker_command(cfg: GPTConfig, store, directory, steps: int, batch: int, every: int, lr: float) -> list[str]:
    return [sys.executable, "-m", "scalelab.capstone", "--store", str(store), "--dir", str(directory),
            "--config", json.dumps(dataclasses.asdict(cfg)), "--steps", str(steps), "--batch", str(batch),
            "--every", str(every), "--lr", repr(lr)]


def restore_final(directory, cfg: GPTConfig, mesh=None, step: int | None = None) -> Any:
    """The state saved in ``directory`` (newest step, or ``step``), restored onto ``mesh``'s
    layout (None: one device), whatever layout it was saved from."""
    from scalelab import checkpoint

    state, _, _ = init_train_state(cfg)
    target = place(state, mesh)[0]
    mngr = checkpoint.manager(directory, keep=None)
    try:
        return checkpoint.restore(mngr, target, step=step)
    finally:
        mngr.close()


def crash_and_resume(folder, cfg: GPTConfig, store, steps: int = 16, batch: int = 8, every: int = 4,
                     kill_at: int = 8, lr: float = 3e-3, devices: int = 2, timeout: float = 300.0) -> dict[str, Any]:
    """Train in a separate process on ``devices`` simulated devices, SIGKILL it right after the
    save of step ``kill_at`` starts, restart it (it resumes from its newest complete checkpoint),
    and compare where it ends with the same run never interrupted (also in its own process):
    ``resume_bitwise_equal`` is True when every saved array is identical, bit for bit."""
    from scalelab import checkpoint

    if not 0 < kill_at < steps or kill_at % every:
        raise ValueError(f"kill_at must be a save step (a multiple of every={every}) below steps={steps}")
    folder = Path(folder)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "SCALELAB_CPU_DEVICES": str(devices)}
    ref_cmd = worker_command(cfg, store, folder / "uninterrupted", steps, batch, every, lr)
    shutil.rmtree(folder / "uninterrupted", ignore_errors=True)
    ref = subprocess.run(ref_cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if ref.returncode != 0:
        raise RuntimeError(f"the uninterrupted run failed:\n{ref.stderr[-2000:]}")
    crashed = checkpoint.kill_and_restart(worker_command(cfg, store, folder / "crashed", steps, batch, every, lr),
                                          folder / "crashed", kill_at, env, timeout)
    a, b = restore_final(folder / "uninterrupted", cfg), restore_final(folder / "crashed", cfg)
    return {**crashed, "devices": devices, "mesh": mesh_shape(devices), "final_step": int(b["step"]),
            "resume_bitwise_equal": checkpoint.bitwise_equal(a, b)}


# --------------------------------------------------------------------------- cost (ch. 13)


def mesh_peak(devices, dtype: str) -> Any:
    """The peak FLOP/s of a mesh of ``devices``: one CPU's estimate when they are simulated devices
    of one processor (they share its cores), else the device's published peak times their count."""
    from scalelab import monitor

    devices = list(devices)
    peak = monitor.device_peak(devices[0], dtype)
    if devices[0].platform == "cpu" or peak.flops is None:
        return peak
    return dataclasses.replace(peak, flops=peak.flops * len(devices), source=f"{len(devices)} x {peak.source}")


def step_seconds(cfg: GPTConfig, batch: int, devices, steps: int = 6) -> float:
    """Median seconds of a training step of ``cfg`` on ``batch`` random rows (after compiling)."""
    import time

    run = setup(cfg, devices, steps=1000)
    x = run.put(np.random.default_rng(0).integers(0, cfg.vocab, (batch, cfg.seq_len + 1), dtype=np.int32))
    state, loss = run.step(run.state, x)
    loss.block_until_ready()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, loss = run.step(state, x)
        loss.block_until_ready()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))
