import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from scalelab import data, models, train


@pytest.fixture(scope="module")
def digits():
    s = data.load_digits()
    return s


def _params(model):
    return jax.tree.leaves(nnx.state(model, nnx.Param))


def _mlp(seed=0, hidden=(16,)):
    return models.MLP(64, 10, hidden=hidden, rngs=nnx.Rngs(seed))


def test_train_step_matches_manual_update(digits):
    x, y = jnp.asarray(digits.x_train[:32]), jnp.asarray(digits.y_train[:32])
    m1, m2 = _mlp(), _mlp()
    o1 = nnx.Optimizer(m1, optax.sgd(0.5), wrt=nnx.Param)
    train.train_step(m1, o1, x, y)
    grads = nnx.grad(lambda m: train.cross_entropy(m, x, y)[0])(m2)
    expected = jax.tree.map(lambda p, g: p - 0.5 * g, nnx.state(m2, nnx.Param), grads)
    for a, b in zip(_params(m1), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_trainer_step_equals_plain_step(digits):
    m1, m2 = _mlp(1), _mlp(1)
    o1 = nnx.Optimizer(m1, optax.adam(1e-2), wrt=nnx.Param)
    trainer = train.Trainer(m2, optax.adam(1e-2))
    for xb, yb in train.array_batches(digits.x_train, digits.y_train, 64, seed=0):
        train.train_step(m1, o1, xb, yb)
        trainer.step(xb, yb)
    for a, b in zip(_params(m1), _params(m2), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert trainer.steps == len(digits.y_train) // 64


@settings(max_examples=10, deadline=None)
@given(st.sampled_from([2, 4, 8, 16]), st.integers(0, 1000))
def test_gradient_accumulation_equals_large_batch(k, seed):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.random((64, 64), dtype=np.float32))
    y = jnp.asarray(rng.integers(0, 10, 64).astype(np.int32))
    m1, m2 = _mlp(seed), _mlp(seed)
    o1 = nnx.Optimizer(m1, optax.sgd(0.1), wrt=nnx.Param)
    o2 = nnx.Optimizer(m2, optax.sgd(0.1), wrt=nnx.Param)
    train.accumulated_step(m1, o1, x, y, micro_batches=1)
    train.accumulated_step(m2, o2, x, y, micro_batches=k)
    for a, b in zip(_params(m1), _params(m2), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_accumulation_rejects_uneven_split():
    with pytest.raises(ValueError, match="equal micro-batches"):
        train.mean_grads(_mlp(), jnp.ones((10, 64)), jnp.zeros(10, jnp.int32), 3)


def test_grad_memory_shrinks_with_micro_batches():
    m = models.MLP(64, 10, hidden=(256, 256), rngs=nnx.Rngs(0))
    one = train.grad_memory_bytes(m, 1024, 64, 1)
    eight = train.grad_memory_bytes(m, 1024, 64, 8)
    assert eight["temp"] < one["temp"] and eight["argument"] == one["argument"]


def test_fit_history_and_accuracy(digits):
    trainer = train.Trainer(_mlp(hidden=(64,)), optax.adam(1e-2))
    hist = train.fit(trainer, (digits.x_train, digits.y_train), val=(digits.x_test, digits.y_test),
                     epochs=5, classes=10, progress=False)
    assert [h["epoch"] for h in hist] == list(range(5))
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds", "steps"} <= set(hist[0])
    assert hist[-1]["val_accuracy"] > 0.9 and hist[-1]["train_loss"] < hist[0]["train_loss"]


def test_fit_reports_the_nan_step(digits):
    x = digits.x_train.copy()
    order = np.random.default_rng([0, 0]).permutation(len(x))
    x[order[64 * 3 + 5]] = np.nan  # in the 4th batch of epoch 0
    trainer = train.Trainer(_mlp(), optax.adam(1e-3))
    with pytest.raises(train.TrainingDiverged, match=r"at step 4 \(epoch 0, batch 3\)"):
        train.fit(trainer, (x, digits.y_train), epochs=1, classes=10, progress=False)


def test_fit_bad_input(digits):
    trainer = train.Trainer(_mlp(), optax.adam(1e-3))
    with pytest.raises(ValueError, match=r"labels must be in 0\.\.9"):
        train.fit(trainer, (digits.x_train, digits.y_train + 1), epochs=1, classes=10, progress=False)
    with pytest.raises(ValueError, match=r"expects inputs of shape \(batch, 64\)"):
        train.fit(trainer, (digits.x_train[:, :32], digits.y_train), epochs=1, classes=10, progress=False)
    with pytest.raises(ValueError, match="labels must be integers"):
        train.check_data(trainer.model, digits.x_train, digits.y_train.astype(float), 10)
    with pytest.raises(ValueError, match="epochs"):
        train.fit(trainer, (digits.x_train, digits.y_train), epochs=0)


def test_patience_rule_and_early_stopping():
    vals = [0.5, 0.7, 0.8, 0.79, 0.8, 0.78, 0.81, 0.8, 0.8, 0.8]
    assert train.patience_stop(vals, patience=2) == 4
    assert train.patience_stop(vals, patience=3) == 5
    assert train.patience_stop(vals, patience=4) == 9  # never triggers: the last epoch
    assert train.patience_stop([0.1, 0.2], patience=5) == 1
    es = train.EarlyStopping(patience=2, restore_best=False)
    stop = next(e for e, v in enumerate(vals) if es.on_epoch_end(None, e, {"val_accuracy": v}))
    assert stop == 4 and es.best_epoch == 2
    with pytest.raises(KeyError, match="monitors"):
        train.EarlyStopping().on_epoch_end(None, 0, {"loss": 1.0})
    with pytest.raises(ValueError, match="patience"):
        train.EarlyStopping(patience=0)


def test_early_stopping_restores_best(digits):
    trainer = train.Trainer(_mlp(), optax.adam(1e-2))
    es = train.EarlyStopping(patience=2, restore_best=True)
    hist = train.fit(trainer, (digits.x_train, digits.y_train), val=(digits.x_test, digits.y_test),
                     epochs=30, classes=10, callbacks=[es], progress=False)
    restored = trainer.evaluate(digits.x_test, digits.y_test)["accuracy"]
    assert restored == pytest.approx(max(h["val_accuracy"] for h in hist), abs=1e-6)
    assert es.stopped_epoch is None or len(hist) == es.stopped_epoch + 1


def test_batches_are_deterministic(digits, tmp_path):
    a = [y for _, y in train.array_batches(digits.x_train, digits.y_train, 100, seed=3, epoch=1)]
    b = [y for _, y in train.array_batches(digits.x_train, digits.y_train, 100, seed=3, epoch=1)]
    c = [y for _, y in train.array_batches(digits.x_train, digits.y_train, 100, seed=3, epoch=2)]
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True)) and not np.array_equal(a[0], c[0])
    path = data.write_store(tmp_path / "d.h5", {"x": digits.x_train, "y": digits.y_train}, "test")
    got = np.concatenate([y for _, y in train.store_batches(path, 64, epoch=0)])
    assert len(got) == 64 * (len(digits.y_train) // 64)
    with pytest.raises(ValueError, match="rows"):
        next(train.array_batches(digits.x_train, digits.y_train[:5], 10))


def test_tracker_records_and_reads_back(digits, tmp_path):
    uri = "sqlite:///" + str(tmp_path / "mlflow.db")
    for lr in (1e-3, 3e-2):
        recipe = train.Recipe(learning_rate=lr, epochs=3, hidden=(32,))
        tracker = train.MlflowTracker("unit", run_name=f"lr{lr}", uri=uri, tags={"purpose": "test"})
        train.run_recipe(recipe, digits.x_train, digits.y_train, (digits.x_test, digits.y_test), 10,
                         callbacks=[tracker], progress=False)
    runs = train.search_runs("unit", uri=uri)
    assert len(runs) == 2
    assert runs[0].data.metrics["val_accuracy"] >= runs[1].data.metrics["val_accuracy"]
    run = runs[0]
    assert run.data.params["epochs"] == "3" and run.data.tags["purpose"] == "test"
    assert "git_commit" in run.data.tags and "scalelab_version" in run.data.tags
    assert len(train.metric_history(run.info.run_id, "val_accuracy", uri=uri)) == 3
    import mlflow

    names = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(run.info.run_id)}
    assert names == {"history.json", "params.npz"}
    local = mlflow.MlflowClient(uri).download_artifacts(run.info.run_id, "history.json", str(tmp_path))
    assert len(json.loads(open(local).read())) == 3


