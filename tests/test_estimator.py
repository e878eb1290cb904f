"""Chapter 08's estimator: bytes per device against the compiled program; pipeline schedules."""

import math

import pytest

from scalelab import env, estimator, parallel


def test_estimate_counts_the_chapter_model_and_the_zero_stages():
    full = estimator.estimate(width=64, depth=4, batch=256)
    cfg = parallel.DeepMLP(width=64, hidden=256, layers=4)
    assert full["param_count"] == cfg.param_count()
    assert full["params_MB"] * 1e6 == cfg.param_count() * 4
    assert full["optimizer_MB"] * 1e6 == 2 * cfg.param_count() * 4 + 4  # two moments and the step count
    # ZeRO shards optimiser state (1), then gradients (2), then parameters (3); DP alone shards nothing
    rows = [estimator.estimate(width=64, depth=4, batch=256, zero=z, dp=4) for z in range(4)]
    assert rows[0]["optimizer_MB"] > rows[1]["optimizer_MB"] == rows[2]["optimizer_MB"] == rows[3]["optimizer_MB"]
    assert rows[1]["grads_MB"] > rows[2]["grads_MB"] and rows[2]["params_MB"] > rows[3]["params_MB"]
    assert [r["total_MB"] for r in rows] == sorted((r["total_MB"] for r in rows), reverse=True)
    assert rows[0]["params_MB"] == full["params_MB"] and rows[0]["comm_dp_MB"] > 0 == full["comm_MB"]


def test_estimate_matches_the_chapter_cost_models():
    cfg = parallel.DeepMLP(width=64, hidden=256, layers=8)
    for zero, name in ((0, "dp"), (1, "zero1"), (2, "zero2"), (3, "fsdp")):
        est = estimator.estimate(width=64, depth=8, batch=64, zero=zero, dp=4)
        want = parallel.communication_model(name, cfg, 64, {"data": 4})
        assert math.isclose(est["comm_MB"] * 1e6, want, rel_tol=1e-12), name
    est = estimator.estimate(width=64, depth=8, batch=64, tp=4)
    tp_acts = parallel.communication_model("tp", cfg, 64, {"model": 4})
    assert math.isclose(est["comm_tp_MB"] * 1e6, tp_acts, rel_tol=1e-12)
    for z in range(4):  # float32 with n large: 16 bytes per parameter shrinking as bytes_per_param says
        a = estimator.estimate(width=64, depth=8, batch=8, zero=z, dp=8)
        b = estimator.estimate(width=64, depth=8, batch=8, zero=z, dp=1)
        assert a["params_MB"] + a["optimizer_MB"] < b["params_MB"] + b["optimizer_MB"] or z == 0


def test_remat_precision_micro_batches_and_pipeline_move_the_right_terms():
    base = estimator.estimate(width=128, depth=8, batch=1024)
    assert estimator.estimate(width=128, depth=8, batch=1024, remat=True)["activations_MB"] < base["activations_MB"]
    mixed = estimator.estimate(width=128, depth=8, batch=1024, precision="mixed")
    assert mixed["params_MB"] == base["params_MB"] / 2 and mixed["optimizer_MB"] > base["optimizer_MB"]
    acc = estimator.estimate(width=128, depth=8, batch=1024, micro_batches=4)
    assert acc["activations_MB"] < base["activations_MB"] / 3
    pipe = estimator.estimate(width=128, depth=8, batch=1024, pp=4, micro_batches=4)
    assert pipe["params_MB"] < base["params_MB"] / 2 and pipe["comm_pp_MB"] > 0
    assert estimator.estimate(width=128, depth=8, batch=1024, seq=2)["activations_MB"] > base["activations_MB"]


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="ZeRO stage"):
        estimator.estimate(zero=4)
    with pytest.raises(ValueError, match="precision"):
        estimator.estimate(precision="fp8")
    with pytest.raises(ValueError, match="tp = 3"):
        estimator.estimate(width=64, tp=3)
    with pytest.raises(ValueError, match="pp = 3"):
        estimator.estimate(depth=8, pp=3)
    with pytest.raises(ValueError, match="micro_batches"):
        estimator.estimate(batch=100, dp=8)
    with pytest.raises(ValueError, match="width must be an integer"):
        estimator.estimate(width=0)
    with pytest.raises(ValueError, match="do not fit"):
        estimator.compiled_memory(dp=64)
    with pytest.raises(ValueError, match="estimate-only"):
        estimator.measure_memory(128, 8, 512, 1, "float32", "off", 0, 1, 2, 1, 2)
    with pytest.raises(ValueError, match="kind"):
        estimator.schedule_model(2, 2, "zb-v")
    with pytest.raises(ValueError, match="p \\(stages\\)"):
        estimator.schedule_model(0, 2, "GPipe")


def test_estimate_within_ten_percent_of_the_compiled_memory_on_a_grid():
    """The grid: per device, state = compiled arguments exactly; state + gradients + activations
    within 10% of arguments + the gradient program's outputs and temporaries."""
    devices = env.devices(4)
    rows = estimator.check_grid(list(estimator.GRID), devices=devices)
    for r in rows:
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()})
    for r in rows:
        assert math.isclose(r["estimate state_MB"], r["compiled state_MB"], rel_tol=0.02), r
        assert abs(r["rel. error (total)"]) <= 0.10, r
    assert len({(r["zero"], r["tp"], r["dp"]) for r in rows}) >= 8


def test_schedule_model_equals_the_chapter_tables():
    for p, m in ((1, 1), (4, 4), (4, 8), (3, 5)):
        g = estimator.schedule_model(p, m, "GPipe")
        assert math.isclose(g["bubble_fraction"], g["predicted_bubble"], rel_tol=1e-12)
        assert g["bubble_fraction"] == parallel.bubble_fraction(parallel.gpipe_schedule(p, m))
        assert g["peak_in_flight"] == m and g["slots"] == 2 * (m + p - 1)
        f = estimator.schedule_model(p, m, "1F1B")
        kind, micro = parallel.one_f_one_b_schedule(p, m)
        assert f["peak_in_flight"] == int(parallel.in_flight(kind, micro).max()) <= min(p, m) + 1
        assert f["peak_in_flight"] <= g["peak_in_flight"] + 1


def test_explorers_follow_their_controls_and_carry_a_static_figure():
    e = estimator.estimator_explorer()
    e.set(width=256, zero=1)
    assert e.prediction == estimator.memory_model(**e.settings, **e.context)
    assert "image/png" in e._repr_mimebundle_()
    e.set(dp=2, tp=1)
    got = e.measure_now()
    assert got is not None and got["compiled_total_MB"] > 0 and len(e.measured) == 1
    s = estimator.schedule_explorer()
    s.controls["kind"].value = "1F1B"
    s.controls["p"].value = 6
    assert s.prediction == estimator.schedule_model(**s.settings, **s.context)
    assert "image/png" in s._repr_mimebundle_()
