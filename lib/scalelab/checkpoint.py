"""Chapter 12: checkpointing, serialisation and model versions.

- A training state — parameters, Adam's state, the step count, the RNG and the position of
  the Grain data iterator — saved every k steps by Orbax's ``CheckpointManager`` (keep the
  last N, asynchronous writes), and restored so exactly that training continues bit for
  bit as if it had never stopped.
- Crash safety: a training process killed with SIGKILL in the middle of an asynchronous
  save leaves a ``*.orbax-checkpoint-tmp`` folder that is ignored and cleaned up; the newest
  complete checkpoint restores.
- A model saved as *architecture* (a JSON configuration with the code version) plus
  *coefficients* (the parameters), rebuilt in a fresh process; parameters restored onto a
  different device mesh; the inference function exported to StableHLO with ``jax.export``
  and run in a process that has no model code.
- Versions: each checkpoint linked to its tracked run (chapter 05's MLflow store) and a
  version promoted to ``production`` in the model registry, then loaded by name.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from scalelab import io


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted or does not match what restores it."""


# --------------------------------------------------------------------------- the model and its training state


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The architecture of the chapter-05 MLP: everything needed to rebuild it, nothing learned."""

    features: int = 64
    classes: int = 10
    hidden: tuple[int, ...] = (128, 64)
    dropout: float = 0.1

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))

    def build(self, seed: int = 0):
        from scalelab import models

        return models.MLP(self.features, self.classes, hidden=self.hidden, dropout=self.dropout,
                          rngs=nnx.Rngs(seed))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "MLP", **dataclasses.asdict(self), "hidden": list(self.hidden)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        kind = d.pop("kind", "MLP")
        if kind != "MLP":
            raise CheckpointError(f"unknown model kind {kind!r} in the configuration; expected 'MLP'")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise CheckpointError(f"unknown configuration keys {sorted(unknown)}; expected {sorted(known)}")
        return cls(**d)


def split_model(model) -> tuple[Any, dict[str, Any], Any]:
    """``(graphdef, params as a plain dict, the rest)``: plain dicts save and export anywhere."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), rest


def init_state(cfg: ModelConfig, seed: int = 0, lr: float = 1e-3) -> tuple[dict[str, Any], Callable]:
    """A fresh training state and its jitted step.

    The state is a plain pytree: ``params``, ``opt_state`` (Adam), ``step`` and ``rng``
    (the raw key data of the dropout RNG; each step's key is ``fold_in(rng, step)``, so
    the RNG's position is the step count). ``step(state, x, y) -> (state, loss)``.
    """
    model = cfg.build(seed)
    graphdef, params, rest = split_model(model)
    abstract = nnx.state(model, nnx.Param)
    tx = optax.adam(lr)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.key_data(jax.random.key(seed + 1))}

    def loss_fn(params, x, y, key):
        nnx.replace_by_pure_dict(abstract, params)
        m = nnx.merge(graphdef, abstract, rest)
        logits = m(x, rngs=key)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(state, x, y):
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], x, y, key)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
                "step": state["step"] + 1, "rng": state["rng"]}, loss

    return state, step


def data_iterator(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int = 0):
    """An endless, shuffled Grain iterator of ``(x, y)`` batches whose position can be saved
    (``get_state()``) and restored (``set_state()``)."""
    import grain

    if len(x) != len(y) or len(x) < batch_size or batch_size < 1:
        raise ValueError(f"need len(x) == len(y) >= batch_size >= 1, got {len(x)}, {len(y)}, {batch_size}")
    ds = (grain.MapDataset.source(np.arange(len(x))).shuffle(seed=seed).repeat()
          .batch(batch_size, drop_remainder=True).map(lambda idx: (x[idx], y[idx])))
    return iter(ds)


def digits_data(batch_size: int = 32, seed: int = 0):
    """The digits training set as a :func:`data_iterator`, and the test split."""
    from scalelab import data

    split = data.load_digits()
    return data_iterator(split.x_train, split.y_train, batch_size, seed), split


# --------------------------------------------------------------------------- saving and restoring training


