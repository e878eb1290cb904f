import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from scalelab import data, models, precision, train

# --------------------------------------------------------------------------- formats


def test_format_table_matches_the_standards():
    info = {f: precision.format_info(f) for f in precision.FORMATS}
    assert (info["float32"].exponent, info["float32"].mantissa, info["float32"].eps) == (8, 23, 2.0 ** -23)
    assert (info["bfloat16"].exponent, info["bfloat16"].mantissa, info["bfloat16"].eps) == (8, 7, 2.0 ** -7)
    assert info["float16"].max == 65504 and info["float16"].smallest_normal == 2.0 ** -14
    assert info["float16"].smallest_subnormal == 2.0 ** -24
    assert info["float8_e4m3fn"].max == 448 and info["float8_e5m2"].max == 57344
    assert info["int8"].max == 127 and info["int8"].min == -128 and info["int8"].eps is None
    for f in info.values():
        assert f.sign + f.exponent + f.mantissa == f.bits
    rows = precision.format_table()
    assert [r["format"] for r in rows] == list(precision.FORMATS)
    assert rows[0]["epsilon"] == "1.192e-07" and rows[-1]["sign/exp/mantissa"].endswith("(integer)")


def test_unknown_format_and_dtype_errors_name_the_allowed_values():
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        precision.format_info("float4")
    with pytest.raises(ValueError, match="bfloat16"):
        precision.parse_dtype("float64")
    with pytest.raises(ValueError, match="allowed"):
        precision.parse_dtype(jnp.int32)
    assert precision.parse_dtype("BF16") == jnp.dtype(jnp.bfloat16)
    assert precision.parse_dtype(jnp.float16) == jnp.dtype(jnp.float16)


def test_roundtrip_error_shrinks_with_mantissa_bits():
    x = jax.random.normal(jax.random.key(0), (4096,))
    errs = {f: precision.relative_error(x, f) for f in ("float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")}
    assert errs["float16"] < errs["bfloat16"] < errs["float8_e4m3fn"] < errs["float8_e5m2"]
    # each mantissa bit halves the error: bf16 has 3 fewer than f16
    assert 5 < errs["bfloat16"] / errs["float16"] < 12
    assert precision.relative_error(x, "float32") == 0.0
    with pytest.raises(ValueError, match="all-zero"):
        precision.relative_error(jnp.zeros(3), "bfloat16")


def test_scaled_float8_keeps_tiny_tensors():
    x = jnp.linspace(1e-6, 1e-5, 100)  # below e4m3fn's smallest subnormal (~0.002)
    assert precision.flushed_fraction(x, "float8_e4m3fn") == 1.0
    assert precision.flushed_fraction(x, "float8_e4m3fn", scaled=True) == 0.0
    assert precision.relative_error(x, "float8_e4m3fn", scaled=True) < 0.07
    rows = precision.noise_table({"w": x})
    assert rows[0]["float8_e4m3fn"] == pytest.approx(1.0) and rows[0]["float8_e4m3fn (scaled)"] < 0.07


# --------------------------------------------------------------------------- failures


def test_underflow_and_overflow_fractions():
    g = {"a": jnp.array([1e-9, 1e-3, 0.0, 1.0]), "b": jnp.array([1e5, 2e-8])}
    assert precision.underflow_fraction(g) == pytest.approx(2 / 5)  # 1e-9 and 2e-8 flush (0.0 is not counted)
    assert precision.underflow_fraction(g, scale=2.0 ** 10) == 0.0
    assert precision.overflow_fraction(g) == pytest.approx(1 / 6)
    assert precision.underflow_fraction(g, dtype=jnp.bfloat16) == 0.0  # bf16 has float32's range
    with pytest.raises(ValueError):
        precision.underflow_fraction({})


