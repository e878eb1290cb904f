"""Chapter 12: exact resume, crash safety, architecture + coefficients, export, registry."""

import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import AxisType

from scalelab import checkpoint as ck
from scalelab import env

CFG = ck.ModelConfig(hidden=(32, 16))


def _fresh():
    it, split = ck.digits_data(batch_size=16)
    state, step = ck.init_state(CFG)
    return state, step, it, split


def test_resume_is_bitwise_identical(tmp_path):
    state, step, it, _ = _fresh()
    reference, _ = ck.train(state, step, it, 8)
    state, step, it, _ = _fresh()
    mngr = ck.manager(tmp_path, every=4, keep=2)
    ck.train(state, step, it, 6, mngr)  # saves at 4; steps 5-6 are lost with the process
    mngr.wait_until_finished()
    state, step, it, _ = _fresh()  # a new process would start like this
    restored = ck.restore(ck.manager(tmp_path, every=4, keep=2), state, it)
    assert int(restored["step"]) == 4
    resumed, _ = ck.train(restored, step, it, 4)
    assert ck.bitwise_equal(resumed, reference)


def test_every_k_and_keep_last_n(tmp_path):
    state, step, it, _ = _fresh()
    mngr = ck.manager(tmp_path, every=2, keep=2)
    ck.train(state, step, it, 10, mngr)
    mngr.wait_until_finished()
    assert mngr.all_steps() == [8, 10]


def test_crash_in_the_middle_of_an_async_save(tmp_path):
    r = ck.crash_during_save(tmp_path / "run", steps=8, every=2, kill_at=4, ballast_mb=32)
    assert r["killed_at_step"] == 4
    if r["tmp_folders_at_kill"]:  # caught mid-write: the partial step is not a checkpoint
        assert 4 not in r["complete_steps_after_crash"]
    assert r["resumed_from_step"] == max(r["complete_steps_after_crash"])
    assert r["tmp_folders_after_restart"] == []  # the partial save was cleaned up
    assert r["final_step"] == 8 and r["equal_to_uninterrupted"]


def test_architecture_and_coefficients_rebuild_in_a_fresh_process(tmp_path):
    state, step, it, split = _fresh()
    state, _ = ck.train(state, step, it, 5)
    directory = ck.save_model(tmp_path / "model", CFG, state["params"], {"val_accuracy": 0.5})
    model, cfg, meta = ck.load_model(directory)
    assert cfg == CFG and meta["metrics"] == {"val_accuracy": 0.5} and "scalelab_version" in meta["code"]
    logits, printed = ck.rebuild_elsewhere(directory, split.x_test[:7])
    np.testing.assert_array_equal(logits, np.asarray(model(split.x_test[:7])))
    assert "hidden=(32, 16)" in printed


def test_restore_onto_another_mesh(tmp_path):
    state, *_ = _fresh()
    devices = env.devices(4)
    dp = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,), devices=devices)
    replicated = jax.device_put(state["params"], jax.sharding.NamedSharding(dp, jax.sharding.PartitionSpec()))
    directory = ck.save_model(tmp_path / "m", CFG, replicated)
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2, devices=devices)
    restored = ck.restore_params_onto(directory, CFG, ck.model_parallel_shardings(state["params"], mesh))
    kernel = restored["layers"][0]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "model")
    assert kernel.addressable_shards[0].data.shape == (64, 16)
    assert ck.bitwise_equal(restored, state["params"])


def test_exported_model_runs_without_the_model_code(tmp_path):
    state, step, it, split = _fresh()
    state, _ = ck.train(state, step, it, 3)
    directory = ck.export_inference(tmp_path / "export", CFG, state["params"])
    model = CFG.build()
    ck.load_model(ck.save_model(tmp_path / "m", CFG, state["params"]))  # sanity: saved form loads
    reference, _, _ = ck.load_model(tmp_path / "m")
    for n in (1, 9):  # the batch dimension is symbolic
        probs, printed = ck.run_exported_elsewhere(directory, split.x_test[:n])
        expected = np.asarray(jax.nn.softmax(reference(split.x_test[:n]), axis=-1))
        np.testing.assert_allclose(probs, expected, rtol=1e-6, atol=1e-7)
        assert printed == "modules: []"  # no scalelab, flax or optax in that process
    del model


