"""Chapter 06: MapReduce, parameter server vs all-reduce, ring all-reduce, collectives."""

import collections
import dataclasses

import jax
import matplotlib.pyplot as plt
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scalelab import data
from scalelab import distributed as dist


@pytest.fixture(scope="module")
def split():
    return data.load_digits()


@pytest.fixture(scope="module")
def small(split):
    """A smaller split so the simulations stay fast."""
    return dataclasses.replace(split, x_train=split.x_train[:400], y_train=split.y_train[:400])


# --------------------------------------------------------------------------- decomposition


def test_forest_is_identical_for_every_worker_count(split):
    runs = dist.forest_scaling(split, trees=16, worker_counts=[1, 2], repeat=1)
    assert [r.workers for r in runs] == [0, 1, 2]
    assert len({r.votes_checksum for r in runs}) == 1
    assert len({r.accuracy for r in runs}) == 1
    assert runs[0].accuracy > 0.85  # 16 trees on the digits
    assert runs[0].startup_s == 0 and all(r.startup_s > 0 for r in runs[1:])
    sp = dist.speedups(runs)
    assert sp[1] == 1.0 and sp[2] > 0
    fig = dist.plot_speedup(runs)
    assert "worker processes" in fig.get_supxlabel() and "host CPU" in fig.get_supxlabel()
    plt.close(fig)


def test_votes_checksum_tells_forests_apart():
    votes = np.array([[3, 1], [0, 4]])
    assert dist.votes_checksum(votes) == dist.votes_checksum(votes.astype(np.int32))
    assert dist.votes_checksum(votes) != dist.votes_checksum(votes[::-1])


def test_forest_bad_input(split):
    with pytest.raises(ValueError, match="workers"):
        dist.train_forest(split, 4, workers=-1)
    with pytest.raises(ValueError, match="trees"):
        dist.train_forest(split, 0, workers=0)
    with pytest.raises(ValueError, match="worker count"):
        dist.forest_scaling(split, 4, [0])
    with pytest.raises(ValueError, match="workers=1"):
        dist.speedups([dist.ForestRun(2, 4, 1.0, 0.1, 0.9, 0)])


# --------------------------------------------------------------------------- MapReduce


def _words(doc):
    return [(w, 1) for w in doc]


@settings(max_examples=40, deadline=None)
@given(docs=st.lists(st.lists(st.sampled_from("abcdefg"), max_size=8), max_size=30),
       partitions=st.integers(1, 7), combine=st.booleans())
def test_word_count_equals_counter(docs, partitions, combine):
    got = dist.map_reduce(docs, _words, dist.add, partitions, combine)
    assert got == collections.Counter(w for doc in docs for w in doc)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 60), cols=st.integers(1, 5), partitions=st.integers(1, 8),
       seed=st.integers(0, 2**16))
def test_moments_equal_numpy(rows, cols, partitions, seed):
    x = np.random.default_rng(seed).normal(size=(rows, cols))
    mean, var = dist.moments_job(x, partitions)
    ref_mean, ref_var = dist.numpy_moments(x)
    assert np.allclose(mean, ref_mean) and np.allclose(var, ref_var)


def test_shuffle_routes_each_key_to_one_partition():
    mapped = [[("a", 1), ("b", 2)], [("a", 3), ("c", 4)]]
    buckets = dist.shuffle(mapped, 3)
    owners = {k: i for i, b in enumerate(buckets) for k in b}
    assert sorted(owners) == ["a", "b", "c"]
    assert buckets[owners["a"]]["a"] == [1, 3]
    assert all(dist.stable_partition(k, 3) == i for k, i in owners.items())


def test_combiner_shrinks_the_shuffle_not_the_result():
    docs = [["a"] * 10, ["a", "b"] * 5]
    plain = dist.run_map_reduce(docs, _words, dist.add, 2)
    combined = dist.run_map_reduce(docs, _words, dist.add, 2, combine=True)
    assert plain.output == combined.output == {"a": 15, "b": 5}
    assert plain.pairs_shuffled == plain.pairs_mapped == 20
    assert combined.pairs_shuffled == 3 and sum(combined.keys_per_partition) == 2


