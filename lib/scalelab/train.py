"""Chapter 05: the supervised training step, a fit loop, early stopping, gradient
accumulation, transfer learning and experiment tracking (MLflow).

The step is forward -> loss -> gradients -> update, compiled once. :class:`Trainer`
wraps it with ``nnx.cached_partial`` (Flax's way of paying the Python cost of walking
the model's object graph once instead of every step) and :func:`fit` adds the epoch
loop, evaluation, metrics history, callbacks and a progress bar in interactive use.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

# --------------------------------------------------------------------------- the step


def cross_entropy(model: nnx.Module, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean softmax cross-entropy of ``model`` on a batch, and the logits."""
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits


def train_step(model: nnx.Module, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array
               ) -> dict[str, jax.Array]:
    """One supervised step: forward, loss, gradients, parameter update. Returns metrics."""
    (loss, logits), grads = nnx.value_and_grad(cross_entropy, has_aux=True)(model, x, y)
    optimizer.update(model, grads)
    return {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == y)}


def eval_step(model: nnx.Module, x: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
    loss, logits = cross_entropy(model, x, y)
    return {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == y)}


def mean_grads(model: nnx.Module, x: jax.Array, y: jax.Array, micro_batches: int):
    """Gradient of the mean loss over ``x``, computed ``micro_batches`` slices at a time.

    A ``lax.scan`` over equal slices sums the per-slice gradients (each of the slice's
    mean loss) and divides by their number: the same gradient as the whole batch at once,
    with the activations of only one slice alive at a time.
    """
    n = x.shape[0]
    if micro_batches < 1 or n % micro_batches:
        raise ValueError(f"batch of {n} cannot be split into {micro_batches} equal micro-batches")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_of(p, xb, yb):
        return cross_entropy(nnx.merge(graphdef, p, rest), xb, yb)[0]

    xs = x.reshape(micro_batches, n // micro_batches, *x.shape[1:])
    ys = y.reshape(micro_batches, n // micro_batches)

    def body(acc, batch):
        g = jax.grad(loss_of)(params, *batch)
        return jax.tree.map(jnp.add, acc, g), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    total, _ = jax.lax.scan(body, zeros, (xs, ys))
    return jax.tree.map(lambda g: g / micro_batches, total)


def accumulated_step(model: nnx.Module, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array,
                     micro_batches: int) -> None:
    """One update from ``micro_batches`` accumulated gradients (gradient accumulation)."""
    optimizer.update(model, mean_grads(model, x, y, micro_batches))


def grad_memory_bytes(model: nnx.Module, batch: int, features: int, micro_batches: int = 1) -> dict[str, int]:
    """XLA's compiled memory analysis of one gradient computation on ``batch`` examples.

    ``temp`` is the scratch space XLA allocates (activations kept for the backward pass
    and intermediates); ``argument`` the inputs. Meaningful on CPU (see PITFALLS).
    """
    x = jax.ShapeDtypeStruct((batch, features), jnp.float32)
    y = jax.ShapeDtypeStruct((batch,), jnp.int32)
    graphdef, state = nnx.split(model)

    def grads(state, x, y):
        return mean_grads(nnx.merge(graphdef, state), x, y, micro_batches)

    mem = jax.jit(grads).lower(state, x, y).compile().memory_analysis()
    return {"temp": int(mem.temp_size_in_bytes), "argument": int(mem.argument_size_in_bytes),
            "output": int(mem.output_size_in_bytes)}


# --------------------------------------------------------------------------- data


def array_batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int = 0,
                  epoch: int = 0, drop_last: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Shuffled mini-batches of in-memory arrays; the order depends only on (seed, epoch)."""
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = np.random.default_rng([seed, epoch]).permutation(len(x))
    stop = len(x) - (len(x) % batch_size if drop_last else 0)
    for lo in range(0, stop, batch_size):
        idx = order[lo:lo + batch_size]
        yield x[idx], y[idx]


def store_batches(path, batch_size: int, seed: int = 0, epoch: int = 0
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Mini-batches of ``x`` and ``y`` from an HDF5 store (chapter 03), read as contiguous
    slices in an order shuffled per epoch at batch level (chapter 04)."""
    from scalelab import data

    with data.Store(path) as store:
        if not {"x", "y"} <= set(store.schema):
            raise ValueError(f"{path} needs datasets 'x' and 'y', has {sorted(store.schema)}")
        batches = len(store) // batch_size
        for b in np.random.default_rng([seed, epoch]).permutation(batches):
            part = store.read(int(b) * batch_size, (int(b) + 1) * batch_size)
            yield part["x"], part["y"]


def validation_split(x: np.ndarray, y: np.ndarray, fraction: float = 0.2, seed: int = 0):
    """Split off a stratified validation set: (x_train, y_train, x_val, y_val)."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    x_tr, x_va, y_tr, y_va = train_test_split(x, y, test_size=fraction, random_state=seed, stratify=y)
    return x_tr, y_tr, x_va, y_va


# --------------------------------------------------------------------------- trainer


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step."""


class Trainer:
    """A model, its optimiser and the compiled step.

    ``wrt`` selects what the optimiser updates (e.g. only the head, for a frozen backbone).
    """

    def __init__(self, model: nnx.Module, tx: optax.GradientTransformation, wrt: Any = nnx.Param):
        self.model = model
        self.optimizer = nnx.Optimizer(model, tx, wrt=wrt)
        self._step = nnx.cached_partial(nnx.jit(train_step), model, self.optimizer)
        self._eval = nnx.cached_partial(nnx.jit(eval_step), model)
        self.steps = 0

    def step(self, x, y) -> dict[str, jax.Array]:
        """One training step (asynchronous: the metrics are device arrays)."""
        self.steps += 1
        return self._step(x, y)

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int = 512) -> dict[str, float]:
        """Loss and accuracy over a whole dataset, in batches."""
        total = {"loss": 0.0, "accuracy": 0.0}
        for lo in range(0, len(x), batch_size):
            xb, yb = x[lo:lo + batch_size], y[lo:lo + batch_size]
            m = self._eval(xb, yb)
            for k in total:
                total[k] += float(m[k]) * len(xb)
        return {k: v / len(x) for k, v in total.items()}


def check_data(model: nnx.Module, x: np.ndarray, y: np.ndarray, classes: int) -> None:
    """Clear errors for data that does not fit the model (before any compute is spent)."""
    expected = getattr(model, "input_shape", None)
    if expected is not None and tuple(x.shape[1:]) != tuple(expected):
        raise ValueError(f"the model expects inputs of shape (batch, {', '.join(map(str, expected))}), "
                         f"the data has {tuple(x.shape)}")
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
    if y.size and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise ValueError(f"labels must be in 0..{classes - 1}, found {int(y.min())}..{int(y.max())}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")


# --------------------------------------------------------------------------- callbacks


class Callback:
    """Hooks called by :func:`fit`. ``on_epoch_end`` returns True to stop training."""

    def on_train_begin(self, trainer: Trainer, config: dict[str, Any]) -> None: ...

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> bool:
        return False

    def on_train_end(self, trainer: Trainer, history: list[dict[str, float]]) -> None: ...


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs;
    optionally restore the parameters of the best epoch."""

    def __init__(self, monitor: str = "val_accuracy", patience: int = 3, min_delta: float = 0.0,
                 mode: str = "max", restore_best: bool = True):
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.monitor, self.patience, self.min_delta = monitor, patience, min_delta
        self.mode, self.restore_best = mode, restore_best
        self.best: float | None = None
        self.best_epoch = -1
        self.stopped_epoch: int | None = None
        self._best_state = None
        self._wait = 0

    def _improved(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.mode == "max":
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    def on_epoch_end(self, trainer, epoch, metrics):
        if self.monitor not in metrics:
            raise KeyError(f"EarlyStopping monitors {self.monitor!r}, but the metrics are {sorted(metrics)}")
        value = metrics[self.monitor]
        if self._improved(value):
            self.best, self.best_epoch, self._wait = value, epoch, 0
            if self.restore_best:
                self._best_state = jax.tree.map(lambda a: a.copy(), nnx.state(trainer.model))
            return False
        self._wait += 1
        if self._wait >= self.patience:
            self.stopped_epoch = epoch
            return True
        return False

    def on_train_end(self, trainer, history):
        if self.restore_best and self._best_state is not None:
            nnx.update(trainer.model, self._best_state)


def patience_stop(values: Sequence[float], patience: int, min_delta: float = 0.0) -> int:
    """The epoch at which a patience rule on ``values`` (higher is better) stops, or the last."""
    best, wait = -math.inf, 0
    for epoch, v in enumerate(values):
        if v > best + min_delta:
            best, wait = v, 0
        else:
            wait += 1
            if wait >= patience:
                return epoch
    return len(values) - 1


# --------------------------------------------------------------------------- fit


def _progress(total: int, enabled: bool | str):
    if enabled == "auto":
        enabled = os.environ.get("SCALELAB_PROGRESS", "1") != "0" and (
            sys.stderr.isatty() or "ipykernel" in sys.modules)
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="epoch", leave=False)


def fit(trainer: Trainer, train: Callable[[int], Iterable[tuple[np.ndarray, np.ndarray]]] | tuple,
        val: tuple[np.ndarray, np.ndarray] | None = None, epochs: int = 10, batch_size: int = 64,
        classes: int | None = None, callbacks: Sequence[Callback] = (), seed: int = 0,
        config: dict[str, Any] | None = None, progress: bool | str = "auto") -> list[dict[str, float]]:
    """Train for ``epochs`` epochs; return the history (one dict of metrics per epoch).

    ``train`` is either ``(x, y)`` arrays (shuffled mini-batches of ``batch_size``) or a
    function ``epoch -> iterable of (x, y) batches`` (e.g. :func:`store_batches`). Each
    epoch records train loss/accuracy (means over its steps), validation loss/accuracy,
    seconds and steps. A NaN or infinite loss raises :class:`TrainingDiverged` naming the
    step. Callbacks may stop training early.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if isinstance(train, tuple):
        x_tr, y_tr = train
        if classes is not None:
            check_data(trainer.model, x_tr, y_tr, classes)
        batches = lambda epoch: array_batches(x_tr, y_tr, batch_size, seed, epoch)  # noqa: E731
    else:
        batches = train
    if val is not None and classes is not None:
        check_data(trainer.model, val[0], val[1], classes)
    config = dict(config or {})
    for cb in callbacks:
        cb.on_train_begin(trainer, config)
    history: list[dict[str, float]] = []
    bar = _progress(epochs, progress)
    try:
        for epoch in range(epochs):
            start = time.perf_counter()
            first_step = trainer.steps
            metrics = [trainer.step(xb, yb) for xb, yb in batches(epoch)]
            if not metrics:
                raise ValueError("an epoch produced no batches (dataset smaller than one batch?)")
            losses = np.asarray(jnp.stack([m["loss"] for m in metrics]))
            bad = np.flatnonzero(~np.isfinite(losses))
            if bad.size:
                step = first_step + int(bad[0]) + 1
                raise TrainingDiverged(f"the loss became {losses[bad[0]]} at step {step} "
                                       f"(epoch {epoch}, batch {int(bad[0])}); lower the learning rate "
                                       "or check the inputs")
            row = {"epoch": epoch, "steps": trainer.steps,
                   "train_loss": float(losses.mean()),
                   "train_accuracy": float(np.mean([float(m["accuracy"]) for m in metrics]))}
            if val is not None:
                row.update({f"val_{k}": v for k, v in trainer.evaluate(*val).items()})
            row["seconds"] = time.perf_counter() - start
            history.append(row)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k.startswith("val_")})
            if any([cb.on_epoch_end(trainer, epoch, row) for cb in callbacks]):
                break
    finally:
        if bar is not None:
            bar.close()
    for cb in callbacks:
        cb.on_train_end(trainer, history)
    return history