def test_bf16_running_sum_stalls_and_float32_accumulation_fixes_it():
    x = np.full(4000, 0.5, np.float32)
    naive = precision.running_sum(x, jnp.bfloat16, jnp.bfloat16)
    fixed = precision.running_sum(x, jnp.bfloat16, jnp.float32)
    # bfloat16 has 8 significant bits: above 128 the gap is 1, and 128 + 0.5 rounds (to even) back to 128
    assert float(naive[-1]) == 128.0 and float(naive[254]) == 127.5
    assert float(fixed[-1]) == 2000.0
    np.testing.assert_allclose(fixed, 0.5 * np.arange(1, 4001))
    f16 = precision.running_sum(x, jnp.float16, jnp.float16)
    assert float(f16[-1]) == 1024.0  # 11 significant bits: 1024 + 0.5 is a tie, rounds to 1024
    with pytest.raises(ValueError, match="float format"):
        precision.running_sum(x, jnp.bfloat16, "int8")


# --------------------------------------------------------------------------- loss scaling


def test_dynamic_scale_backs_off_on_inf_and_grows_after_period():
    ls = precision.dynamic_loss_scale(2.0 ** 10, period=3)
    ls = precision.update(ls, jnp.asarray(False))
    assert float(ls.scale) == 2.0 ** 9 and int(ls.good_steps) == 0
    for expected_good in (1, 2):
        ls = precision.update(ls, jnp.asarray(True))
        assert float(ls.scale) == 2.0 ** 9 and int(ls.good_steps) == expected_good
    ls = precision.update(ls, jnp.asarray(True))  # third good step in a row: grow
    assert float(ls.scale) == 2.0 ** 10 and int(ls.good_steps) == 0


def test_scale_never_drops_below_min_and_static_never_moves():
    ls = precision.dynamic_loss_scale(4.0, period=10, min_scale=1.0)
    for _ in range(5):
        ls = precision.update(ls, jnp.asarray(False))
    assert float(ls.scale) == 1.0
    st_ls = precision.static_loss_scale(128.0)
    assert precision.update(st_ls, jnp.asarray(False)) is st_ls
    with pytest.raises(ValueError):
        precision.dynamic_loss_scale(0.0)
    with pytest.raises(ValueError):
        precision.dynamic_loss_scale(1.0, period=0)
    with pytest.raises(ValueError):
        precision.static_loss_scale(-1.0)


def _reference_rule(scale, good, finite, period, factor=2.0, min_scale=1.0):
    if not finite:
        return max(scale / factor, min_scale), 0
    if good + 1 >= period:
        return scale * factor, 0
    return scale, good + 1


@settings(max_examples=30, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=40), st.integers(1, 6), st.integers(0, 20))
def test_update_follows_the_rule_under_jit(flags, period, log_scale):
    ls = precision.dynamic_loss_scale(2.0 ** log_scale, period=period)
    step = jax.jit(precision.update)
    scale, good = 2.0 ** log_scale, 0
    for f in flags:
        ls = step(ls, jnp.asarray(f))
        scale, good = _reference_rule(scale, good, f, period)
        assert float(ls.scale) == scale and int(ls.good_steps) == good
        assert 0 <= int(ls.good_steps) < period and float(ls.scale) >= 1.0


@settings(max_examples=30, deadline=None)
@given(hnp.arrays(np.float32, st.integers(1, 20), elements=st.floats(-1e3, 1e3, width=32, allow_subnormal=False)),
       st.integers(0, 24))
def test_unscale_inverts_scale_for_powers_of_two(g, log_scale):
    # (float32 subnormals are excluded: XLA on CPU flushes them to zero in arithmetic)
    ls = precision.static_loss_scale(2.0 ** log_scale)
    scaled = jnp.asarray(g) * ls.scale
    np.testing.assert_array_equal(precision.unscale_grads({"g": scaled}, ls)["g"], g)


def test_scale_loss_of_a_float16_loss_stays_finite():
    ls = precision.static_loss_scale(2.0 ** 20)  # does not fit in float16
    out = precision.scale_loss(jnp.asarray(2.5, jnp.float16), ls)
    assert out.dtype == jnp.float32 and float(out) == 2.5 * 2 ** 20


def test_all_finite_finds_inf_and_nan_in_any_leaf():
    good = {"a": jnp.ones(3), "b": [jnp.zeros((2, 2), jnp.bfloat16)]}
    assert bool(precision.all_finite(good)) and bool(precision.all_finite({}))
    for bad in (jnp.inf, -jnp.inf, jnp.nan):
        tree = {"a": jnp.ones(3), "b": [jnp.zeros((2, 2), jnp.bfloat16).at[1, 0].set(bad)]}
        assert not bool(precision.all_finite(tree))


