"""Chapter 00: languages and abstraction levels, measured.

- the same dot product in pure Python, NumPy (compiled C/Fortran) and ``jax.jit`` (XLA);
- a harness that trains one classifier written at several abstraction levels and
  reports lines of code, accuracy and time;
- the lowering pyramid of a JAX function: jaxpr -> StableHLO -> optimised HLO, with
  XLA's cost analysis.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io as _stdio
import linecache
import re
import textwrap
import time
import tokenize
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from scalelab import bench, env, plot

# --------------------------------------------------------------------------- dot product


def dot_python(a: Sequence[float], b: Sequence[float]) -> float:
    """Dot product as an interpreted loop: one bytecode dispatch per multiply-add."""
    total = 0.0
    for x, y in zip(a, b, strict=True):
        total += x * y
    return total


def dot_numpy(a: np.ndarray, b: np.ndarray) -> float:
    """Dot product in NumPy: one call into compiled, vectorised BLAS code."""
    return float(np.dot(a, b))


dot_jax = jax.jit(jnp.dot)
dot_jax.__doc__ = "Dot product compiled by XLA (``jax.jit(jnp.dot)``)."

IMPLEMENTATIONS = ("python", "numpy", "jax.jit")


def language_speed(sizes: Sequence[int], repeat: int = 3, seed: int = 0) -> list[dict[str, Any]]:
    """Time the three dot products on the same random float32 data for each size.

    Returns one row per (implementation, n): seconds per call, nanoseconds per element,
    speedup over pure Python, and the absolute difference from NumPy's float64 result.
    """
    if not sizes or any(int(n) < 1 for n in sizes):
        raise ValueError(f"sizes must be positive integers, got {list(sizes)}")
    rng = np.random.default_rng(seed)
    rows = []
    for n in map(int, sizes):
        a = rng.standard_normal(n, dtype=np.float32)
        b = rng.standard_normal(n, dtype=np.float32)
        reference = float(np.dot(a.astype(np.float64), b.astype(np.float64)))
        a_list, b_list = a.tolist(), b.tolist()
        a_dev, b_dev = jnp.asarray(a), jnp.asarray(b)
        cases: list[tuple[str, Callable[..., Any], tuple[Any, ...]]] = [
            ("python", dot_python, (a_list, b_list)),
            ("numpy", dot_numpy, (a, b)),
            ("jax.jit", dot_jax, (a_dev, b_dev)),
        ]
        python_s = None
        for impl, fn, args in cases:
            timing = bench.timeit(fn, *args, repeat=repeat)
            value = float(fn(*args))
            python_s = python_s or timing.best
            rows.append(
                {
                    "impl": impl,
                    "n": n,
                    "seconds": timing.best,
                    "ns_per_element": timing.best / n * 1e9,
                    "speedup_vs_python": python_s / timing.best,
                    "abs_error": abs(value - reference),
                    "rel_error": abs(value - reference) / max(abs(reference), 1e-30),
                }
            )
    return rows


def plot_language_speed(rows: Sequence[dict[str, Any]], info: env.EnvInfo | None = None):
    """Nanoseconds per element against n, one line per implementation (log-log)."""
    fig, ax = plot.figure()
    for impl in IMPLEMENTATIONS:
        pts = [(r["n"], r["ns_per_element"]) for r in rows if r["impl"] == impl]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=impl)
    ax.set(xscale="log", yscale="log", xlabel="vector length n",
           ylabel="time per element (ns)", title="Dot product: cost per multiply-add")
    ax.legend()
    info = info or env.describe()
    # jax.jit ran on one device (the default one); Python and NumPy on the host CPU, which on
    # the CPU backend is that same device.
    source = "measured" if info.backend == "cpu" else "Python, NumPy on the host CPU; jax.jit"
    plot.label(fig, info, source, devices=1)
    return fig


def bench_abstractions(quick: bool = False) -> dict[str, Any]:
    """Benchmark ``abstractions``: the chapter-00 dot product at several sizes."""
    sizes = [1_000, 10_000, 100_000] if quick else [1_000, 10_000, 100_000, 1_000_000]
    rows = language_speed(sizes)
    largest = [r for r in rows if r["n"] == sizes[-1]]
    return {
        "sizes": sizes,
        "rows": rows,
        "ns_per_element": {r["impl"]: r["ns_per_element"] for r in largest},
        "speedup_vs_python": {r["impl"]: r["speedup_vs_python"] for r in largest},
        "max_rel_error": max(r["rel_error"] for r in rows),
    }


# --------------------------------------------------------------------------- lines of code


def _source(obj: Any) -> str:
    if isinstance(obj, str):
        return textwrap.dedent(obj)
    target = getattr(obj, "__wrapped__", obj)
    try:
        return textwrap.dedent(inspect.getsource(target))
    except (OSError, TypeError) as exc:
        if inspect.isclass(target):
            found = _class_source_from_methods(target)
            if found:
                return textwrap.dedent(found)
        raise ValueError(f"cannot read the source of {obj!r}: {exc}") from None


def _class_source_from_methods(cls: type) -> str | None:
    """Find a class's source through its methods' code objects.

    ``inspect.getsource`` cannot find classes defined in a notebook cell (before Python
    3.13), but their methods know the cell they came from.
    """
    pattern = re.compile(rf"^\s*class\s+{re.escape(cls.__name__)}\b")
    for member in vars(cls).values():
        code = getattr(member, "__code__", None)
        if code is None:
            continue
        lines = linecache.getlines(code.co_filename)
        for i in range(min(code.co_firstlineno, len(lines)) - 1, -1, -1):
            if pattern.match(lines[i]):
                return "".join(inspect.getblock(lines[i:]))
    return None


def count_lines(*objs: Any) -> int:
    """Lines of code in the given functions/classes/source strings.

    Blank lines, comments and docstrings do not count; a statement spread over several
    lines counts once per physical line, as a reader sees it.
    """
    total = 0
    for obj in objs:
        src = _source(obj)
        tree = ast.parse(src)
        skip: set[int] = set()
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (
                isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                and body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                skip.update(range(body[0].lineno, (body[0].end_lineno or body[0].lineno) + 1))
        ignore = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                  tokenize.DEDENT, tokenize.ENCODING, tokenize.ENDMARKER}
        lines = set()
        for tok in tokenize.generate_tokens(_stdio.StringIO(src).readline):
            if tok.type not in ignore:
                lines.update(range(tok.start[0], tok.end[0] + 1))
        total += len(lines - skip)
    return total


# --------------------------------------------------------------------------- levels


@dataclasses.dataclass(frozen=True)
class LevelResult:
    level: str
    lines: int
    control: str
    accuracy: float
    train_s: float

    def row(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "lines of code": self.lines,
            "what you control": self.control,
            "test accuracy": round(self.accuracy, 3),
            "train + predict s (incl. compile)": round(self.train_s, 2),
        }


def measure_level(
    level: str,
    train: Callable[[np.ndarray, np.ndarray], Callable[[np.ndarray], Any]],
    split: Any,
    control: str,
    source: Sequence[Any],
) -> LevelResult:
    """Train with ``train(x, y) -> predict`` and measure it on ``split``'s test set.

    ``source`` lists the functions/classes a learner writes for this level; their
    lines of code are counted from the running code, never typed in.
    """
    start = time.perf_counter()
    predict = train(split.x_train, split.y_train)
    pred = np.asarray(predict(split.x_test))  # waits for any asynchronous JAX work
    train_s = time.perf_counter() - start
    if pred.shape != split.y_test.shape:
        raise ValueError(
            f"predict must return one label per test example, shape {split.y_test.shape}; "
            f"got {pred.shape}"
        )
    accuracy = float(np.mean(pred == split.y_test))
    return LevelResult(level, count_lines(*source), control, accuracy, train_s)


# --------------------------------------------------------------------------- lowering


@dataclasses.dataclass(frozen=True)
class Lowering:
    """The stages a jitted function passes through on its way to the device."""

    jaxpr: str
    stablehlo: str
    hlo: str
    cost: dict[str, float]

    @property
    def flops(self) -> float:
        return float(self.cost.get("flops", float("nan")))

    @property
    def bytes_accessed(self) -> float:
        return float(self.cost.get("bytes accessed", float("nan")))

    def sizes(self) -> dict[str, int]:
        """Lines of text at each stage."""
        return {k: len(getattr(self, k).splitlines()) for k in ("jaxpr", "stablehlo", "hlo")}


def lowering(fn: Callable[..., Any], *args: Any) -> Lowering:
    """Trace, lower and compile ``fn`` for ``args``; return every stage and the cost."""
    jaxpr = jax.make_jaxpr(fn)(*args).pretty_print(use_color=False)
    lowered = jax.jit(fn).lower(*args)
    compiled = lowered.compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older JAX returned one dict per device
        cost = cost[0] if cost else {}
    cost = {k: float(v) for k, v in (cost or {}).items() if "{" not in k}
    return Lowering(jaxpr, lowered.as_text(), strip_debug_info(compiled.as_text()), cost)


_DEBUG_SECTIONS = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")
_METADATA = re.compile(r",? metadata=\{[^{}]*\}")


def strip_debug_info(hlo: str) -> str:
    """Drop source-location tables and ``metadata={...}`` attributes from HLO text.

    They name files on the machine that compiled the function and are noise to a reader.
    """
    out: list[str] = []
    skipping = False
    for line in hlo.splitlines():
        if line.strip() in _DEBUG_SECTIONS:
            skipping = True
            continue
        if skipping:
            if line.strip():
                continue
            skipping = False
        out.append(_METADATA.sub("", line))
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def excerpt(text: str, lines: int = 12) -> str:
    """The first ``lines`` lines of a long text, with a count of what was left out."""
    all_lines = text.splitlines()
    shown = all_lines[:lines]
    if len(all_lines) > lines:
        shown.append(f"... ({len(all_lines) - lines} more lines)")
    return "\n".join(shown)
