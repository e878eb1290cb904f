import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scalelab import abstractions, data

floats = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(floats, floats), min_size=1, max_size=200))
def test_dot_implementations_agree(pairs):
    a = np.array([p[0] for p in pairs], dtype=np.float32)
    b = np.array([p[1] for p in pairs], dtype=np.float32)
    ref = float(np.dot(a.astype(np.float64), b.astype(np.float64)))
    scale = float(np.dot(np.abs(a).astype(np.float64), np.abs(b).astype(np.float64))) + 1e-6
    assert abs(abstractions.dot_python(a.tolist(), b.tolist()) - ref) <= 1e-9 * scale
    assert abs(abstractions.dot_numpy(a, b) - ref) <= 1e-5 * scale
    assert abs(float(abstractions.dot_jax(a, b)) - ref) <= 1e-5 * scale


def test_dot_python_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        abstractions.dot_python([1.0, 2.0], [1.0])


def test_language_speed_rows():
    rows = abstractions.language_speed([100, 1000], repeat=1)
    assert [(r["impl"], r["n"]) for r in rows] == [
        (impl, n) for n in (100, 1000) for impl in abstractions.IMPLEMENTATIONS]
    for r in rows:
        assert r["seconds"] > 0 and r["rel_error"] < 1e-3
        assert r["ns_per_element"] == pytest.approx(r["seconds"] / r["n"] * 1e9)
    assert all(r["speedup_vs_python"] == 1 for r in rows if r["impl"] == "python")
    with pytest.raises(ValueError, match="positive"):
        abstractions.language_speed([0])
    with pytest.raises(ValueError, match="positive"):
        abstractions.language_speed([])


def _sample(x, y=2):
    """Docstring: not counted."""
    # a comment: not counted

    z = (x +
         y)
    return z


class _Thing:
    """Class docstring."""

    def go(self):
        return 1


def test_count_lines():
    assert abstractions.count_lines(_sample) == 4  # def, two lines of z, return
    assert abstractions.count_lines(_Thing) == 3
    assert abstractions.count_lines("a = 1\n\n# c\nb = 2\n") == 2
    assert abstractions.count_lines(_sample, _Thing) == 7
    assert abstractions.count_lines(jax.jit(_sample)) == 4  # follows __wrapped__
    with pytest.raises(ValueError, match="cannot read the source"):
        abstractions.count_lines(len)


def test_count_lines_finds_classes_defined_outside_files():
    namespace: dict = {}
    src = "class Cell:\n    '''doc'''\n    def f(self):\n        return 2\n"
    filename = "<cell-1>"
    import linecache
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
    exec(compile(src, filename, "exec"), namespace)
    assert abstractions.count_lines(namespace["Cell"]) == 3


def test_measure_level_with_trivial_predictor():
    split = data.load_digits()
    majority = int(np.bincount(split.y_train).argmax())

    def train(x, y):
        return lambda x_new: np.full(len(x_new), majority)

    res = abstractions.measure_level("const", train, split, "nothing", [train])
    assert res.accuracy == pytest.approx(np.mean(split.y_test == majority))
    assert res.lines == 2 and res.train_s >= 0
    assert res.row()["level"] == "const"

    def bad(x, y):
        return lambda x_new: np.zeros((len(x_new), 2))

    with pytest.raises(ValueError, match="one label per test example"):
        abstractions.measure_level("bad", bad, split, "", [bad])


@pytest.mark.parametrize(("m", "k", "n"), [(8, 16, 4), (32, 32, 32)])
def test_lowering_counts_matmul_flops(m, k, n):
    low = abstractions.lowering(lambda a, b: a @ b, jnp.ones((m, k)), jnp.ones((k, n)))
    assert low.flops == 2 * m * k * n
    assert low.bytes_accessed >= 4 * (m * k + k * n + m * n)
    assert "dot_general" in low.jaxpr and "stablehlo.dot_general" in low.stablehlo
    assert "ENTRY" in low.hlo
    assert "\x1b[" not in low.jaxpr  # no terminal colours
    assert set(low.sizes()) == {"jaxpr", "stablehlo", "hlo"}


def test_strip_debug_info_removes_paths():
    hlo = ("HloModule m\n\nFileNames\n1 \"/home/me/x.py\"\n\nFunctionNames\n1 \"f\"\n\n"
           "ENTRY %main {\n  %a = f32[] add(%x, %y), metadata={op_name=\"jit(f)/add\" stack_frame_id=1}\n}\n")
    out = abstractions.strip_debug_info(hlo)
    assert "/home/me" not in out and "metadata" not in out and "FileNames" not in out
    assert "%a = f32[] add(%x, %y)" in out and out.startswith("HloModule m")


def test_excerpt():
    assert abstractions.excerpt("a\nb", 5) == "a\nb"
    assert abstractions.excerpt("a\nb\nc", 1) == "a\n... (2 more lines)"


def test_lowering_agrees_with_the_aot_api():
    def layer(x, w, b):
        return jax.nn.relu(x @ w + b)

    args = (jnp.ones((16, 8)), jnp.ones((8, 4)), jnp.ones(4))
    low = abstractions.lowering(layer, *args)
    lowered = jax.jit(layer).lower(*args)
    compiled = lowered.compile()
    cost = compiled.cost_analysis()
    assert low.jaxpr == jax.make_jaxpr(layer)(*args).pretty_print(use_color=False)
    assert low.stablehlo == lowered.as_text()
    assert low.hlo == abstractions.strip_debug_info(compiled.as_text())
    assert low.flops == cost["flops"] == 2 * 16 * 8 * 4 + 2 * 16 * 4
    assert low.bytes_accessed == cost["bytes accessed"]


def test_language_speed_figure_names_one_device():
    import matplotlib

    matplotlib.use("Agg")
    rows = abstractions.language_speed([100], repeat=1)
    fig = abstractions.plot_language_speed(rows)
    assert " 1 x " in fig.get_supxlabel() and "device" in fig.get_supxlabel()