def manager(directory: str | os.PathLike, every: int = 1, keep: int | None = 3, asynchronous: bool = True):
    """An Orbax ``CheckpointManager`` saving every ``every`` steps and keeping the last
    ``keep``; unfinished saves left by a crash (``*.orbax-checkpoint-tmp``) are removed
    when it starts."""
    import orbax.checkpoint as ocp

    if every < 1 or (keep is not None and keep < 1):
        raise ValueError(f"every and keep must be >= 1, got {every}, {keep}")
    options = ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep,
                                           enable_async_checkpointing=asynchronous,
                                           cleanup_tmp_directories=True)
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(Path(directory).resolve(), options=options, item_handlers=handlers)


def save(mngr, state: dict[str, Any], iterator, force: bool = False) -> bool:
    """Save ``state`` and the data iterator's position at ``state['step']`` (if the
    manager's interval says so, or ``force``). Returns whether a save started."""
    import orbax.checkpoint as ocp

    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(iterator.get_state()))
    return bool(mngr.save(int(state["step"]), args=args, force=force))


def train(state, step_fn, iterator, steps: int, mngr=None, on_save: Callable[[int], None] | None = None):
    """Run ``steps`` training steps from ``state``; with a manager, offer a checkpoint
    after each step. Blocks on the loss every step. Returns ``(state, losses)``."""
    losses = []
    for _ in range(steps):
        x, y = next(iterator)
        state, loss = step_fn(state, x, y)
        losses.append(float(loss))
        if mngr is not None and save(mngr, state, iterator) and on_save is not None:
            on_save(int(state["step"]))
    return state, losses


def _path(keys) -> str:
    """``opt_state/0/mu/layers/1/kernel``: one spelling for dict keys, indices and fields,
    so a tree read back from a checkpoint's metadata compares with the live one."""
    parts = []
    for k in keys:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _describe(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_path(k): (tuple(v.shape), str(jnp.dtype(v.dtype))) for k, v in flat}


def structure_differences(saved, target) -> list[str]:
    """What differs between a saved tree (its metadata) and the tree it should restore into:
    missing or extra entries, shapes, dtypes. Empty when they match."""
    a, b = _describe(saved), _describe(target)
    out = [f"{k}: in the checkpoint, not in the target" for k in sorted(set(a) - set(b))]
    out += [f"{k}: in the target, not in the checkpoint" for k in sorted(set(b) - set(a))]
    for k in sorted(set(a) & set(b)):
        if a[k][0] != b[k][0]:
            out.append(f"{k}: checkpoint has shape {a[k][0]}, target expects {b[k][0]}")
        elif a[k][1] != b[k][1]:
            out.append(f"{k}: checkpoint has dtype {a[k][1]}, target expects {b[k][1]}")
    return out


def restore(mngr, target_state: dict[str, Any], iterator=None, step: int | None = None) -> dict[str, Any]:
    """Restore the state saved at ``step`` (default: the newest complete one) into the
    structure of ``target_state``, and put ``iterator`` back at its saved position.

    Raises :class:`CheckpointError` naming the problem: no such step (and which exist), a
    structure that does not match (each differing entry), or unreadable files."""
    import orbax.checkpoint as ocp

    steps = mngr.all_steps()
    if step is None:
        if not steps:
            raise CheckpointError(f"no complete checkpoint in {mngr.directory}")
        step = max(steps)
    if step not in steps:
        raise CheckpointError(f"no checkpoint for step {step} in {mngr.directory}; available: {sorted(steps)}")
    try:
        saved = mngr.item_metadata(step)["state"]
    except Exception as err:  # metadata missing or unreadable
        raise CheckpointError(f"checkpoint step {step} in {mngr.directory} is unreadable: {err}") from err
    if saved is None:
        raise CheckpointError(f"checkpoint step {step} in {mngr.directory} has no readable 'state' metadata")
    diffs = structure_differences(_saved_tree(saved), target_state)
    if diffs:
        raise CheckpointError(f"checkpoint step {step} does not match the target state:\n  " + "\n  ".join(diffs))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                              data=ocp.args.JsonRestore()))
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(f"checkpoint step {step} in {mngr.directory} could not be restored "
                              f"(corrupted or incomplete?): {type(err).__name__}: {first}") from err
    if iterator is not None:
        iterator.set_state(restored["data"])
    return restored["state"]


def _saved_tree(metadata):
    """The tree of array metadata inside what Orbax's ``metadata()`` returns."""
    metadata = getattr(metadata, "item_metadata", metadata)
    return getattr(metadata, "tree", metadata)