# --------------------------------------------------------------------------- tracking


def code_version(start: str | os.PathLike | None = None) -> dict[str, str]:
    """The code a run used: git commit (and whether the tree had changes) and scalelab's version."""
    from scalelab import __version__

    info = {"scalelab_version": __version__}
    cwd = Path(start or Path(__file__).resolve().parent)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        info["git_commit"] = commit
        info["git_dirty"] = str(bool(dirty)).lower()
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = "unknown (not a git checkout)"
    return info


def default_tracking_uri() -> str:
    """An embedded SQLite MLflow store: ``build/mlruns/mlflow.db`` in a checkout, else
    ``./mlruns/mlflow.db``. Works offline; point ``MLFLOW_TRACKING_URI`` at a server instead."""
    from scalelab import bench

    folder = bench.results_dir().parent / ("build/mlruns" if (bench.results_dir().parent / "lib").is_dir() else "mlruns")
    folder.mkdir(parents=True, exist_ok=True)
    return "sqlite:///" + str((folder / "mlflow.db").resolve())


def tracking_uri(uri: str | None = None) -> str:
    """The tracking store to use: ``uri``, else ``$MLFLOW_TRACKING_URI``, else the embedded default."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def mlflow_experiment(uri: str | None, experiment: str):
    """The ``mlflow`` module, pointed at the store :func:`tracking_uri` picks and at
    ``experiment`` (created on first use, with artifacts next to a SQLite store)."""
    import logging

    import mlflow

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    uri = tracking_uri(uri)
    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:///") and mlflow.get_experiment_by_name(experiment) is None:
        # keep artifacts next to the database, not in ./mlruns of whatever the working directory is
        artifacts = Path(uri.removeprefix("sqlite:///")).parent / "artifacts" / experiment
        mlflow.create_experiment(experiment, artifact_location=artifacts.resolve().as_uri())
    mlflow.set_experiment(experiment)
    return mlflow


class MlflowTracker(Callback):
    """Record a run in MLflow: configuration, code version, per-epoch metrics, artifacts
    (the history as JSON and the final parameters as ``.npz``)."""

    def __init__(self, experiment: str, run_name: str | None = None, uri: str | None = None,
                 tags: dict[str, str] | None = None):
        self.experiment, self.run_name, self.uri = experiment, run_name, uri
        self.tags = dict(tags or {})
        self.run_id: str | None = None
        self._mlflow = None

    def on_train_begin(self, trainer, config):
        mlflow = mlflow_experiment(self.uri, self.experiment)
        self._mlflow = mlflow
        run = mlflow.start_run(run_name=self.run_name)
        self.run_id = run.info.run_id
        mlflow.log_params({k: v if isinstance(v, int | float | str | bool) else json.dumps(v)
                           for k, v in config.items()})
        mlflow.set_tags({**code_version(), **self.tags})

    def on_epoch_end(self, trainer, epoch, metrics):
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items() if k != "epoch"}, step=epoch)
        return False

    def on_train_end(self, trainer, history):
        import tempfile

        mlflow = self._mlflow
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "history.json").write_text(json.dumps(history, indent=1))
            leaves = jax.tree.leaves_with_path(nnx.state(trainer.model, nnx.Param))
            np.savez(Path(tmp) / "params.npz", **{jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves})
            mlflow.log_artifacts(tmp)
        mlflow.end_run()


def search_runs(experiment: str, uri: str | None = None, order_by: str = "metrics.val_accuracy DESC"):
    """The runs of ``experiment`` as MLflow Run objects, best first."""
    mlflow = mlflow_experiment(uri, experiment)
    return mlflow.search_runs(experiment_names=[experiment], order_by=[order_by], output_format="list")


def metric_history(run_id: str, key: str, uri: str | None = None) -> list[float]:
    """A run's per-epoch values of ``key``, read back from the tracker."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri(uri))
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


