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
        assert r["strong: step s"] > 0 and 0 <= r["all-reduce share"] <= 1
    assert jax.devices()  # the mesh helpers left the runtime usable
