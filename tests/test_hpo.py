"""Chapter 09: search spaces, grids, Optuna strategies, failed trials, vmapped populations,
population-based training, shared-storage studies worked by several processes, tracking."""

import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optuna
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from optuna.trial import TrialState

from scalelab import hpo

# --------------------------------------------------------------------------- search space


@pytest.mark.parametrize("kwargs, match", [
    ({"low": 1.0, "high": 1.0}, "empty or inverted"),
    ({"low": 2.0, "high": 1.0}, "empty or inverted"),
    ({"low": 0.0, "high": 1.0, "log": True}, "log-scale range needs low > 0"),
    ({"low": -1e-3, "high": 1.0, "log": True}, "log-scale range needs low > 0"),
    ({"low": 0.5, "high": 3.0, "integer": True}, "integer bounds"),
    ({"low": float("nan"), "high": 1.0}, "finite"),
    ({"low": 0.0, "high": float("inf")}, "finite"),
])
def test_dim_rejects_bad_ranges(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hpo.Dim(**kwargs)


def test_dim_rejects_non_numbers():
    with pytest.raises(TypeError, match="must be a number"):
        hpo.Dim("0", 1.0)
    with pytest.raises(TypeError, match="must be a number"):
        hpo.Dim(True, 2.0)


def test_space_validation():
    with pytest.raises(ValueError, match="empty"):
        hpo.check_space({})
    with pytest.raises(TypeError, match="must be a Dim"):
        hpo.check_space({"lr": (1e-4, 1e-1)})
    with pytest.raises(TypeError, match="mapping"):
        hpo.check_space([hpo.Dim(0, 1)])
    with pytest.raises(ValueError, match="searches"):
        hpo.DigitsTask(space={"learning_rate": hpo.Dim(1e-4, 1e-1, log=True)})
    with pytest.raises(ValueError, match="dropout"):
        hpo.DigitsTask(space={**hpo.DIGITS_SPACE, "dropout": hpo.Dim(0.0, 1.0)})


dims = st.builds(
    lambda lo, span, log, integer: hpo.Dim(float(max(1, round(lo))) if integer else lo,
                                           float(max(1, round(lo)) + max(1, round(span))) if integer else lo + span,
                                           log=log, integer=integer),
    st.floats(1e-6, 1e3), st.floats(1e-3, 1e4), st.booleans(), st.booleans())


@given(dims, st.floats(0.0, 1.0))
def test_from_unit_stays_in_bounds_and_inverts(dim, u):
    value = float(dim.from_unit(u))
    assert dim.low <= value <= dim.high
    assert dim.contains(value)
    if not dim.integer:
        assert math.isclose(float(dim.to_unit(value)), u, abs_tol=1e-9)


@given(dims)
def test_unit_end_points_are_the_bounds(dim):
    assert float(dim.from_unit(0.0)) == dim.low
    assert float(dim.from_unit(1.0)) == dim.high


@given(st.floats(1e-8, 1.0), st.floats(1.5, 1e6))
def test_log_scale_midpoint_is_the_geometric_mean(low, ratio):
    dim = hpo.Dim(low, low * ratio, log=True)
    assert math.isclose(float(dim.from_unit(0.5)), math.sqrt(dim.low * dim.high), rel_tol=1e-9)


def test_from_unit_rejects_outside_the_unit_interval():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        hpo.Dim(0.0, 1.0).from_unit(1.5)


def test_random_sampling_is_log_uniform():
    draws = hpo.sample(hpo.DIGITS_SPACE, 20_000, np.random.default_rng(0))
    lr = draws["learning_rate"]
    assert lr.min() >= 1e-4 and lr.max() <= 1e-1
    # log-uniform on [1e-4, 1e-1]: each decade holds a third of the draws
    for lo in (1e-4, 1e-3, 1e-2):
        assert abs(np.mean((lr >= lo) & (lr < 10 * lo)) - 1 / 3) < 0.02
    width = draws["width"]
    assert np.all(width == np.round(width)) and width.min() >= 8 and width.max() <= 128
    assert abs(np.mean(draws["dropout"] < 0.25) - 0.5) < 0.02  # linear scale


# --------------------------------------------------------------------------- grids


def test_grid_counts_of_the_chapter_budgets():
    assert list(hpo.grid_counts(hpo.DIGITS_SPACE, 16).values()) == [2, 2, 2, 2]
    assert list(hpo.grid_counts(hpo.DIGITS_SPACE, 36).values()) == [3, 3, 2, 2]
    assert len(hpo.grid_points(hpo.DIGITS_SPACE, 36)) == 36
    with pytest.raises(ValueError, match="budget"):
        hpo.grid_counts(hpo.DIGITS_SPACE, 0)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 400))
