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
    for name in ("zero1", "zero2"):  # ZeRO-1/2: parameters whole, Adam's moments sharded
        assert by[name]["param_bytes"] == full and by[name]["opt_state_bytes"] < full, name
    # the compiled program's arguments are exactly parameters + moments + the local batch
    batch_bytes = 16 * 64 * 4 + 16 * 4
    for name in ("dp", "zero1", "zero2", "fsdp"):
        assert by[name]["argument_bytes"] == by[name]["param_bytes"] + by[name]["opt_state_bytes"] + batch_bytes // 4
    # donated state: the new parameters and moments reuse the old buffers
    for r in rows:
        assert r["alias_bytes"] >= r["param_bytes"], r["strategy"]
        assert r["bytes_per_device"] == r["argument_bytes"] + r["output_bytes"] + r["temp_bytes"] - r["alias_bytes"]


def test_collectives_and_cost_model(rows):
    by = {r["strategy"]: r for r in rows}
    assert set(by["dp"]["collectives"]) == {"all-reduce"}
    assert by["fsdp"]["collectives"]["all-gather"] >= 4 and by["fsdp"]["collectives"]["reduce-scatter"] >= 4
    assert by["pp"]["collectives"]["collective-permute"] >= 2
    assert by["zero2"]["collectives"]["reduce-scatter"] >= 4 and by["zero2"]["collectives"]["all-gather"] >= 4
    for name in ("dp", "tp", "dp_tp", "zero2"):  # the compiled collectives match the textbook model
        assert by[name]["comm_bytes_hlo"] == pytest.approx(by[name]["comm_bytes_model"], rel=1e-3, abs=64), name


def test_fsdp_hlo_keeps_gathered_weights_for_the_backward_pass():
    params = SMALL.init(jax.random.key(0))
    mesh = parallel.model_mesh(env.devices(4), ("data",))
    step, place = parallel.fsdp_step(parallel.adam(), mesh, params)
    args = place(params, None, *parallel.deep_batches(16, 1)[0])
    reuse = parallel.gathered_weight_reuse(step.lower(*args).compile().as_text())
    assert reuse["all_gathers"] >= 4 * SMALL.layers
    assert 0 <= reuse["used_forward_and_backward"] <= reuse["all_gathers"]


def test_bytes_per_param_accounting():
    assert parallel.bytes_per_param(0, 8) == 16 == parallel.bytes_per_param(0, 8, "float32")
    assert parallel.bytes_per_param(1, 4) == 2 + 2 + 12 / 4
    assert parallel.bytes_per_param(2, 4) == 2 + 14 / 4
    assert parallel.bytes_per_param(3, 4) == 16 / 4
    assert parallel.bytes_per_param(2, 4, "float32") == 4 + 12 / 4
    with pytest.raises(ValueError, match="stage"):
        parallel.bytes_per_param(4, 8)
    with pytest.raises(ValueError, match="precision"):
        parallel.bytes_per_param(1, 8, "fp8")


def test_interconnects_are_one_way_link_figures_with_sources():
    by = {link["system"].split(",")[0]: link for link in parallel.INTERCONNECTS}
    assert by["Google TPU v5e"]["bytes_per_s"] == 4.5e10 and by["Google TPU v5p"]["bytes_per_s"] == 9e10
    assert by["NVIDIA H100 SXM"]["bytes_per_s"] == 900e9 / 2
    for link in parallel.INTERCONNECTS:
        assert link["source"].startswith("https://") and parallel.chip_peak(link["chip"]) > 1e14
    # DP overlaps its all-reduce with compute above b = 2 F / (3 W) examples per device
    v5e = by["Google TPU v5e"]
    assert parallel.overlap_batch(v5e) == pytest.approx(2 * 197e12 / (3 * 4.5e10))


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
    assert list(parallel.in_flight(*parallel.gpipe_kinds(p, m))) == [m] * p


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 10), st.integers(1, 20))
def test_one_f_one_b_schedule_invariants(p, m):
    kind, micro = parallel.one_f_one_b_schedule(p, m)
    assert kind.shape == (p, 2 * (m + p - 1))  # the same length, so the same bubble, as GPipe
    slot = {}
    for s in range(p):
        for k in (parallel.FWD, parallel.BWD):
            assert sorted(micro[s][kind[s] == k]) == list(range(m))  # every micro-batch once each way
        for t in range(kind.shape[1]):
            if kind[s, t] != parallel.IDLE:
                slot[(int(kind[s, t]), s, int(micro[s, t]))] = t
    for s in range(p):
        for j in range(m):
            assert slot[(parallel.BWD, s, j)] > slot[(parallel.FWD, s, j)]
            if s:
                assert slot[(parallel.FWD, s, j)] > slot[(parallel.FWD, s - 1, j)]
                assert slot[(parallel.BWD, s - 1, j)] > slot[(parallel.BWD, s, j)]
    assert list(parallel.in_flight(kind, micro)) == [min(p - s, m) for s in range(p)]


@pytest.mark.parametrize(("n", "m"), [(4, 1), (4, 4), (2, 8), (1, 4)])
def test_pipeline_gradients_equal_the_unsharded_ones(n, m):
    params = SMALL.init(jax.random.key(0))
    x, y = parallel.deep_batches(16, 1)[0]
    ref_loss, ref = jax.value_and_grad(parallel.deep_loss)(params, x, y)
    mesh = parallel.model_mesh(env.devices(n), ("stage",))
    placed = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), parallel.pipeline_specs(params),
                                                 is_leaf=lambda s: isinstance(s, P)))
    for fn in (parallel.gpipe_grads(mesh, params, m), parallel.one_f_one_b_grads(mesh, params, m),
               parallel.scheduled_grads(mesh, params, m, "gpipe")):
        loss, grads = fn(placed, x, y)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_one_f_one_b_step_equals_the_unsharded_step():
    params = SMALL.init(jax.random.key(0))
    tx = parallel.adam()
    x, y = parallel.deep_batches(16, 1)[0]
    ref = parallel.unsharded_step(tx)(params, tx.init(params), x, y)[0]
    step, place = parallel.one_f_one_b_step(tx, parallel.model_mesh(env.devices(4), ("stage",)), params, 4)
    assert parallel.max_abs_diff(step(*place(params, None, x, y))[0], ref) <= 1e-5


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
    with pytest.raises(ValueError, match="cannot be split evenly over 3 pipeline stages"):
        parallel.one_f_one_b_grads(parallel.model_mesh(env.devices(3), ("stage",)), params, 2)
    with pytest.raises(ValueError, match="schedule must be"):
        parallel.scheduled_grads(parallel.model_mesh(env.devices(2), ("stage",)), params, 2, "zb-v")
    with pytest.raises(ValueError, match="ZeRO stages 1 and 2"):
        parallel.zero_step(parallel.adam(), parallel.model_mesh(env.devices(2), ("data",)), params, 3)
    with pytest.raises(ValueError, match=">= 1"):
        parallel.one_f_one_b_schedule(2, 0)
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