def bitwise_equal(a, b) -> bool:
    """True when two pytrees have the same structure and identical bits in every array."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return (jax.tree.structure(a) == jax.tree.structure(b)
            and all(np.array_equal(np.asarray(u), np.asarray(v)) for u, v in zip(la, lb, strict=True)))


def temporary_folders(directory: str | os.PathLike) -> list[str]:
    """Unfinished saves in a checkpoint folder (what a crash mid-save leaves behind)."""
    d = Path(directory)
    return sorted(p.name for p in d.iterdir() if "orbax-checkpoint-tmp" in p.name) if d.exists() else []


# --------------------------------------------------------------------------- the crash test


def _worker(argv: list[str] | None = None) -> None:
    """A training process for the crash test: prints ``saving STEP`` as each save starts."""
    ap = argparse.ArgumentParser(prog="python -m scalelab.checkpoint")
    ap.add_argument("--dir", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--ballast-mb", type=float, default=0.0)
    a = ap.parse_args(argv)
    it, _ = digits_data()
    state, step_fn = init_state(ModelConfig())
    state["ballast"] = _ballast(a.ballast_mb)
    mngr = manager(a.dir, every=a.every, keep=None)
    if mngr.latest_step() is not None:
        state = restore(mngr, state, it)
    todo = a.steps - int(state["step"])
    state, _ = train(state, _keep_ballast(step_fn), it, todo, mngr,
                     on_save=lambda s: print(f"saving {s}", flush=True))
    mngr.wait_until_finished()
    print(f"done {int(state['step'])}", flush=True)


def _ballast(mb: float) -> jax.Array:
    """Incompressible bytes that make a checkpoint big enough to be caught mid-write."""
    n = max(1, int(mb * 2**20 / 4))
    return jax.random.uniform(jax.random.key(7), (n,))


def _keep_ballast(step_fn):
    def step(state, x, y):
        ballast = state.pop("ballast")
        new, loss = step_fn(state, x, y)
        new["ballast"] = ballast
        state["ballast"] = ballast
        return new, loss

    return step


def kill_and_restart(cmd: list[str], directory: str | os.PathLike, kill_at: int, env: dict[str, str] | None = None,
                     timeout: float = 180.0) -> dict[str, Any]:
    """Start the training process ``cmd`` (it must print ``saving STEP`` as each save starts and
    resume from its newest checkpoint in ``directory``), SIGKILL it right after the save of step
    ``kill_at`` starts, then run it again to its end. Returns what was on disk at each stage."""
    directory = Path(directory)
    shutil.rmtree(directory, ignore_errors=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    killed_at, tmp_at_kill, deadline = None, [], time.monotonic() + timeout
    try:
        for line in proc.stdout:
            if line.strip() == f"saving {kill_at}":
                proc.send_signal(signal.SIGKILL)  # no chance to finish or clean up
                killed_at = kill_at
                tmp_at_kill = temporary_folders(directory)
                break
            if time.monotonic() > deadline:
                break
    finally:
        proc.kill()
        proc.wait(timeout=30)
    if killed_at is None:
        raise CheckpointError(f"the training process never reached the save of step {kill_at}")
    complete_after_crash = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
    tmp_after_crash = temporary_folders(directory)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)  # the same command, no kill
    if out.returncode != 0:
        raise CheckpointError(f"the restarted training failed:\n{out.stderr[-2000:]}")
    return {
        "killed_at_step": killed_at, "tmp_folders_at_kill": tmp_at_kill,
        "complete_steps_after_crash": complete_after_crash, "tmp_folders_after_crash": tmp_after_crash,
        "resumed_from_step": max(complete_after_crash) if complete_after_crash else 0,
        "tmp_folders_after_restart": temporary_folders(directory), "restart_output": out.stdout.split(),
    }


def crash_during_save(directory: str | os.PathLike, steps: int = 12, every: int = 2, kill_at: int = 6,
                      ballast_mb: float = 64.0, timeout: float = 180.0) -> dict[str, Any]:
    """Start a training process, SIGKILL it right after the save of step ``kill_at``
    starts, then restart it. Returns what was on disk at each stage and whether the
    resumed run ends bit for bit where an uninterrupted run ends."""
    if not 0 < kill_at < steps or kill_at % every:
        raise ValueError(f"kill_at must be a save step (a multiple of every={every}) below steps={steps}")
    cmd = [sys.executable, "-m", "scalelab.checkpoint", "--dir", str(directory), "--steps", str(steps),
           "--every", str(every), "--ballast-mb", str(ballast_mb)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "SCALELAB_CPU_DEVICES": "1"}
    result = kill_and_restart(cmd, directory, kill_at, env, timeout)
    # the reference: the same training without interruption, in this process
    it, _ = digits_data()
    ref, step_fn = init_state(ModelConfig())
    ref, _ = train(ref, step_fn, it, steps)
    mngr = manager(directory, every=every, keep=None)
    target = dict(ref)
    target["ballast"] = _ballast(ballast_mb)
    final = restore(mngr, target)
    final.pop("ballast")
    return {**result, "final_step": int(final["step"]), "equal_to_uninterrupted": bitwise_equal(final, ref)}


# --------------------------------------------------------------------------- architecture + coefficients


def save_model(directory: str | os.PathLike, cfg: ModelConfig, params: dict[str, Any],
               metrics: dict[str, float] | None = None) -> Path:
    """Save a model as ``config.json`` (architecture, code version, metrics) and
    ``params/`` (the coefficients, Orbax). Nothing of the Python object is pickled."""
    import orbax.checkpoint as ocp

    from scalelab import train

    directory = Path(directory).resolve()
    if (directory / "params").exists():
        shutil.rmtree(directory / "params")
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / "params", params)
    meta = {"model": cfg.to_dict(), "code": train.code_version(), "jax": jax.__version__,
            "metrics": dict(metrics or {}), "saved": time.strftime("%Y-%m-%dT%H:%M:%S")}
    io.write_json(directory / "config.json", meta)  # written last: its presence marks a complete save
    return directory


def load_model(directory: str | os.PathLike):
    """Rebuild a model saved by :func:`save_model`: the configuration builds the
    architecture, the parameters fill it. Returns ``(model, config, metadata)``."""
    import orbax.checkpoint as ocp

    directory = Path(directory).resolve()
    if not (directory / "config.json").exists():
        raise CheckpointError(f"{directory} holds no saved model (config.json missing)")
    meta = json.loads((directory / "config.json").read_text())
    cfg = ModelConfig.from_dict(meta["model"])
    model = cfg.build()
    _, params, _ = split_model(model)
    with ocp.StandardCheckpointer() as ckptr:
        diffs = structure_differences(_saved_tree(ckptr.metadata(directory / "params")), params)
        if diffs:
            raise CheckpointError(f"the parameters in {directory} do not fit the configuration:\n  " + "\n  ".join(diffs))
        restored = ckptr.restore(directory / "params", jax.tree.map(ocp.utils.to_shape_dtype_struct, params))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
    model.eval()
    return model, cfg, meta


def restore_params_onto(directory: str | os.PathLike, cfg: ModelConfig, shardings) -> dict[str, Any]:
    """Restore saved parameters with each array placed by ``shardings`` (a pytree of
    ``jax.sharding.Sharding`` shaped like the parameters): Orbax reads each device's part."""
    import orbax.checkpoint as ocp

    _, params, _ = split_model(cfg.build())
    abstract = jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s), params, shardings)
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(Path(directory).resolve() / "params", abstract)