def test_least_squares_equals_numpy(split):
    x, y = dist.with_bias(split.x_train), dist.one_hot(split.y_train, split.classes)
    ref = dist.numpy_lstsq(x, y, ridge=1e-3)
    for partitions in (1, 3, 8):
        assert np.allclose(dist.lstsq_job(x, y, partitions, ridge=1e-3), ref)
    # a 1-D target, without ridge, on a well-conditioned problem
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 3)), rng.normal(size=50)
    assert np.allclose(dist.lstsq_job(a, b, 4), np.linalg.lstsq(a, b, rcond=None)[0])


def test_dask_bag_equals_numpy(split):
    x = split.x_train
    mean, var = dist.moments_job(x, 4, engine="dask", scheduler="sync")
    ref_mean, ref_var = dist.numpy_moments(x)
    assert np.allclose(mean, ref_mean) and np.allclose(var, ref_var)
    xb, y = dist.with_bias(x), dist.one_hot(split.y_train, split.classes)
    w = dist.lstsq_job(xb, y, 4, ridge=1e-3, engine="dask", scheduler="sync")
    assert np.allclose(w, dist.numpy_lstsq(xb, y, ridge=1e-3))
    docs = [["a", "b"], ["b"], [], ["c", "a", "a"]]
    assert dist.dask_bag_map_reduce(docs, _words, dist.add, 3) == {"a": 3, "b": 2, "c": 1}


@pytest.mark.slow
def test_dask_distributed_cluster_equals_numpy(split):
    x = split.x_train
    ref_mean, ref_var = dist.numpy_moments(x)
    with dist.local_cluster(2) as client:
        assert len(client.scheduler_info()["workers"]) == 2
        for _ in range(3):  # repeated calls on the same data must not share keys
            mean, var = dist.futures_moments(client, x, 4)
            assert np.allclose(mean, ref_mean) and np.allclose(var, ref_var)
        mean, var = dist.moments_job(x, 4, engine="dask", scheduler=client)
        assert np.allclose(mean, ref_mean) and np.allclose(var, ref_var)
    assert client.status == "closed"


def test_mapreduce_bad_input():
    with pytest.raises(ValueError, match="partitions"):
        dist.map_reduce([1], _words, dist.add, 0)
    with pytest.raises(ValueError, match="same number of rows"):
        dist.row_blocks(np.zeros((3, 2)), 2, y=np.zeros(4))
    with pytest.raises(ValueError, match="2-D"):
        dist.row_blocks(np.zeros(3), 2)
    with pytest.raises(ValueError, match="engine"):
        dist.moments_job(np.zeros((3, 2)), 2, engine="spark")
    with pytest.raises(ValueError, match="same number of rows"):
        dist.numpy_lstsq(np.zeros((3, 2)), np.zeros(2))
    with pytest.raises(ValueError, match="workers"):
        with dist.local_cluster(0):
            pass


# --------------------------------------------------------------------------- PS vs all-reduce


def test_async_with_no_staleness_and_one_worker_is_sync(small):
    task = dist.make_task(small, 1)
    sync = dist.train_sync(task, 30, 0.5, eval_every=5)
    asy = dist.train_async(task, 30, 0.5, tau=0, eval_every=5)
    assert np.array_equal(sync.loss, asy.loss) and np.array_equal(sync.accuracy, asy.accuracy)


def test_sync_step_is_one_large_batch_step(small):
    """The mean of N equal-size batch gradients is the gradient of their union."""
    task = dist.make_task(small, 4)
    w = np.random.default_rng(0).normal(size=(task.x.shape[1], task.classes))
    rows = [s[:8] for s in task.shards]
    mean = np.mean([dist.softmax_loss_grad(w, task.x[r], task.y[r])[1] for r in rows], axis=0)
    union = np.concatenate(rows)
    assert np.allclose(mean, dist.softmax_loss_grad(w, task.x[union], task.y[union])[1])


def test_softmax_gradient_matches_finite_differences(small):
    task = dist.make_task(small, 1)
    rng = np.random.default_rng(1)
    w = rng.normal(size=(task.x.shape[1], task.classes)) * 0.1
    x, y = task.x[:20], task.y[:20]
    _, g = dist.softmax_loss_grad(w, x, y)
    for i, j in [(0, 0), (10, 3), (64, 9)]:
        e = np.zeros_like(w)
        e[i, j] = 1e-6
        num = (dist.softmax_loss_grad(w + e, x, y)[0] - dist.softmax_loss_grad(w - e, x, y)[0]) / 2e-6
        assert abs(num - g[i, j]) < 1e-6