def test_loss_scale_is_a_pytree():
    ls = precision.dynamic_loss_scale(8.0, period=7)
    leaves, treedef = jax.tree.flatten(ls)
    assert len(leaves) == 2
    back = jax.tree.unflatten(treedef, leaves)
    assert back.period == 7 and float(back.scale) == 8.0


# --------------------------------------------------------------------------- policies


def test_policy_parsing():
    p = precision.Policy.parse("params=float32,compute=bfloat16,output=float32")
    assert (p.param_dtype, p.compute_dtype, p.output_dtype) == (jnp.float32, jnp.bfloat16, jnp.float32)
    assert str(p) == "params=float32,compute=bfloat16,output=float32"
    assert precision.Policy.parse(str(p)) == p
    assert precision.Policy.parse(" p = f32 , c = f16 , o = f32 ") == precision.Policy.parse(
        "params=float32,compute=float16,output=float32")
    half = precision.Policy.parse("float16")
    assert half.param_dtype == half.compute_dtype == half.output_dtype == jnp.float16
    assert precision.Policy.parse("bf16").compute_dtype == jnp.bfloat16


@pytest.mark.parametrize("spec, match", [
    ("float64", "unknown policy"),
    ("params=float32,compute=int8,output=float32", "unknown dtype 'int8'.*allowed"),
    ("params=float32,compute=bfloat16", "lacks output"),
    ("params=float32,weights=bfloat16,output=float32", "expected key=dtype"),
    ("params=float32,params=float16,compute=bfloat16,output=float32", "twice"),
    ("params=float32,compute,output=float32", "expected key=dtype"),
])
def test_bad_policies_raise_clear_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        precision.Policy.parse(spec)


def test_policy_needs_a_string():
    with pytest.raises(TypeError, match="string"):
        precision.Policy.parse(32)


def test_policy_casts_only_floats():
    p = precision.Policy.parse("params=float32,compute=bfloat16,output=float32")
    tree = {"x": jnp.ones(2), "y": jnp.arange(2)}
    out = p.cast_to_compute(tree)
    assert out["x"].dtype == jnp.bfloat16 and out["y"].dtype == tree["y"].dtype


# --------------------------------------------------------------------------- mixed precision training


@pytest.fixture(scope="module")
def digits():
    return data.load_digits()


@pytest.fixture(scope="module")
def small_model():
    return precision.digits_model(hidden=(16,), seed=0)


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_mixed_step_keeps_float32_master_params(small_model, digits, name):
    policy = precision.Policy.parse(precision.POLICIES[name])
    tx = optax.adam(1e-2)
    step = precision.make_train_step(small_model, policy, tx)
    params, opt_state, ls = small_model.params, tx.init(small_model.params), precision.dynamic_loss_scale(2.0 ** 10)
    xb, yb = digits.x_train[:32], digits.y_train[:32]
    grads = jax.grad(lambda p: precision.mixed_loss(small_model, policy, p, xb, yb)[0])(params)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    new, _, ls, metrics = step(params, opt_state, ls, xb, yb)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(new))
    assert bool(metrics["finite"]) and int(ls.good_steps) == 1
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(params), strict=True)]
    assert all(changed)
    # the low-precision loss is close to the float32 one
    ref = precision.mixed_loss(small_model, precision.Policy(), params, xb, yb)[0]
    low = precision.mixed_loss(small_model, policy, params, xb, yb)[0]
    assert abs(float(ref) - float(low)) < 0.05


def test_overflow_skips_the_step_and_halves_the_scale(small_model, digits):
    policy = precision.Policy.parse(precision.POLICIES["float16"])
    tx = optax.adam(1e-2)
    step = precision.make_train_step(small_model, policy, tx)
    opt_state = tx.init(small_model.params)
    ls = precision.dynamic_loss_scale(2.0 ** 30, period=5)  # far beyond float16's range: gradients overflow
    new, new_opt, new_ls, metrics = step(small_model.params, opt_state, ls, digits.x_train[:32], digits.y_train[:32])
    assert not bool(metrics["finite"])
    for a, b in zip(jax.tree.leaves((new, new_opt)), jax.tree.leaves((small_model.params, opt_state)), strict=True):
        np.testing.assert_array_equal(a, b)
    assert float(new_ls.scale) == 2.0 ** 29 and int(new_ls.good_steps) == 0


