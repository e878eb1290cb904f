"""Chapter 11: low precision training and inference.

A number format trades range (exponent bits) and resolution (mantissa bits) for memory
and arithmetic speed. This module gathers what the chapter measures:

- **formats**: float32, bfloat16, float16, float8 (e4m3fn, e5m2) and int8 — bit layouts,
  range, epsilon and smallest normal (from ``jnp.finfo`` / ``jnp.iinfo``), and the
  quantisation noise of each on real weights and activations;
- **failures**: float16 gradient underflow, overflow to inf, and bfloat16 accumulation
  error in long sums (fixed by accumulating in float32);
- **loss scaling**, static and dynamic, as a few pure (jit-able) functions on a small
  pytree state :class:`LossScale` — written here instead of taken from the unmaintained
  ``jmp`` package;
- **mixed precision training**: float32 master weights, 16-bit products accumulated in float32
  (``preferred_element_type``, :func:`dense`), described by a :class:`Policy` (param / compute /
  output dtypes) parsed from a string; the per-step share of gradients flushed to zero and of
  updates rounded away (pure bfloat16 against float32 masters);
- **inference quantisation**: int8 post-training quantisation with per-output-channel
  scales and an int32-accumulating matmul, and float8 inference simulated by casting
  through float8 and back;
- the ``precision`` benchmark (:func:`bench_precision`), and committed results of it read back
  with their provenance (:func:`committed_matmul_rows`, :func:`provenance`) beside published
  peak ratios (:func:`spec_ratios`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

# --------------------------------------------------------------------------- dtypes and formats

#: The dtype names (and their short aliases) accepted wherever a dtype is given as a string.
DTYPES: dict[str, Any] = {
    "float32": jnp.float32, "f32": jnp.float32,
    "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
    "float16": jnp.float16, "f16": jnp.float16, "half": jnp.float16,
}

#: The formats of the chapter, widest first.
FORMATS: tuple[str, ...] = ("float32", "bfloat16", "float16", "float8_e4m3fn", "float8_e5m2", "int8")

_FORMAT_DTYPES: dict[str, Any] = {
    "float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16,
    "float8_e4m3fn": jnp.float8_e4m3fn, "float8_e5m2": jnp.float8_e5m2, "int8": jnp.int8,
}


def parse_dtype(name: str | Any, allowed: dict[str, Any] | None = None) -> Any:
    """The JAX dtype named ``name`` (e.g. ``"bfloat16"`` or ``"bf16"``); a dtype passes through.

    Raises ValueError naming the allowed names for anything else.
    """
    allowed = DTYPES if allowed is None else allowed
    if not isinstance(name, str):
        try:
            dtype = jnp.dtype(name)
        except TypeError:
            raise TypeError(f"expected a dtype or one of {sorted(allowed)}, got {name!r}") from None
        if dtype not in {jnp.dtype(d) for d in allowed.values()}:
            raise ValueError(f"dtype {dtype} is not allowed here; allowed: {sorted(allowed)}")
        return dtype
    key = name.strip().lower()
    if key not in allowed:
        raise ValueError(f"unknown dtype {name!r}; allowed: {', '.join(sorted(allowed))}")
    return jnp.dtype(allowed[key])


def format_dtype(name: str) -> Any:
    """The dtype of one of :data:`FORMATS` (clear error for other names)."""
    return parse_dtype(name, _FORMAT_DTYPES)


@dataclasses.dataclass(frozen=True)
class FormatInfo:
    """Bit layout and range of a number format."""

    name: str
    bits: int
    sign: int
    exponent: int
    mantissa: int
    max: float
    smallest_normal: float | None  # None for integers
    smallest_subnormal: float | None
    eps: float | None  # gap between 1 and the next larger number; None for integers
    min: float


def format_info(name: str) -> FormatInfo:
    """Layout and range of ``name`` from ``jnp.finfo`` (floats) or ``jnp.iinfo`` (int8)."""
    dtype = format_dtype(name)
    if jnp.issubdtype(dtype, jnp.integer):
        ii = jnp.iinfo(dtype)
        return FormatInfo(name, ii.bits, 1, 0, ii.bits - 1, float(ii.max), None, None, None, float(ii.min))
    fi = jnp.finfo(dtype)
    return FormatInfo(name, fi.bits, 1, int(fi.nexp), int(fi.nmant), float(fi.max), float(fi.smallest_normal),
                      float(fi.smallest_subnormal), float(fi.eps), float(fi.min))


def format_table(names: Sequence[str] = FORMATS) -> list[dict[str, Any]]:
    """One row per format: bits, layout, largest value, smallest normal/subnormal, epsilon.

    Numbers are formatted as strings (4 significant digits) so that the table prints the
    same everywhere.
    """
    def g(v: float | None) -> str:
        return "-" if v is None else f"{v:.4g}"

    rows = []
    for name in names:
        f = format_info(name)
        rows.append({"format": name, "bits": f.bits,
                     "sign/exp/mantissa": f"{f.sign}/{f.exponent}/{f.mantissa}" if f.exponent
                     else f"{f.sign}/-/{f.mantissa} (integer)",
                     "max": g(f.max), "smallest normal": g(f.smallest_normal),
                     "smallest subnormal": g(f.smallest_subnormal), "epsilon": g(f.eps),
                     "bytes": f.bits // 8})
    return rows


def plot_bit_layouts(names: Sequence[str] = FORMATS, info: Any = None):
    """A figure with one bar per format: its sign, exponent and mantissa bits, drawn to scale."""
    from matplotlib.patches import Rectangle

    from scalelab import plot

    fig, ax = plot.figure(width=7.2, height=0.45 * len(names) + 1.0)
    colours = {"sign": "#d62728", "exponent": "#1f77b4", "mantissa": "#2ca02c", "value": "#9467bd"}
    for row, name in enumerate(names):
        f = format_info(name)
        y = len(names) - 1 - row
        parts = [("sign", f.sign), ("exponent", f.exponent), ("mantissa", f.mantissa)] if f.exponent else \
            [("sign", f.sign), ("value", f.mantissa)]
        x = 0
        for part, width in parts:
            ax.barh(y, width, left=x, color=colours[part], edgecolor="white", height=0.7)
            if width:
                ax.text(x + width / 2, y, str(width), ha="center", va="center", color="white", fontsize=8)
            x += width
    ax.set_yticks(range(len(names)), list(reversed(names)))
    ax.set_xlim(0, 32)
    ax.set_xticks(range(0, 33, 4))
    ax.set_xlabel("bits")
    ax.grid(False)
    handles = [Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    ax.legend(handles, ["sign", "exponent", "mantissa (fraction)", "two's-complement value"],
              loc="lower right", ncols=2, fontsize=8)
    ax.set_title("Bit layouts: exponent bits buy range, mantissa bits buy precision")
    plot.label(fig, info, source="drawn from jnp.finfo/jnp.iinfo")
    return fig


# --------------------------------------------------------------------------- quantisation noise


def roundtrip(x: jax.Array, name: str, scaled: bool = False) -> jax.Array:
    """``x`` (float32) cast to format ``name`` and back to float32.

    ``scaled`` first divides by a per-tensor scale that maps ``max|x|`` onto the
    format's largest value (as float8 recipes do); int8 is always scaled
    (symmetric, ``max|x| / 127``).
    """
    x = jnp.asarray(x, jnp.float32)
    dtype = format_dtype(name)
    if name == "int8":
        q, s = quantize_tensor(x)
        return q.astype(jnp.float32) * s
    if not scaled:
        return x.astype(dtype).astype(jnp.float32)
    s = _safe_scale(jnp.max(jnp.abs(x)) / float(jnp.finfo(dtype).max))
    return (x / s).astype(dtype).astype(jnp.float32) * s


def relative_error(x: jax.Array, name: str, scaled: bool = False) -> float:
    """Norm-wise relative error ``||roundtrip(x) - x|| / ||x||`` of casting ``x`` down and back."""
    x = jnp.asarray(x, jnp.float32)
    norm = float(jnp.linalg.norm(x))
    if norm == 0.0:
        raise ValueError("relative error of an all-zero tensor is undefined")
    return float(jnp.linalg.norm(roundtrip(x, name, scaled) - x)) / norm


def flushed_fraction(x: jax.Array, name: str, scaled: bool = False) -> float:
    """Fraction of the non-zero entries of ``x`` that become exactly 0 after the round trip."""
    x = jnp.asarray(x, jnp.float32)
    nonzero = x != 0
    count = int(nonzero.sum())
    if count == 0:
        return 0.0
    return int(((roundtrip(x, name, scaled) == 0) & nonzero).sum()) / count


def noise_table(tensors: dict[str, jax.Array], names: Sequence[str] = FORMATS[1:]) -> list[dict[str, Any]]:
    """Relative round-trip error of each tensor in each format (float8 unscaled and scaled)."""
    rows = []
    for label, x in tensors.items():
        flat = jnp.ravel(jnp.asarray(x, jnp.float32))
        row: dict[str, Any] = {"tensor": label, "values": int(flat.size)}
        for name in names:
            row[name] = relative_error(flat, name)
            if name.startswith("float8"):
                row[f"{name} (scaled)"] = relative_error(flat, name, scaled=True)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- what goes wrong


def underflow_fraction(tree: Any, dtype: Any = jnp.float16, scale: float = 1.0) -> float:
    """Fraction of the non-zero values in ``tree`` that become 0 when ``scale * value`` is cast to ``dtype``."""
    leaves = [jnp.ravel(jnp.asarray(a, jnp.float32)) for a in jax.tree.leaves(tree)]
    if not leaves:
        raise ValueError("underflow_fraction needs at least one array")
    x = jnp.concatenate(leaves)
    nonzero = x != 0
    zero_after = (x * scale).astype(dtype) == 0
    return float((zero_after & nonzero).sum() / jnp.maximum(nonzero.sum(), 1))


def overflow_fraction(tree: Any, dtype: Any = jnp.float16, scale: float = 1.0) -> float:
    """Fraction of the finite values in ``tree`` that become +-inf when ``scale * value`` is cast to ``dtype``."""
    leaves = [jnp.ravel(jnp.asarray(a, jnp.float32)) for a in jax.tree.leaves(tree)]
    if not leaves:
        raise ValueError("overflow_fraction needs at least one array")
    x = jnp.concatenate(leaves)
    return float(jnp.mean(jnp.isinf((x * scale).astype(dtype))))


def running_sum(x: jax.Array, dtype: Any = jnp.bfloat16, accumulate: Any = jnp.bfloat16) -> jax.Array:
    """Sequential prefix sums of ``x`` stored in ``dtype``, added one after another
    (``lax.scan``) into a running total kept in ``accumulate``. Returns every partial sum
    (as float32).

    This is the naive loop ``total = total + x[i]``. With a bfloat16 total, once the total
    is large each addend is smaller than half the gap between neighbouring bfloat16
    numbers and is rounded away. The rounding of every addition is made explicit with
    ``lax.reduce_precision``: XLA may otherwise keep a low-precision loop carry in float32
    between iterations (``xla_allow_excess_precision``, on by default), which would hide
    part of the effect on CPU.
    """
    xs = jnp.asarray(x).astype(parse_dtype(dtype, _FORMAT_DTYPES))  # stored in dtype (materialised)
    acc = parse_dtype(accumulate, _FORMAT_DTYPES)
    if not jnp.issubdtype(acc, jnp.floating):
        raise ValueError(f"the accumulator must be a float format, got {acc}")
    fi = jnp.finfo(acc)
    return _scan_sum(xs, int(fi.nexp), int(fi.nmant))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _scan_sum(xs: jax.Array, exponent_bits: int, mantissa_bits: int) -> jax.Array:
    def body(total, v):
        total = jax.lax.reduce_precision(total + v.astype(jnp.float32), exponent_bits, mantissa_bits)
        return total, total

    _, partial = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
    return partial


# --------------------------------------------------------------------------- loss scaling


@functools.partial(jax.tree_util.register_dataclass, data_fields=["scale", "good_steps"],
                   meta_fields=["period", "factor", "dynamic", "min_scale"])
@dataclasses.dataclass(frozen=True)
class LossScale:
    """Loss-scaling state: the current ``scale`` and the number of finite steps in a row.

    A pytree (the two arrays are its leaves; the configuration is static), so it passes
    through ``jax.jit`` and ``lax.scan``. ``dynamic=False`` is static loss scaling: the
    scale never changes. Dynamic: on a non-finite gradient the scale is divided by
    ``factor`` (not below ``min_scale``) and the step is skipped; after ``period`` finite
    steps in a row it is multiplied by ``factor``.
    """

    scale: jax.Array
    good_steps: jax.Array
    period: int = 2000
    factor: float = 2.0
    dynamic: bool = True
    min_scale: float = 1.0


def dynamic_loss_scale(initial: float = 2.0 ** 15, period: int = 2000, factor: float = 2.0,
                       min_scale: float = 1.0) -> LossScale:
    """A dynamic loss scale starting at ``initial`` (defaults as in Micikevicius et al. 2018)."""
    if not initial > 0 or period < 1 or not factor > 1 or not min_scale > 0:
        raise ValueError(f"need initial > 0, period >= 1, factor > 1, min_scale > 0; got "
                         f"{initial}, {period}, {factor}, {min_scale}")
    return LossScale(jnp.asarray(initial, jnp.float32), jnp.asarray(0, jnp.int32), period, float(factor),
                     True, float(min_scale))


def static_loss_scale(scale: float) -> LossScale:
    """A fixed loss scale (``update`` leaves it unchanged)."""
    if not scale > 0:
        raise ValueError(f"the loss scale must be > 0, got {scale}")
    return LossScale(jnp.asarray(scale, jnp.float32), jnp.asarray(0, jnp.int32), dynamic=False)


def no_loss_scale() -> LossScale:
    """Scale 1, never changed: training without loss scaling, through the same code path."""
    return static_loss_scale(1.0)


def scale_loss(loss: jax.Array, ls: LossScale) -> jax.Array:
    """``loss * scale`` in float32: backpropagating it scales every gradient by ``scale``.

    The product is formed in float32 on purpose: scales above 65504 (2**16 and up) do
    not fit in float16, so casting the scale to a float16 loss's dtype would give inf.
    """
    return loss.astype(jnp.float32) * ls.scale


def unscale_grads(grads: Any, ls: LossScale) -> Any:
    """Gradients divided by the scale, in float32 (the master-weight dtype)."""
    return jax.tree.map(lambda g: g.astype(jnp.float32) / ls.scale, grads)


def all_finite(tree: Any) -> jax.Array:
    """A boolean scalar: True when no leaf of ``tree`` holds inf or NaN."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.asarray(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in leaves]))