def test_registry_promotes_and_loads_by_name(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    from scalelab import train

    train.mlflow_experiment(uri, "ch12-test")
    state, *_ = _fresh()
    versions = []
    for acc in (0.5, 0.7):
        with mlflow.start_run() as run:
            mlflow.log_metric("val_accuracy", acc)
        d = ck.save_model(tmp_path / f"v{acc}", CFG, state["params"], {"val_accuracy": acc})
        versions.append(ck.register_version("digits", d, run.info.run_id))
    assert versions == [1, 2]
    ck.promote("digits", 2)
    _, cfg, info = ck.load_registered("digits")
    assert info["version"] == 2 and info["metrics"]["val_accuracy"] == 0.7 and cfg == CFG
    with pytest.raises(ck.CheckpointError, match="alias 'staging'"):
        ck.load_registered("digits", alias="staging")


def test_bad_input_is_named(tmp_path):
    state, step, it, _ = _fresh()
    mngr = ck.manager(tmp_path / "c", every=2)
    ck.train(state, step, it, 2, mngr)
    mngr.wait_until_finished()
    with pytest.raises(ck.CheckpointError, match=r"no checkpoint for step 7 .* available: \[1, 2\]"):
        ck.restore(mngr, state, step=7)
    other, _ = ck.init_state(ck.ModelConfig(hidden=(32, 8)))
    with pytest.raises(ck.CheckpointError, match=r"params/layers/1/kernel: checkpoint has shape \(32, 16\), "
                                                 r"target expects \(32, 8\)"):
        ck.restore(mngr, other)
    with pytest.raises(ck.CheckpointError, match="no complete checkpoint"):
        ck.restore(ck.manager(tmp_path / "empty"), state)
    # corrupt the largest array file of the checkpoint
    files = [p for p in Path(tmp_path / "c" / "2" / "state").rglob("*") if p.is_file()]
    max(files, key=lambda p: p.stat().st_size).write_bytes(b"garbage")
    with pytest.raises(ck.CheckpointError, match="could not be restored"):
        ck.restore(ck.manager(tmp_path / "c", every=2), state)
    with pytest.raises(ck.CheckpointError, match=r"config\.json missing"):
        ck.load_model(tmp_path)
    with pytest.raises(ck.CheckpointError, match="unknown configuration keys"):
        ck.ModelConfig.from_dict({"kind": "MLP", "width": 3})
    with pytest.raises(ValueError, match=">= 1"):
        ck.manager(tmp_path / "x", every=0)
    with pytest.raises(ValueError, match="kill_at"):
        ck.crash_during_save(tmp_path / "y", steps=8, every=2, kill_at=3)
    shutil.rmtree(tmp_path / "c")


def test_fsdp_shardings_split_the_largest_dividing_dimension():
    mesh = jax.make_mesh((4,), ("fsdp",), axis_types=(AxisType.Auto,), devices=env.devices(4))
    P = jax.sharding.PartitionSpec
    tree = {"k": np.zeros((64, 128)), "tall": np.zeros((12, 6)), "b": np.zeros(10), "s": np.zeros(())}
    specs = {k: s.spec for k, s in ck.fsdp_shardings(tree, mesh).items()}
    assert specs == {"k": P(None, "fsdp"), "tall": P("fsdp", None), "b": P(), "s": P()}


def test_sharded_state_restores_onto_fewer_devices(tmp_path):
    state, *_ = _fresh()
    P = jax.sharding.PartitionSpec

    def mesh(n):
        return jax.make_mesh((n,), ("fsdp",), axis_types=(AxisType.Auto,), devices=env.devices(n))

    sharded = jax.device_put(state, ck.fsdp_shardings(state, mesh(4)))
    it, _ = ck.digits_data(batch_size=16)
    m = ck.manager(tmp_path, asynchronous=False)
    ck.save(m, sharded, it, force=True)
    for n in (2, 1):
        back = ck.restore(ck.manager(tmp_path), jax.device_put(state, ck.fsdp_shardings(state, mesh(n))))
        kernel = back["params"]["layers"][0]["kernel"]
        assert kernel.sharding.spec == P("fsdp", None) and len(kernel.sharding.device_set) == n
        assert ck.bitwise_equal(back, state)


def test_raw_write_peer_writes_the_same_bytes(tmp_path):
    tree = {"a": np.arange(10, dtype=np.float32), "b": np.ones((3, 4), np.int32)}
    nbytes = 10 * 4 + 12 * 4
    assert ck.raw_write(tmp_path / "one", tree) == nbytes
    assert ck.folder_bytes(tmp_path / "one") == nbytes and ck.folder_files(tmp_path / "one") == 1
    assert ck.raw_write(tmp_path / "many", tree, durable=False, one_file=False) == nbytes
    assert ck.folder_files(tmp_path / "many") == 2
    assert (tmp_path / "one" / "0.bin").read_bytes() == tree["a"].tobytes() + tree["b"].tobytes()