def test_grid_uses_the_budget_and_covers_every_dim(ndims, budget):
    space = {f"x{i}": hpo.Dim(1e-3, 10.0, log=bool(i % 2)) for i in range(ndims)}
    counts = hpo.grid_counts(space, budget)
    assert math.prod(counts.values()) <= budget
    # maximal: no dim can get one more point within the budget
    for name in space:
        assert math.prod(counts.values()) // counts[name] * (counts[name] + 1) > budget
    if budget >= 2 ** ndims:                                       # every dim gets at least two values
        assert min(counts.values()) >= 2
    values = hpo.grid(space, budget)
    assert len(hpo.grid_points(space, budget)) == math.prod(counts.values())
    for name, dim in space.items():
        k = counts[name]
        g = dim.to_unit(np.asarray(values[name]))
        probe = np.linspace(0, 1, 101)
        # every value of the dim is within half a cell (on its scale) of a grid value
        assert np.max(np.min(np.abs(probe[:, None] - g[None, :]), axis=1)) <= 1 / (2 * k) + 1e-9


def test_integer_grid_never_repeats_values():
    space = {"n": hpo.Dim(1, 3, integer=True), "x": hpo.Dim(0.0, 1.0)}
    values = hpo.grid(space, 100)
    assert values["n"] == [1, 2, 3] and len(values["x"]) == 33


# --------------------------------------------------------------------------- Optuna strategies


def quadratic(space):
    def objective(trial):
        p = hpo.suggest(space, trial)
        return -sum((float(d.to_unit(p[k])) - 0.3) ** 2 for k, d in space.items())
    return objective


def test_unknown_strategy_and_pruner_are_clear_errors():
    with pytest.raises(ValueError, match="unknown strategy 'annealing'; expected one of grid, random, tpe"):
        hpo.make_sampler("annealing", hpo.DIGITS_SPACE, 8)
    with pytest.raises(ValueError, match="unknown strategy"):
        hpo.run_study(quadratic(hpo.DIGITS_SPACE), "bayes", 4, space=hpo.DIGITS_SPACE)
    with pytest.raises(ValueError, match="unknown pruner 'sha'; expected one of none, median, asha, hyperband"):
        hpo.make_pruner("sha", 8)
    with pytest.raises(ValueError, match="unknown strategy"):
        hpo.run_workers("unused.log", "s", strategy="nope")


@pytest.mark.parametrize("strategy", ["grid", "random", "tpe", "cmaes"])
def test_strategies_sample_inside_the_space(strategy):
    space = hpo.DIGITS_SPACE
    study = hpo.run_study(quadratic(space), strategy, 16, space=space, seed=1)
    assert len(study.trials) == 16
    for t in study.trials:
        assert t.state == TrialState.COMPLETE
        for name, dim in space.items():
            assert dim.contains(t.params[name]), (name, t.params[name])
    curve = hpo.best_so_far(study)
    assert np.all(np.diff(curve) >= 0) and curve[-1] == study.best_value
    if strategy == "grid":  # the grid study visits every grid point once
        seen = {tuple(t.params[k] for k in space) for t in study.trials}
        assert seen == {tuple(p[k] for k in space) for p in hpo.grid_points(space, 16)}


def test_grid_smaller_than_the_budget_stops_and_the_curve_is_padded():
    space = {"x": hpo.Dim(0.0, 1.0), "y": hpo.Dim(0.0, 1.0)}
    study = hpo.run_study(quadratic(space), "grid", 18, space=space)
    assert len(study.trials) == 16                 # 4 x 4 <= 18 < 5 x 4
    curve = hpo.best_so_far(study, 18)
    assert len(curve) == 18 and np.all(curve[16:] == curve[15])


def test_failed_trials_are_recorded_and_the_study_goes_on():
    def objective(trial):
        x = trial.suggest_float("x", 0.0, 1.0)
        if trial.number == 1:
            raise RuntimeError("injected failure")
        if trial.number == 2:
            return float("nan")
        return x

    study = hpo.run_study(objective, "random", 6, space={"x": hpo.Dim(0.0, 1.0)})
    states = [t.state for t in study.trials]
    assert len(states) == 6
    assert states[1] == TrialState.FAIL and states[2] == TrialState.FAIL
    assert states.count(TrialState.COMPLETE) == 4
    assert "injected failure" in study.trials[1].user_attrs["fail_reason"]
    assert "nan" in study.trials[2].user_attrs["fail_reason"]
    assert hpo.best_so_far(study)[-1] == study.best_value