def test_recipe_errors():
    with pytest.raises(ValueError, match="model must be"):
        train.Recipe(model="rnn").build(64, 10)
    with pytest.raises(ValueError, match="square"):
        train.Recipe(model="cnn").build(60, 10)


def test_transfer_experiment_smoke(digits):
    src, tgt, tt = digits.y_train < 5, digits.y_train >= 5, digits.y_test >= 5
    rows = train.transfer_experiment(digits.x_train[src], digits.y_train[src], digits.x_train[tgt],
                                     digits.y_train[tgt] - 5, digits.x_test[tt], digits.y_test[tt] - 5,
                                     labels_per_class=[2], seeds=(0,), pretrain_epochs=2, epochs=2)
    assert {r["strategy"] for r in rows} == {"scratch", "frozen backbone", "fine-tune"}
    table = train.summarize_transfer(rows)
    assert table[0]["labels per class"] == 2 and 0 <= table[0]["fine-tune"] <= 1


def test_frozen_backbone_does_not_change(digits):
    model, source = _mlp(0), _mlp(5)
    train._copy_backbone(model, source)
    before = [np.asarray(p) for p in jax.tree.leaves(nnx.state(model, train.BACKBONE))]
    trainer = train.Trainer(model, optax.adam(1e-2), wrt=nnx.All(nnx.Param, nnx.PathContains("head")))
    train.fit(trainer, (digits.x_train, digits.y_train), epochs=1, progress=False)
    after = jax.tree.leaves(nnx.state(model, train.BACKBONE))
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    src = jax.tree.leaves(nnx.state(source, train.BACKBONE))
    assert all(np.array_equal(a, b) for a, b in zip(before, src, strict=True))