def update(ls: LossScale, finite: jax.Array) -> LossScale:
    """The next loss scale after a step whose gradients were ``finite`` (the dynamic rule).

    Not finite: halve (divide by ``factor``, not below ``min_scale``) and reset the count.
    Finite: count it; after ``period`` finite steps in a row, double and reset the count.
    """
    if not ls.dynamic:
        return ls
    grow = finite & (ls.good_steps + 1 >= ls.period)
    scale = jnp.where(finite, jnp.where(grow, ls.scale * ls.factor, ls.scale),
                      jnp.maximum(ls.scale / ls.factor, ls.min_scale))
    good = jnp.where(finite & ~grow, ls.good_steps + 1, 0)
    return dataclasses.replace(ls, scale=scale.astype(jnp.float32), good_steps=good.astype(jnp.int32))


def select_if_finite(finite: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where ``finite`` else ``old``, leaf by leaf: how a step is skipped inside jit."""
    return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)


# --------------------------------------------------------------------------- policies


@dataclasses.dataclass(frozen=True)
class Policy:
    """Which dtype parameters are stored in, compute runs in, and outputs are returned in.

    Like ``jmp.Policy``. Mixed precision is ``params=float32, compute=bfloat16 (or float16),
    output=float32``: float32 master weights, low-precision arithmetic, float32 loss.
    """

    param_dtype: Any = jnp.float32
    compute_dtype: Any = jnp.float32
    output_dtype: Any = jnp.float32

    def __post_init__(self):
        for field in ("param_dtype", "compute_dtype", "output_dtype"):
            object.__setattr__(self, field, parse_dtype(getattr(self, field)))

    @classmethod
    def parse(cls, spec: str) -> Policy:
        """A policy from ``"params=float32,compute=bfloat16,output=float32"`` or one dtype name
        (``"float32"``, ``"bfloat16"``, ``"float16"``, or a short alias), meaning all three.

        Keys: ``params`` (or ``param``, ``p``), ``compute`` (``c``), ``output`` (``o``); all
        three are required in the key=value form.
        """
        if not isinstance(spec, str):
            raise TypeError(f"a policy is a string such as {EXAMPLE_POLICY!r}, got {type(spec).__name__}")
        text = spec.strip().lower()
        if "=" not in text:
            if text not in DTYPES:
                raise ValueError(f"unknown policy {spec!r}: give one dtype ({', '.join(sorted(DTYPES))}) "
                                 f"or key=value pairs such as {EXAMPLE_POLICY!r}")
            return cls(text, text, text)
        values: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, eq, value = (s.strip() for s in part.partition("="))
            if not eq or key not in _POLICY_KEYS:
                raise ValueError(f"bad policy entry {part!r} in {spec!r}: expected key=dtype with key one of "
                                 f"{sorted(set(_POLICY_KEYS))}")
            field = _POLICY_KEYS[key]
            if field in values:
                raise ValueError(f"policy {spec!r} sets {field} twice")
            values[field] = value
        missing = [f for f in ("params", "compute", "output") if f not in values]
        if missing:
            raise ValueError(f"policy {spec!r} lacks {', '.join(missing)} (e.g. {EXAMPLE_POLICY!r})")
        return cls(values["params"], values["compute"], values["output"])

    def __str__(self) -> str:
        name = lambda d: jnp.dtype(d).name  # noqa: E731
        return f"params={name(self.param_dtype)},compute={name(self.compute_dtype)},output={name(self.output_dtype)}"

    def cast_to_param(self, tree: Any) -> Any:
        return _cast_floats(tree, self.param_dtype)

    def cast_to_compute(self, tree: Any) -> Any:
        return _cast_floats(tree, self.compute_dtype)

    def cast_to_output(self, tree: Any) -> Any:
        return _cast_floats(tree, self.output_dtype)


EXAMPLE_POLICY = "params=float32,compute=bfloat16,output=float32"
_POLICY_KEYS = {"params": "params", "param": "params", "p": "params", "compute": "compute", "c": "compute",
                "output": "output", "o": "output"}


def _cast_floats(tree: Any, dtype: Any) -> Any:
    """Cast the floating-point leaves of ``tree`` to ``dtype``; integers (labels, counters) stay."""
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) else a,
                        tree)


#: The three training policies of the chapter's comparison.
POLICIES: dict[str, str] = {
    "float32": "float32",
    "bfloat16": "params=float32,compute=bfloat16,output=float32",
    "float16": "params=float32,compute=float16,output=float32",
}


def tree_bytes(tree: Any) -> int:
    """Total bytes of the array leaves of ``tree``."""
    return int(sum(np.dtype(a.dtype).itemsize * int(np.prod(a.shape)) for a in jax.tree.leaves(tree)))


# --------------------------------------------------------------------------- mixed precision training


@dataclasses.dataclass(frozen=True)
class Model:
    """A Flax NNX model split into (graphdef, params, rest) so steps are pure JAX functions."""

    graphdef: Any
    params: Any
    rest: Any

    @classmethod
    def of(cls, module: nnx.Module) -> Model:
        graphdef, params, rest = nnx.split(module, nnx.Param, ...)
        return cls(graphdef, params, rest)

    def module(self, params: Any = None) -> nnx.Module:
        return nnx.merge(self.graphdef, self.params if params is None else params, self.rest)


def dense(h: jax.Array, kernel: jax.Array, bias: jax.Array, compute_dtype: Any) -> jax.Array:
    """One mixed-precision linear layer: ``h @ kernel`` with both operands in ``compute_dtype``
    and the products accumulated and returned in float32 (``preferred_element_type``), then
    the bias added in float32.

    Asking for a float32 result is what lets a backend use its 16-bit matrix path with a wide
    accumulator; a 16-bit result (``a @ b`` on 16-bit inputs) rounds the sum to 16 bits and, on
    XLA's CPU backend, is compiled as a float32 product between two conversions.
    """
    c = jnp.dtype(compute_dtype)
    z = jnp.dot(h.astype(c), kernel.astype(c), preferred_element_type=jnp.float32)
    return z + bias.astype(jnp.float32)


def mixed_logits(model: Model, policy: Policy, params: Any, x: jax.Array) -> jax.Array:
    """Logits (in ``policy.output_dtype``) with the forward pass in ``policy.compute_dtype``.

    For :class:`scalelab.models.MLP` every layer is :func:`dense`: 16-bit operands, float32
    accumulation, and each ReLU output cast back to the compute dtype (the activation the
    next product and the backward pass use). Other models run their own ``__call__`` on
    parameters and inputs cast to the compute dtype.
    """
    from scalelab import models

    net = model.module(params)
    c = policy.compute_dtype
    if isinstance(net, models.MLP):
        h = jnp.asarray(x).astype(c)
        for layer in net.layers:
            h = nnx.relu(dense(h, layer.kernel[...], layer.bias[...], c)).astype(c)
        logits = dense(h, net.head.kernel[...], net.head.bias[...], c)
    else:
        logits = model.module(policy.cast_to_compute(params))(policy.cast_to_compute(x))
    return policy.cast_to_output(logits)


def mixed_loss(model: Model, policy: Policy, params: Any, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy with the forward pass in ``policy.compute_dtype`` (:func:`mixed_logits`).

    The parameters (float32 masters) and the inputs are cast to the compute dtype *inside*
    the differentiated function, so the gradients come back in the parameters' dtype: the
    transpose of a cast is a cast back. The logits are in the output dtype (float32)
    before the softmax, whose exponentials would overflow float16.
    """
    logits = mixed_logits(model, policy, params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits


def zero_fraction(tree: Any) -> jax.Array:
    """Fraction of the entries of ``tree`` that are exactly zero (a scalar array)."""
    leaves = jax.tree.leaves(tree)
    zeros = sum(jnp.sum(a == 0) for a in leaves)
    return zeros / max(sum(a.size for a in leaves), 1)


def unchanged_fraction(new: Any, old: Any, updates: Any) -> jax.Array:
    """Fraction of the non-zero ``updates`` that left their parameter unchanged (``new == old``):
    updates smaller than half the gap between neighbouring numbers of the parameter's dtype,
    rounded away."""
    pairs = list(zip(jax.tree.leaves(new), jax.tree.leaves(old), jax.tree.leaves(updates), strict=True))
    moved = sum(jnp.sum(u != 0) for _, _, u in pairs)
    lost = sum(jnp.sum((n == o) & (u != 0)) for n, o, u in pairs)
    return lost / jnp.maximum(moved, 1)


def make_train_step(model: Model, policy: Policy, tx: optax.GradientTransformation,
                    loss_weight: float = 1.0) -> Callable:
    """A jitted mixed-precision training step with loss scaling.

    ``step(params, opt_state, ls, x, y) -> (params, opt_state, ls, metrics)``: scale the
    loss, differentiate, unscale the gradients into float32, check them, apply the update
    only if they are finite (else keep the old parameters and optimiser state: the step
    is skipped), and update the loss scale. The optimiser sees the gradients in the
    parameters' dtype (float32 master weights; bfloat16 for a pure-bfloat16 policy, whose
    optimiser state and updates are then bfloat16 too).

    ``loss_weight`` multiplies the loss that is differentiated (an auxiliary loss's weight,
    or a mean over very many values): it makes every gradient that much smaller. Metrics:
    the (unweighted) loss, batch accuracy, ``finite``, the ``scale`` used, ``zero_grads``
    (fraction of gradient entries exactly 0) and ``unchanged`` (fraction of non-zero updates
    rounded away by the parameters' dtype).
    """
    def step(params, opt_state, ls: LossScale, x, y):
        def scaled(p):
            loss, logits = mixed_loss(model, policy, p, x, y)
            return scale_loss(loss_weight * loss, ls), (loss, logits)

        grads, (loss, logits) = jax.grad(scaled, has_aux=True)(params)
        grads = unscale_grads(grads, ls)
        finite = all_finite(grads)
        updates, new_opt_state = tx.update(policy.cast_to_param(grads), opt_state, params)
        new_params = optax.apply_updates(params, updates)
        metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == y), "finite": finite,
                   "scale": ls.scale, "zero_grads": zero_fraction(grads),
                   "unchanged": unchanged_fraction(new_params, params, updates)}
        params = select_if_finite(finite, new_params, params)
        opt_state = select_if_finite(finite, new_opt_state, opt_state)
        return params, opt_state, update(ls, finite), metrics

    return jax.jit(step)


