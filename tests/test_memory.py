import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from scalelab import memory, train


@pytest.mark.parametrize("depth", [1, 7, 16])
def test_every_variant_gives_the_no_remat_gradient(depth):
    ws, x = memory.init(depth, 8, 16, seed=depth)
    out = memory.forward(ws, x)
    ref = memory.grad_fn("none")(ws, x)
    assert float(jnp.abs(ref).max()) > 0
    for variant in memory.VARIANTS:
        np.testing.assert_allclose(memory.forward(ws, x, variant), out, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(memory.grad_fn(variant)(ws, x), ref, rtol=1e-4, atol=5e-5, err_msg=variant)


@pytest.mark.parametrize("segment", [1, 2, 3, 5])
def test_sqrt_gradient_with_any_segment_length(segment):
    ws, x = memory.init(5, 4, 8, seed=1)
    np.testing.assert_allclose(memory.grad_fn("sqrt", segment)(ws, x), memory.grad_fn("none")(ws, x),
                               rtol=1e-4, atol=5e-5)


def test_layer_is_the_residual_tanh_layer():
    ws, x = memory.init(2, 3, 4)
    expected = x + jnp.tanh(x @ ws[0])
    expected = expected + jnp.tanh(expected @ ws[1])
    np.testing.assert_allclose(memory.forward(ws, x, "sqrt"), expected, rtol=1e-5, atol=1e-6)


@given(st.integers(1, 5000))
def test_segment_sizes_cover_the_depth(depth):
    k, full, rest = memory.segment_sizes(depth)
    assert k * full + rest == depth and 0 <= rest < k and full >= 1
    assert abs(k - math.sqrt(depth)) <= 0.5 + 1e-9
    assert memory.segment_sizes(depth, 1) == (1, depth, 0)
    assert memory.segment_sizes(depth, depth) == (depth, 1, 0)


def test_compiled_bytes_accounting():
    mem = memory.activation_bytes("none", 16, 8, 64)
    assert mem["total"] == mem["argument"] + mem["output"] + mem["temp"] - mem["alias"]
    # arguments: the weights and the inputs; output: the gradient of the weights
    assert mem["argument"] >= 4 * (16 * 8 * 8 + 64 * 8)
    assert mem["output"] >= 4 * 16 * 8 * 8
    assert memory.compiled_bytes(lambda a: a * 2, jnp.ones(10))["argument"] == 40


def test_memory_grows_with_depth_and_batch_and_remat_saves_it():
    depths = [16, 64, 256]
    sweep = memory.memory_sweep(["none", "full", "sqrt"], depths, 8, 512)
    for variant, values in sweep.items():
        assert values == sorted(values) and values[0] < values[-1], variant
    assert all(f < n and s < n for n, f, s in zip(sweep["none"], sweep["full"], sweep["sqrt"], strict=True))
    assert sweep["sqrt"][-1] < sweep["full"][-1] / 3  # per-layer remat is still linear in depth
    assert memory.fit_slope(depths, sweep["none"]) > 0.85
    assert memory.fit_slope(depths, sweep["sqrt"]) < 0.65
    small, large = (memory.activation_bytes("none", 32, 8, b)["temp"] for b in (256, 1024))
    assert 3.5 < large / small < 4.5


def test_checkpoint_policies_save_between_nothing_and_everything():
    none, full, dots, named = (memory.activation_bytes(v, 64, 8, 512)["total"]
                               for v in ("none", "full", "dots_saveable", "save_only_these_names"))
    assert full < none
    for policy in (dots, named):  # on some backends (GPU) the compiler already keeps only two arrays
        assert full < policy <= 1.01 * none


def test_per_layer_remat_recomputes_one_forward():
    args = memory.shapes(4, 32, 256)
    ratio = memory.compiled_flops(memory.grad_fn("full"), *args) / memory.compiled_flops(memory.grad_fn("none"), *args)
    assert 1.2 < ratio < 1.5


@settings(max_examples=50, deadline=None)
@given(st.floats(-3, 3), st.floats(1e-3, 1e6),
       st.lists(st.floats(1e-2, 1e4), min_size=2, max_size=12, unique=True).filter(
           lambda xs: max(xs) / min(xs) > 1.5))
def test_fit_slope_recovers_power_laws(p, c, xs):
    ys = [c * x**p for x in xs]
    assert memory.fit_slope(xs, ys) == pytest.approx(p, abs=1e-6)


def test_fit_slope_rejects_bad_input():
    for xs, ys in (([1], [1]), ([1, 2], [1]), ([1, 2], [0, 1]), ([-1, 2], [1, 1]), ([2, 2], [1, 3]),
                   ([1, float("nan")], [1, 2])):
        with pytest.raises(ValueError):
            memory.fit_slope(xs, ys)


def test_clear_errors_on_bad_input():
    with pytest.raises(ValueError, match="depth must be an integer >= 1"):
        memory.init(0, 8, 8)
    with pytest.raises(ValueError, match="depth must be an integer >= 1"):
        memory.segment_sizes(0)
    with pytest.raises(ValueError, match="width"):
        memory.shapes(4, 0, 8)
    with pytest.raises(ValueError, match=r"segment must be an integer in 1\.\.4"):
        memory.segment_sizes(4, 5)
    with pytest.raises(ValueError, match="unknown remat variant 'sqrt_n'"):
        memory.grad_fn("sqrt_n")
    with pytest.raises(ValueError, match="unknown remat variant"):
        memory.checkpoint_policy("dots")
    ws, x = memory.init(3, 4, 2)
    with pytest.raises(ValueError, match="unknown remat variant"):
        memory.forward(ws, x, "everything")
    with pytest.raises(ValueError, match="x must have shape"):
        memory.forward(ws, jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="stacked square layer weights"):
        memory.forward(ws[0], x)
    with pytest.raises(ValueError, match="segment must be"):
        memory.forward(ws, x, "sqrt", segment=4)
    with pytest.raises(ValueError, match="unknown remat variant"):
        memory.DeepMLP(4, 8, "half", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="depth"):
        memory.DeepMLP(0, 8, rngs=nnx.Rngs(0))


def test_peak_bytes_is_none_without_allocator_statistics():
    if jax.devices()[0].memory_stats():
        pytest.skip("this backend keeps allocator statistics")
    assert memory.peak_bytes(memory.grad_fn("none"), *memory.init(2, 4, 4)) is None


def test_accumulation_with_remat_equals_the_full_batch_gradient():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(32, 8)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 8, 32).astype(np.int32))
    ref_model = memory.DeepMLP(9, 8, "none", rngs=nnx.Rngs(3))
    ref = train.mean_grads(ref_model, x, y, 1)
    for variant in ("sqrt", "full"):
        model = memory.DeepMLP(9, 8, variant, rngs=nnx.Rngs(3))
        got = train.mean_grads(model, x, y, 4)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5)