def test_train_policy_learns_and_counts(digits):
    run = precision.train_policy("bfloat16", digits.x_train, digits.y_train, epochs=2, hidden=(16,), learning_rate=1e-2,
                                 loss_scale=precision.dynamic_loss_scale(2.0 ** 4, period=5))
    steps = 2 * (len(digits.x_train) // 64)
    assert len(run.losses) == len(run.scales) == steps
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(run.params))
    assert run.accuracy(digits.x_test, digits.y_test) > 0.5  # 10 classes: chance is 0.1
    assert float(run.loss_scale.scale) > 2.0 ** 4  # grew (no overflow at such a small scale)
    with pytest.raises(ValueError, match="no default policy"):
        precision.train_policy("int4", digits.x_train, digits.y_train)


def test_activation_bytes_halve_in_bf16(small_model, digits):
    xb = digits.x_train[:64]
    f32 = precision.activation_bytes(small_model, precision.Policy(), small_model.params, xb)
    bf16 = precision.activation_bytes(small_model, precision.Policy.parse("bf16"), small_model.params, xb)
    assert f32 == 4 * 64 * (64 + 16 + 10) and bf16 * 2 == f32


def test_activation_and_weight_grads_match_direct_differentiation(small_model, digits):
    x, y = jnp.asarray(digits.x_train[:16]), jnp.asarray(digits.y_train[:16])
    ag = precision.activation_grads(small_model, small_model.params, x, y)
    _, inputs = precision.activations(small_model, small_model.params, x)
    assert [a.shape for a in ag] == [a.shape for a in inputs]
    direct = jax.grad(lambda x_: train.cross_entropy(small_model.module(), x_, y)[0])(x)
    np.testing.assert_allclose(ag[0], direct, rtol=1e-5, atol=1e-8)  # the first layer's input is x
    wg = precision.weight_grads(small_model, small_model.params, x, y)
    ref = nnx.grad(lambda m: train.cross_entropy(m, x, y)[0])(small_model.module())
    for a, b in zip(jax.tree.leaves(wg), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_layer_by_layer_forward_equals_the_model(small_model, digits):
    x = jnp.asarray(digits.x_test[:20])
    logits, _ = precision.activations(small_model, small_model.params, x)
    np.testing.assert_allclose(logits, small_model.module()(x), rtol=1e-5, atol=1e-6)
    cnn = precision.Model.of(models.CNN(8, 10, rngs=nnx.Rngs(0)))
    with pytest.raises(TypeError, match="MLP"):
        precision.activations(cnn, cnn.params, x)


# --------------------------------------------------------------------------- quantisation


# magnitudes below 1e-30 become exact zeros: a channel that small would need a subnormal scale
_weights = st.floats(-100, 100, width=32).map(lambda v: 0.0 if abs(v) < 1e-30 else v)


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.float32, st.sampled_from([(1, 1), (5, 3), (12, 6)]), elements=_weights))
def test_per_channel_quantisation_error_is_at_most_half_a_step(w):
    qt = precision.quantize_per_channel(jnp.asarray(w))
    assert qt.q.dtype == jnp.int8 and qt.scale.shape == (w.shape[1],)
    assert int(jnp.max(jnp.abs(qt.q.astype(jnp.int32)))) <= 127
    err = np.abs(np.asarray(qt.dequantize()) - w)
    assert np.all(err <= np.asarray(qt.scale) / 2 * (1 + 1e-5) + 1e-30)
    nonzero = np.abs(w).max(axis=0) > 0
    # the largest magnitude of every non-zero channel maps onto +-127
    assert np.all(np.abs(np.asarray(qt.q)).max(axis=0)[nonzero] == 127)


def test_tiny_channels_never_get_a_zero_scale():
    qt = precision.quantize_per_channel(jnp.array([[1e-38, 0.0], [-1e-39, 0.0]], jnp.float32))
    assert np.all(np.asarray(qt.scale) > 0) and np.all(np.isfinite(qt.dequantize()))
    assert np.all(np.abs(np.asarray(qt.dequantize()) - np.array([[1e-38, 0], [-1e-39, 0]])) <= 1e-38)