@dataclasses.dataclass
class Run:
    """A finished training run under one policy."""

    name: str
    policy: Policy
    model: Model
    params: Any
    loss_scale: LossScale
    losses: list[float]
    scales: list[float]  # the scale each step used
    finite: list[bool]  # whether each step's gradients were finite (False: the step was skipped)
    step: Callable
    opt_state: Any
    forward: Callable
    zero_grads: list[float] = dataclasses.field(default_factory=list)  # per step: gradient entries exactly 0
    unchanged: list[float] = dataclasses.field(default_factory=list)  # per step: non-zero updates rounded away

    @property
    def skipped(self) -> int:
        """Steps skipped because their gradients overflowed."""
        return len(self.finite) - sum(self.finite)

    def predict(self, x: np.ndarray, batch: int = 512) -> np.ndarray:
        """Predicted classes, with the forward pass in the policy's compute dtype."""
        return np.concatenate([np.asarray(jnp.argmax(self.forward(self.params, x[lo:lo + batch]), -1))
                               for lo in range(0, len(x), batch)])

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean(self.predict(x) == np.asarray(y)))


def make_forward(model: Model, policy: Policy) -> Callable[[Any, jax.Array], jax.Array]:
    """A jitted ``(params, x) -> logits`` with the forward pass under ``policy``."""
    def forward(params, x):
        return mixed_logits(model, policy, params, x)

    return jax.jit(forward)