def test_every_trial_failing_raises_with_the_reason():
    def objective(trial):
        trial.suggest_float("x", 0.0, 1.0)
        raise ValueError("always broken")

    with pytest.raises(RuntimeError, match=r"every trial of the random study failed.*always broken"):
        hpo.run_study(objective, "random", 3, space={"x": hpo.Dim(0.0, 1.0)})


# --------------------------------------------------------------------------- the training program


@pytest.fixture(scope="module")
def task():
    return hpo.DigitsTask(epochs=2)


def test_diverging_training_is_a_failed_trial(task):
    space = {**hpo.DIGITS_SPACE, "learning_rate": hpo.Dim(1e20, 1e30, log=True)}
    diverging, fine = hpo.DigitsTask(space=space, epochs=2).objective(), task.objective()

    def objective(trial):  # even trials diverge (absurd learning rates), odd ones are fine
        return diverging(trial) if trial.number % 2 == 0 else fine(trial)

    study = hpo.run_study(objective, "random", 4, space=task.space)
    states = [t.state for t in study.trials]
    assert states == [TrialState.FAIL, TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert "TrainingDiverged" in study.trials[0].user_attrs["fail_reason"]


def test_hyperparameters_outside_the_space_are_rejected(task):
    with pytest.raises(ValueError, match=r"learning_rate=2\.0 lies outside"):
        task.train({"learning_rate": 2.0, "weight_decay": 1e-4, "width": 32, "dropout": 0.1})
    with pytest.raises(ValueError, match="missing hyperparameters"):
        task.train({"learning_rate": 1e-3})


def test_masked_network_is_the_chapter_05_mlp_of_that_width(task):
    hp = {"learning_rate": 3e-3, "weight_decay": 1e-4, "width": 23, "dropout": 0.2}
    state, metrics = task.train(hp)
    model = hpo.to_mlp(state.params, 23)
    assert model.layers[0].kernel[...].shape == (64, 23)
    x = task.data.x_val
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(hpo.logits(state.params, x, 23.0)), atol=1e-5)
    acc = float(np.mean(np.argmax(np.asarray(model(x)), -1) == np.asarray(task.data.y_val)))
    assert acc == pytest.approx(float(metrics.val_accuracy[-1]), abs=1e-6)
    assert 0.5 < acc <= 1.0


def test_masked_units_get_no_gradient(task):
    hp = hpo.hyperparameter_arrays({"learning_rate": 1e-3, "weight_decay": 0.0, "width": 10, "dropout": 0.0})
    state = task.init(task.key(), hp)
    grads = jax.grad(hpo.loss_fn)(state.params, task.data.x_train[:32], task.data.y_train[:32], hp["width"], 0.0, None)
    assert float(jnp.abs(grads["hidden"]["kernel"][:, 10:]).max()) == 0.0
    assert float(jnp.abs(grads["head"]["kernel"][10:]).max()) == 0.0
    assert float(jnp.abs(grads["hidden"]["kernel"][:, :10]).max()) > 0.0


def test_vmapped_population_equals_the_loop_of_single_runs(task):
    hps = hpo.sample(task.space, 5, np.random.default_rng(3))
    result = hpo.population_vs_loop(task, hps)
    assert result["configs"] == 5
    assert result["max_loss_diff"] <= 1e-4
    assert result["max_param_diff"] <= 1e-3
    assert result["max_accuracy_diff"] <= 1 / len(task.data.y_val) + 1e-6  # at most one example flips
    np.testing.assert_allclose(result["val_accuracy_vmap"], result["val_accuracy_loop"], atol=0.004)


def test_pbt_copies_the_best_and_stays_in_the_space(task):
    result = hpo.pbt(task, population=5, epochs=2, interval=1, seed=0)  # 5: the programs of the test above
    assert result.accuracy.shape == result.baseline.shape == (2, 5)
    assert len(result.replaced) == 1 and len(result.replaced[0]) == 1
    worst, source = result.replaced[0][0]
    before, after = result.hyperparameters
    assert after["width"][worst] == before["width"][source]       # width travels with the weights
    for name, dim in task.space.items():
        assert all(dim.low <= v <= dim.high for v in after[name])
    # before the first exploit both populations are the same
    np.testing.assert_array_equal(result.accuracy[0], result.baseline[0])
    with pytest.raises(ValueError, match="multiple of interval"):
        hpo.pbt(task, population=5, epochs=3, interval=2)