def test_accumulation_bytes_shrink_with_micro_batches():
    rows = memory.accumulation_bytes(64, 8, 512, [1, 4, 16])
    temps = [r["temp"] for r in rows]
    assert temps == sorted(temps, reverse=True) and temps[0] > 3 * temps[-1]
    assert [r["micro_batch"] for r in rows] == [512, 128, 32]



def test_saved_residuals_show_what_each_variant_keeps():
    ws, x = memory.init(9, 4, 8)

    def kept(variant):
        return memory.saved_residuals(lambda ws, x: memory.loss(ws, x, variant), ws, x)

    activations = [line for line in kept("none") if line.startswith("f32[9,8,4]")]
    assert len(activations) >= 2  # the layer inputs and at least one intermediate per layer
    assert [line for line in kept("full") if "8,4]" in line] == ["f32[9,8,4] output of scan"]
    assert [line for line in kept("sqrt") if "8,4]" in line] == ["f32[3,8,4] output of scan"]
    assert not any("/" in line for line in kept("none"))


def test_tanh_saves_its_output_and_one_minus_it():
    z = jnp.linspace(-2.0, 2.0, 7)
    assert memory.saved_residuals(jnp.tanh, z) == ["f32[7] output of tanh", "f32[7] output of sub"]
    t, vjp = jax.vjp(jnp.tanh, z)
    saved = jax.tree.leaves(vjp)
    assert len(saved) == 2
    np.testing.assert_array_equal(saved[0], jnp.tanh(z))
    np.testing.assert_array_equal(saved[1], 1 - jnp.tanh(z))
    g = jnp.arange(7.0)
    np.testing.assert_allclose(vjp(g)[0], g * (1 - t**2), rtol=1e-6, atol=1e-6)


