"""Chapter 09: hyperparameter optimisation — grid, random, Bayesian (TPE), evolutionary
(CMA-ES) search and pruning with Optuna; whole populations of configurations trained in one
compiled program with ``jax.vmap``; population-based training; studies shared by several
processes through a common storage, and trials recorded in the chapter-05 tracker (MLflow).

One real task serves every strategy: the chapter-05 MLP classifier on the digits, searched
over learning rate, weight decay (both on log scales), width (log scale, integer) and
dropout. A trial trains for a few epochs on a validation split of the training set (the test
set is only used once, for the final best configuration).

The trick that makes all of this cheap in JAX is to treat every hyperparameter as an *array
input* of one compiled training program instead of a Python constant baked into it:

* learning rate and weight decay live in the optimiser *state*
  (``optax.inject_hyperparams(optax.adamw)``), so the update reads them as arrays;
* dropout is a rate array that draws the mask;
* width is a *mask*: the network always has ``max_width`` hidden units and units beyond
  ``width`` are multiplied by zero, so they receive zero gradients and never influence the
  output. The masked network is exactly a width-``width`` MLP (:func:`to_mlp` extracts it);
  its head is initialised with the fan-in of the real width.

One program then serves every trial (no recompilation when the configuration changes), and
``jax.vmap`` over the hyperparameter arrays trains a whole population in one call.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import itertools
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optuna
from optuna.trial import TrialState

# --------------------------------------------------------------------------- search space


@dataclasses.dataclass(frozen=True)
class Dim:
    """One hyperparameter's range ``[low, high]``: on a log scale if ``log`` (the right scale
    for quantities that matter by their order of magnitude, like learning rates), integers if
    ``integer``. Sampling is uniform on that scale."""

    low: float
    high: float
    log: bool = False
    integer: bool = False

    def __post_init__(self) -> None:
        for name in ("low", "high"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
                raise TypeError(f"Dim.{name} must be a number, got {type(value).__name__} {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"Dim.{name} must be finite, got {value}")
        if not self.low < self.high:
            raise ValueError(f"empty or inverted range: low={self.low} must be < high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log-scale range needs low > 0, got low={self.low}")
        if self.integer and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError(f"an integer range needs integer bounds, got [{self.low}, {self.high}]")

    def _scale(self, value):
        return np.log(value) if self.log else np.asarray(value, dtype=float)

    def from_unit(self, u) -> np.ndarray:
        """Map ``u`` in [0, 1] to a value: 0 -> low, 1 -> high, uniform on the dim's scale."""
        u = np.asarray(u, dtype=float)
        if np.any((u < 0) | (u > 1)) or not np.all(np.isfinite(u)):
            raise ValueError("unit coordinates must lie in [0, 1]")
        lo, hi = self._scale(self.low), self._scale(self.high)
        t = lo + u * (hi - lo)
        value = np.exp(t) if self.log else t
        value = np.where(u == 0, self.low, np.where(u == 1, self.high, value))  # exact end points
        if self.integer:
            value = np.round(value)
        return np.clip(value, self.low, self.high)[()]

    def to_unit(self, value) -> np.ndarray:
        """The inverse of :meth:`from_unit` (for values inside the range)."""
        value = np.asarray(value, dtype=float)
        lo, hi = self._scale(self.low), self._scale(self.high)
        return (self._scale(value) - lo) / (hi - lo)

    def contains(self, value: float) -> bool:
        ok = self.low <= value <= self.high
        return bool(ok and (not self.integer or float(value) == int(value)))

    def suggest(self, trial: optuna.Trial, name: str) -> float:
        """Ask an Optuna trial for a value of this dim (Optuna's own distributions)."""
        if self.integer:
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(name, float(self.low), float(self.high), log=self.log)


Space = Mapping[str, Dim]

#: The chapter's search space for the digits MLP.
DIGITS_SPACE: dict[str, Dim] = {
    "learning_rate": Dim(1e-4, 1e-1, log=True),
    "weight_decay": Dim(1e-6, 1e-1, log=True),
    "width": Dim(8, 128, log=True, integer=True),
    "dropout": Dim(0.0, 0.5),
}
HYPERPARAMETERS = tuple(DIGITS_SPACE)


def check_space(space: Space) -> dict[str, Dim]:
    """A validated copy of ``space``: a non-empty mapping of names to :class:`Dim`."""
    if not isinstance(space, Mapping):
        raise TypeError(f"a search space is a mapping of names to Dim, got {type(space).__name__}")
    if not space:
        raise ValueError("the search space is empty: give at least one Dim")
    for name, dim in space.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"hyperparameter names must be non-empty strings, got {name!r}")
        if not isinstance(dim, Dim):
            raise TypeError(f"space[{name!r}] must be a Dim, got {type(dim).__name__}")
    return dict(space)


def sample(space: Space, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``n`` configurations drawn uniformly on each dim's scale (random search), as arrays."""
    space = check_space(space)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return {name: dim.from_unit(rng.random(n)) for name, dim in space.items()}


def suggest(space: Space, trial: optuna.Trial) -> dict[str, float]:
    """Ask an Optuna trial for one value of every dim of ``space``."""
    return {name: dim.suggest(trial, name) for name, dim in check_space(space).items()}


def grid_counts(space: Space, budget: int) -> dict[str, int]:
    """Points per dim of the largest grid with at most ``budget`` points.

    Every dim starts with one point; dims get one more point in turn (in the order of the
    space), as long as the product stays within the budget. With 4 dims a budget of 16 gives
    2 x 2 x 2 x 2, 36 gives 3 x 3 x 2 x 2. An integer dim never gets more points than it has
    integers.
    """
    space = check_space(space)
    if isinstance(budget, bool) or not isinstance(budget, int | np.integer) or budget < 1:
        raise ValueError(f"budget must be an integer >= 1, got {budget!r}")
    counts = dict.fromkeys(space, 1)
    capacity = {k: int(d.high - d.low) + 1 if d.integer else budget for k, d in space.items()}
    grew = True
    while grew:
        grew = False
        for name in space:
            if counts[name] < capacity[name] and math.prod(counts.values()) // counts[name] * (counts[name] + 1) <= budget:
                counts[name] += 1
                grew = True
    return counts


def grid(space: Space, budget: int) -> dict[str, list[float]]:
    """The grid values of every dim: the centres of ``k`` equal cells of its scale.

    Centres (not the end points) cover the range best: every value of the dim is within half
    a cell, ``1 / (2k)`` of the range on its scale, of a grid value.
    """
    counts = grid_counts(space, budget)
    out = {}
    for name, dim in check_space(space).items():
        k = counts[name]
        values = dim.from_unit((np.arange(k) + 0.5) / k)
        out[name] = list(dict.fromkeys(int(v) if dim.integer else float(v) for v in values))
    return out


def grid_points(space: Space, budget: int) -> list[dict[str, float]]:
    """Every point of :func:`grid` (the Cartesian product), at most ``budget`` of them."""
    values = grid(space, budget)
    return [dict(zip(values, combo, strict=True)) for combo in itertools.product(*values.values())]


# --------------------------------------------------------------------------- Optuna strategies

STRATEGIES: dict[str, str] = {
    "grid": "every point of a grid over the space (Optuna GridSampler)",
    "random": "independent uniform draws on each dim's scale (RandomSampler)",
    "tpe": "Bayesian optimisation with a tree-structured Parzen estimator (TPESampler)",
    "cmaes": "evolution strategy with an adapted covariance matrix (CmaEsSampler, needs `cmaes`)",
    "gp": "Bayesian optimisation with a Gaussian process (GPSampler, needs PyTorch)",
}
PRUNERS = ("none", "median", "asha", "hyperband")


def check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    return strategy


def startup_trials(budget: int) -> int:
    """Random trials a model-based sampler takes before it models: a quarter of the budget, >= 4."""
    return max(4, budget // 4)


def make_sampler(strategy: str, space: Space, budget: int, seed: int = 0) -> optuna.samplers.BaseSampler:
    """The Optuna sampler of ``strategy`` for ``budget`` trials over ``space``."""
    check_strategy(strategy)
    samplers = optuna.samplers
    if strategy == "grid":
        return samplers.GridSampler(grid(space, budget), seed=seed)
    if strategy == "random":
        return samplers.RandomSampler(seed=seed)
    if strategy == "tpe":
        return samplers.TPESampler(seed=seed, n_startup_trials=startup_trials(budget))
    if strategy == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise ImportError("the 'cmaes' strategy uses Optuna's CmaEsSampler, which needs the "
                              "`cmaes` package: pip install cmaes") from None
        return samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ImportError("the 'gp' strategy uses Optuna's GPSampler, which needs PyTorch: "
                          "pip install torch") from None
    return samplers.GPSampler(seed=seed, n_startup_trials=startup_trials(budget))


def make_pruner(pruner: str | None, epochs: int) -> optuna.pruners.BasePruner:
    """``median``: stop a trial whose accuracy after an epoch is below the median of earlier
    trials at that epoch (after 5 trials and 2 epochs); ``asha``: asynchronous successive
    halving (Optuna's ``SuccessiveHalvingPruner``, Li et al. 2020): rungs at reported steps
    1, 3, 9, ... (epochs are reported as steps 0, 1, ...), and a trial reaching a rung continues
    only if it is in the top third of the trials that reached that rung so far; ``hyperband``: several successive-halving brackets with
    different minimum budgets; ``none``."""
    name = pruner or "none"
    if name not in PRUNERS:
        raise ValueError(f"unknown pruner {pruner!r}; expected one of {', '.join(PRUNERS)}")
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2)
    if name == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3, min_early_stopping_rate=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3)
    return optuna.pruners.NopPruner()