def test_sweep_is_deterministic_and_shaped(small):
    a = dist.staleness_sweep(small, workers=(2,), taus=(0, 4), steps=40, lr=0.5, eval_every=10)
    b = dist.staleness_sweep(small, workers=(2,), taus=(0, 4), steps=40, lr=0.5, eval_every=10)
    assert [c.label for c in a] == ["sync all-reduce, N=2", "async, tau=0", "async, tau=4"]
    for ca, cb in zip(a, b, strict=True):
        assert np.array_equal(ca.loss, cb.loss)
        assert list(ca.steps) == [0, 10, 20, 30, 40] and ca.accuracy.shape == ca.loss.shape
    assert np.isclose(a[0].loss[0], np.log(10))  # zero weights: uniform prediction
    fig = dist.plot_convergence(a)
    assert "simulated in NumPy on the host CPU" in fig.get_supxlabel()
    plt.close(fig)


def test_heavy_staleness_hurts_in_this_setting(small):
    """Deterministic (fixed seed): at lr 0.5 a 32-step delay leaves the loss far higher."""
    task = dist.make_task(small, 2)
    fresh = dist.train_async(task, 200, 0.5, tau=0)
    stale = dist.train_async(task, 200, 0.5, tau=32)
    assert stale.final_loss > 2 * fresh.final_loss
    assert dist.steps_to_loss(fresh, 1.0) is not None


def test_async_schedule_staleness_and_time_model():
    model = dist.StepTimeModel()
    schedule, times = dist.async_schedule(model, 4, 400)
    stale = np.array([s for _, s in schedule])
    assert len(schedule) == 400 and np.all(np.diff(times) >= 0) and stale.min() >= 0
    assert abs(stale.mean() - 3) < 0.5  # N - 1 other updates land while one worker computes
    assert {w for w, _ in schedule} == {0, 1, 2, 3}
    sync = dist.sync_step_times(model, 8, 500)
    single = dist.sync_step_times(model, 1, 500)
    assert sync.mean() > single.mean()  # waiting for the slowest of 8
    rows = dist.straggler_table(model, [1, 4], steps=200)
    assert rows[0]["sync utilisation"] == pytest.approx(1.0, abs=0.1)
    assert rows[1]["sync utilisation"] < 1
    no_noise = dist.StepTimeModel(sigma=0.0, p_straggler=0.0)
    assert np.allclose(dist.sync_step_times(no_noise, 8, 10), 1.0)


def test_wallclock_comparison_curves(small):
    curves = dist.wallclock_comparison(small, 2, 20, 0.5, eval_every=5)
    assert [c.workers for c in curves] == [2, 2, 2]
    sync, scaled, asy = curves
    assert sync.gradients[-1] == scaled.gradients[-1] == asy.gradients[-1] == 40
    assert np.all(np.diff(sync.time) > 0) and np.all(np.diff(asy.time) > 0)
    fig = dist.plot_wallclock([curves])
    plt.close(fig)
    # time_to_loss reads the modelled time of the first evaluation at or below the target
    target = float(asy.loss[2])
    hit = dist.time_to_loss(asy, target)
    assert hit is not None and hit <= asy.time[2]
    assert dist.time_to_loss(asy, -1.0) is None
    with pytest.raises(ValueError, match="modelled time"):
        dist.time_to_loss(dataclasses.replace(asy, time=None), 1.0)


def test_plot_latency_names_both_sides():
    fig = dist.plot_latency([8, 8000], [1e-2, 2e-2], [1e-4, 1e-3], workers=2)
    assert "psum on" in fig.get_supxlabel() and "Dask with 2 worker" in fig.get_supxlabel()
    plt.close(fig)
    with pytest.raises(ValueError, match="one Dask and one psum"):
        dist.plot_latency([8], [1e-2, 2e-2], [1e-4], workers=2)


