"""Chapter 08: tensor, FSDP and pipeline parallelism equal the unsharded computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from scalelab import env, parallel

SMALL = parallel.DeepMLP(width=16, hidden=32, layers=4)


@pytest.fixture(scope="module")
def rows():
    return parallel.compare_strategies(env.devices(4), SMALL, batch=16, steps=2, microbatches=4, time_repeat=1)


def test_every_strategy_equals_the_unsharded_step(rows):
    assert [r["strategy"] for r in rows] == list(parallel.STRATEGY_NAMES)
    for r in rows:
        assert r["max_abs_diff_vs_unsharded"] <= 1e-4, r["strategy"]


def test_sharding_divides_parameter_and_adam_bytes(rows):
    by = {r["strategy"]: r for r in rows}
    full = SMALL.param_count() * 4
    assert by["dp"]["param_bytes"] == full
    assert by["dp"]["opt_state_bytes"] == 2 * full + 4  # two moments and the step count
    for name in ("fsdp", "tp", "pp"):
        assert by[name]["param_bytes"] < full / 2, name
        assert by[name]["opt_state_bytes"] < full, name
    # the compiled program's arguments are exactly parameters + moments + the batch
    batch_bytes = 16 * 64 * 4 + 16 * 4
    assert by["dp"]["argument_bytes"] == by["dp"]["param_bytes"] + by["dp"]["opt_state_bytes"] + batch_bytes // 4


def test_collectives_and_cost_model(rows):
    by = {r["strategy"]: r for r in rows}
    assert set(by["dp"]["collectives"]) == {"all-reduce"}
    assert by["fsdp"]["collectives"]["all-gather"] >= 4 and by["fsdp"]["collectives"]["reduce-scatter"] >= 4
    assert by["pp"]["collectives"]["collective-permute"] >= 2
    for name in ("dp", "tp", "dp_tp"):  # GSPMD's collectives match the textbook model
        assert by[name]["comm_bytes_hlo"] == pytest.approx(by[name]["comm_bytes_model"], rel=1e-3, abs=64), name


def test_tensor_parallel_block_equals_unsharded():
    mesh = parallel.model_mesh(env.devices(4), ("model",))
    k = jax.random.split(jax.random.key(1), 3)
    w1, w2 = jax.random.normal(k[0], (16, 32)), jax.random.normal(k[1], (32, 16))
    b1, b2, x = jnp.zeros(32), jnp.ones(16), jax.random.normal(k[2], (8, 16))
    ref = parallel.mlp_block(x, w1, b1, w2, b2)
    specs = parallel.tp_block_specs()
    placed = [jax.device_put(a, NamedSharding(mesh, specs[n])) for n, a in zip(("w1", "b1", "w2", "b2"),
                                                                              (w1, b1, w2, b2), strict=True)]
    auto = jax.jit(parallel.mlp_block)(x, *placed)
    manual = parallel.tp_block_shard_map(mesh)(x, *placed)
    np.testing.assert_allclose(auto, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(manual, ref, rtol=1e-5, atol=1e-5)
    assert placed[0].addressable_shards[0].data.shape == (16, 8)  # each device a quarter of the columns


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(1, 20))
def test_gpipe_schedule_invariants(p, m):
    sched = parallel.gpipe_schedule(p, m)
    ticks = m + p - 1
    assert sched.shape == (p, 2 * ticks)
    for s in range(p):
        fwd, bwd = sched[s, :ticks], sched[s, ticks:]
        assert sorted(fwd[fwd >= 0]) == list(range(m)) and sorted(bwd[bwd >= 0]) == list(range(m))
        assert list(np.flatnonzero(fwd >= 0)) == list(range(s, s + m))  # micro-batch j at tick s + j
    assert parallel.bubble_fraction(sched) == pytest.approx(parallel.predicted_bubble(p, m))


@pytest.mark.parametrize("m", [1, 3, 4])
def test_executed_pipeline_follows_the_schedule(m):
    mesh = parallel.model_mesh(env.devices(4), ("stage",))
    bubble, busy = parallel.executed_bubble(mesh, m, SMALL)
    ticks = m + 3
    np.testing.assert_array_equal(busy, parallel.gpipe_schedule(4, m)[:, :ticks] >= 0)
    assert bubble == pytest.approx(parallel.predicted_bubble(4, m))


def test_meshes_adapt_to_the_device_count():
    shapes = {n: dict(parallel.model_mesh(env.devices(n), ("data", "model")).shape) for n in (1, 2, 4)}
    assert shapes == {1: {"data": 1, "model": 1}, 2: {"data": 1, "model": 2}, 4: {"data": 2, "model": 2}}


def test_bytes_per_device_and_hlo_parsing():
    mesh = parallel.model_mesh(env.devices(4), ("data", "model"))
    tree = {"a": jnp.zeros((8, 4)), "b": jnp.zeros((6,))}
    assert parallel.bytes_per_device(tree, {"a": P("data", "model"), "b": P()}, mesh) == 8 * 4 * 4 // 4 + 24
    assert parallel.bytes_per_device(tree, {"a": P(("data", "model")), "b": P()}, mesh) == 32 + 24
    lines = "\n".join([
        "  %ar = f32[32,64]{1,0} all-reduce(%x), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add",
        "  %ag = f32[64]{0} all-gather(%p), channel_id=2, replica_groups=[1,8]<=[8], dimensions={0}",
        "  %ar2 = (f32[64]{0}, f32[10]{0}) all-reduce(%t), replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}",
        "  %cp = bf16[16,64]{1,0} collective-permute(%h), channel_id=3, source_target_pairs={{0,1}}",
        "  %add = f32[4]{0} add(%a, %b)",
    ])
    comm = parallel.hlo_communication(lines, default_group=8)
    assert comm["counts"]["all-reduce"] == 2 and comm["counts"]["all-gather"] == 1
    expected = 2 * 3 / 4 * 32 * 64 * 4 + 7 / 8 * 64 * 4 + 2 * 1 / 2 * 74 * 4 + 16 * 64 * 2
    assert comm["bytes"] == int(expected)


def test_bad_input_is_refused():
    params = SMALL.init(jax.random.key(0))
    with pytest.raises(ValueError, match="unknown strategy"):
        parallel.strategy_mesh("zero", env.devices(2))
    with pytest.raises(ValueError, match="unknown strategy"):
        parallel.communication_model("zero", SMALL, 8, {"data": 2})
    with pytest.raises(ValueError, match="cannot be split evenly over 3 pipeline stages"):
        parallel.gpipe_step(parallel.adam(), parallel.model_mesh(env.devices(3), ("stage",)), params, 2)
    with pytest.raises(ValueError, match="does not fit"):
        parallel.model_mesh(env.devices(4), ("data", "model"), shape=(3, 2))
    with pytest.raises(ValueError, match=">= 1"):
        parallel.DeepMLP(layers=0)
    with pytest.raises(ValueError, match=">= 1"):
        parallel.gpipe_schedule(0, 4)
    with pytest.raises(ValueError, match="2 arrays but 1 PartitionSpecs"):
        parallel.bytes_per_device({"a": jnp.zeros(2), "b": jnp.zeros(2)}, {"a": P()},
                                  parallel.model_mesh(env.devices(1), ("data",)))


def test_pipeline_refuses_a_batch_that_micro_batches_do_not_divide():
    params = SMALL.init(jax.random.key(0))
    mesh = parallel.model_mesh(env.devices(2), ("stage",))
    step, place = parallel.gpipe_step(parallel.adam(), mesh, params, microbatches=3)
    x, y = parallel.deep_batches(16, 1)[0]
    with pytest.raises(ValueError, match="cannot be split into 3 micro-batches"):
        step(*place(params, None, x, y))