# --------------------------------------------------------------------------- recipes


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What one training run is: model, optimiser settings, data size. Logged as the config."""

    model: str = "mlp"
    learning_rate: float = 1e-3
    epochs: int = 30
    batch_size: int = 64
    hidden: tuple[int, ...] = (128, 64)
    seed: int = 0

    def build(self, features: int, classes: int) -> nnx.Module:
        from scalelab import models

        rngs = nnx.Rngs(self.seed)
        if self.model == "mlp":
            return models.MLP(features, classes, self.hidden, rngs=rngs)
        if self.model == "cnn":
            side = round(math.sqrt(features))
            if side * side != features:
                raise ValueError(f"the CNN needs square images; {features} features is not a square")
            return models.CNN(side, classes, rngs=rngs)
        raise ValueError(f"model must be 'mlp' or 'cnn', got {self.model!r}")

    def config(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def run_recipe(recipe: Recipe, x_tr, y_tr, val, classes: int, callbacks: Sequence[Callback] = (),
               progress: bool | str = "auto") -> tuple[Trainer, list[dict[str, float]]]:
    """Build the model of ``recipe``, train it with Adam, return the trainer and history."""
    model = recipe.build(x_tr.shape[1], classes)
    trainer = Trainer(model, optax.adam(recipe.learning_rate))
    history = fit(trainer, (x_tr, y_tr), val, epochs=recipe.epochs, batch_size=recipe.batch_size,
                  classes=classes, callbacks=callbacks, seed=recipe.seed, config=recipe.config(),
                  progress=progress)
    return trainer, history


# --------------------------------------------------------------------------- transfer learning


def transfer_experiment(x_src, y_src, x_tgt, y_tgt, x_test, y_test, labels_per_class: Sequence[int],
                        seeds: Sequence[int] = (0, 1), pretrain_epochs: int = 30,
                        epochs: int = 40, lr: float = 1e-3, model: str = "mlp") -> list[dict[str, Any]]:
    """Accuracy on the target test set against the number of target labels per class for
    three strategies: from scratch, frozen pretrained backbone + new head, full fine-tuning.

    Target labels are re-indexed 0..k-1. The backbone is pretrained once on the source task.
    """
    classes_src = int(y_src.max()) + 1
    classes_tgt = int(y_tgt.max()) + 1
    source_model = Recipe(model=model, seed=100).build(x_src.shape[1], classes_src)
    fit(Trainer(source_model, optax.adam(lr)), (x_src, y_src), epochs=pretrain_epochs, progress=False)
    rows = []
    for n in labels_per_class:
        for seed in seeds:
            rng = np.random.default_rng(seed)
            idx = np.concatenate([rng.permutation(np.flatnonzero(y_tgt == c))[:n] for c in range(classes_tgt)])
            xs, ys = x_tgt[idx], y_tgt[idx]
            for strategy in ("scratch", "frozen backbone", "fine-tune"):
                net = Recipe(model=model, seed=seed).build(x_tgt.shape[1], classes_tgt)
                wrt: Any = nnx.Param
                if strategy != "scratch":
                    _copy_backbone(net, source_model)
                if strategy == "frozen backbone":
                    wrt = nnx.All(nnx.Param, nnx.PathContains("head"))
                trainer = Trainer(net, optax.adam(lr), wrt=wrt)
                steps_per_epoch = max(1, len(xs) // min(64, len(xs)))
                fit(trainer, (xs, ys), epochs=max(epochs, 200 // steps_per_epoch),
                    batch_size=min(64, len(xs)), seed=seed, progress=False)
                acc = trainer.evaluate(x_test, y_test)["accuracy"]
                rows.append({"labels per class": n, "strategy": strategy, "seed": seed, "test accuracy": acc})
    return rows


BACKBONE = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("head")))


def _copy_backbone(model, source) -> None:
    """Copy every parameter of ``source`` except its head into ``model`` (the heads differ)."""
    nnx.update(model, jax.tree.map(lambda a: a.copy(), nnx.state(source, BACKBONE)))


def summarize_transfer(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean test accuracy per (labels per class, strategy), as a wide table."""
    out: dict[int, dict[str, Any]] = {}
    for r in rows:
        row = out.setdefault(r["labels per class"], {"labels per class": r["labels per class"]})
        row.setdefault(r["strategy"], []).append(r["test accuracy"])
    return [{k: (float(np.mean(v)) if isinstance(v, list) else v) for k, v in row.items()}
            for row in out.values()]


