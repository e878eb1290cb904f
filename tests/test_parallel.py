import jax
import pytest

from scalelab import env, parallel


@pytest.fixture(scope="module")
def problem():
    return parallel.digits_problem(hidden=(32,))


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("strategy", sorted(parallel.STRATEGIES))
def test_data_parallel_equals_single_device(problem, n, strategy):
    batches = parallel.global_batches(problem, 32, 4)
    reference, ref_losses = parallel.train_single(problem, batches)
    params, losses = parallel.STRATEGIES[strategy](problem, batches, env.devices(n))
    assert parallel.max_abs_diff(params, reference) <= 1e-5
    assert max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)) <= 1e-4


def test_uneven_batch_is_refused(problem):
    batches = parallel.global_batches(problem, 30, 1)
    for fn in parallel.STRATEGIES.values():
        with pytest.raises(ValueError, match="cannot be split evenly over 4 devices"):
            fn(problem, batches, env.devices(4))


def test_global_batches_validate(problem):
    with pytest.raises(ValueError, match=">= 1"):
        parallel.global_batches(problem, 0, 1)
    a = parallel.global_batches(problem, 8, 2, seed=3)
    b = parallel.global_batches(problem, 8, 2, seed=3)
    assert all((x1 == x2).all() and (y1 == y2).all() for (x1, y1), (x2, y2) in zip(a, b, strict=True))


def test_all_reduce_is_inserted_only_with_several_devices(problem):
    counts, lines = parallel.collectives_in_hlo(problem, env.devices(4), 32)
    assert counts["all-reduce"] >= 1 and any("all-reduce" in ln for ln in lines)
    assert "metadata" not in " ".join(lines)
    counts1, _ = parallel.collectives_in_hlo(problem, env.devices(1), 32)
    assert sum(counts1.values()) == 0


def test_scaling_rows(problem):
    rows = parallel.scaling(problem, [1, 2], per_device_batch=8, global_batch=16)
    assert [r["devices"] for r in rows] == [1, 2]
    for r in rows:
        assert r["strong: step s"] > 0 and 0 <= r["pmean share"] <= 1
    assert jax.devices()  # the mesh helpers left the runtime usable


JIT_LINE = ("%all-reduce.7 = (f32[10]{0}, f32[10,64]{1,0}, f32[]) all-reduce(%a, %b, %c), channel_id=1, "
            "replica_groups=mesh['axis_0'=8,'axis_1'=1] {'axis_0'}, use_global_device_ids=true, to_apply=%r")


def test_hlo_elements_counts_every_tuple_member():
    assert parallel.hlo_elements(JIT_LINE) == 10 + 640 + 1
    assert parallel.hlo_elements("%x = bf16[4,8]{1,0} all-reduce(%y), replica_groups={{0,1}}") == 32
    with pytest.raises(ValueError, match="not an HLO instruction"):
        parallel.hlo_elements("=")


def test_replica_group_sizes_reads_every_form():
    assert parallel.replica_group_sizes(JIT_LINE) == [8]
    assert parallel.replica_group_sizes("x, replica_groups={{0,1,2,3},{4,5,6,7}}, y") == [4, 4]
    assert parallel.replica_group_sizes("x, replica_groups=[2,4]<=[8], y") == [4, 4]
    assert parallel.replica_group_sizes("x, replica_groups=[1,8]<=[4,2]T(1,0), y") == [8]
    assert parallel.replica_group_sizes("x, replica_groups=mesh['a'=2,'b'=4] {'b'}, y") == [4, 4]
    assert parallel.replica_group_sizes("x, replica_groups=mesh['a'=2,'b'=4] {'a','b'}, y") == [8]
    with pytest.raises(ValueError, match="no replica_groups"):
        parallel.replica_group_sizes("%x = f32[] add(%a, %b)")


def test_param_count(problem):
    assert parallel.param_count(problem) == sum(p.size for p in jax.tree.leaves(problem.params))


@pytest.mark.parametrize("n", [1, 4])
def test_compiled_collectives_of_the_shard_map_step(problem, n):
    mesh = parallel.data_mesh(env.devices(n))
    abstract = parallel.abstract_inputs(problem, mesh, 16)
    counts, lines = parallel.compiled_collectives(parallel.shard_map_step(problem, mesh), *abstract)
    assert counts["all-reduce"] >= 1  # written out: kept even for one device
    assert sum(parallel.hlo_elements(ln) for ln in lines) == parallel.param_count(problem) + 1
    assert {s for ln in lines for s in parallel.replica_group_sizes(ln)} == {n}
    counts0, lines0 = parallel.compiled_collectives(parallel.shard_map_step(problem, mesh, reduce=False), *abstract)
    assert sum(counts0.values()) == 0 and lines0 == []


def test_jit_step_all_reduce_carries_gradients_and_loss(problem):
    _, lines = parallel.collectives_in_hlo(problem, env.devices(4), 32)
    assert sum(parallel.hlo_elements(ln) for ln in lines if " all-reduce" in ln) == parallel.param_count(problem) + 1
    assert all(parallel.replica_group_sizes(ln) == [4] for ln in lines)