def digits_model(hidden: tuple[int, ...] = (128, 64), seed: int = 0, features: int = 64, classes: int = 10) -> Model:
    """The chapter-05 MLP (no dropout), split for functional training."""
    from scalelab import models

    return Model.of(models.MLP(features, classes, hidden=hidden, rngs=nnx.Rngs(seed)))


def train_policy(name: str, x: np.ndarray, y: np.ndarray, policy: Policy | str | None = None,
                 loss_scale: LossScale | None = None, epochs: int = 30, batch_size: int = 64,
                 learning_rate: float = 2e-3, hidden: tuple[int, ...] = (128, 64), seed: int = 0,
                 loss_weight: float = 1.0) -> Run:
    """Train the chapter-05 MLP with Adam under ``policy`` (default: :data:`POLICIES` ``[name]``).

    For a given ``seed`` every policy starts from the same initial parameters and sees the
    same batches, so differences between policies come from the arithmetic alone. The
    metrics are read back once per epoch. ``loss_weight``: see :func:`make_train_step`.
    """
    from scalelab import train

    if policy is None:
        if name not in POLICIES:
            raise ValueError(f"no default policy for {name!r}; known: {sorted(POLICIES)} (or pass policy=)")
        policy = POLICIES[name]
    policy = Policy.parse(policy) if isinstance(policy, str) else policy
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    model = digits_model(hidden, seed, features=x.shape[1], classes=int(y.max()) + 1)
    if jnp.dtype(policy.param_dtype) != jnp.float32:
        model = dataclasses.replace(model, params=policy.cast_to_param(model.params))
    tx = optax.adam(learning_rate)
    step = make_train_step(model, policy, tx, loss_weight)
    params, opt_state = model.params, tx.init(model.params)
    ls = loss_scale if loss_scale is not None else no_loss_scale()
    losses: list[float] = []
    scales: list[float] = []
    finite: list[bool] = []
    zero_grads: list[float] = []
    unchanged: list[float] = []
    for epoch in range(epochs):
        epoch_metrics = []
        for xb, yb in train.array_batches(x, y, batch_size, seed, epoch):
            params, opt_state, ls, m = step(params, opt_state, ls, xb, yb)
            epoch_metrics.append(m)
        stacked = jax.device_get(jax.tree.map(lambda *a: jnp.stack(a), *epoch_metrics))  # blocks once per epoch
        losses += [float(v) for v in stacked["loss"]]
        scales += [float(v) for v in stacked["scale"]]
        finite += [bool(v) for v in stacked["finite"]]
        zero_grads += [float(v) for v in stacked["zero_grads"]]
        unchanged += [float(v) for v in stacked["unchanged"]]
    return Run(name, policy, model, params, ls, losses, scales, finite, step, opt_state, make_forward(model, policy),
               zero_grads, unchanged)


def activations(model: Model, params: Any, x: jax.Array, hook: Callable[[jax.Array], jax.Array] = lambda a: a
                ) -> tuple[jax.Array, list[jax.Array]]:
    """The MLP's forward pass layer by layer: (logits, the input of every layer).

    ``hook`` is applied to each layer's input (e.g. a cast through float8). Only for
    :class:`scalelab.models.MLP` (its dropout is skipped: this is inference).
    """
    from scalelab import models

    net = model.module(params)
    if not isinstance(net, models.MLP):
        raise TypeError(f"layer-by-layer forward supports scalelab.models.MLP, got {type(net).__name__}")
    inputs = []
    for layer in net.layers:
        x = hook(x)
        inputs.append(x)
        x = nnx.relu(layer(x))
    x = hook(x)
    inputs.append(x)
    return net.head(x), inputs