def model_parallel_shardings(params: dict[str, Any], mesh) -> Any:
    """A data x model layout for MLP parameters: each kernel and bias split over ``model``
    along its output units where they divide; everything replicated over ``data``."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    size = mesh.shape["model"]

    def spec(p):
        if p.ndim == 2 and p.shape[1] % size == 0:
            return NamedSharding(mesh, P(None, "model"))
        if p.ndim == 1 and p.shape[0] % size == 0:
            return NamedSharding(mesh, P("model"))
        return NamedSharding(mesh, P())

    return jax.tree.map(spec, params)


def fsdp_sharding(x, mesh, axis: str = "fsdp"):
    """FSDP placement of one array: split over mesh axis ``axis`` along its largest dimension that
    the axis size divides (ties: the earlier dimension); replicated when none does (scalars,
    small vectors)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    n = mesh.shape[axis]
    shape = tuple(np.shape(x))
    for dim in sorted(range(len(shape)), key=lambda d: (-shape[d], d)):
        if shape[dim] >= n and shape[dim] % n == 0:
            spec = [None] * len(shape)
            spec[dim] = axis
            return NamedSharding(mesh, P(*spec))
    return NamedSharding(mesh, P())


def fsdp_shardings(tree, mesh, axis: str = "fsdp"):
    """:func:`fsdp_sharding` for every array of a pytree (a training state: parameters and the
    optimiser's moments split alike, the step and the RNG replicated)."""
    return jax.tree.map(lambda x: fsdp_sharding(x, mesh, axis), tree)