# --------------------------------------------------------------------------- benchmark


def bench_train(quick: bool = False) -> dict[str, Any]:
    """Benchmark ``train``: the CNN on the digits, Adam, to >= 97% test accuracy in full mode."""
    from scalelab import data, models

    split = data.load_digits()
    recipe = Recipe(model="cnn", learning_rate=2e-3, epochs=8 if quick else 30, batch_size=64)
    model = recipe.build(split.features, split.classes)
    trainer = Trainer(model, optax.adam(recipe.learning_rate))
    xb, yb = split.x_train[:recipe.batch_size], split.y_train[:recipe.batch_size]
    start = time.perf_counter()
    jax.block_until_ready(trainer.step(xb, yb))  # the first call compiles the step
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    history = fit(trainer, (split.x_train, split.y_train), epochs=recipe.epochs,
                  batch_size=recipe.batch_size, classes=split.classes, progress=False)
    train_s = time.perf_counter() - start
    steps = trainer.steps - 1
    test = trainer.evaluate(split.x_test, split.y_test)
    return {
        "model": recipe.model, "params": models.count_params(model),
        "epochs": len(history), "steps": steps, "batch_size": recipe.batch_size,
        "compile_s": compile_s, "train_s": train_s,
        "steps_per_s": steps / train_s, "samples_per_s": steps * recipe.batch_size / train_s,
        "final_train_loss": history[-1]["train_loss"],
        "final_test_accuracy": test["accuracy"],
    }