def test_ps_bad_input(small):
    task = dist.make_task(small, 2)
    with pytest.raises(ValueError, match="tau"):
        dist.train_async(task, 10, 0.5, tau=-1)
    with pytest.raises(ValueError, match="workers"):
        dist.make_task(small, 0)
    with pytest.raises(ValueError, match="lr"):
        dist.train_sync(task, 10, 0.0)
    with pytest.raises(ValueError, match="shapes"):
        dist.softmax_loss_grad(np.zeros((3, 10)), task.x[:4], task.y[:4])
    with pytest.raises(ValueError, match="worker 5"):
        dist.train_async(task, 2, 0.5, schedule=[(5, 0), (0, 0)])
    with pytest.raises(ValueError, match="schedule has"):
        dist.train_async(task, 5, 0.5, schedule=[(0, 0)])
    with pytest.raises(ValueError, match="step-time model"):
        dist.StepTimeModel(p_straggler=2.0)


# --------------------------------------------------------------------------- ring all-reduce


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("length", [1, 3, 8, 37])
def test_ring_allreduce_equals_psum(n, length):
    values = np.random.default_rng(n * 100 + length).normal(size=(n, length)).astype(np.float32)
    ring = dist.ring_allreduce(values)
    psum = dist.psum_allreduce(values)
    assert ring.shape == (n, length)
    assert np.allclose(ring, psum, rtol=1e-5, atol=1e-5)
    assert np.allclose(ring, np.tile(values.sum(0), (n, 1)), rtol=1e-5, atol=1e-5)


def test_ring_with_one_device_is_identity():
    values = np.arange(5.0, dtype=np.float32)[None]
    assert np.array_equal(dist.ring_allreduce(values), values)
    assert dist.count_ppermute_bytes(values) == (0, 0)


@pytest.mark.parametrize("n", [2, 4])
def test_ring_traffic_matches_the_formula(n):
    size_bytes = 4 * 1024  # float32 x 1024, divisible by n
    count, sent = dist.count_ppermute_bytes(np.zeros((n, 1024), np.float32))
    assert count == 2 * (n - 1)
    assert sent == dist.allreduce_bytes(size_bytes, n)["ring_per_device"]


def test_ring_local_rejects_indivisible_blocks():
    from jax.sharding import PartitionSpec as P

    mesh = dist.mesh_1d(2)
    fn = jax.shard_map(lambda b: dist.ring_allreduce_local(b[0], "i")[None], mesh=mesh,
                       in_specs=P("i"), out_specs=P("i"))
    with pytest.raises(ValueError, match="divisible"):
        jax.jit(fn)(np.zeros((2, 3), np.float32))


def test_bytes_formulas():
    b = dist.allreduce_bytes(1e9, 8)
    assert b["ring_per_device"] == pytest.approx(1.75e9)
    assert b["ps_server"] == 8e9 and b["ps_per_worker"] == 2e9 and b["direct_per_device"] == 7e9
    assert dist.allreduce_bytes(1e9, 1)["ring_per_device"] == 0
    assert dist.ring_seconds(1e9, 8, 100e9) == pytest.approx(0.0175)
    assert dist.ring_seconds(0, 8, 1e9, latency=1e-6) == pytest.approx(14e-6)
    fig = dist.plot_bytes([1, 2, 4, 8])
    assert "computed from the formulas" in fig.get_supxlabel()
    plt.close(fig)


def test_ring_bad_input():
    with pytest.raises(ValueError, match="device count"):
        dist.ring_allreduce(np.zeros((2, 4)), n=0)
    with pytest.raises(ValueError, match="one row per device"):
        dist.ring_allreduce(np.zeros((3, 4)), n=2)
    with pytest.raises(ValueError, match="devices requested"):
        dist.ring_allreduce(np.zeros((64, 4)))
    with pytest.raises(ValueError, match="n must be"):
        dist.allreduce_bytes(10, 0)
    with pytest.raises(ValueError, match="size"):
        dist.allreduce_bytes(-1, 2)
    with pytest.raises(ValueError, match="bandwidth"):
        dist.ring_seconds(1, 2, 0)
    with pytest.raises(ValueError, match="device count > 1"):
        dist.plot_bytes([1])


# --------------------------------------------------------------------------- collectives


@pytest.mark.parametrize("n", [1, 2, 4])
def test_collectives_match_numpy(n):
    out = dist.collectives(n, root=n - 1)
    assert set(out) == {"psum", "pmean", "all_gather", "psum_scatter", "all_to_all", "ppermute",
                        "broadcast"}
    for name, (got, expected) in out.items():
        assert got.shape == expected.shape, name
        assert np.allclose(got, expected), name


def test_collectives_bad_root():
    with pytest.raises(ValueError, match="root"):
        dist.collectives(2, root=2)