def test_zero_channel_quantises_to_zero():
    w = jnp.zeros((4, 2)).at[:, 1].set(jnp.array([1.0, -2.0, 0.5, 0.0]))
    qt = precision.quantize_per_channel(w)
    np.testing.assert_array_equal(qt.q[:, 0], 0)
    assert np.all(np.isfinite(qt.dequantize()))


@jax.jit
def _int8_vs_dequantised(x, w):
    qw = precision.quantize_per_channel(w)
    xq, sx = precision.quantize_tensor(x)
    return precision.int8_matmul(x, qw), (xq.astype(jnp.float32) * sx) @ qw.dequantize()


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2 ** 32 - 1), st.sampled_from([(1, 3, 1), (5, 40, 7), (9, 17, 2)]), st.floats(1e-3, 1e3))
def test_int8_matmul_equals_dequantised_float_matmul(seed, shape, magnitude):
    rows, inner, cols = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, inner)).astype(np.float32) * magnitude
    w = rng.standard_normal((inner, cols)).astype(np.float32)
    got, expected = _int8_vs_dequantised(x, w)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * magnitude)


def test_quantisation_bad_input():
    with pytest.raises(ValueError, match=">= 2 axes"):
        precision.quantize_per_channel(jnp.ones(3))
    with pytest.raises(ValueError, match="float"):
        precision.quantize_per_channel(jnp.ones((3, 3), jnp.int32))
    with pytest.raises(ValueError, match="cannot multiply"):
        precision.int8_matmul(jnp.ones((2, 5)), precision.quantize_per_channel(jnp.ones((4, 3))))


def test_int8_mlp_and_fp8_simulation_stay_close_to_float32(small_model, digits):
    x = jnp.asarray(digits.x_test[:64])
    ref = small_model.module()(x)
    qlayers = precision.quantize_mlp(small_model)
    assert precision.tree_bytes(qlayers) < 0.3 * precision.tree_bytes(small_model.params)
    int8 = precision.int8_forward(qlayers, x)
    fp8 = precision.fp8_forward(small_model, small_model.params, x)
    for out, tol in ((int8, 0.05), (fp8, 0.15)):
        assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) < tol
    assert precision.accuracy_of(ref, np.asarray(jnp.argmax(ref, -1))) == 1.0


# --------------------------------------------------------------------------- compiled code


def test_matmul_dtypes_reads_the_compiled_program():
    a = jnp.ones((8, 8), jnp.float32)
    assert precision.matmul_dtypes(lambda a, b: a @ b, a, a) == ["f32 x f32"]
    q = precision.quantize_per_channel(jnp.ones((8, 4)))
    found = precision.matmul_dtypes(precision.int8_matmul, a, q)
    assert found and "s8" in found[0]


def test_tree_bytes():
    assert precision.tree_bytes({"a": jnp.ones((3, 4)), "b": jnp.ones(2, jnp.bfloat16)}) == 48 + 4
    assert precision.tree_bytes(dataclasses.replace(precision.quantize_per_channel(jnp.ones((4, 2))))) == 8 + 8


# --------------------------------------------------------------------------- mixed-precision products, failures


def test_mixed_logits_accumulate_in_float32_and_match_the_module(small_model, digits):
    x = jnp.asarray(digits.x_test[:32])
    ref = small_model.module()(x)
    f32 = precision.mixed_logits(small_model, precision.Policy(), small_model.params, x)
    np.testing.assert_allclose(f32, ref, rtol=1e-5, atol=1e-5)
    bf16 = precision.mixed_logits(small_model, precision.Policy.parse("params=f32,compute=bf16,output=f32"),
                                  small_model.params, x)
    assert bf16.dtype == jnp.float32 and float(jnp.linalg.norm(bf16 - ref) / jnp.linalg.norm(ref)) < 0.02
    k = small_model.params["head"]["kernel"][...]
    out = precision.dense(jnp.ones((2, k.shape[0]), jnp.bfloat16), k, jnp.zeros(k.shape[1]), jnp.bfloat16)
    assert out.dtype == jnp.float32
    found = precision.matmul_dtypes(lambda h: precision.dense(h, k, jnp.zeros(k.shape[1]), jnp.bfloat16),
                                    jnp.ones((2, k.shape[0]), jnp.bfloat16))
    assert len(found) == 1