REBUILD = """\
import sys
import numpy as np
from scalelab import checkpoint
model, cfg, meta = checkpoint.load_model(sys.argv[1])
np.save(sys.argv[3], np.asarray(model(np.load(sys.argv[2]))))
print(cfg)
"""


def _fresh_process(script: str, directory, x: np.ndarray, timeout: float) -> tuple[np.ndarray, str]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "x.npy", np.asarray(x, np.float32))
        out = subprocess.run([sys.executable, "-c", script, str(Path(directory).resolve()),
                              str(Path(tmp) / "x.npy"), str(Path(tmp) / "y.npy")],
                             capture_output=True, text=True, timeout=timeout,
                             env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=tmp)
        if out.returncode != 0:
            raise CheckpointError(f"the model failed in a fresh process:\n{out.stderr[-2000:]}")
        return np.load(Path(tmp) / "y.npy"), out.stdout.strip()


def rebuild_elsewhere(directory: str | os.PathLike, x: np.ndarray, timeout: float = 120.0) -> tuple[np.ndarray, str]:
    """Rebuild a saved model (:func:`save_model`) in a fresh Python process from its
    configuration and parameters alone, and return its logits for ``x`` and what it printed."""
    return _fresh_process(REBUILD, directory, x, timeout)


# --------------------------------------------------------------------------- jax.export


def export_inference(directory: str | os.PathLike, cfg: ModelConfig, params: dict[str, Any]) -> Path:
    """Serialise the inference function to StableHLO with a symbolic batch dimension
    (``model.stablehlo``), and the weights separately (``weights.npz``, the flat list of
    arrays the function takes). Loading needs only ``jax`` and ``numpy``."""
    model = cfg.build()
    graphdef, _, rest = split_model(model)
    abstract = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)

    def predict(weights: list[jax.Array], x: jax.Array) -> jax.Array:
        nnx.replace_by_pure_dict(abstract, jax.tree.unflatten(treedef, weights))
        m = nnx.merge(graphdef, abstract, rest)
        m.eval()
        return jax.nn.softmax(m(x), axis=-1)

    (batch,) = jax.export.symbolic_shape("batch")
    exported = jax.export.export(jax.jit(predict))(
        [jax.ShapeDtypeStruct(w.shape, w.dtype) for w in leaves],
        jax.ShapeDtypeStruct((batch, cfg.features), jnp.float32))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with io.atomic_open(directory / "model.stablehlo", "wb") as f:
        f.write(exported.serialize())
    with io.atomic_open(directory / "weights.npz", "wb") as f:
        np.savez(f, *[np.asarray(w) for w in leaves])
    return directory


LOADER = """\
import sys
import jax, numpy as np
exported = jax.export.deserialize(bytearray(open(sys.argv[1] + "/model.stablehlo", "rb").read()))
weights = np.load(sys.argv[1] + "/weights.npz")
weights = [weights[f"arr_{i}"] for i in range(len(weights.files))]
x = np.load(sys.argv[2])
np.save(sys.argv[3], np.asarray(exported.call(weights, x)))
print("modules:", sorted(m for m in sys.modules if m.split(".")[0] in ("scalelab", "flax", "optax")))
"""


def run_exported_elsewhere(directory: str | os.PathLike, x: np.ndarray, timeout: float = 120.0) -> tuple[np.ndarray, str]:
    """Run an exported model in a fresh Python process that imports only jax and numpy.
    Returns its predictions and what it printed (the list of model-code modules it loaded)."""
    return _fresh_process(LOADER, directory, x, timeout)


# --------------------------------------------------------------------------- versions: tracker + registry