def test_policy_variants_keep_what_their_policy_says():
    ws, x = memory.init(9, 4, 8)

    def stacks(variant):
        lines = memory.saved_residuals(lambda ws, x: memory.loss(ws, x, variant), ws, x)
        return [line for line in lines if "8,4]" in line]

    assert len(stacks("everything_saveable")) == len(stacks("none")) == 3
    for variant in ("dots_saveable", "dots_with_no_batch_dims_saveable", "save_only_these_names"):
        assert len(stacks(variant)) == 2, variant
    assert stacks("offload_pre") == ["f32<host>[9,8,4] output of scan", "f32[9,8,4] output of scan"]
    temp = {v: memory.activation_bytes(v, 32, 8, 256)["temp"] for v in memory.VARIANTS}
    assert temp["dots_saveable"] == temp["dots_with_no_batch_dims_saveable"]  # h @ W has no batch dimension
    assert temp["everything_saveable"] == pytest.approx(temp["none"], rel=0.01)
    assert temp["full"] < temp["dots_saveable"] < temp["none"]


def test_offloading_is_a_no_op_on_cpu():
    if jax.default_backend() != "cpu":
        pytest.skip("offloading moves residuals to host memory on GPU/TPU")
    args = memory.shapes(16, 8, 64)
    lowered = memory.grad_fn("offload_pre").lower(*args)
    assert memory.placement_moves(lowered.as_text()) == 0
    assert (memory.activation_bytes("offload_pre", 16, 8, 64)["temp"]
            == memory.activation_bytes("save_only_these_names", 16, 8, 64)["temp"])
    ws, x = memory.init(5, 4, 8)
    np.testing.assert_allclose(memory.grad_fn("offload_pre")(ws, x), memory.grad_fn("none")(ws, x), rtol=1e-5)


def test_placement_moves_counts_annotations():
    assert memory.placement_moves("a annotate_device_placement b annotate_device_placement") == 2
    assert memory.placement_moves("") == 0


def test_lever_model_recovers_a_known_split():
    fixed, act, a, b = 3.0, 192.0, 16, 12.0
    total = fixed + act
    r_acc, r_rem = total / (fixed + act / a), total / (fixed + act / b)
    model = memory.lever_model(r_acc, r_rem, a)
    assert model["f"] == pytest.approx(fixed / total)
    assert model["b"] == pytest.approx(b)
    assert model["predicted"] == pytest.approx(total / (fixed + act / (a * b)))
    assert model["ceiling"] == pytest.approx(total / fixed)
    assert max(r_acc, r_rem) < model["predicted"] < min(r_acc * r_rem, model["ceiling"])


def test_lever_model_rejects_impossible_inputs():
    with pytest.raises(ValueError, match="micro_batches"):
        memory.lever_model(2.0, 2.0, 1)
    with pytest.raises(ValueError, match="reduction_accumulation < micro_batches"):
        memory.lever_model(20.0, 2.0, 16)
    with pytest.raises(ValueError, match="ceiling"):
        memory.lever_model(2.0, 100.0, 4)


# --------------------------------------------------------------------------- explorer