def test_zero_and_unchanged_fractions():
    assert float(precision.zero_fraction({"a": jnp.array([0.0, 1.0]), "b": jnp.zeros(2)})) == 0.75
    old = {"w": jnp.array([1.0, 1.0, 1.0], jnp.bfloat16)}
    upd = {"w": jnp.array([1e-4, 0.5, 0.0], jnp.bfloat16)}
    new = {"w": old["w"] + upd["w"]}
    # 1e-4 is below half of bfloat16's gap at 1 (2**-8): rounded away; the zero update is not counted
    assert float(precision.unchanged_fraction(new, old, upd)) == 0.5


def test_small_loss_weight_flushes_float16_gradients_and_scaling_restores_them(digits):
    kw = dict(epochs=1, hidden=(16,), loss_weight=2.0 ** -20)
    f16 = precision.POLICIES["float16"]
    ref = precision.train_policy("float32", digits.x_train, digits.y_train, **kw)
    none = precision.train_policy("float16", digits.x_train, digits.y_train, policy=f16, **kw)
    scaled = precision.train_policy("float16", digits.x_train, digits.y_train, policy=f16,
                                    loss_scale=precision.static_loss_scale(2.0 ** 20), **kw)
    assert np.mean(none.zero_grads) > 0.95 > np.mean(ref.zero_grads) + 0.3
    assert abs(np.mean(scaled.zero_grads) - np.mean(ref.zero_grads)) < 0.02
    assert none.losses[-1] > ref.losses[-1] and abs(scaled.losses[-1] - ref.losses[-1]) < 0.05


def test_pure_bfloat16_keeps_bfloat16_state_and_loses_small_updates(digits):
    kw = dict(epochs=1, hidden=(16,), learning_rate=2e-4)
    pure = precision.train_policy("pure", digits.x_train, digits.y_train,
                                  policy="params=bfloat16,compute=bfloat16,output=float32", **kw)
    mixed = precision.train_policy("mixed", digits.x_train, digits.y_train, policy=precision.POLICIES["bfloat16"], **kw)
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves((pure.params, pure.opt_state)) if a.ndim)
    assert np.mean(pure.unchanged) > 0.3 > 10 * np.mean(mixed.unchanged)


def test_committed_matmul_rows_and_spec_ratios():
    result = {"device": "GPU X", "backend": "gpu", "device_count": 1, "date": "2026-01-01T00:00:00",
              "versions": {"jax": "0"}, "quick": False, "timing_shape": {"matmul_n": 8},
              "matmul": {"float32": {"op_per_s": 2e12, "compiled": "f32 x f32"},
                         "bfloat16 (float32 accumulate)": {"op_per_s": 3e12, "compiled": "bf16 x bf16"}}}
    rows = precision.committed_matmul_rows(result)
    assert rows[0]["variant"] == "float32 = TF32 (default precision)" and rows[1]["speed-up over float32 row"] == 1.5
    assert "GPU X (gpu, 1 device(s)), jax 0, committed 2026-01-01, full mode, matmul n=8" == precision.provenance(result)
    r = precision.spec_ratios("NVIDIA H200 SXM")
    assert r["bf16 / tf32"] == pytest.approx(2.0) and r["bf16 / fp32"] > 10
    assert precision.spec_ratios("TPU v5e")["bf16 / tf32"] is None
    with pytest.raises(ValueError, match="no published spec"):
        precision.spec_ratios("GPU X")


# --------------------------------------------------------------------------- the loss-scale explorer