def test_exploit_and_explore_copies_the_best_members(task):
    n, q = 5, 2
    hps = {k: np.asarray(v, np.float32) for k, v in hpo.sample(task.space, n, np.random.default_rng(2)).items()}
    keys = jax.random.split(task.key(2), n)
    states = hpo.init_population(keys, hpo.hyperparameter_arrays(hps), features=task.features,
                                 classes=task.classes, max_width=task.max_width)
    accuracy = np.asarray([0.5, 0.9, 0.1, 0.8, 0.3])
    before = {k: v.copy() for k, v in hps.items()}
    new_states, new_hp, pairs = hpo.exploit_and_explore(states, hps, accuracy, q, task.space,
                                                        np.random.default_rng(0))
    assert sorted(w for w, _ in pairs) == [2, 4]                      # the two worst
    assert all(src in (1, 3) for _, src in pairs)                     # copy one of the two best
    for w, src in pairs:
        for a, b in zip(jax.tree.leaves(new_states), jax.tree.leaves(states), strict=True):
            np.testing.assert_array_equal(np.asarray(a[w]), np.asarray(b[src]))   # weights and optimiser state
        assert new_hp["width"][w] == hps["width"][src]
        ratio = new_hp["learning_rate"][w] / hps["learning_rate"][src]
        clipped = new_hp["learning_rate"][w] in (task.space["learning_rate"].low, task.space["learning_rate"].high)
        assert clipped or np.isclose(ratio, 0.8, rtol=1e-5) or np.isclose(ratio, 1.25, rtol=1e-5)
    for i in (0, 1, 3):                                               # the others are untouched
        assert all(new_hp[k][i] == hps[k][i] for k in hps)
    assert all(np.array_equal(hps[k], before[k]) for k in hps)       # the inputs are not modified


def test_pbt_summary_reports_both_runs(task):
    result = hpo.pbt(task, population=5, epochs=2, interval=1, seed=0)
    summary = hpo.pbt_summary(result)
    assert set(summary) == {"baseline", "pbt"}
    for name, acc in (("baseline", result.baseline), ("pbt", result.accuracy)):
        assert summary[name]["worst"] == pytest.approx(float(acc[-1].min()))
        assert summary[name]["median"] == pytest.approx(float(np.median(acc[-1])))
    w = result.replaced[0][0][0]
    assert summary["pbt"]["first_replaced_mean"] == pytest.approx(float(result.accuracy[-1, w]))


def test_step_flops_counts_forward_and_backward_products(task):
    assert hpo.step_flops(64, 128, 10, 64) == 3 * 2 * 64 * (64 * 128 + 128 * 10)
    steps = len(task.data.x_train) // task.batch_size
    assert hpo.training_flops(task, 3) == 3 * 2 * steps * hpo.step_flops(64, 128, 10, 64)