def activation_grads(model: Model, params: Any, x: jax.Array, y: jax.Array) -> list[jax.Array]:
    """Gradients of the mean loss with respect to every layer's input (float32): the values
    backpropagation carries between layers, which are smaller than the weight gradients
    (they are not summed over the batch)."""
    x = jnp.asarray(x, jnp.float32)
    _, inputs = activations(model, params, x)

    def loss_of(perturbations):
        it = iter(perturbations)
        logits, _ = activations(model, params, x, hook=lambda a: a + next(it))
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return jax.grad(loss_of)([jnp.zeros_like(a) for a in inputs])


def weight_grads(model: Model, params: Any, x: jax.Array, y: jax.Array) -> Any:
    """Float32 gradients of the mean loss with respect to the parameters."""
    return jax.grad(lambda p: mixed_loss(model, Policy(), p, x, y)[0])(params)


def activation_bytes(model: Model, policy: Policy, params: Any, x: jax.Array) -> int:
    """Bytes of the activations between layers (each layer's input, and the logits) for the batch
    ``x``, computed in ``policy.compute_dtype``: what backpropagation keeps for the backward pass."""
    logits, inputs = activations(model, policy.cast_to_compute(params), policy.cast_to_compute(jnp.asarray(x)))
    return tree_bytes([*inputs, logits])


# --------------------------------------------------------------------------- int8 quantisation