@pytest.mark.parametrize("fmt", precision.LOSS_SCALE_FORMATS)
def test_cast_thresholds_decide_every_value_as_the_cast_does(fmt):
    """Round to nearest, ties to even: the midpoints themselves are the hardest values."""
    t = precision.cast_thresholds(fmt)
    edges = [t["zero_max"], t["normal_min"], t["inf_min"], t["smallest_subnormal"], t["smallest_normal"], t["max"]]
    probes = np.array([e * f for e in edges for f in (1 - 2.0 ** -20, 1.0, 1 + 2.0 ** -20)], np.float64)
    probes = probes[np.isfinite(probes.astype(np.float32)) & (probes.astype(np.float32) > 0)]
    x = probes.astype(np.float32)
    with np.errstate(over="ignore"):
        cast = np.abs(x.astype(precision.format_dtype(fmt)).astype(np.float32))
    y = x.astype(np.float64)
    assert np.array_equal(cast == 0, y <= t["zero_max"])
    assert np.array_equal((cast > 0) & (cast < t["smallest_normal"]), (y > t["zero_max"]) & (y < t["normal_min"]))
    assert np.array_equal(np.isinf(cast), y >= t["inf_min"])
    if fmt == "float16":
        assert (t["zero_max"], t["inf_min"]) == (2.0 ** -25, 65520.0)


def test_loss_scale_model_counts_what_the_cast_does():
    g = precision.step_gradients(0)
    for fmt in precision.LOSS_SCALE_FORMATS:
        for k in (-8, 0, 6, 20, 32):
            pred = precision.loss_scale_model(k, fmt, epochs=0)
            got = precision.measure_loss_scale_point(k, fmt, epochs=0)
            assert {key: pred[key] for key in got} == got
    # the chapter's own counters agree (on these gradients, which have no exact zeros)
    pred = precision.loss_scale_model(-4, "float16", epochs=0)
    assert pred["exact_zeros"] == 0
    assert pred["underflow_fraction"] == pytest.approx(precision.underflow_fraction(g, scale=2.0 ** -4), abs=1e-7)
    high = precision.loss_scale_model(30, "float16", epochs=0)
    assert high["overflow_fraction"] == pytest.approx(precision.overflow_fraction(g, scale=2.0 ** 30), abs=1e-7)


def test_loss_scale_model_invariants():
    sweep = precision.loss_scale_model(0, "float16", epochs=0)
    under, over = np.array(sweep["sweep_underflow"]), np.array(sweep["sweep_overflow"])
    assert np.all(np.diff(under) <= 0) and np.all(np.diff(over) >= 0)  # a larger scale: fewer zeros, more infs
    assert sum(sweep["hist_counts"]) == sweep["gradients"]
    for k in (-8, 0, 12, 32):
        p = precision.loss_scale_model(k, "float16", epochs=0)
        total = p["underflow_fraction"] + p["subnormal_fraction"] + p["overflow_fraction"] + p["normal_fraction"]
        assert total == pytest.approx(1.0)
        assert p["log2_normal_edge"] == pytest.approx(np.log2(2.0 ** -14 - 2.0 ** -25) - k)
        assert p["sweep_underflow"][p["sweep_log2_scales"].index(k)] == p["underflow_fraction"]
        bf = precision.loss_scale_model(k, "bfloat16", epochs=0)  # float32's exponent: nothing is lost
        assert bf["underflow_count"] == bf["overflow_count"] == bf["subnormal_count"] == 0


def test_loss_scale_model_refuses_bad_settings():
    for kwargs, match in [({"format": "float8_e4m3fn"}, "format must be one of"), ({"log2_scale": 0.5}, "log2_scale"),
                          ({"log2_scale": 99}, "log2_scale"), ({"epochs": -1}, "epochs"), ({"batch": 0}, "batch")]:
        args = {"log2_scale": 0, "format": "float16", "epochs": 0, **kwargs}
        with pytest.raises(ValueError, match=match):
            precision.loss_scale_model(**args)


def test_loss_scale_explorer_follows_its_controls_and_measures():
    e = precision.loss_scale_explorer(epochs=0)
    assert e.prediction == precision.loss_scale_model(**e.settings, **e.context)
    e.set(log2_scale=2, format="bfloat16")
    assert e.prediction == precision.loss_scale_model(**e.settings, **e.context)
    measured = e.measure_now()
    assert measured is not None and measured["underflow_fraction"] == e.prediction["underflow_fraction"]
    bundle = e._repr_mimebundle_()
    assert "image/png" in bundle and "become 0" in bundle["text/plain"]
    assert 'data-model="scalelab.precision:loss_scale_model"' in e.result.value
