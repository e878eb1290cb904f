import math

import jax.numpy as jnp
import matplotlib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scalelab import systolic

matplotlib.use("Agg")

dims = st.integers(1, 9)
sides = st.integers(1, 5)
dataflows = st.sampled_from(systolic.DATAFLOWS)


def _operands(seed, M, K, N, integer=False):
    rng = np.random.default_rng(seed)
    if integer:
        return rng.integers(-50, 50, size=(M, K)), rng.integers(-50, 50, size=(K, N))
    return rng.standard_normal((M, K)), rng.standard_normal((K, N))


def _expected_folds(M, K, N, R, C, df):
    return {
        "os": math.ceil(M / R) * math.ceil(N / C),
        "ws": math.ceil(K / R) * math.ceil(N / C),
        "is": math.ceil(K / R) * math.ceil(M / C),
    }[df]


@settings(max_examples=60, deadline=None)
@given(M=dims, K=dims, N=dims, R=sides, C=sides, df=dataflows, seed=st.integers(0, 2**16))
def test_simulate_matches_matmul_and_closed_form(M, K, N, R, C, df, seed):
    a, b = _operands(seed, M, K, N)
    res = systolic.simulate(a, b, R, C, df)
    np.testing.assert_allclose(res.output, a @ b, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(res.output, np.asarray(jnp.matmul(a, b)), rtol=1e-5, atol=1e-5)
    assert res.output.shape == (M, N) and res.output.dtype == (a @ b).dtype
    assert res.cycles == systolic.cycle_count(M, K, N, R, C, df)
    assert res.folds == _expected_folds(M, K, N, R, C, df)
    assert res.cycles == res.folds * res.cycles_per_fold
    assert res.macs == M * K * N
    assert res.utilization == pytest.approx(res.macs / (res.cycles * R * C))
    assert 0 < res.utilization <= 1
    assert res.utilization == pytest.approx(systolic.utilization(M, K, N, R, C, df))
    assert res.operand_reads == systolic.memory_traffic(M, K, N, R, C, df).systolic_operand_reads


@settings(max_examples=40, deadline=None)
@given(M=dims, K=dims, N=dims, R=sides, C=sides, df=dataflows, seed=st.integers(0, 2**16))
def test_integers_are_exact(M, K, N, R, C, df, seed):
    a, b = _operands(seed, M, K, N, integer=True)
    res = systolic.simulate(a.astype(np.int32), b.astype(np.int32), R, C, df)
    assert res.output.dtype == np.int32
    np.testing.assert_array_equal(res.output, a @ b)


@settings(max_examples=30, deadline=None)
@given(M=st.integers(1, 5), K=st.integers(1, 5), N=st.integers(1, 5), R=st.integers(1, 4),
       C=st.integers(1, 4), df=dataflows, seed=st.integers(0, 2**16))
def test_reference_loop_agrees(M, K, N, R, C, df, seed):
    a, b = _operands(seed, M, K, N, integer=True)
    fast = systolic.simulate(a, b, R, C, df)
    ref = systolic.reference_simulate(a, b, R, C, df)
    np.testing.assert_array_equal(ref.output, a @ b)
    np.testing.assert_array_equal(fast.output, ref.output)
    assert (fast.cycles, fast.macs, fast.folds, fast.operand_reads) == (
        ref.cycles, ref.macs, ref.folds, ref.operand_reads)


@settings(max_examples=40, deadline=None)
@given(M=dims, K=dims, N=dims, R=sides, C=sides, df=dataflows, seed=st.integers(0, 2**16))
def test_full_trace(M, K, N, R, C, df, seed):
    a, b = _operands(seed, M, K, N, integer=True)
    res = systolic.simulate(a, b, R, C, df, trace=True, trace_limit=10_000)
    tr = res.trace
    assert len(tr) == res.cycles and not tr.truncated and tr.total_cycles == res.cycles
    for name in ("active", "a", "a_valid", "b", "b_valid", "acc"):
        assert getattr(tr, name).shape == (res.cycles, R, C), name
    assert int(tr.active_count.sum()) == res.macs == M * K * N
    assert not tr.active[tr.loading].any()  # no MAC while the stationary tile loads
    # an active PE holds both operands
    assert (tr.a_valid[tr.active] & tr.b_valid[tr.active]).all()
    assert tr.fold.min() == 0 and tr.fold.max() == res.folds - 1
    assert int(tr.loading.sum()) == (0 if df == "os" else R * res.folds)


def test_os_fold_takes_3n_minus_2_cycles_with_the_written_schedule():
    for n in range(1, 9):
        a, b = _operands(n, n, n, n, integer=True)
        res = systolic.simulate(a, b, n, n, "os", trace=True)
        assert res.cycles == systolic.cycle_count(n, n, n, n, n, "os") == 3 * n - 2
        assert res.folds == 1 and res.utilization == pytest.approx(n**3 / ((3 * n - 2) * n * n))
        # PE(i, j) does its k-th MAC at cycle i + j + k
        for t in range(res.cycles):
            expected = [[1 if 0 <= t - i - j < n else 0 for j in range(n)] for i in range(n)]
            np.testing.assert_array_equal(res.trace.active[t], expected)


def test_stationary_schedule_pe_k_j_at_R_plus_m_plus_k_plus_j():
    R = C = 3
    M = 4
    a, b = _operands(1, M, R, C, integer=True)
    tr = systolic.simulate(a, b, R, C, "ws", trace=True).trace
    for t in range(len(tr)):
        want = [[1 if 0 <= t - R - k - j < M else 0 for j in range(C)] for k in range(R)]
        np.testing.assert_array_equal(tr.active[t], want)
    # after the preload, PE(k, j) holds the weight b[k, j]
    np.testing.assert_array_equal(tr.b[R - 1], b)


def test_trace_memory_is_bounded():
    a, b = _operands(0, 20, 20, 20)
    res = systolic.simulate(a, b, 4, 4, "ws", trace=True, trace_limit=7)
    assert len(res.trace) == 7 and res.trace.truncated and res.trace.total_cycles == res.cycles
    assert res.trace.active.shape == (7, 4, 4)
    np.testing.assert_allclose(res.output, a @ b)  # truncating the trace changes nothing else
    assert systolic.simulate(a, b, 4, 4, "ws").trace is None
    big = np.ones((300, 300))
    with pytest.raises(ValueError, match="trace_limit"):
        systolic.simulate(big, big, 256, 256, "ws", trace=True, trace_limit=1000)
    with pytest.raises(ValueError, match="trace_limit"):
        systolic.simulate(a, b, 4, 4, "ws", trace=True, trace_limit=0)


def test_dtypes_and_non_finite_values():
    a = np.array([[1.0, np.inf], [2.0, 3.0]])
    b = np.array([[1.0, 2.0], [3.0, 4.0]])
    with np.errstate(invalid="ignore"):  # numpy's own a @ b computes inf * 0
        expected = a @ b
    for df in systolic.DATAFLOWS:
        np.testing.assert_array_equal(systolic.simulate(a, b, 3, 3, df).output, expected)
    f32 = np.arange(12, dtype=np.float32).reshape(3, 4)
    res = systolic.simulate(f32, f32.T, 2, 2, "ws")
    assert res.output.dtype == np.float32
    np.testing.assert_allclose(res.output, f32 @ f32.T, rtol=1e-6)
    c = np.array([[1 + 2j, 3], [0, 1j]])
    np.testing.assert_allclose(systolic.simulate(c, c, 2, 1, "is").output, c @ c)
    j = jnp.arange(6.0).reshape(2, 3)
    np.testing.assert_allclose(systolic.simulate(j, j.T, 2, 2, "os").output, np.asarray(j @ j.T))
    assert systolic.simulate(a, b, np.int64(2), 2, "Weight-Stationary").dataflow == "ws"


@pytest.mark.parametrize(
    "args, match",
    [
        ((np.ones(3), np.ones((3, 2)), 2, 2, "os"), "a must be a 2-D matrix"),
        ((np.ones((2, 3)), np.ones((3, 2, 1)), 2, 2, "os"), "b must be a 2-D matrix"),
        ((np.ones((2, 3)), np.ones((4, 2)), 2, 2, "os"), "inner dimensions do not match"),
        ((np.ones((2, 3)), np.ones((3, 2)), 0, 2, "os"), "rows must be >= 1"),
        ((np.ones((2, 3)), np.ones((3, 2)), 2, -1, "os"), "cols must be >= 1"),
        ((np.ones((2, 3)), np.ones((3, 2)), 2.0, 2, "os"), "rows must be a positive integer"),
        ((np.ones((2, 3)), np.ones((3, 2)), True, 2, "os"), "rows must be a positive integer"),
        ((np.ones((2, 3)), np.ones((3, 2)), 2, 2, "rs"), "unknown dataflow 'rs'"),
        ((np.ones((2, 3)), np.ones((3, 2)), 2, 2, None), "unknown dataflow"),
        ((np.array([["x", "y"]]), np.ones((2, 2)), 2, 2, "os"), "a must hold numbers"),
        ((np.ones((2, 2)), np.ones((2, 2), dtype=bool), 2, 2, "os"), "b must hold numbers"),
        ((np.ones((2, 2)), np.array([[1, None], [2, 3]]), 2, 2, "os"), "dtype object"),
        ((np.ones((0, 2)), np.ones((2, 2)), 2, 2, "os"), "must not be empty"),
    ],
)
def test_bad_input_raises_value_error(args, match):
    with pytest.raises(ValueError, match=match):
        systolic.simulate(*args)
    with pytest.raises(ValueError, match=match):
        systolic.reference_simulate(*args)


def test_closed_form_validates_and_matches_scale_sim():
    with pytest.raises(ValueError, match="M must be >= 1"):
        systolic.cycle_count(0, 1, 1, 1, 1, "os")
    with pytest.raises(ValueError, match="unknown dataflow"):
        systolic.cycle_count(1, 1, 1, 1, 1, "xs")
    # SCALE-Sim's stationary formula 2*Sr + Sc + T - 2 is the 0-based index of the last
    # cycle, one less than our count; Sr = rows, Sc = cols, T = streamed length.
    for R, C, M in [(4, 4, 10), (8, 16, 3), (128, 128, 512)]:
        assert systolic.cycles_per_fold(M, R, C, R, C, "ws") == (2 * R + C + M - 2)
    # the TPU-like case of the benchmark
    assert systolic.cycle_count(512, 512, 512, 128, 128, "ws") == 16 * (512 + 256 + 128 - 2)


def test_memory_traffic():
    n = 16
    t = systolic.memory_traffic(n, n, n, n, n, "os")
    assert t.scalar_operand_reads == 2 * n**3 and t.systolic_operand_reads == 2 * n * n
    assert t.systolic_partial_sum_reads == 0 and t.reduction == pytest.approx(n)
    ws = systolic.memory_traffic(64, 64, 64, 16, 16, "ws")
    assert ws.systolic_operand_reads == 64 * 64 + 64 * 64 * 4
    assert ws.systolic_partial_sum_reads == 64 * 64 * 3
    assert set(ws.row()) >= {"MACs", "scalar loop reads", "systolic reads"}


def test_compare_dataflows_rows():
    rows = systolic.compare_dataflows([(4, 6, 5), (9, 3, 2)], 3, 4)
    assert len(rows) == 6 and {r["dataflow"] for r in rows} == {"OS", "WS", "IS"}
    assert all(0 < r["utilisation"] <= 1 for r in rows)


def test_figures_and_widget():
    a, b = _operands(0, 4, 4, 4, integer=True)
    tr = systolic.simulate(a, b, 4, 4, "os", trace=True).trace
    fig = systolic.plot_trace(tr)
    assert len([ax for ax in fig.axes if ax.get_visible()]) == len(tr) == 10
    assert "simulated on" in fig.get_supxlabel()
    fig = systolic.plot_utilization(arrays=(4, 8), simulated={4: [5]})
    assert "closed-form model" in fig.get_supxlabel()
    widget = systolic.trace_widget(tr)
    slider = widget.children[0]
    assert slider.max == len(tr) - 1
    slider.value = 3  # redraws without error
    with pytest.raises(ValueError, match="at least one cycle"):
        systolic.plot_trace(tr, cycles=[])
    fake = {"pe_cycles_per_s": 3e8, "same_case": [
        {"side": s, "loop_pe_cycles_per_s": 5e6, "vectorised_pe_cycles_per_s": 5e6 * s,
         "speedup": float(s)} for s in (4, 8)]}
    fig = systolic.plot_simulator_speed(fake)
    assert "1 x cpu device" in fig.get_supxlabel()  # the simulator ran in one host process
    assert "1 x cpu device" in systolic.plot_trace(tr).get_supxlabel()


def test_bench_systolic_quick():
    # The headline case runs in well under a second with the vectorised simulator.
    result = systolic.bench_systolic(quick=True)
    for key in ("pe_cycles_per_s", "reference_loop_pe_cycles_per_s", "speedup_vs_loop",
                "seconds_128x128_ws_512", "cycles_128x128_ws_512", "utilization_128x128_ws_512"):
        assert result[key] > 0, key
    assert result["output_matches"] is True and result["reference_matches"] is True
    assert result["cycles_128x128_ws_512"] == systolic.cycle_count(512, 512, 512, 128, 128, "ws")
    assert result["pe_cycles_128x128_ws_512"] == result["cycles_128x128_ws_512"] * 128 * 128
    # the speed-up is measured on one case for both simulators: the largest of the sweep
    sides = [r["side"] for r in result["same_case"]]
    assert sides == sorted(sides) and len(sides) >= 2
    assert result["speedup_vs_loop"] == result["same_case"][-1]["speedup"]


def test_same_case_speedup_times_one_case():
    row = systolic.same_case_speedup(4, repeat=1)
    # four folds of (M + 2R + C - 2) cycles on 4 x 4 PEs, for the loop and the vectorised simulator
    assert row["pe_cycles"] == systolic.cycle_count(8, 8, 8, 4, 4, "ws") * 16 == 4 * (8 + 12 - 2) * 16
    assert row["matches"] is True and row["gemm"] == "8x8x8" and row["array"] == "4x4 WS"
    assert row["speedup"] == pytest.approx(row["loop_s"] / row["vectorised_s"])
    with pytest.raises(ValueError):
        systolic.same_case_speedup(0)


# --------------------------------------------------------------------------- explorer


@pytest.mark.parametrize("df", systolic.DATAFLOWS)
def test_systolic_model_equals_the_simulator_on_a_small_grid(df):
    for M, K, N, R, C in [(1, 1, 1, 1, 1), (3, 5, 2, 2, 3), (8, 8, 8, 8, 8), (9, 4, 7, 4, 2), (5, 12, 3, 3, 5)]:
        pred = systolic.systolic_model(df, M, K, N, R, C)
        a, b = _operands(M * 100 + K, M, K, N, integer=True)
        res = systolic.simulate(a, b, R, C, df)
        assert pred["cycles"] == res.cycles and pred["folds"] == res.folds
        assert pred["cycles_per_fold"] == res.cycles_per_fold and pred["macs"] == res.macs
        assert pred["utilization"] == pytest.approx(res.utilization, rel=1e-12)
        measured = systolic.measure_systolic_point(df, M, K, N, R, C)
        assert measured["cycles"] == pred["cycles"] and measured["exact"]


def test_systolic_model_marks_the_3n_minus_2_case_and_keeps_its_invariants():
    for n in (1, 4, 16, 128):
        pred = systolic.systolic_model("os", n, n, n, n, n)
        assert pred["single_fold_square"] and pred["folds"] == 1 and pred["cycles"] == 3 * n - 2
        assert pred["three_n_minus_2"] == 3 * n - 2
    assert not systolic.systolic_model("ws", 8, 8, 8, 8, 8)["single_fold_square"]
    assert not systolic.systolic_model("os", 9, 8, 8, 8, 8)["single_fold_square"]
    pred = systolic.systolic_model("ws", 100, 70, 33, 16, 8)
    assert pred["cycles"] == pred["folds"] * pred["cycles_per_fold"]
    assert 0 < pred["utilization"] <= 1 and pred["fewer_reads"] == pytest.approx(
        pred["scalar_reads"] / pred["systolic_reads"])
    assert all(type(v) in (int, float, bool) for v in pred.values())


def test_systolic_model_refuses_bad_settings():
    with pytest.raises(ValueError, match="unknown dataflow"):
        systolic.systolic_model("xs", 4, 4, 4, 4, 4)
    with pytest.raises(ValueError, match="rows must be >= 1"):
        systolic.systolic_model("os", 4, 4, 4, 0, 4)
    with pytest.raises(ValueError, match="K must be a positive integer"):
        systolic.systolic_model("os", 4, 4.5, 4, 4, 4)
    with pytest.raises(ValueError, match="PE-cycles"):
        systolic.measure_systolic_point("os", 4096, 4096, 4096, 64, 64)


def test_systolic_explorer_follows_its_controls_and_carries_a_static_figure():
    e = systolic.systolic_explorer()
    assert e.prediction == systolic.systolic_model(**e.settings, **e.context)
    assert e.prediction["single_fold_square"] and e.prediction["cycles"] == 22
    e.set(M=10, dataflow="ws")
    assert e.prediction == systolic.systolic_model(**e.settings, **e.context)
    assert e.prediction["cycles"] == systolic.cycle_count(10, 8, 8, 8, 8, "ws")
    result = e.measure_now()
    assert result is not None and result["cycles"] == e.prediction["cycles"]
    bundle = e._repr_mimebundle_()
    assert "image/png" in bundle and "cycles" in bundle["text/plain"]
    assert 'data-model="scalelab.systolic:systolic_model"' in e.result.value