def _client(uri: str | None = None):
    import mlflow

    from scalelab import train

    return mlflow.MlflowClient(tracking_uri=train.tracking_uri(uri))


def accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    """Share of ``x`` a (rebuilt, eval-mode) model classifies as ``y``."""
    return float(np.mean(np.argmax(np.asarray(model(x)), axis=-1) == np.asarray(y)))


def log_run(experiment: str, cfg: ModelConfig, metrics: dict[str, float], model_dir: str | os.PathLike,
            step: int, uri: str | None = None) -> str:
    """Record a saved model in the chapter-05 tracker: its configuration as parameters,
    its metrics at ``step``, the code version and the checkpoint's path as tags.
    Returns the run id (what a registered version links to)."""
    from scalelab import train

    mlflow = train.mlflow_experiment(uri, experiment)
    with mlflow.start_run() as run:
        mlflow.log_params({k: json.dumps(v) if isinstance(v, list) else v for k, v in cfg.to_dict().items()})
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)
        mlflow.set_tags({**train.code_version(), "checkpoint": str(Path(model_dir).resolve()), "step": str(step)})
    return run.info.run_id


def register_version(name: str, model_dir: str | os.PathLike, run_id: str, uri: str | None = None) -> int:
    """Add a saved model (:func:`save_model`) as a new version of registered model ``name``,
    linked to the tracked run ``run_id``. Returns the version number."""
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="scalelab chapter 12: config.json + params/")
    source = Path(model_dir).resolve().as_uri()
    version = client.create_model_version(name, source=source, run_id=run_id)
    return int(version.version)


def promote(name: str, version: int, alias: str = "production", uri: str | None = None) -> None:
    """Point ``alias`` (e.g. ``production``) at ``version`` of ``name``."""
    _client(uri).set_registered_model_alias(name, alias, str(version))


def load_registered(name: str, alias: str = "production", uri: str | None = None):
    """Load the model version that ``alias`` points at. Returns ``(model, config, info)``
    where ``info`` has the version, its run and the run's metrics."""
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    try:
        mv = client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        raise CheckpointError(f"no version of model {name!r} has the alias {alias!r}") from err
    path = Path(mv.source.removeprefix("file://"))
    model, cfg, meta = load_model(path)
    run = client.get_run(mv.run_id)
    return model, cfg, {"version": int(mv.version), "run_id": mv.run_id, "source": str(path),
                        "metrics": dict(run.data.metrics), "saved": meta.get("saved")}