@functools.partial(jax.tree_util.register_dataclass, data_fields=["q", "scale"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class QTensor:
    """A symmetrically quantised tensor: ``value ~= q * scale`` (int8 ``q``, float32 ``scale``,
    one scale per output channel, the last axis, or one for the whole tensor)."""

    q: jax.Array
    scale: jax.Array

    def dequantize(self) -> jax.Array:
        return self.q.astype(jnp.float32) * self.scale

    @property
    def nbytes(self) -> int:
        return tree_bytes(self)


def _safe_scale(scale: jax.Array) -> jax.Array:
    """A usable scale: at least float32's smallest normal number (a subnormal scale would be
    flushed to zero on some backends), and 1 for an all-zero tensor or channel (any positive
    value quantises zeros to zero; dividing by zero would not)."""
    tiny = float(jnp.finfo(jnp.float32).tiny)
    return jnp.where(scale > 0, jnp.maximum(scale, tiny), 1.0)


@jax.jit
def quantize_per_channel(w: jax.Array) -> QTensor:
    """Symmetric int8 quantisation with one scale per output channel (the last axis):
    ``scale = max|w| / 127`` over all other axes, ``q = round(w / scale)`` in [-127, 127]."""
    w = jnp.asarray(w)
    if w.ndim < 2 or not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"per-channel quantisation needs a float weight with >= 2 axes, got {w.dtype}{w.shape}")
    scale = _safe_scale(jnp.max(jnp.abs(w.astype(jnp.float32)), axis=tuple(range(w.ndim - 1))) / 127.0)
    q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return QTensor(q, scale.astype(jnp.float32))


@jax.jit
def quantize_tensor(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric per-tensor int8 quantisation (for activations, computed on the fly): (q, scale)."""
    x = jnp.asarray(x, jnp.float32)
    scale = _safe_scale(jnp.max(jnp.abs(x)) / 127.0)
    return jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8), scale


@jax.jit
def int8_matmul(x: jax.Array, w: QTensor) -> jax.Array:
    """``x @ w`` with int8 operands and int32 accumulation, rescaled to float32.

    ``x`` is quantised per tensor on the fly; the int32 products are exact, so the result
    equals the float matmul of the dequantised operands up to float32 rounding.
    """
    if x.shape[-1] != w.q.shape[0] or w.q.ndim != 2:
        raise ValueError(f"cannot multiply x of shape {x.shape} by a quantised {w.q.shape} matrix")
    xq, sx = quantize_tensor(x)
    acc = jax.lax.dot_general(xq, w.q, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    return acc.astype(jnp.float32) * (sx * w.scale)


def quantize_mlp(model: Model, params: Any = None) -> list[tuple[QTensor, jax.Array]]:
    """Post-training int8 quantisation of an MLP: per-channel int8 kernels, float32 biases."""
    from scalelab import models

    net = model.module(params)
    if not isinstance(net, models.MLP):
        raise TypeError(f"quantize_mlp supports scalelab.models.MLP, got {type(net).__name__}")
    return [(quantize_per_channel(layer.kernel[...]), jnp.asarray(layer.bias[...], jnp.float32))
            for layer in (*net.layers, net.head)]


@jax.jit
def int8_forward(qlayers: list[tuple[QTensor, jax.Array]], x: jax.Array) -> jax.Array:
    """Logits of a quantised MLP: int8 matmuls (int32 accumulate), float32 bias and ReLU."""
    for i, (w, b) in enumerate(qlayers):
        x = int8_matmul(x, w) + b
        if i < len(qlayers) - 1:
            x = jax.nn.relu(x)
    return x


def fp8_forward(model: Model, params: Any, x: jax.Array, dtype: Any = jnp.float8_e4m3fn,
                activations_too: bool = True) -> jax.Array:
    """Simulated float8 inference: weights (and layer inputs) cast through ``dtype`` and back,
    each with a per-tensor scale that maps its largest magnitude onto the format's maximum."""
    name = jnp.dtype(dtype).name
    fake = functools.partial(roundtrip, name=name, scaled=True)
    qparams = jax.tree.map(lambda a: fake(a) if a.ndim >= 2 else a, params)
    hook = fake if activations_too else (lambda a: a)
    logits, _ = activations(model, qparams, jnp.asarray(x, jnp.float32), hook)
    return logits


def accuracy_of(logits: jax.Array, y: np.ndarray) -> float:
    return float(np.mean(np.asarray(jnp.argmax(logits, -1)) == np.asarray(y)))


# --------------------------------------------------------------------------- inspecting compiled code


_TYPE = re.compile(r"\b(pred|s8|s16|s32|s64|u8|u32|bf16|f16|f32|f64|f8e4m3fn|f8e5m2)\[")


def matmul_dtypes(fn: Callable, *args: Any) -> list[str]:
    """The operand dtypes of every matrix multiplication in ``jit(fn)``'s *compiled* program,
    e.g. ``["f32 x f32"]``: what the hardware path really multiplies, after XLA inserted
    any conversions. Recognises HLO ``dot`` ops and GPU GEMM custom calls."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    types: dict[str, str] = {}
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line.endswith("{"):  # a new computation: its parameters are declared in its header
            types = {}
            for name, typ in re.findall(r"([\w.\-]+): (\w+)\[", line):
                types[name] = typ
        m = re.match(r"(?:ROOT )?%?([\w.\-]+) = \(?(\w+)\[", line)
        if m:
            types[m.group(1)] = m.group(2)
        is_gemm = " dot(" in line or ("custom-call(" in line and re.search(r"gemm|matmul", line, re.I))
        if is_gemm:
            call = re.search(r"(?:dot|custom-call)\(([^)]*)\)", line)
            operands = [o.strip().lstrip("%") for o in call.group(1).split(",")][:2] if call else []
            inline = _TYPE.findall(call.group(1)) if call else []
            dts = inline[:2] if len(inline) >= 2 else [types.get(o, "?") for o in operands]
            found.append(" x ".join(dts))
    return found


# --------------------------------------------------------------------------- timing


def time_step(policy: Policy | str, width: int, batch: int, depth: int = 2, loss_scale: LossScale | None = None,
              repeat: int = 5) -> float:
    """Best seconds per training step of a ``depth``-layer MLP of ``width`` on random data
    under ``policy`` — a matmul-heavy step, large enough to show arithmetic speed."""
    from scalelab import bench

    policy = Policy.parse(policy) if isinstance(policy, str) else policy
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, width), dtype=np.float32))
    y = jnp.asarray(rng.integers(0, 10, batch).astype(np.int32))
    model = digits_model((width,) * depth, seed=0, features=width, classes=10)
    tx = optax.adam(1e-3)
    step = make_train_step(model, policy, tx)
    state = (model.params, tx.init(model.params), loss_scale or no_loss_scale())
    return bench.timeit(step, *state, x, y, repeat=repeat, min_time=0.05).best


def time_digits_step(run: Run, x: np.ndarray, y: np.ndarray, batch: int = 64, repeat: int = 5) -> float:
    """Best seconds per training step of a finished run's own step on one digits batch."""
    from scalelab import bench

    xb, yb = jnp.asarray(x[:batch]), jnp.asarray(y[:batch])
    return bench.timeit(run.step, run.params, run.opt_state, run.loss_scale, xb, yb, repeat=repeat).best


def _matmul_variants() -> dict[str, tuple[Any, Callable]]:
    f32 = jnp.float32
    return {
        "float32": (jnp.float32, lambda a, b: a @ b),
        "bfloat16 (bf16 result)": (jnp.bfloat16, lambda a, b: a @ b),
        "bfloat16 (float32 accumulate)": (jnp.bfloat16, lambda a, b: jnp.dot(a, b, preferred_element_type=f32)),
        "float16 (float32 accumulate)": (jnp.float16, lambda a, b: jnp.dot(a, b, preferred_element_type=f32)),
        "int8 (int32 accumulate)": (jnp.int8, lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.int32)),
    }


def matmul_variants(n: int, repeat: int = 5) -> list[dict[str, Any]]:
    """An ``n x n`` matrix product in each format: best seconds, (FL)OP/s, and the operand
    dtypes of the matmul XLA actually compiled (:func:`matmul_dtypes`)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    from scalelab import bench

    rng = np.random.default_rng(0)
    base = rng.standard_normal((n, n), dtype=np.float32)
    rows = []
    for name, (dtype, fn) in _matmul_variants().items():
        a = jnp.asarray(np.clip(np.round(base * 20), -127, 127) if dtype == jnp.int8 else base).astype(dtype)
        t = bench.timeit(jax.jit(fn), a, a, repeat=repeat).best
        rows.append({"variant": name, "seconds": t, "op_per_s": 2 * n ** 3 / t,
                     "compiled matmul": ", ".join(sorted(set(matmul_dtypes(fn, a, a)))) or "(library call)"})
    return rows


def committed_matmul_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The square-matmul table of a saved ``precision`` result, one row per format: rate,
    what XLA compiled it as, and its speed-up over the float32 row.

    A saved result records operand dtypes and rates, not the matmul precision setting; the
    float32 row is labelled with what a float32 product means at JAX's default precision on
    the result's backend (:func:`scalelab.hardware.float32_label`: TF32 on recent NVIDIA GPUs).
    """
    from scalelab import hardware

    matmul = result["matmul"]
    base = matmul["float32"]["op_per_s"]
    rows = []
    for variant, v in matmul.items():
        label = hardware.float32_label(result.get("backend", "")) if variant == "float32" else variant
        rows.append({"variant": label, "T(FL)OP/s": v["op_per_s"] / 1e12, "compiled as": v["compiled"],
                     "speed-up over float32 row": v["op_per_s"] / base})
    return rows


def provenance(result: dict[str, Any]) -> str:
    """One line saying where a saved result comes from: device, backend, versions, date, mode."""
    v = result.get("versions", {})
    return (f"{result['device']} ({result.get('backend')}, {result.get('device_count')} device(s)), "
            f"jax {v.get('jax')}, committed {str(result.get('date', ''))[:10]}, "
            f"{'quick' if result.get('quick') else 'full'} mode, matmul n={result['timing_shape']['matmul_n']}")


def spec_ratios(chip: str) -> dict[str, float | None]:
    """Published dense peak ratios of ``chip`` (a :data:`scalelab.hardware.SPECS` name):
    16-bit over TF32 and 16-bit over plain float32 (None where not published)."""
    from scalelab import hardware

    spec = next((s for s in hardware.SPECS if s.name == chip), None)
    if spec is None:
        raise ValueError(f"no published spec for {chip!r}; known: {[s.name for s in hardware.SPECS]}")
    return {"bf16 / tf32": spec.peak_16bit / spec.peak_tf32 if spec.peak_tf32 else None,
            "bf16 / fp32": spec.peak_16bit / spec.peak_fp32 if spec.peak_fp32 else None,
            "source": spec.source}


# --------------------------------------------------------------------------- the benchmark


def timing_shape(quick: bool) -> dict[str, int]:
    """Sizes of the matmul-heavy timings (MLP width and batch, square matmul ``n``):
    bigger on accelerators, small on CPU."""
    if jax.default_backend() == "cpu":
        return {"width": 256, "batch": 128, "matmul_n": 512} if quick else {"width": 512, "batch": 256, "matmul_n": 1024}
    return ({"width": 1024, "batch": 1024, "matmul_n": 4096} if quick
            else {"width": 4096, "batch": 4096, "matmul_n": 8192})


def mode_summary(run: Run, split: Any, shape: dict[str, int] | None = None, repeat: int = 5) -> dict[str, Any]:
    """One row of the comparison: accuracy, bytes and step times of a finished run."""
    pol = run.policy
    xb = jnp.asarray(split.x_train[:64])
    row = {
        "policy": str(pol),
        "loss scaling": "dynamic" if run.loss_scale.dynamic else (
            "none" if float(run.loss_scale.scale) == 1.0 else "static"),
        "test_accuracy": run.accuracy(split.x_test, split.y_test),
        "param_bytes": tree_bytes(run.params),
        "compute_param_bytes": tree_bytes(pol.cast_to_compute(run.params)),
        "activation_bytes": activation_bytes(run.model, pol, run.params, xb),
        "step_s": time_digits_step(run, split.x_train, split.y_train, repeat=repeat),
        "step_kind": "train step, digits MLP, batch 64",
        "skipped_steps": run.skipped,
    }
    if shape is not None:
        row["wide_step_s"] = time_step(pol, shape["width"], shape["batch"], loss_scale=run.loss_scale,
                                       repeat=repeat)
    return row


def int8_summary(run: Run, split: Any, repeat: int = 5) -> dict[str, Any]:
    """Post-training int8 quantisation of a float32 run: accuracy, bytes, inference time."""
    from scalelab import bench

    qlayers = quantize_mlp(run.model, run.params)
    x_test = jnp.asarray(split.x_test)
    acc = accuracy_of(int8_forward(qlayers, x_test), split.y_test)
    base_acc = run.accuracy(split.x_test, split.y_test)
    _, inputs = activations(run.model, run.params, jnp.asarray(split.x_train[:64]))
    return {
        "test_accuracy": acc,
        "param_bytes": tree_bytes(qlayers),
        "activation_bytes": int(sum(a.size for a in inputs)) + 64 * split.classes * 4,  # int8 inputs, f32 logits
        "step_s": bench.timeit(int8_forward, qlayers, x_test, repeat=repeat).best,
        "step_kind": f"inference of the test set ({len(x_test)} digits): int8 matmuls, int32 accumulation",
        "float32_inference_s": bench.timeit(run.forward, run.params, x_test, repeat=repeat).best,
        "size_ratio": tree_bytes(qlayers) / tree_bytes(run.params),
        "accuracy_delta": acc - base_acc,
    }


def bench_precision(quick: bool = False) -> dict[str, Any]:
    """Benchmark ``precision``: the digits MLP trained in float32, bfloat16 (float32 master
    weights) and float16 (+ dynamic loss scaling), and int8 post-training quantisation.

    Per mode (``modes``): test accuracy, stored parameter bytes, parameter bytes in the
    compute dtype, activation bytes (batch 64), ``step_s`` of the digits training step and
    ``wide_step_s`` of a matmul-heavy step (``timing_shape``) with its speed-up over
    float32. Accuracies are means over ``seeds`` runs (3 in full mode, 1 in quick mode);
    bytes and times come from the seed-0 run. For int8, ``step_s`` is the inference time
    of the test set (``step_kind``), ``size_ratio`` is int8 bytes / float32 bytes and
    ``accuracy_delta`` int8 minus float32 (seed 0). ``matmul`` gives each format's square
    matmul rate and what XLA compiled it as.
    """
    from scalelab import data

    start = time.perf_counter()
    split = data.load_digits()
    epochs = 8 if quick else 30
    period = 50 if quick else 200
    repeat = 3 if quick else 7
    shape = timing_shape(quick)
    seeds = (0,) if quick else (0, 1, 2)
    modes: dict[str, dict[str, Any]] = {}
    runs: dict[str, Run] = {}
    for name in ("float32", "bfloat16", "float16"):
        accs = []
        for seed in seeds:
            ls = dynamic_loss_scale(2.0 ** 15, period=period) if name == "float16" else None
            run = train_policy(name, split.x_train, split.y_train, loss_scale=ls, epochs=epochs, seed=seed)
            accs.append(run.accuracy(split.x_test, split.y_test))
            runs.setdefault(name, run)  # the seed-0 run is timed and measured
        modes[name] = mode_summary(runs[name], split, shape, repeat)
        modes[name]["test_accuracy"] = float(np.mean(accs))
        modes[name]["test_accuracy_per_seed"] = accs
    for row in modes.values():
        row["wide_speedup_vs_float32"] = modes["float32"]["wide_step_s"] / row["wide_step_s"]
    modes["float16"]["loss_scale_final"] = float(runs["float16"].loss_scale.scale)
    modes["int8"] = int8_summary(runs["float32"], split, repeat)  # quantises the seed-0 float32 run
    base = runs["float32"]
    fp8_acc = accuracy_of(fp8_forward(base.model, base.params, split.x_test), split.y_test)
    matmul = {r["variant"]: {"op_per_s": r["op_per_s"], "compiled": r["compiled matmul"]}
              for r in matmul_variants(shape["matmul_n"], repeat)}
    f32_acc = modes["float32"]["test_accuracy"]
    f32_seed0 = modes["float32"]["test_accuracy_per_seed"][0]
    return {
        "model": "MLP 64-128-64-10 on the digits (chapter 05), Adam 2e-3, batch 64",
        "epochs": epochs,
        "loss_scale_period": period,
        "timing_shape": shape,
        "modes": modes,
        "loss_scale_final": modes["float16"]["loss_scale_final"],
        "matmul": matmul,
        "fp8_accuracy": fp8_acc,
        "fp8_accuracy_delta": fp8_acc - f32_seed0,
        "seeds": len(seeds),
        "float32_seed_spread_points": 100 * float(np.ptp(modes["float32"]["test_accuracy_per_seed"])),
        "bf16_accuracy_gap_points": 100 * (f32_acc - modes["bfloat16"]["test_accuracy"]),
        "fp16_accuracy_gap_points": 100 * (f32_acc - modes["float16"]["test_accuracy"]),
        "bench_s": time.perf_counter() - start,
    }


# --------------------------------------------------------------------------- the loss-scale explorer
#
# One real float32 step: the activation gradients of the chapter's MLP (trained in float32 for
# ``epochs`` epochs, as in section 3) on the first training batch. Scaling by 2^k is exact in
# float32, and the cast to a 16-bit format rounds to nearest, ties to even; so a value's fate is
# decided by three thresholds of the format, and counting against them predicts the cast exactly.

#: The formats the loss-scale explorer offers (float8 e4m3fn has no inf: it saturates to NaN).
LOSS_SCALE_FORMATS: tuple[str, ...] = ("float16", "bfloat16")
_SCALE_RANGE = (-40, 40)  # |g| 2^k stays a normal float32 number for these gradients


@functools.lru_cache(maxsize=4)
def step_gradients(epochs: int = 8, batch: int = 64, seed: int = 0) -> np.ndarray:
    """The activation gradients (float32, flattened, read-only) of one real float32 step: the
    chapter's MLP trained for ``epochs`` epochs (``epochs=0``: at initialisation) and the mean
    loss of the first ``batch`` training digits. Computed once per process for each argument."""
    from scalelab import data

    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be an integer >= 0, got {epochs!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
    split = data.load_digits()
    if epochs:
        run = train_policy("float32", split.x_train, split.y_train, epochs=epochs, seed=seed)
        model, params = run.model, run.params
    else:
        model = digits_model(seed=seed)
        params = model.params
    xb, yb = jnp.asarray(split.x_train[:batch]), jnp.asarray(split.y_train[:batch])
    grads = activation_grads(model, params, xb, yb)
    out = np.concatenate([np.ravel(np.asarray(a, np.float32)) for a in grads])
    out.flags.writeable = False
    return out


def cast_thresholds(format: str) -> dict[str, float]:
    """Where round-to-nearest-even casting float32 to ``format`` changes a value's fate:
    ``|y| <= zero_max`` becomes 0; ``|y| < normal_min`` (and above zero_max) becomes subnormal;
    ``|y| >= inf_min`` becomes inf. Each is the midpoint between two neighbours of the format."""
    if format not in LOSS_SCALE_FORMATS:
        raise ValueError(f"format must be one of {list(LOSS_SCALE_FORMATS)}, got {format!r}")
    fi = jnp.finfo(format_dtype(format))
    tiny, normal, top = float(fi.smallest_subnormal), float(fi.smallest_normal), float(fi.max)
    ulp_top = 2.0 ** (int(fi.maxexp) - 1 - int(fi.nmant))  # the gap below the largest value
    return {"zero_max": tiny / 2, "normal_min": normal - tiny / 2, "inf_min": top + ulp_top / 2,
            "smallest_subnormal": tiny, "smallest_normal": normal, "max": top}


def _fates(mags: np.ndarray, log2_scale: int, t: dict[str, float]) -> tuple[int, int, int]:
    y = mags * 2.0 ** log2_scale  # float64: exact
    zero = int(np.count_nonzero(y <= t["zero_max"]))
    sub = int(np.count_nonzero((y > t["zero_max"]) & (y < t["normal_min"])))
    inf = int(np.count_nonzero(y >= t["inf_min"]))
    return zero, sub, inf


def _check_scale(log2_scale: Any) -> int:
    lo, hi = _SCALE_RANGE
    if isinstance(log2_scale, bool) or not isinstance(log2_scale, int | np.integer) or not lo <= log2_scale <= hi:
        raise ValueError(f"log2_scale must be an integer in {lo}..{hi}, got {log2_scale!r}")
    return int(log2_scale)


def loss_scale_model(log2_scale: int, format: str, epochs: int = 8, batch: int = 64, seed: int = 0,
                     sweep: Sequence[int] = (-8, 32)) -> dict[str, Any]:
    """What a loss scale of ``2**log2_scale`` does to one real step's gradients cast to ``format``
    (pure: the explorer's model).

    Over the non-zero gradients of :func:`step_gradients` (``epochs``, ``batch``, ``seed``), counts
    those that the cast of ``g * 2**log2_scale`` sends to 0 (underflow), to a subnormal (few
    significant bits left) and to inf (overflow), from the format's thresholds
    (:func:`cast_thresholds`). Also returns the histogram of log2|g| (the drawing) and the
    underflow / subnormal / overflow fractions for every integer scale in ``sweep`` (lo, hi).
    """
    k = _check_scale(log2_scale)
    t = cast_thresholds(format)
    lo, hi = (_check_scale(s) for s in sweep)
    g = step_gradients(epochs, batch, seed)
    mags = np.abs(g[g != 0]).astype(np.float64)
    n = int(mags.size)
    if n == 0:
        raise ValueError("the step has no non-zero gradient")
    zero, sub, inf = _fates(mags, k, t)
    logs = np.log2(mags)
    edges = np.arange(np.floor(logs.min()), np.ceil(logs.max()) + 0.5, 0.5)
    counts, _ = np.histogram(logs, bins=edges)
    ks = list(range(lo, hi + 1))
    fates = [_fates(mags, s, t) for s in ks]
    return {
        "underflow_fraction": zero / n, "subnormal_fraction": sub / n, "overflow_fraction": inf / n,
        "normal_fraction": (n - zero - sub - inf) / n,
        "underflow_count": zero, "subnormal_count": sub, "overflow_count": inf, "gradients": n,
        "exact_zeros": int(g.size - n), "scale": float(2.0 ** k),
        # the format's edges in units of the unscaled gradient (log2): where the histogram is cut
        "log2_zero_edge": math.log2(t["zero_max"]) - k, "log2_normal_edge": math.log2(t["normal_min"]) - k,
        "log2_inf_edge": math.log2(t["inf_min"]) - k,
        "hist_edges": [float(e) for e in edges], "hist_counts": [int(c) for c in counts],
        "sweep_log2_scales": ks, "sweep_underflow": [f[0] / n for f in fates],
        "sweep_subnormal": [f[1] / n for f in fates], "sweep_overflow": [f[2] / n for f in fates],
    }


def measure_loss_scale_point(log2_scale: int, format: str, epochs: int = 8, batch: int = 64,
                             seed: int = 0) -> dict[str, Any]:
    """Cast the real gradients times ``2**log2_scale`` to ``format`` (NumPy; ml_dtypes for
    bfloat16) and count what came out 0, subnormal and inf (fractions of the non-zero ones)."""
    k = _check_scale(log2_scale)
    t = cast_thresholds(format)
    g = step_gradients(epochs, batch, seed)
    g = g[g != 0]
    with np.errstate(over="ignore"):  # overflowing to inf is what is being counted
        cast = (g * np.float32(2.0 ** k)).astype(format_dtype(format))  # exact scaling, then the cast
    back = np.abs(cast.astype(np.float32))
    zero = int(np.count_nonzero(back == 0))
    inf = int(np.count_nonzero(np.isinf(back)))
    sub = int(np.count_nonzero((back > 0) & (back < t["smallest_normal"])))
    n = int(g.size)
    return {"underflow_fraction": zero / n, "subnormal_fraction": sub / n, "overflow_fraction": inf / n,
            "underflow_count": zero, "subnormal_count": sub, "overflow_count": inf}


def loss_scale_explorer(epochs: int = 8, info: Any = None):
    """The loss-scale explorer: a format and log2 of the loss scale -> which of one real step's
    gradients the cast sends to 0, to subnormals and to inf; "measure this point" does the cast."""
    from scalelab import plot, widgets

    context = {"epochs": int(epochs), "batch": 64}

    def draw(settings, pred, points):
        fig, (a, b) = plot.figure(ncols=2, width=10.0, height=3.8)
        edges, counts = np.asarray(pred["hist_edges"]), np.asarray(pred["hist_counts"])
        a.stairs(counts, edges, fill=True, color="C0", alpha=0.6, label="|g| of one real step (float32)")
        left, right = -44.0, 20.0
        z, nrm, inf = pred["log2_zero_edge"], pred["log2_normal_edge"], pred["log2_inf_edge"]
        a.axvspan(left, min(max(z, left), right), color="C3", alpha=0.15, label="cast to 0")
        a.axvspan(min(max(z, left), right), min(max(nrm, left), right), color="C1", alpha=0.15,
                  label="subnormal")
        a.axvspan(min(max(inf, left), right), right, color="k", alpha=0.15, label="inf")
        a.set(xlim=(left, right), xlabel="log2 |gradient| (before scaling)", ylabel="count",
              title=f"{settings['format']} with loss scale 2^{settings['log2_scale']}")
        if z < left and inf > right:
            a.text(0.98, 0.75, f"{settings['format']}'s range covers\nthe whole figure", transform=a.transAxes,
                   ha="right", fontsize=8)
        a.legend(fontsize=7, loc="upper left")
        ks = pred["sweep_log2_scales"]
        b.plot(ks, pred["sweep_underflow"], color="C3", label="become 0 (underflow)")
        b.plot(ks, pred["sweep_subnormal"], color="C1", label="become subnormal")
        b.plot(ks, pred["sweep_overflow"], color="k", label="become inf (overflow)")
        b.axvline(settings["log2_scale"], color="0.6", ls=":")
        for key, colour in (("underflow_fraction", "C3"), ("subnormal_fraction", "C1"), ("overflow_fraction", "k")):
            b.scatter([settings["log2_scale"]], [pred[key]], color=colour, s=30, zorder=3)
        for i, p in enumerate(q for q in points if q["settings"]["format"] == settings["format"]):
            for key in ("underflow_fraction", "subnormal_fraction", "overflow_fraction"):
                b.scatter([p["settings"]["log2_scale"]], [p["result"][key]], marker="*", s=110, color="C2",
                          zorder=4, label="measured (cast)" if i == 0 and key == "underflow_fraction" else None)
        b.set(xlabel="log2(loss scale)", ylabel="fraction of non-zero gradients",
              title="Predicted from the format's thresholds")
        b.set_yscale("symlog", linthresh=1e-4)
        b.legend(fontsize=7, loc="center right")
        plot.label(fig, info, source=f"gradients of one float32 step ({epochs} epochs); stars: the cast, measured",
                   devices=1)
        return fig

    controls = {
        "format": widgets.dropdown("format", list(LOSS_SCALE_FORMATS)),
        "log2_scale": widgets.slider("log2(loss scale)", 0, -8, 32, step=1, integer=True),
    }
    return widgets.Explorer(
        "loss_scale", "Loss-scale explorer: what a 16-bit cast does to one real step's gradients", controls,
        loss_scale_model, draw, context=context,
        measure=lambda log2_scale, format: measure_loss_scale_point(log2_scale, format, **context),
        shown=["underflow_fraction", "subnormal_fraction", "overflow_fraction", "scale"],
        labels={"underflow_fraction": "become 0", "subnormal_fraction": "become subnormal",
                "overflow_fraction": "become inf", "scale": "loss scale"},
        note="'measure this point' casts the scaled gradients to the format and counts zeros, subnormals and infs; "
             "it must agree exactly with the prediction, which only compares each value with the format's thresholds.")