def test_mpi_table_names_every_collective():
    jax_names = " ".join(r["JAX (inside shard_map)"] for r in dist.MPI_TO_JAX)
    for name in ("psum", "pmean", "all_gather", "psum_scatter", "all_to_all", "ppermute"):
        assert f"lax.{name}(" in jax_names
    mpi = {r["MPI"].split()[0] for r in dist.MPI_TO_JAX}
    assert {"MPI_Allreduce", "MPI_Allgather", "MPI_Reduce_scatter", "MPI_Alltoall",
            "MPI_Sendrecv", "MPI_Bcast"} <= mpi


def test_ring_schedule_covers_every_chunk():
    rows = dist.ring_schedule(4)
    assert len(rows) == 2 * 3 and dist.ring_schedule(1) == []
    for device in range(4):
        sent = [r[f"device {device}"].split()[1] for r in rows if r["phase"] == "all-gather"]
        owned = str((device + 1) % 4)  # the chunk this device completed in reduce-scatter
        assert sent[0] == owned and len(set(sent)) == 3


# --------------------------------------------------------------------------- the staleness explorer


def test_staleness_model_is_the_chapters_training(split):
    """The model summarises staleness_sweep's runs: same curves, same steps to the target."""
    pred = dist.staleness_model(2, 4, 0.5, steps=60, target=1.0)
    sync, *asyncs = dist.staleness_sweep(split, workers=(2,), taus=(4,), steps=60, lr=0.5, eval_every=10)
    assert pred["sync_loss"] == [float(v) for v in sync.loss]
    assert pred["async_loss"] == [float(v) for v in asyncs[0].loss]
    assert pred["steps"] == [int(s) for s in sync.steps]
    assert pred["sync_final_loss"] == sync.final_loss and pred["async_final_loss"] == asyncs[0].final_loss
    assert pred["sync_steps_to_target"] == dist.steps_to_loss(sync, 1.0)
    assert pred["async_steps_to_target"] == dist.steps_to_loss(asyncs[0], 1.0)
    assert pred["sync_gradients_to_target"] == 2 * pred["sync_steps_to_target"]
    assert pred["start_loss"] == pytest.approx(np.log(10)) and pred["sync_loss"][0] == pytest.approx(np.log(10))


def test_staleness_model_invariants():
    fresh = dist.staleness_model(1, 0, 0.5, steps=50)
    # one worker and no delay: the async server IS synchronous SGD
    assert fresh["sync_loss"] == fresh["async_loss"] and not fresh["async_diverged"]
    again = dist.staleness_model(1, 0, 0.5, steps=50)
    assert again == fresh  # deterministic
    # an enormous rate with a long delay: the stale updates overshoot, the loss ends above its start
    wild = dist.staleness_model(4, 64, 5.0, steps=200)
    assert wild["async_diverged"] and wild["async_final_loss"] > wild["start_loss"]
    assert wild["async_steps_to_target"] is None and wild["async_gradients_to_target"] is None
    for key in ("sync_final_loss", "async_final_loss", "sync_accuracy", "async_accuracy", "start_loss"):
        assert type(wild[key]) is float
    assert type(wild["async_diverged"]) is bool


def test_staleness_model_refuses_bad_settings():
    for kwargs, match in [({"workers": 0}, "workers"), ({"tau": -1}, "tau"), ({"lr": 0.0}, "lr"),
                          ({"lr": float("inf")}, "lr"), ({"steps": 0}, "steps"), ({"target": 0}, "target"),
                          ({"workers": 2.5}, "workers")]:
        args = {"workers": 2, "tau": 0, "lr": 0.5, "steps": 10, **kwargs}
        with pytest.raises(ValueError, match=match):
            dist.staleness_model(**args)


def test_staleness_explorer_follows_its_controls():
    e = dist.staleness_explorer(steps=60)
    assert e.prediction == dist.staleness_model(**e.settings, **e.context)
    e.set(tau=10, workers=8)
    assert e.settings["tau"] == 10 and e.settings["workers"] == 8
    assert e.prediction == dist.staleness_model(**e.settings, **e.context)
    bundle = e._repr_mimebundle_()
    assert "image/png" in bundle and "async diverged" in bundle["text/plain"]
    assert 'data-model="scalelab.distributed:staleness_model"' in e.result.value
    assert e.button is None  # the model is the training: nothing separate to measure