# --------------------------------------------------------------------------- benchmark


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _fsync_folder(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def raw_write(directory: str | os.PathLike, arrays, durable: bool = True, one_file: bool = True) -> int:
    """Write the bytes of ``arrays`` (a pytree) into ``directory`` without any format: the peer a
    checkpoint library is compared with. ``durable`` fsyncs every file and the folder (what
    TensorStore's file driver, under Orbax, does by default: ``file_io_sync`` is true), otherwise the
    bytes stay in the page cache. ``one_file`` writes one file, else one file per array.
    Returns the number of bytes written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    leaves = [np.ascontiguousarray(np.asarray(a)) for a in jax.tree.leaves(arrays)]
    groups = [leaves] if one_file else [[a] for a in leaves]
    total = 0
    for i, group in enumerate(groups):
        with open(directory / f"{i}.bin", "wb") as f:
            for a in group:
                total += f.write(memoryview(a).cast("B"))
            if durable:
                f.flush()
                os.fsync(f.fileno())
    if durable:
        _fsync_folder(directory)
    return total


def folder_bytes(directory: str | os.PathLike) -> int:
    """Bytes in the files under ``directory`` (what a checkpoint occupies on disk)."""
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


def folder_files(directory: str | os.PathLike) -> int:
    """Number of files under ``directory``."""
    return sum(1 for p in Path(directory).rglob("*") if p.is_file())


def _sync_disk() -> None:
    """Flush every dirty page first, so a timed write does not pay for the previous one's writeback."""
    if hasattr(os, "sync"):
        os.sync()


def bench_checkpoint(quick: bool = False, folder: str | os.PathLike | None = None) -> dict[str, Any]:
    """Benchmark ``checkpoint``: save and restore throughput of a training state padded to a
    realistic size, against a raw write of the same bytes in the same folder, timed in parts.

    Every timed write starts after ``os.sync()`` (no writeback debt from the previous write).
    Parts (``parts_s``, medians): the device-to-host copy; the raw write to the page cache only;
    the raw durable write (fsync per file and folder, as TensorStore does), in one file and one file
    per array; Orbax's ``StandardCheckpointer`` (zstd-compressed chunks, OCDBT); Orbax without
    compression; the chapter's ``CheckpointManager`` (synchronous: the headline ``save_bytes_per_s``);
    the restore; the asynchronous save's blocked time and its total time until
    ``wait_until_finished``. ``disk_write_bytes_per_s`` is the faster of the two durable raw writes.
    """
    import tempfile

    import orbax.checkpoint as ocp

    mb = 32 if quick else 256
    repeats = 2 if quick else 3
    state, _ = init_state(ModelConfig())
    state["ballast"] = _ballast(mb)
    jax.block_until_ready(state)
    nbytes = sum(int(np.asarray(x).nbytes) for x in jax.tree.leaves(state))
    it, _ = digits_data()
    times: dict[str, list[float]] = {}
    disk: dict[str, int] = {}
    files: dict[str, int] = {}

    def timed(name: str, fn: Callable[[], Any], sync_first: bool = True) -> None:
        if sync_first:
            _sync_disk()
        times.setdefault(name, []).append(_timed(fn))

    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        tmp = Path(tmp)
        for r in range(repeats):
            timed("device_to_host", lambda: jax.device_get(state))
            timed("raw_page_cache", lambda r=r: raw_write(tmp / f"cache{r}", state, durable=False))
            timed("raw_durable_one_file", lambda r=r: raw_write(tmp / f"raw{r}", state))
            timed("raw_durable_per_array", lambda r=r: raw_write(tmp / f"rawn{r}", state, one_file=False))
            with ocp.StandardCheckpointer() as ckptr:
                timed("orbax_checkpointer", lambda c=ckptr, r=r: (c.save(tmp / f"std{r}", state),
                                                                  c.wait_until_finished()))
            plain = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False))
            timed("orbax_uncompressed", lambda c=plain, r=r: c.save(tmp / f"plain{r}", args=ocp.args.PyTreeSave(state)))
            plain.close()
            m = manager(tmp / f"sync{r}", asynchronous=False)
            timed("manager_sync", lambda m=m: save(m, state, it, force=True))
            timed("restore", lambda m=m: jax.block_until_ready(restore(m, state)))
            m.close()
            a = manager(tmp / f"async{r}", asynchronous=True)
            _sync_disk()
            start = time.perf_counter()
            save(a, state, it, force=True)
            times.setdefault("async_block", []).append(time.perf_counter() - start)
            a.wait_until_finished()
            times.setdefault("async_total", []).append(time.perf_counter() - start)
            a.close()
        for name, path in (("raw", tmp / "raw0"), ("orbax_checkpointer", tmp / "std0"),
                           ("orbax_uncompressed", tmp / "plain0"), ("manager", tmp / "sync0")):
            disk[name], files[name] = folder_bytes(path), folder_files(path)
    med = {k: float(np.median(v)) for k, v in times.items()}
    raw_best = min(med["raw_durable_one_file"], med["raw_durable_per_array"])
    save_rate, disk_rate = nbytes / med["manager_sync"], nbytes / raw_best
    return {
        "state_bytes": nbytes, "repeats": repeats,
        "save_bytes_per_s": save_rate, "restore_bytes_per_s": nbytes / med["restore"],
        "disk_write_bytes_per_s": disk_rate, "save_vs_disk": save_rate / disk_rate,
        "page_cache_write_bytes_per_s": nbytes / med["raw_page_cache"],
        "uncompressed_save_bytes_per_s": nbytes / med["orbax_uncompressed"],
        "async_block_s": med["async_block"], "sync_block_s": med["manager_sync"],
        "async_block_fraction": med["async_block"] / med["manager_sync"], "async_total_s": med["async_total"],
        "parts_s": med, "bytes_on_disk": disk, "files_on_disk": files,
        "note": "every timed write starts after os.sync(); the raw peer writes the same bytes and fsyncs "
                "each file and the folder, as TensorStore's file driver does under Orbax (file_io_sync)",
    }


def main(argv: list[str] | None = None) -> None:
    _worker(argv)


if __name__ == "__main__":
    main()