def test_asha_prunes_behind_trials_at_its_rungs():
    pruner = hpo.make_pruner("asha", 8)
    assert isinstance(pruner, optuna.pruners.SuccessiveHalvingPruner)

    def objective(trial):
        x = trial.suggest_float("x", 0.0, 1.0)
        for step in range(8):
            trial.report(x * (step + 1), step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return x

    study = hpo.run_study(objective, "random", 12, space={"x": hpo.Dim(0.0, 1.0)}, pruner="asha", epochs=8)
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert pruned and all(max(t.intermediate_values) in (1, 3) for t in pruned)   # rungs at steps 1 and 3
    assert study.best_value == max(t.value for t in study.trials if t.state == TrialState.COMPLETE)


@given(st.lists(st.floats(1e-4, 1e-1), min_size=1, max_size=6), st.integers(0, 100))
def test_explore_stays_in_bounds(lrs, seed):
    n = len(lrs)
    hp = {"learning_rate": np.asarray(lrs), "weight_decay": np.full(n, 1e-6), "width": np.full(n, 8.0),
          "dropout": np.full(n, 0.5)}
    out = hpo.explore(hp, np.arange(n), hpo.DIGITS_SPACE, np.random.default_rng(seed))
    for name, dim in hpo.DIGITS_SPACE.items():
        assert np.all((out[name] >= dim.low) & (out[name] <= dim.high))
    assert np.all(out["width"] == 8.0)


def test_bergstra_synthetic_random_beats_grid_when_one_dim_matters():
    result = hpo.bergstra_synthetic(dims=4, important=1, budget=16, seeds=400)
    assert result["grid_points"] == 16 and result["grid_values_of_x0"] == 2
    assert np.median(result["random"]) < np.median(result["grid"])
    with pytest.raises(ValueError, match="important"):
        hpo.bergstra_synthetic(dims=2, important=3)


# --------------------------------------------------------------------------- scaling out and tracking


def test_shared_storage_study_worked_by_two_processes(tmp_path):
    study = hpo.run_workers(tmp_path / "study.log", "shared", workers=2, trials=2, epochs=2, timeout=240)
    assert len(study.trials) == 4
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert {t.user_attrs["worker"] for t in study.trials} == {0, 1}
    assert len({t.user_attrs["pid"] for t in study.trials}) == 2
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    # both workers marked themselves ready before either took a trial (the start barrier)
    ready = [v for k, v in study.user_attrs.items() if k.startswith("ready-")]
    assert len(ready) == 2
    assert max(ready) <= min(t.datetime_start.timestamp() for t in study.trials) + 1e-3


def test_start_barrier_times_out_when_a_worker_never_comes(tmp_path):
    with hpo.quiet_optuna():
        study = optuna.create_study(storage=hpo.open_storage(tmp_path / "j.log"), study_name="alone")
    with pytest.raises(TimeoutError, match="fewer than 2 workers"):
        hpo._start_together(study, 0, 2, timeout=0.3)


def test_a_failing_worker_process_is_reported(tmp_path):
    import subprocess

    logs = [open(tmp_path / "w.log", "w+", encoding="utf-8")]
    procs = [subprocess.Popen([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], stdout=logs[0])]
    with pytest.raises(hpo.WorkerError, match="worker 0 exited with code 3"):
        hpo._wait_all(procs, logs, timeout=60)
    slow = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], stdout=logs[0])]
    try:
        with pytest.raises(hpo.WorkerError, match="timed out"):
            hpo._wait_all(slow, logs, timeout=0.5)
    finally:
        slow[0].kill()
        slow[0].wait()
        logs[0].close()


def test_storage_kinds(tmp_path):
    journal = hpo.open_storage(tmp_path / "j.log")
    assert isinstance(journal, optuna.storages.JournalStorage)
    rdb = hpo.open_storage(f"sqlite:///{tmp_path / 's.db'}")
    assert isinstance(rdb, optuna.storages.RDBStorage)
    study = hpo.run_study(quadratic({"x": hpo.Dim(0.0, 1.0)}), "random", 3, space={"x": hpo.Dim(0.0, 1.0)},
                          storage=f"sqlite:///{tmp_path / 's.db'}", study_name="a")
    again = optuna.load_study(study_name="a", storage=f"sqlite:///{tmp_path / 's.db'}")
    assert len(again.trials) == len(study.trials) == 3
    with pytest.raises(ValueError, match="storage"):
        hpo.open_storage("")


def test_trials_land_in_mlflow_with_study_and_trial_tags(tmp_path):
    from scalelab import train

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = {"x": hpo.Dim(0.0, 1.0)}

    def objective(trial):
        x = trial.suggest_float("x", 0.0, 1.0)
        for step in range(3):
            trial.report(x * (step + 1) / 3, step)
        if trial.number == 2:
            raise RuntimeError("broken")
        return x

    study = hpo.run_study(objective, "random", 4, space=space, study_name="tracked")
    ids = hpo.track_study(study, "hpo-test", uri=uri)
    assert len(ids) == 4
    assert hpo.track_study(study, "hpo-test", uri=uri) == []      # already recorded
    runs = train.search_runs("hpo-test", uri=uri)
    tags = {r.data.tags["optuna.trial"]: r for r in runs}
    assert set(tags) == {"0", "1", "2", "3"}
    assert all(r.data.tags["optuna.study"] == "tracked" for r in runs)
    assert tags["2"].data.tags["optuna.state"] == "FAIL" and tags["2"].info.status == "FAILED"
    best = runs[0]
    assert best.data.metrics["val_accuracy"] == pytest.approx(study.best_value)
    assert len(train.metric_history(best.info.run_id, "val_accuracy", uri=uri)) == 3