@contextlib.contextmanager
def quiet_optuna(level: int = logging.WARNING) -> Iterator[None]:
    """Optuna logs every trial at INFO; keep warnings (failed trials) only."""
    old = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(level)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(old)


def open_storage(storage: str | os.PathLike) -> optuna.storages.BaseStorage:
    """Shared storage for a study worked by several processes.

    A database URL (``sqlite:///study.db``, ``postgresql://user:pw@host/db``) gives Optuna's
    RDB storage; anything else is a file path for a journal (an append-only log that several
    processes on one machine, or on a shared file system, can write safely).
    """
    text = os.fspath(storage)
    if not text:
        raise ValueError("storage must be a database URL or a journal file path, got ''")
    if "://" in text:
        return optuna.storages.RDBStorage(text)
    from optuna.storages.journal import JournalFileBackend

    Path(text).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(text))


def failures(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The failed trials; each has its error in ``user_attrs["fail_reason"]``."""
    return [t for t in study.trials if t.state == TrialState.FAIL]


def recording_failures(objective: Callable[[optuna.Trial], float]) -> Callable[[optuna.Trial], float]:
    """``objective``, storing the error of a failing trial as its ``fail_reason`` attribute
    (the study records the trial as FAIL and goes on; see :func:`run_study`)."""

    @functools.wraps(objective)
    def wrapped(trial: optuna.Trial) -> float:
        try:
            value = objective(trial)
        except optuna.TrialPruned:
            raise
        except Exception as err:
            trial.set_user_attr("fail_reason", f"{type(err).__name__}: {err}")
            raise
        if value is None or not math.isfinite(value):
            trial.set_user_attr("fail_reason", f"the objective returned {value}")
        return value

    return wrapped


def run_study(objective: Callable[[optuna.Trial], float], strategy: str, budget: int, *, space: Space,
              seed: int = 0, pruner: str | None = None, epochs: int = 1,
              storage: str | os.PathLike | optuna.storages.BaseStorage | None = None,
              study_name: str | None = None, timeout: float | None = None) -> optuna.Study:
    """Maximise ``objective`` with ``budget`` trials of ``strategy``.

    A trial that raises (or returns NaN) is recorded as failed (``TrialState.FAIL``) and the
    study goes on; only if *every* trial failed does this raise, naming the first failure.
    ``epochs`` is the number of intermediate reports per trial (for the Hyperband pruner).
    """
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    sampler = make_sampler(strategy, space, budget, seed)
    if isinstance(storage, str | os.PathLike):
        storage = open_storage(storage)
    with quiet_optuna(logging.ERROR):  # failures are recorded in the trials, not logged
        study = optuna.create_study(direction="maximize", sampler=sampler, pruner=make_pruner(pruner, epochs),
                                    storage=storage, study_name=study_name, load_if_exists=True)
        study.set_user_attr("strategy", strategy)
        study.optimize(recording_failures(objective), n_trials=budget, timeout=timeout, catch=(Exception,))
    done = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    if study.trials and not done:
        reason = failures(study)[0].user_attrs.get("fail_reason", "unknown")
        raise RuntimeError(f"every trial of the {strategy} study failed; the first: {reason}")
    return study


def best_so_far(study: optuna.Study, budget: int | None = None) -> np.ndarray:
    """The best completed value after each trial (NaN before the first), padded with the last
    value up to ``budget`` (a grid smaller than the budget simply has nothing more to try)."""
    trials = sorted(study.trials, key=lambda t: t.number)
    best, curve = -math.inf, []
    for t in trials:
        if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value):
            best = max(best, t.value)
        curve.append(best if best > -math.inf else math.nan)
    budget = len(curve) if budget is None else budget
    curve = curve[:budget] + [curve[-1] if curve else math.nan] * (budget - len(curve))
    return np.asarray(curve, dtype=float)


# --------------------------------------------------------------------------- the training program


class Data(NamedTuple):
    """Training and validation arrays (the validation set is split from the training set)."""

    x_train: jax.Array
    y_train: jax.Array
    x_val: jax.Array
    y_val: jax.Array


class State(NamedTuple):
    """What one configuration carries from epoch to epoch: parameters and optimiser state."""

    params: Any
    opt_state: Any


class Metrics(NamedTuple):
    """Per epoch: mean training loss and validation accuracy."""

    train_loss: jax.Array
    val_accuracy: jax.Array


def hyperparameter_arrays(hp: Mapping[str, Any]) -> dict[str, jax.Array]:
    """The four hyperparameters as float32 arrays (the inputs of the compiled program)."""
    missing = set(HYPERPARAMETERS) - set(hp)
    if missing:
        raise ValueError(f"missing hyperparameters {sorted(missing)}; need {list(HYPERPARAMETERS)}")
    return {k: jnp.asarray(hp[k], dtype=jnp.float32) for k in HYPERPARAMETERS}


def _optimizer(hp: Mapping[str, jax.Array]) -> optax.GradientTransformation:
    # inject_hyperparams keeps learning rate and weight decay in the optimiser *state*, as
    # arrays: the update reads them from there, so they can be traced, vmapped and changed.
    return optax.inject_hyperparams(optax.adamw)(learning_rate=hp["learning_rate"],
                                                 weight_decay=hp["weight_decay"])


def _set_hyperparameters(opt_state, hp: Mapping[str, jax.Array]):
    hyper = dict(opt_state.hyperparams)
    hyper["learning_rate"] = jnp.asarray(hp["learning_rate"], hyper["learning_rate"].dtype)
    hyper["weight_decay"] = jnp.asarray(hp["weight_decay"], hyper["weight_decay"].dtype)
    return opt_state._replace(hyperparams=hyper)


def init_member(key: jax.Array, hp: Mapping[str, jax.Array], *, features: int, classes: int,
                max_width: int) -> State:
    """Parameters (the chapter-05 MLP with one hidden layer of ``max_width`` units, initialised
    like ``nnx.Linear``) and AdamW state for one configuration. The head's fan-in is the
    configuration's width, so its initial scale is that of a real width-``width`` MLP."""
    k_hidden, k_head = jax.random.split(key)
    lecun = jax.nn.initializers.lecun_normal()
    params = {
        "hidden": {"kernel": lecun(k_hidden, (features, max_width)), "bias": jnp.zeros(max_width)},
        "head": {"kernel": lecun(k_head, (max_width, classes)) * jnp.sqrt(max_width / hp["width"]),
                 "bias": jnp.zeros(classes)},
    }
    return State(params, _optimizer(hp).init(params))


def epoch_order(n: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """Mini-batch indices of one epoch, ``(steps, batch_size)``: a shuffle that depends only on
    ``(seed, epoch)``, shared by every configuration (common random numbers: configurations
    then differ only by their hyperparameters). Drawn on the host, an input of the program."""
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be in 1..{n}, got {batch_size}")
    steps = n // batch_size
    order = np.random.default_rng([seed, epoch]).permutation(n)[:steps * batch_size]
    return order.reshape(steps, batch_size).astype(np.int32)


def logits(params, x: jax.Array, width: jax.Array, dropout: jax.Array | float = 0.0,
           uniform: jax.Array | None = None) -> jax.Array:
    """The MLP's output. Hidden units at index >= ``width`` are masked to zero; in training,
    ``uniform`` (random numbers in [0, 1) of the hidden layer's shape) drops units with
    probability ``dropout`` (an array, so it can differ per configuration)."""
    max_width = params["hidden"]["bias"].shape[-1]
    h = jax.nn.relu(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    h = h * (jnp.arange(max_width) < width)
    if uniform is not None:
        keep = 1.0 - dropout
        h = jnp.where(uniform < keep, h / keep, 0.0)
    return h @ params["head"]["kernel"] + params["head"]["bias"]


def loss_fn(params, x, y, width, dropout, uniform) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits(params, x, width, dropout, uniform), y).mean()


def accuracy(params, x: jax.Array, y: jax.Array, width: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(logits(params, x, width), -1) == y)


def train_epochs(state: State, hp: Mapping[str, jax.Array], key: jax.Array, order: jax.Array, data: Data,
                 start_epoch: jax.Array | int) -> tuple[State, Metrics]:
    """Train one configuration for ``len(order)`` epochs of AdamW on the mini-batches
    ``order[epoch, step]`` (indices into the training set), with the validation accuracy
    after each epoch. ``key`` draws the dropout masks. A pure function of arrays: jit it, or
    vmap it over ``state``, ``hp`` and ``key`` to train a whole population at once."""
    tx = _optimizer(hp)
    carry = (state.params, _set_hyperparameters(state.opt_state, hp))
    steps, batch = order.shape[1:]
    max_width = state.params["hidden"]["bias"].shape[-1]

    def step(carry, inputs):
        params, opt_state = carry
        idx, i = inputs
        # dropout's random numbers, drawn inside the step (vmapped, this fuses far better than
        # materialising a whole epoch's worth per configuration)
        uniform = jax.random.uniform(jax.random.fold_in(key, i), (batch, max_width))
        loss, grads = jax.value_and_grad(loss_fn)(params, data.x_train[idx], data.y_train[idx],
                                                  hp["width"], hp["dropout"], uniform)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    def epoch(carry, inputs):
        e, idx = inputs
        carry, losses = jax.lax.scan(step, carry, (idx, e * steps + jnp.arange(steps)))
        return carry, (losses.mean(), accuracy(carry[0], data.x_val, data.y_val, hp["width"]))

    carry, (loss, acc) = jax.lax.scan(epoch, carry, (start_epoch + jnp.arange(order.shape[0]), order))
    return State(*carry), Metrics(loss, acc)


_init_jit = jax.jit(init_member, static_argnames=("features", "classes", "max_width"))
_epochs_jit = jax.jit(train_epochs)


@functools.partial(jax.jit, static_argnames=("features", "classes", "max_width"))
def init_population(keys: jax.Array, hps: Mapping[str, jax.Array], *, features: int, classes: int,
                    max_width: int) -> State:
    """:func:`init_member` for a population: ``keys`` and every array of ``hps`` have a
    leading population axis."""
    member = functools.partial(init_member, features=features, classes=classes, max_width=max_width)
    return jax.vmap(member)(keys, hps)


@jax.jit
def population_epochs(states: State, hps: Mapping[str, jax.Array], keys: jax.Array, order: jax.Array,
                      data: Data, start_epoch: jax.Array | int) -> tuple[State, Metrics]:
    """:func:`train_epochs` for a whole population in one compiled program: vmapped over
    states, hyperparameters and keys; data and data order are shared."""
    return jax.vmap(train_epochs, in_axes=(0, 0, 0, None, None, None))(states, hps, keys, order, data, start_epoch)


def to_mlp(params, width: int, features: int | None = None, classes: int | None = None):
    """The trained configuration as a chapter-05 ``models.MLP(hidden=(width,))`` (the masked
    units dropped): the network the search actually found."""
    from flax import nnx

    from scalelab import models

    kernel, bias = np.asarray(params["hidden"]["kernel"]), np.asarray(params["hidden"]["bias"])
    head_k, head_b = np.asarray(params["head"]["kernel"]), np.asarray(params["head"]["bias"])
    width = int(width)
    if not 1 <= width <= kernel.shape[1]:
        raise ValueError(f"width must be in 1..{kernel.shape[1]}, got {width}")
    model = models.MLP(features or kernel.shape[0], classes or head_k.shape[1], hidden=(width,), rngs=nnx.Rngs(0))
    model.layers[0].kernel[...] = kernel[:, :width]
    model.layers[0].bias[...] = bias[:width]
    model.head.kernel[...] = head_k[:width]
    model.head.bias[...] = head_b
    return model


# --------------------------------------------------------------------------- the task


class TrainingDiverged(RuntimeError):
    """The training loss of a trial became NaN or infinite."""


class DigitsTask:
    """The chapter-05 MLP on the digits as a hyperparameter-optimisation problem.

    Training examples are split into train and validation (stratified, 20%); a trial trains
    ``epochs`` epochs of mini-batches of ``batch_size`` and scores the validation accuracy of
    the last epoch. ``seed`` fixes the data split, the data order and the initialisation.
    """

    def __init__(self, space: Space | None = None, epochs: int = 8, batch_size: int = 64,
                 val_fraction: float = 0.2, seed: int = 0):
        from scalelab import data as datasets
        from scalelab import train

        space = check_space(DIGITS_SPACE if space is None else space)
        if set(space) != set(HYPERPARAMETERS):
            raise ValueError(f"the digits task searches {list(HYPERPARAMETERS)}, got {list(space)}")
        if space["width"].low < 1 or not space["width"].integer:
            raise ValueError(f"width must be an integer Dim with low >= 1, got {space['width']}")
        if space["dropout"].low < 0 or space["dropout"].high >= 1:
            raise ValueError(f"dropout must lie in [0, 1), got {space['dropout']}")
        if space["learning_rate"].low <= 0 or space["weight_decay"].low < 0:
            raise ValueError("learning_rate must be > 0 and weight_decay >= 0")
        if epochs < 1 or batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
        self.space, self.epochs, self.batch_size, self.seed = space, epochs, batch_size, seed
        self.max_width = int(space["width"].high)
        self.split = datasets.load_digits()
        x_tr, y_tr, x_va, y_va = train.validation_split(self.split.x_train, self.split.y_train, val_fraction, seed)
        if batch_size > len(x_tr):
            raise ValueError(f"batch_size {batch_size} exceeds the {len(x_tr)} training examples")
        self.data = Data(*(jnp.asarray(a) for a in (x_tr, y_tr, x_va, y_va)))
        self.features, self.classes = self.split.features, self.split.classes
        self._orders: dict[tuple[int, int], jax.Array] = {}

    def __repr__(self) -> str:
        return (f"DigitsTask(epochs={self.epochs}, batch_size={self.batch_size}, max_width={self.max_width}, "
                f"train={len(self.data.x_train)}, val={len(self.data.x_val)})")

    def key(self, seed: int | None = None) -> jax.Array:
        """The initialisation and dropout key of a run seed (default: the task's seed)."""
        return jax.random.key(self.seed if seed is None else seed)

    def order(self, epoch: int, seed: int | None = None) -> jax.Array:
        """The mini-batches of ``epoch``, ``(1, steps, batch_size)``, for a run seed."""
        seed = self.seed if seed is None else seed
        if (seed, epoch) not in self._orders:
            self._orders[seed, epoch] = jnp.asarray(epoch_order(len(self.data.x_train), self.batch_size, seed, epoch))[None]
        return self._orders[seed, epoch]

    def check(self, hp: Mapping[str, Any]) -> dict[str, jax.Array]:
        """Hyperparameter arrays of ``hp``; values outside the space raise ValueError."""
        for name, dim in self.space.items():
            if name in hp and not dim.contains(float(hp[name])):
                raise ValueError(f"{name}={hp[name]} lies outside [{dim.low}, {dim.high}]")
        return hyperparameter_arrays(hp)

    def init(self, key: jax.Array, hp: Mapping[str, jax.Array]) -> State:
        return _init_jit(key, hp, features=self.features, classes=self.classes, max_width=self.max_width)

    def run_epoch(self, state: State, hp: Mapping[str, jax.Array], key: jax.Array, epoch: int,
                  seed: int | None = None) -> tuple[State, Metrics]:
        """One epoch of one configuration: a call of the compiled one-epoch program (the same
        program for every configuration); metrics have one entry."""
        return _epochs_jit(state, hp, key, self.order(epoch, seed), self.data, epoch)

    def train(self, hp: Mapping[str, Any], seed: int | None = None, key: jax.Array | None = None,
              epochs: int | None = None) -> tuple[State, Metrics]:
        """Train one configuration: one call of the compiled one-epoch program per epoch."""
        hp = self.check(hp)
        key = self.key(seed) if key is None else key
        state, metrics = self.init(key, hp), []
        for epoch in range(epochs or self.epochs):
            state, m = _epochs_jit(state, hp, key, self.order(epoch, seed), self.data, epoch)
            metrics.append(m)
        return state, Metrics(*(jnp.concatenate(v) for v in zip(*metrics, strict=True)))

    def train_population(self, hps: Mapping[str, Any], seed: int | None = None, keys: jax.Array | None = None,
                         epochs: int | None = None) -> tuple[State, Metrics]:
        """Train a population (arrays with one entry per configuration) with the vmapped
        programs; metrics have shape ``(population, epochs)``."""
        hps = hyperparameter_arrays(hps)
        n = hps["learning_rate"].shape[0]
        keys = jax.random.split(self.key(seed), n) if keys is None else keys
        states = init_population(keys, hps, features=self.features, classes=self.classes, max_width=self.max_width)
        metrics = []
        for epoch in range(epochs or self.epochs):
            states, m = population_epochs(states, hps, keys, self.order(epoch, seed), self.data, epoch)
            metrics.append(m)
        return states, Metrics(*(jnp.concatenate(v, axis=1) for v in zip(*metrics, strict=True)))

    def objective(self, seed: int | None = None) -> Callable[[optuna.Trial], float]:
        """The Optuna objective: train a suggested configuration epoch by epoch, report the
        validation accuracy after each epoch (so a pruner can stop it), return the last."""
        key = self.key(seed)

        def objective(trial: optuna.Trial) -> float:
            hp = self.check(suggest(self.space, trial))
            state = self.init(key, hp)
            for epoch in range(self.epochs):
                state, m = self.run_epoch(state, hp, key, epoch, seed)
                loss, acc = float(m.train_loss[0]), float(m.val_accuracy[0])
                trial.set_user_attr("epochs", epoch + 1)
                if not math.isfinite(loss):
                    raise TrainingDiverged(f"the training loss became {loss} in epoch {epoch}")
                trial.report(acc, epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"val accuracy {acc:.3f} after epoch {epoch}")
            return acc

        return objective

    def test_accuracy(self, hp: Mapping[str, Any], seed: int | None = None) -> dict[str, float]:
        """Train ``hp`` once more and score it on the *test* set (for the final best
        configuration only), through the chapter-05 MLP and evaluation step."""
        from scalelab import train

        state, metrics = self.train(hp, seed)
        model = to_mlp(state.params, int(hp["width"]), self.features, self.classes)
        test = train.eval_step(model, jnp.asarray(self.split.x_test), jnp.asarray(self.split.y_test))
        return {"val_accuracy": float(metrics.val_accuracy[-1]), "test_accuracy": float(test["accuracy"])}


# --------------------------------------------------------------------------- comparing strategies


@dataclasses.dataclass
class StrategyResult:
    """One strategy over several seeds: best-so-far curves (seeds x budget) and costs."""

    strategy: str
    budget: int
    seeds: list[int]
    curves: np.ndarray
    trials: list[int]
    epochs: list[int]
    pruned: list[int]
    failed: list[int]
    seconds: float
    studies: list[optuna.Study]

    @property
    def best(self) -> np.ndarray:
        return self.curves[:, -1]

    def row(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "budget": self.budget, "seeds": len(self.seeds),
                "trials run": float(np.mean(self.trials)), "epochs trained": float(np.mean(self.epochs)),
                "median best val acc": float(np.median(self.best)), "mean": float(np.mean(self.best)),
                "std": float(np.std(self.best)), "min": float(np.min(self.best)),
                "s per study": self.seconds / len(self.seeds)}


def study_epochs(study: optuna.Study) -> int:
    return int(sum(t.user_attrs.get("epochs", 0) for t in study.trials))


def run_strategy(task: DigitsTask, strategy: str, budget: int, seeds: Sequence[int],
                 pruner: str | None = None) -> StrategyResult:
    """``strategy`` at ``budget`` trials once per seed (sampler seed = training seed)."""
    check_strategy(strategy)
    if not seeds:
        raise ValueError("give at least one seed")
    curves, trials, epochs, pruned, failed, studies = [], [], [], [], [], []
    start = time.perf_counter()
    for seed in seeds:
        study = run_study(task.objective(seed), strategy, budget, space=task.space, seed=seed,
                          pruner=pruner, epochs=task.epochs)
        curves.append(best_so_far(study, budget))
        trials.append(len(study.trials))
        epochs.append(study_epochs(study))
        pruned.append(sum(t.state == TrialState.PRUNED for t in study.trials))
        failed.append(len(failures(study)))
        studies.append(study)
    return StrategyResult(strategy, budget, list(seeds), np.stack(curves), trials, epochs, pruned, failed,
                          time.perf_counter() - start, studies)


def compare_strategies(task: DigitsTask, strategies: Sequence[str] = ("grid", "random", "tpe", "cmaes"),
                       budget: int = 16, seeds: Sequence[int] = (0, 1, 2)) -> dict[str, StrategyResult]:
    """Every strategy at the same trial budget, over the same seeds."""
    for s in strategies:
        check_strategy(s)
    return {s: run_strategy(task, s, budget, seeds) for s in strategies}


def pruning_effect(task: DigitsTask, budget: int, seeds: Sequence[int],
                   pruners: Sequence[str] = ("median", "asha", "hyperband"),
                   strategy: str = "tpe") -> list[dict[str, Any]]:
    """``strategy`` without and with each pruner at the same trial budget and seeds: epochs
    trained (the cost) against the best validation accuracy found (median, mean and worst over
    seeds)."""
    plain = run_strategy(task, strategy, budget, seeds)
    rows = []
    for name, result in [("none", plain), *[(p, run_strategy(task, strategy, budget, seeds, pruner=p))
                                           for p in pruners]]:
        rows.append({
            "pruner": name, "trials": budget, "seeds": len(seeds),
            "trials pruned": float(np.mean(result.pruned)),
            "epochs trained": float(np.mean(result.epochs)),
            "epochs saved": 1 - float(np.sum(result.epochs)) / float(np.sum(plain.epochs)),
            "median best val acc": float(np.median(result.best)),
            "mean best val acc": float(np.mean(result.best)),
            "min best val acc": float(np.min(result.best)),
            "accuracy lost": float(np.median(plain.best) - np.median(result.best)),
            "s per study": result.seconds / len(seeds),
        })
    return rows


def bergstra_synthetic(dims: int = 4, important: int = 1, budget: int = 16, seeds: int = 1000,
                       seed: int = 0) -> dict[str, Any]:
    """Grid vs random search on a synthetic objective where only ``important`` of ``dims``
    unit-range hyperparameters matter: ``f(x) = -sum_{i < important} |x_i - c_i|`` with the
    optimum ``c`` drawn uniformly per seed. Returns each strategy's regret (distance of its
    best point from the optimum) per seed. Bergstra & Bengio's argument: a grid of ``k^d``
    points tries only ``k`` distinct values of the one dim that matters, random search tries
    ``k^d`` of them."""
    if not 1 <= important <= dims:
        raise ValueError(f"important must be in 1..{dims}, got {important}")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    unit = {f"x{i}": Dim(0.0, 1.0) for i in range(dims)}
    rng = np.random.default_rng(seed)
    optimum = rng.random((seeds, 1, important))
    g = np.asarray([[p[f"x{i}"] for i in range(dims)] for p in grid_points(unit, budget)])
    r = rng.random((seeds, budget, dims))

    def regret(points):
        return np.abs(points[..., :important] - optimum).sum(-1).min(-1)

    return {"grid": regret(np.broadcast_to(g, (seeds, *g.shape))), "random": regret(r),
            "budget": budget, "grid_points": len(g), "grid_values_of_x0": len(set(g[:, 0]))}


# --------------------------------------------------------------------------- populations


def population_vs_loop(task: DigitsTask, hps: Mapping[str, np.ndarray], seed: int = 0,
                       epochs: int | None = None) -> dict[str, Any]:
    """Train the configurations ``hps`` (arrays with one entry per configuration) once with
    the vmapped programs and once as a loop over the single-configuration programs; return
    both validation accuracies and the largest differences (equal up to float rounding)."""
    hps = hyperparameter_arrays(hps)
    n = hps["learning_rate"].shape[0]
    keys = jax.random.split(task.key(seed), n)
    pop_state, pop_m = task.train_population(hps, seed, keys, epochs)
    loop = [task.train({k: v[i] for k, v in hps.items()}, seed, keys[i], epochs) for i in range(n)]
    loop_params = jax.tree.map(lambda *a: jnp.stack(a), *[s.params for s, _ in loop])
    loop_acc = np.stack([np.asarray(m.val_accuracy) for _, m in loop])
    loop_loss = np.stack([np.asarray(m.train_loss) for _, m in loop])
    param_diff = max(float(jnp.max(jnp.abs(a - b)))
                     for a, b in zip(jax.tree.leaves(pop_state.params), jax.tree.leaves(loop_params), strict=True))
    return {"configs": n, "val_accuracy_vmap": np.asarray(pop_m.val_accuracy), "val_accuracy_loop": loop_acc,
            "train_loss_vmap": np.asarray(pop_m.train_loss), "train_loss_loop": loop_loss,
            "max_param_diff": param_diff,
            "max_loss_diff": float(np.max(np.abs(np.asarray(pop_m.train_loss) - loop_loss))),
            "max_accuracy_diff": float(np.max(np.abs(np.asarray(pop_m.val_accuracy) - loop_acc)))}


def _separately_jitted(task: DigitsTask, hp: Mapping[str, Any], key: jax.Array, orders, shape) -> jax.Array:
    """One configuration the way a plain loop writes it: the hyperparameters are Python
    numbers closed over by freshly jitted functions, so each configuration is traced and
    compiled anew before it trains."""
    const = {k: float(v) for k, v in hp.items()}

    def as_arrays():
        return {k: jnp.asarray(v, jnp.float32) for k, v in const.items()}

    init = jax.jit(lambda key: init_member(key, as_arrays(), **shape))
    epochs = jax.jit(lambda state, key, order, data, e: train_epochs(state, as_arrays(), key, order, data, e))
    state = init(key)
    for e in range(task.epochs):
        state, m = epochs(state, key, orders[e], task.data, e)
    return m.val_accuracy.block_until_ready()


def step_flops(features: int, width: int, classes: int, batch: int) -> int:
    """Matrix-product FLOPs of one training step of one configuration: the forward pass's two
    products cost ``2 * batch * (features * width + width * classes)``, the backward pass twice
    that (gradients of the inputs and of the weights), so three times the forward in all.
    Element-wise work (ReLU, softmax, AdamW) is not counted."""
    return 3 * 2 * batch * (features * width + width * classes)


def training_flops(task: DigitsTask, configs: int = 1) -> int:
    """Matrix-product FLOPs of training ``configs`` configurations for ``task.epochs`` epochs
    (every member computes with ``max_width`` units: the masked ones are multiplied, not skipped)."""
    steps = len(task.data.x_train) // task.batch_size
    return configs * task.epochs * steps * step_flops(task.features, task.max_width, task.classes, task.batch_size)


def dispatch_seconds(repeat: int = 5) -> float:
    """Seconds one call of a tiny compiled program costs from Python (argument handling,
    dispatch, waiting for the result): the fixed price of every call, whatever it computes."""
    from scalelab import bench

    tiny = jax.jit(lambda x: x + 1.0)
    x = jnp.zeros(())
    return bench.timeit(tiny, x, repeat=repeat, warmup=2).best


def vmap_benchmark(task: DigitsTask | None = None, configs: int = 64, repeat: int = 3, seed: int = 0,
                   separate: int | None = None) -> dict[str, Any]:
    """Seconds to train ``configs`` random configurations of ``task`` for ``task.epochs``
    epochs, three ways:

    * one **vmapped** program for the whole population, one call per epoch;
    * the **reused program**: the single-configuration programs, compiled once and called once
      per configuration and epoch with different hyperparameter arrays (the fair peer);
    * **separately jitted** runs: hyperparameters baked in as Python constants, so every
      configuration traces and compiles its own programs (what a naive loop does; measured on
      ``separate`` configurations, default all, and scaled to ``configs``).

    The vmapped and reused programs are compiled ahead of time (``jit(f).lower(...).compile()``,
    timed, after ``jax.clear_caches()`` so that programs compiled earlier in the process are not
    counted as free) and then timed running those executables, so "run" and "compile + run"
    ratios are both honest.

    The headline ``vmap_speedup`` is against the fair peer, compilation included on both sides:
    what batching configurations gains once hyperparameters are arrays.
    ``vmap_speedup_vs_separately_jitted`` adds the recompilations a naive loop pays. The
    matrix-product rate of both programs (``*_gflops``, from :func:`training_flops`) and the
    fixed cost of one call (``dispatch_s_per_call`` times the calls each side makes) say where
    a running speed-up comes from."""
    from scalelab import bench

    if configs < 1 or repeat < 1:
        raise ValueError(f"configs and repeat must be >= 1, got {configs}, {repeat}")
    task = task or DigitsTask()
    hps = hyperparameter_arrays(sample(task.space, configs, np.random.default_rng(seed)))
    keys = jax.random.split(task.key(seed), configs)
    members = [{k: v[i] for k, v in hps.items()} for i in range(configs)]
    orders = [task.order(e, seed) for e in range(task.epochs)]
    shape = {"features": task.features, "classes": task.classes, "max_width": task.max_width}
    jax.block_until_ready((members, orders))

    jax.clear_caches()

    def timed_compile(fn, *args, **kwargs):
        start = time.perf_counter()
        compiled = fn.lower(*args, **kwargs).compile()
        return compiled, time.perf_counter() - start

    init1, c1 = timed_compile(_init_jit, keys[0], members[0], **shape)
    state1 = init1(keys[0], members[0])
    epoch1, c2 = timed_compile(_epochs_jit, state1, members[0], keys[0], orders[0], task.data, 0)
    init_pop, c3 = timed_compile(init_population, keys, hps, **shape)
    states = init_pop(keys, hps)
    epoch_pop, c4 = timed_compile(population_epochs, states, hps, keys, orders[0], task.data, 0)

    def loop():
        out = []
        for i in range(configs):
            state = init1(keys[i], members[i])
            for e in range(task.epochs):
                state, m = epoch1(state, members[i], keys[i], orders[e], task.data, e)
            out.append(m.val_accuracy)
        return jnp.stack(out)

    def vmapped():
        state = init_pop(keys, hps)
        for e in range(task.epochs):
            state, m = epoch_pop(state, hps, keys, orders[e], task.data, e)
        return m.val_accuracy

    t_loop = bench.timeit(loop, repeat=repeat, number=1, warmup=1).best
    t_vmap = bench.timeit(vmapped, repeat=repeat, number=1, warmup=1).best
    compile_single, compile_vmap = c1 + c2, c3 + c4
    separate = configs if separate is None else max(1, min(int(separate), configs))
    start = time.perf_counter()
    for i in range(separate):
        _separately_jitted(task, members[i], keys[i], orders, shape)
    separately_jitted = (time.perf_counter() - start) / separate * configs
    flops = training_flops(task, configs)
    dispatch = dispatch_seconds()
    return {
        "vmap_configs": configs, "epochs": task.epochs, "batch_size": task.batch_size,
        "max_width": task.max_width,
        "vmap_speedup": (t_loop + compile_single) / (t_vmap + compile_vmap),
        "vmap_s": t_vmap + compile_vmap, "vmap_run_s": t_vmap, "vmap_compile_s": compile_vmap,
        "reused_program_s": t_loop + compile_single,
        "reused_program_run_s": t_loop, "reused_program_compile_s": compile_single,
        "vmap_speedup_vs_reused_program": t_loop / t_vmap,
        "vmap_speedup_vs_reused_program_with_compile": (t_loop + compile_single) / (t_vmap + compile_vmap),
        "separately_jitted_s": separately_jitted,
        "separately_jitted_measured_configs": separate,
        "vmap_speedup_vs_separately_jitted": separately_jitted / (t_vmap + compile_vmap),
        "matmul_flops": flops,
        "reused_program_gflops": flops / t_loop / 1e9, "vmap_gflops": flops / t_vmap / 1e9,
        "dispatch_s_per_call": dispatch,
        "reused_program_calls": configs * (task.epochs + 1), "vmap_calls": task.epochs + 1,
    }


def population_scaling(task: DigitsTask, sizes: Sequence[int] = (1, 4, 16, 64), epochs: int = 2,
                       repeat: int = 2, seed: int = 0) -> list[dict[str, Any]]:
    """Running seconds *per configuration* of the vmapped program at several population sizes
    (``epochs`` epochs each, compilation excluded, one compiled program per size). Where the
    time per member falls as the population grows, a fixed cost per step (per-operation
    overhead, dispatch, idle lanes) is being shared; where it stops falling, the hardware is
    full and batching gains nothing more."""
    from scalelab import bench

    if not sizes or min(sizes) < 1 or epochs < 1:
        raise ValueError(f"sizes must be >= 1 and epochs >= 1, got {sizes}, {epochs}")
    rows = []
    for n in sizes:
        hps = hyperparameter_arrays(sample(task.space, n, np.random.default_rng(seed)))
        keys = jax.random.split(task.key(seed), n)
        orders = [task.order(e, seed) for e in range(epochs)]
        states = init_population(keys, hps, features=task.features, classes=task.classes, max_width=task.max_width)

        def run(states=states, hps=hps, keys=keys, orders=orders):
            for e, order in enumerate(orders):
                states, m = population_epochs(states, hps, keys, order, task.data, e)
            return m.val_accuracy

        t = bench.timeit(run, repeat=repeat, number=1, warmup=1).best
        steps = epochs * (len(task.data.x_train) // task.batch_size)
        flops = n * steps * step_flops(task.features, task.max_width, task.classes, task.batch_size)
        rows.append({"population": n, "run s": t, "s per member": t / n, "gflops": flops / t / 1e9})
    return rows


@dataclasses.dataclass
class PBTResult:
    """Population-based training against the same population trained without exploit/explore."""

    accuracy: np.ndarray          # (epochs, population) validation accuracy, PBT
    baseline: np.ndarray          # (epochs, population) the same start, no exploit/explore
    hyperparameters: list[dict[str, np.ndarray]]   # per segment, before it
    replaced: list[list[tuple[int, int]]]          # per exploit step: (member replaced, source)
    interval: int

    @property
    def best_hyperparameters(self) -> dict[str, float]:
        last = self.hyperparameters[-1]
        i = int(np.argmax(self.accuracy[-1]))
        return {k: float(v[i]) for k, v in last.items()}


def explore(hp: dict[str, np.ndarray], members: np.ndarray, space: Space, rng: np.random.Generator,
            factors: tuple[float, float] = (0.8, 1.25), shift: float = 0.1) -> dict[str, np.ndarray]:
    """Perturb the hyperparameters of ``members``: log-scale dims are multiplied by a factor
    drawn from ``factors``, linear ones shifted by +-``shift`` of their range, all clipped to the
    space. Width is copied, not perturbed (it is tied to the copied weights)."""
    out = {k: v.copy() for k, v in hp.items()}
    for name, dim in space.items():
        if name == "width":
            continue
        v = out[name][members]
        if dim.log:
            v = v * rng.choice(factors, size=len(members))
        else:
            v = v + rng.choice([-shift, shift], size=len(members)) * (dim.high - dim.low)
        out[name][members] = np.clip(v, dim.low, dim.high)
    return out


def pbt(task: DigitsTask, population: int = 16, epochs: int | None = None, interval: int = 2,
        fraction: float = 0.25, seed: int = 0) -> PBTResult:
    """Population-based training (Jaderberg et al. 2017) on one vmapped program: every
    ``interval`` epochs the worst ``fraction`` of the population takes a copy of the weights,
    optimiser state and hyperparameters of a member of the best ``fraction`` (exploit) and
    perturbs the hyperparameters (explore). The baseline trains the same initial population
    without either (random search at the same cost)."""
    epochs = epochs or task.epochs
    if population < 2 or interval < 1 or epochs % interval:
        raise ValueError(f"need population >= 2 and epochs ({epochs}) a multiple of interval ({interval})")
    if not 0 < fraction <= 0.5:
        raise ValueError(f"fraction must be in (0, 0.5], got {fraction}")
    rng = np.random.default_rng(seed)
    hp = {k: np.asarray(v, np.float32) for k, v in sample(task.space, population, rng).items()}
    keys = jax.random.split(task.key(seed), population)
    init = init_population(keys, hyperparameter_arrays(hp), features=task.features, classes=task.classes,
                           max_width=task.max_width)
    q = max(1, round(fraction * population))
    states = {"pbt": init, "baseline": init}
    base_hp = hyperparameter_arrays(hp)
    accuracy: dict[str, list[np.ndarray]] = {"pbt": [], "baseline": []}
    hps, replaced = [], []
    for epoch in range(epochs):
        order = task.order(epoch, seed)
        if epoch % interval == 0:
            hps.append({k: v.copy() for k, v in hp.items()})
        states["pbt"], m = population_epochs(states["pbt"], hyperparameter_arrays(hp), keys, order, task.data, epoch)
        states["baseline"], mb = population_epochs(states["baseline"], base_hp, keys, order, task.data, epoch)
        acc = np.asarray(m.val_accuracy[:, 0])
        accuracy["pbt"].append(acc)
        accuracy["baseline"].append(np.asarray(mb.val_accuracy[:, 0]))
        if (epoch + 1) % interval or epoch + 1 == epochs:
            continue
        states["pbt"], hp, pairs = exploit_and_explore(states["pbt"], hp, acc, q, task.space, rng)
        replaced.append(pairs)
    return PBTResult(np.stack(accuracy["pbt"]), np.stack(accuracy["baseline"]), hps, replaced, interval)


def exploit_and_explore(states: State, hp: dict[str, np.ndarray], accuracy: np.ndarray, q: int, space: Space,
                        rng: np.random.Generator) -> tuple[State, dict[str, np.ndarray], list[tuple[int, int]]]:
    """One PBT step. Exploit: the ``q`` members with the lowest ``accuracy`` take a copy of
    the weights, optimiser state and hyperparameters of members drawn from the best ``q``.
    Explore: the copies' hyperparameters are perturbed (:func:`explore`). Returns the new
    states, the new hyperparameters and the ``(replaced member, source)`` pairs."""
    ranked = np.argsort(accuracy, kind="stable")
    worst, sources = ranked[:q], rng.choice(ranked[-q:], size=q)
    states = jax.tree.map(lambda a: a.at[worst].set(a[sources]), states)
    hp = {k: v.copy() for k, v in hp.items()}
    for k in hp:
        hp[k][worst] = hp[k][sources]
    hp = explore(hp, worst, space, rng)
    return states, hp, list(zip(worst.tolist(), sources.tolist(), strict=True))


def pbt_summary(result: PBTResult) -> dict[str, dict[str, float]]:
    """Validation accuracy after the last epoch, PBT and baseline: median, best, worst member,
    and the final accuracy of the members PBT replaced at its first exploit step."""
    first = sorted({w for w, _ in result.replaced[0]}) if result.replaced else []
    out = {}
    for name, acc in (("baseline", result.baseline), ("pbt", result.accuracy)):
        last = acc[-1]
        out[name] = {"median": float(np.median(last)), "best": float(last.max()), "worst": float(last.min()),
                     "first_replaced_mean": float(np.mean(last[first])) if first else math.nan}
    return out


# --------------------------------------------------------------------------- scaling out


def default_storage_dir() -> Path:
    """Where studies live by default: ``build/optuna`` in a checkout, else ``./optuna``
    (like the chapter-05 MLflow store)."""
    from scalelab import bench

    root = bench.results_dir().parent
    folder = root / ("build/optuna" if (root / "lib").is_dir() else "optuna")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class WorkerError(RuntimeError):
    """A worker process failed or overran its timeout; the message has its output."""


def worker(storage: str, study_name: str, trials: int, strategy: str = "tpe", seed: int = 0,
           worker_id: int = 0, epochs: int = 8, timeout: float | None = None, pruner: str | None = None,
           wait_for: int = 0) -> int:
    """Work ``trials`` trials of an existing study (one process of a distributed search).
    Each worker has its own sampler (seeded differently) and reads every other worker's
    trials from the shared storage before it samples. With ``wait_for`` > 1 the worker marks
    itself ready in the study once compiled and waits (up to ``timeout``) until that many
    workers are ready, so that the workers' trials run at the same time instead of being
    staggered by their start-up. Returns the trials it finished."""
    task = DigitsTask(epochs=epochs)
    objective = task.objective()
    # compile before taking trials, so that a trial's time in the study is its training time
    middle = {name: float(dim.from_unit(0.5)) for name, dim in task.space.items()}
    jax.block_until_ready(task.train(middle, epochs=1))
    storage_obj = open_storage(storage)
    sampler = make_sampler(strategy, task.space, trials, seed)
    with quiet_optuna(logging.ERROR):
        study = optuna.load_study(study_name=study_name, storage=storage_obj, sampler=sampler,
                                  pruner=make_pruner(pruner, epochs))
        if wait_for > 1:
            _start_together(study, worker_id, wait_for, timeout)

        def tagged(trial: optuna.Trial) -> float:
            trial.set_user_attr("worker", worker_id)
            trial.set_user_attr("pid", os.getpid())
            return objective(trial)

        before = len(study.trials)
        study.optimize(recording_failures(tagged), n_trials=trials, timeout=timeout, catch=(Exception,))
    return len(study.trials) - before


def _start_together(study: optuna.Study, worker_id: int, workers: int, timeout: float | None) -> None:
    """A barrier through the study's storage: mark this worker ready, wait until ``workers`` are."""
    study.set_user_attr(f"ready-{worker_id}", time.time())
    deadline = time.monotonic() + (timeout or 300.0)
    while sum(k.startswith("ready-") for k in study.user_attrs) < workers:
        if time.monotonic() > deadline:
            raise TimeoutError(f"worker {worker_id}: fewer than {workers} workers became ready")
        time.sleep(0.05)


def run_workers(storage: str | os.PathLike, study_name: str, workers: int = 3, trials: int = 4,
                strategy: str = "tpe", seed: int = 0, epochs: int = 8, timeout: float = 300.0,
                pruner: str | None = None) -> optuna.Study:
    """Create a study in ``storage`` and work it with ``workers`` processes at once
    (``python -m scalelab.hpo worker ...``), each doing ``trials`` trials; they start their
    trials together once all of them have compiled (see :func:`worker`). A worker that exits
    with an error, or overruns ``timeout`` seconds, stops the rest and raises WorkerError.
    Returns the study read back from the storage: every worker's trials in one place."""
    if workers < 1 or trials < 1:
        raise ValueError(f"workers and trials must be >= 1, got {workers}, {trials}")
    check_strategy(strategy)
    make_pruner(pruner, epochs)
    url = os.fspath(storage)
    with quiet_optuna():
        optuna.create_study(storage=open_storage(url), study_name=study_name, direction="maximize",
                            load_if_exists=True).set_user_attr("strategy", strategy)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("SCALELAB_CPU_DEVICES", None)
    env.pop("JAX_NUM_CPU_DEVICES", None)
    with tempfile.TemporaryDirectory() as tmp:
        procs, logs = [], []
        for i in range(workers):
            log = open(Path(tmp) / f"worker{i}.log", "w+", encoding="utf-8")
            cmd = [sys.executable, "-m", "scalelab.hpo", "worker", "--storage", url, "--study", study_name,
                   "--trials", str(trials), "--strategy", strategy, "--seed", str(seed + i),
                   "--worker-id", str(i), "--epochs", str(epochs), "--timeout", str(timeout),
                   "--pruner", pruner or "none", "--wait-for", str(workers)]
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
            logs.append(log)
        try:
            _wait_all(procs, logs, timeout)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            for log in logs:
                log.close()
    with quiet_optuna():
        return optuna.load_study(study_name=study_name, storage=open_storage(url))


def _tail(log, lines: int = 15) -> str:
    log.flush()
    log.seek(0)
    return "".join(log.readlines()[-lines:])


def _wait_all(procs: list[subprocess.Popen], logs: list, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        codes = [p.poll() for p in procs]
        for i, code in enumerate(codes):
            if code not in (None, 0):
                raise WorkerError(f"worker {i} exited with code {code}:\n{_tail(logs[i])}")
        if all(c == 0 for c in codes):
            return
        if time.monotonic() > deadline:
            slow = [i for i, c in enumerate(codes) if c is None]
            raise WorkerError(f"workers {slow} timed out after {timeout:.0f} s:\n{_tail(logs[slow[0]])}")
        time.sleep(0.1)


# --------------------------------------------------------------------------- tracking


def track_study(study: optuna.Study, experiment: str = "hpo", uri: str | None = None) -> list[str]:
    """Record every finished trial of ``study`` as an MLflow run of ``experiment`` (the
    chapter-05 tracker; default: its embedded store under ``build/``): hyperparameters as
    params, the per-epoch validation accuracy as the metric ``val_accuracy``, and tags
    ``optuna.study``, ``optuna.trial``, ``optuna.state``, ``hpo.strategy``. Trials already
    recorded (same study name and trial number: give studies unique names) are skipped.
    Returns the new run ids."""
    from mlflow.entities import Metric, Param, RunTag

    from scalelab import train

    mlflow = train.mlflow_experiment(uri, experiment)
    client = mlflow.MlflowClient()
    exp = mlflow.get_experiment_by_name(experiment)
    done = {r.data.tags.get("optuna.trial") for r in client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`optuna.study` = '{study.study_name}'", max_results=50_000)}
    strategy = str(study.user_attrs.get("strategy", "unknown"))
    run_ids = []
    for t in sorted(study.trials, key=lambda t: t.number):
        if t.state in (TrialState.RUNNING, TrialState.WAITING) or str(t.number) in done:
            continue
        tags = {"optuna.study": study.study_name, "optuna.trial": str(t.number), "optuna.state": t.state.name,
                "hpo.strategy": strategy}
        tags.update({f"optuna.{k}": str(v) for k, v in t.user_attrs.items()})
        run = client.create_run(exp.experiment_id, run_name=f"{study.study_name}-trial-{t.number}")
        stamp = int(1000 * (t.datetime_start.timestamp() if t.datetime_start else time.time()))
        values = sorted(t.intermediate_values.items()) or ([(0, t.value)] if t.value is not None else [])
        metrics = [Metric("val_accuracy", float(v), stamp, int(step)) for step, v in values]
        client.log_batch(run.info.run_id, metrics=metrics,
                         params=[Param(k, str(v)) for k, v in t.params.items()],
                         tags=[RunTag(k, v) for k, v in tags.items()])
        client.set_terminated(run.info.run_id, status="FAILED" if t.state == TrialState.FAIL else "FINISHED")
        run_ids.append(run.info.run_id)
    return run_ids


# --------------------------------------------------------------------------- tables and benchmark


def synthetic_summary(result: Mapping[str, Any]) -> dict[str, Any]:
    """The figures of a :func:`bergstra_synthetic` result."""
    grid_regret, random_regret = np.asarray(result["grid"]), np.asarray(result["random"])
    return {"budget": int(result["budget"]), "grid_points": int(result["grid_points"]), "seeds": len(grid_regret),
            "grid_values_of_the_dim_that_matters": int(result["grid_values_of_x0"]),
            "median_regret_grid": float(np.median(grid_regret)), "median_regret_random": float(np.median(random_regret)),
            "random_better_fraction": float(np.mean(random_regret < grid_regret))}


def strategy_table(results: Mapping[str, StrategyResult]) -> list[dict[str, Any]]:
    return [r.row() for r in results.values()]


def summary(results: Mapping[str, StrategyResult], vmap: Mapping[str, Any],
            synthetic: Mapping[str, Any] | None = None,
            pruning: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The ``hpo`` benchmark's JSON from a strategy comparison, a vmap measurement and
    (optionally) the synthetic grid-vs-random check and a :func:`pruning_effect` table."""
    out: dict[str, Any] = dict(vmap)
    out["strategies"] = {
        name: {"median_best_val_accuracy": float(np.median(r.best)), "mean_best_val_accuracy": float(np.mean(r.best)),
               "std_best_val_accuracy": float(np.std(r.best)), "budget": r.budget, "seeds": len(r.seeds),
               "trials_run": float(np.mean(r.trials)), "seconds_per_study": r.seconds / len(r.seeds)}
        for name, r in results.items()}
    if synthetic is not None:
        out["synthetic_1_of_4_dims"] = dict(synthetic)
    if pruning is not None:
        out["pruners"] = {row["pruner"]: {"median_best_val_accuracy": row["median best val acc"],
                                          "mean_best_val_accuracy": row["mean best val acc"],
                                          "epochs_trained": row["epochs trained"], "epochs_saved": row["epochs saved"],
                                          "trials_pruned": row["trials pruned"], "trials": row["trials"],
                                          "seeds": row["seeds"]} for row in pruning}
    return out


def bench_hpo(quick: bool = False) -> dict[str, Any]:
    """Benchmark ``hpo``: grid / random / TPE / CMA-ES on the digits MLP at equal budget (median
    best validation accuracy over seeds), grid vs random on a synthetic objective where one
    of four dims matters, TPE without a pruner and with the median, ASHA and Hyperband pruners
    at equal budget, and 64 configurations trained by one vmapped program vs a loop reusing one
    compiled program (the headline) and vs separately jitted runs."""
    budget, seeds = (16, 3) if quick else (36, 5)
    task = DigitsTask()
    results = compare_strategies(task, budget=budget, seeds=range(seeds))
    synthetic = synthetic_summary(bergstra_synthetic(budget=16, seeds=1000))
    pruning = pruning_effect(task, budget, range(seeds))
    vmap = vmap_benchmark(task, configs=64, repeat=2 if quick else 3, separate=8 if quick else 16)
    return summary(results, vmap, synthetic, pruning)


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scalelab.hpo")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker", help="work trials of a shared study (one of several processes)")
    w.add_argument("--storage", required=True, help="database URL (sqlite:///..., postgresql://...) or journal file")
    w.add_argument("--study", required=True, help="study name (created beforehand)")
    w.add_argument("--trials", type=int, required=True)
    w.add_argument("--strategy", default="tpe", choices=sorted(STRATEGIES))
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--worker-id", type=int, default=0)
    w.add_argument("--epochs", type=int, default=8)
    w.add_argument("--timeout", type=float, default=None, help="seconds; no new trial starts after it")
    w.add_argument("--pruner", default="none", choices=PRUNERS)
    w.add_argument("--wait-for", type=int, default=0, help="start trials once this many workers are ready")
    args = parser.parse_args(argv)
    done = worker(args.storage, args.study, args.trials, args.strategy, args.seed, args.worker_id,
                  args.epochs, args.timeout, args.pruner, args.wait_for)
    print(f"worker {args.worker_id} (pid {os.getpid()}): {done} trials of study {args.study!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