@pytest.mark.parametrize("variant", memory.EXPLORER_VARIANTS)
def test_remat_model_matches_the_compiled_step_on_a_small_grid(variant):
    # the closed forms against XLA's compiled memory analysis and cost model: within 2%
    for depth, segment, width, batch in [(16, 4, 8, 256), (60, 8, 32, 2048), (48, 7, 16, 1024), (32, 16, 8, 512)]:
        pred = memory.remat_model(variant, depth, segment, width, batch)
        seg = segment if variant == "sqrt" else None
        assert pred["total_bytes"] == pytest.approx(memory.activation_bytes(variant, depth, width, batch, seg)["total"],
                                                    rel=0.02)
        measured = memory.measure_remat_point(variant, depth, segment, width, batch)
        assert measured["total_bytes"] == pytest.approx(pred["total_bytes"], rel=0.02)
        assert measured["flops_per_layer"] == pytest.approx(pred["flops_per_layer"], rel=0.02)
    d = 16
    flops = memory.compiled_flops(memory.grad_fn(variant), *memory.shapes(d, 8, 256))
    assert flops == pytest.approx(memory.remat_model(variant, d, 4, 8, 256)["flops_per_layer"], rel=0.02)


def test_remat_model_counts_and_invariants():
    n, k, d, B = 64, 8, 32, 2048
    none, full, seg = (memory.remat_model(v, n, k, d, B) for v in ("none", "full", "sqrt"))
    assert (none["kept_arrays"], full["kept_arrays"], seg["kept_arrays"]) == (3 * n, n, n // k + 3 * k)
    assert seg["total_bytes"] < full["total_bytes"] < none["total_bytes"]
    assert none["recompute_flops"] == 0 and none["flop_ratio"] == 1 and none["memory_ratio"] == 1
    assert full["recompute_flops"] == seg["recompute_flops"] == n * 2 * B * d * d
    assert full["flop_ratio"] == pytest.approx(4 / 3, rel=0.01)
    assert memory.remat_model("sqrt", 60, 8, d, B)["segments"] == 8  # 7 of 8 layers and one of 4
    assert memory.remat_model("none", n, 3, d, B) == memory.remat_model("none", n, 5, d, B)  # segment unused
    assert all(type(v) in (int, float) for v in seg.values())
    # activations are linear in the batch; segments are smallest near k = sqrt(n / c)
    assert memory.remat_model("none", n, k, d, 2 * B)["activation_bytes"] == 2 * none["activation_bytes"]
    by_k = {kk: memory.remat_model("sqrt", 1024, kk, d, B)["total_bytes"] for kk in range(1, 65)}
    assert min(by_k, key=by_k.get) in (18, 19)


def test_remat_model_refuses_bad_settings():
    with pytest.raises(ValueError, match="variant must be one of"):
        memory.remat_model("dots_saveable", 16, 4, 8, 8)
    with pytest.raises(ValueError, match=r"segment must be an integer in 1\.\.16"):
        memory.remat_model("sqrt", 16, 17, 8, 8)
    with pytest.raises(ValueError, match="batch must be an integer >= 1"):
        memory.remat_model("none", 16, 4, 8, 0)
    with pytest.raises(ValueError, match="depth must be an integer >= 1"):
        memory.remat_model("none", 0, 4, 8, 8)


def test_remat_explorer_follows_its_controls_and_carries_a_static_figure():
    e = memory.remat_explorer()
    assert e.prediction == memory.remat_model(**e.settings, **e.context)
    e.set(depth=96, variant="full")
    assert e.prediction == memory.remat_model(**e.settings, **e.context)
    assert e.prediction["kept_arrays"] == 96
    e.set(width=8, batch=256)
    result = e.measure_now()
    assert result is not None and result["total_bytes"] == pytest.approx(e.prediction["total_bytes"], rel=0.02)
    bundle = e._repr_mimebundle_()
    assert "image/png" in bundle and "predicted MiB" in bundle["text/plain"]
    assert 'data-model="scalelab.memory:remat_model"' in e.result.value
