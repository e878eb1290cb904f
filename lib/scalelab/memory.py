"""Chapter 10: memory-efficient backpropagation — rematerialisation (``jax.checkpoint``),
sqrt(n) segment checkpointing (Chen et al. 2016), checkpoint policies, and gradient
accumulation as the other lever, all measured from XLA's compiled memory analysis.

Backpropagation keeps what each layer's backward step needs (its input, and intermediates
such as ``tanh(z)``) from the forward pass until the backward pass reaches that layer, so
activation memory grows linearly with depth and batch. Rematerialisation stores less and
recomputes the rest during the backward pass: per-layer remat still keeps every layer's
input (linear), while checkpointing only the inputs of sqrt(n) segments of sqrt(n) layers
keeps O(sqrt(n)) for one extra forward pass.

The model is a deep, narrow residual MLP, ``h <- h + tanh(h @ W_i)``, with the layer weights
stacked as ``(depth, width, width)`` and the layers in ``lax.scan`` (remat is invisible in an
unrolled Python loop: XLA's fusion already recomputes cheap ops, see PITFALLS).
Memory comes from ``jax.jit(f).lower(...).compile().memory_analysis()`` (argument + output +
temp - alias), which works on every backend; where the backend keeps allocator statistics
(GPU), :func:`peak_bytes` also measures the peak of a real run.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from scalelab import bench

# --------------------------------------------------------------------------- the model

#: How each variant treats the layers. ``sqrt`` checkpoints segments, the others single layers.
VARIANTS: dict[str, str] = {
    "none": "no remat: every layer keeps what its backward step needs",
    "full": "jax.checkpoint on each layer: keep only each layer's input, recompute the rest",
    "sqrt": "nested scan: keep only the input of each of ~sqrt(n) segments of ~sqrt(n) layers",
    "everything_saveable": "per-layer checkpoint, policy everything_saveable: keep all, as without jax.checkpoint",
    "dots_saveable": "per-layer checkpoint, policy dots_saveable: keep matmul outputs, recompute tanh",
    "dots_with_no_batch_dims_saveable": "per-layer checkpoint, policy dots_with_no_batch_dims_saveable: keep "
                                        "matmul outputs without batch dimensions (h @ W has none)",
    "save_only_these_names": "per-layer checkpoint, policy save_only_these_names('pre'): keep the named h @ W",
    "offload_pre": "per-layer checkpoint, policy save_and_offload_only_these_names: move the named h @ W to "
                   "pinned host memory (a no-op on CPU, where the lowering ignores memory placement)",
}


def layer(h: jax.Array, w: jax.Array) -> jax.Array:
    """One residual layer ``h + tanh(h @ w)``; the pre-activation is named ``"pre"``."""
    z = checkpoint_name(h @ w, "pre")
    return h + jnp.tanh(z)


def checkpoint_policy(variant: str) -> Callable[..., Any] | None:
    """The ``jax.checkpoint`` policy of a per-layer variant (None: save nothing but inputs,
    the same as ``nothing_saveable``; also None for ``none`` and ``sqrt``, which use no policy)."""
    _check_variant(variant)
    policies = jax.checkpoint_policies
    return {
        "full": None,
        "everything_saveable": policies.everything_saveable,
        "dots_saveable": policies.dots_saveable,
        "dots_with_no_batch_dims_saveable": policies.dots_with_no_batch_dims_saveable,
        "save_only_these_names": policies.save_only_these_names("pre"),
        "offload_pre": offload_policy(),
    }.get(variant)


def offload_policy(offload_dst: str = "pinned_host") -> Callable[..., Any]:
    """``save_and_offload_only_these_names``: keep nothing on the device, move the named
    pre-activation ``"pre"`` to ``offload_dst`` in the forward pass and back for the backward."""
    return jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=(), names_which_can_be_offloaded=("pre",),
        offload_src="device", offload_dst=offload_dst)


def placement_moves(lowered_text: str) -> int:
    """How many memory-placement annotations (``annotate_device_placement``, what offloading
    lowers to on GPU/TPU) a lowered program's text contains; 0 where offloading is a no-op."""
    return lowered_text.count("annotate_device_placement")


def _check_variant(variant: str) -> None:
    if not isinstance(variant, str) or variant not in VARIANTS:
        raise ValueError(f"unknown remat variant {variant!r}; expected one of {', '.join(VARIANTS)}")


def segment_sizes(depth: int, segment: int | None = None) -> tuple[int, int, int]:
    """How :func:`forward` splits ``depth`` layers for sqrt(n) checkpointing.

    Returns ``(segment, full_segments, remainder)``: ``full_segments`` segments of ``segment``
    layers, then one shorter segment of ``remainder`` layers (0 when ``segment`` divides
    ``depth``). The default segment length is ``round(sqrt(depth))``, so any depth works.
    """
    if isinstance(depth, bool) or not isinstance(depth, int | np.integer) or depth < 1:
        raise ValueError(f"depth must be an integer >= 1, got {depth!r}")
    depth = int(depth)
    if segment is None:
        segment = max(1, round(math.sqrt(depth)))
    elif isinstance(segment, bool) or not isinstance(segment, int | np.integer) or not 1 <= segment <= depth:
        raise ValueError(f"segment must be an integer in 1..{depth} (the depth), got {segment!r}")
    segment = int(segment)
    return segment, depth // segment, depth % segment


def _scan_layers(h: jax.Array, ws: jax.Array, policy: Any = None, remat: bool = False) -> jax.Array:
    """Apply the stacked layers ``ws`` in a ``lax.scan``; optionally checkpoint each layer."""
    def body(h, w):
        return layer(h, w), None

    if remat:
        body = jax.checkpoint(body, policy=policy)
    h, _ = lax.scan(body, h, ws)
    return h


def _scan_segments(h: jax.Array, ws: jax.Array, segment: int | None) -> jax.Array:
    """sqrt(n) checkpointing: an outer scan over segments, each a checkpointed inner scan."""
    k, full, rest = segment_sizes(ws.shape[0], segment)
    run_segment = jax.checkpoint(_scan_layers)  # keeps only the segment's input h
    segments = ws[: full * k].reshape(full, k, *ws.shape[1:])
    h, _ = lax.scan(lambda h, seg: (run_segment(h, seg), None), h, segments)
    if rest:
        h = run_segment(h, ws[full * k:])
    return h


def _check_shapes(ws: Any, x: Any) -> None:
    if len(ws.shape) != 3 or ws.shape[1] != ws.shape[2] or ws.shape[0] < 1:
        raise ValueError(f"ws must be stacked square layer weights (depth >= 1, width, width), got shape {ws.shape}")
    if len(x.shape) != 2 or x.shape[1] != ws.shape[1]:
        raise ValueError(f"x must have shape (batch, {ws.shape[1]}) to match ws, got {x.shape}")


def forward(ws: jax.Array, x: jax.Array, variant: str = "none", segment: int | None = None) -> jax.Array:
    """The deep MLP's output for inputs ``x`` (batch, width), computed as ``variant`` says.

    Every variant computes the same function; they differ only in what the backward pass
    finds stored and what it recomputes. ``segment`` (sqrt only) overrides the segment length.
    """
    _check_variant(variant)
    _check_shapes(ws, x)
    if variant == "none":
        return _scan_layers(x, ws)
    if variant == "sqrt":
        return _scan_segments(x, ws, segment)
    return _scan_layers(x, ws, checkpoint_policy(variant), remat=True)


def loss(ws: jax.Array, x: jax.Array, variant: str = "none", segment: int | None = None) -> jax.Array:
    """A scalar to differentiate: the mean of the network's output."""
    return jnp.mean(forward(ws, x, variant, segment))


def grad_fn(variant: str = "none", segment: int | None = None) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The jitted gradient of :func:`loss` with respect to the stacked weights."""
    _check_variant(variant)
    return jax.jit(jax.grad(lambda ws, x: loss(ws, x, variant, segment)))


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def init(depth: int, width: int, batch: int, seed: int = 0, scale: float = 0.5) -> tuple[jax.Array, jax.Array]:
    """Random stacked weights ``(depth, width, width)`` and inputs ``(batch, width)``."""
    _check_sizes(depth=depth, width=width, batch=batch)
    kw, kx = jax.random.split(jax.random.key(seed))
    ws = jax.random.normal(kw, (depth, width, width), jnp.float32) * (scale / math.sqrt(width))
    x = jax.random.normal(kx, (batch, width), jnp.float32)
    return ws, x


def shapes(depth: int, width: int, batch: int) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
    """Abstract arguments (no memory is allocated) for compiling without running."""
    _check_sizes(depth=depth, width=width, batch=batch)
    return (jax.ShapeDtypeStruct((depth, width, width), jnp.float32),
            jax.ShapeDtypeStruct((batch, width), jnp.float32))


class DeepMLP(nnx.Module):
    """The same network as an NNX classifier (``width`` classes), so chapter 05's
    ``train.mean_grads`` / ``train.grad_memory_bytes`` (gradient accumulation) apply to it."""

    def __init__(self, depth: int, width: int, variant: str = "none", segment: int | None = None,
                 *, rngs: nnx.Rngs):
        _check_sizes(depth=depth, width=width)
        _check_variant(variant)
        segment_sizes(depth, segment)
        self.input_shape = (width,)
        self.variant, self.segment = variant, segment
        scale = 0.5 / math.sqrt(width)
        self.ws = nnx.Param(jax.random.normal(rngs.params(), (depth, width, width), jnp.float32) * scale)

    def __call__(self, x: jax.Array) -> jax.Array:
        return forward(self.ws[...], x, self.variant, self.segment)


# --------------------------------------------------------------------------- measuring


def saved_residuals(f: Callable[..., Any], *args: Any) -> list[str]:
    """What reverse-mode autodiff of ``f`` keeps from the forward pass for the backward
    pass (JAX's ``print_saved_residuals``), one line per array, source locations removed."""
    from jax.ad_checkpoint import print_saved_residuals

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        print_saved_residuals(f, *args)
    # "... from file.py:3:9 (fn)", or a bare " from " for values made inside JAX itself
    return [re.sub(r" from (\S+:\d+(:\d+)?)?( \(.*\))?$", "", line).rstrip()
            for line in buffer.getvalue().splitlines()]


def compiled_bytes(fn: Callable[..., Any], *args: Any) -> dict[str, int]:
    """XLA's memory analysis of ``jax.jit(fn)`` compiled for ``args`` (arrays or
    ``ShapeDtypeStruct``; nothing is run). ``total = argument + output + temp - alias``:
    ``temp`` holds the activations kept for the backward pass."""
    from scalelab import parallel

    return parallel.compiled_memory(jax.jit(fn).lower(*args).compile())


def compiled_flops(fn: Callable[..., Any], *args: Any) -> float:
    """XLA's FLOP estimate for ``jax.jit(fn)``. Caution: XLA's cost model counts a loop
    body once, whatever its trip count, so compare variants with the same loop structure."""
    return flops_of(jax.jit(fn).lower(*args).compile())


def flops_of(compiled: Any) -> float:
    """The FLOP count XLA's cost analysis reports for a compiled program."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older JAX returned one dict per computation
        cost = cost[0] if cost else {}
    flops = (cost or {}).get("flops")
    if flops is None or not math.isfinite(flops) or flops <= 0:
        raise RuntimeError(f"XLA's cost analysis reported no FLOP count on {jax.default_backend()} (got {flops!r})")
    return float(flops)


def activation_bytes(variant: str, depth: int, width: int, batch: int, segment: int | None = None) -> dict[str, int]:
    """:func:`compiled_bytes` of the gradient of the deep MLP (compiled, not run)."""
    return compiled_bytes(grad_fn(variant, segment), *shapes(depth, width, batch))


def peak_bytes(fn: Callable[..., Any], *args: Any, device: Any = None) -> int | None:
    """Bytes the allocator's peak rose above what was in use before running ``fn(*args)``
    once (temp + output; the arguments were already allocated), or None where unknown.

    Only backends with allocator statistics (``device.memory_stats()``, e.g. GPU) have it.
    The peak is a high-water mark for the whole process: if an earlier computation
    already went higher, this run's peak cannot be seen and None is returned. On GPU the
    function is compiled without autotuning, whose trial runs would raise the peak first.
    """
    device = device or jax.devices()[0]
    stats = device.memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    options = {"xla_gpu_autotune_level": 0} if device.platform == "gpu" else None
    compiled = jax.jit(fn).lower(*args).compile(compiler_options=options)
    stats = device.memory_stats()
    before, peak_before = stats["bytes_in_use"], stats["peak_bytes_in_use"]
    jax.block_until_ready(compiled(*args))
    peak_after = device.memory_stats()["peak_bytes_in_use"]
    if peak_after <= peak_before:
        return None
    return int(peak_after - before)


def fit_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ``log y`` against ``log x``: the exponent p of ``y ~ c x^p``."""
    x = np.asarray(xs, dtype=float)
    y = np.asarray(ys, dtype=float)
    if x.ndim != 1 or x.shape != y.shape or len(x) < 2:
        raise ValueError(f"need two 1-D sequences of equal length >= 2, got shapes {x.shape} and {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and np.all(x > 0) and np.all(y > 0)):
        raise ValueError("fit_slope needs finite, positive values on both axes (it fits on log-log axes)")
    lx, ly = np.log(x), np.log(y)
    if np.ptp(lx) == 0:
        raise ValueError("fit_slope needs at least two different x values")
    return float(np.polyfit(lx, ly, 1)[0])


def memory_sweep(variants: Sequence[str], depths: Sequence[int], width: int, batch: int) -> dict[str, list[int]]:
    """Total compiled bytes of each variant's gradient at each depth."""
    return {v: [activation_bytes(v, d, width, batch)["total"] for d in depths] for v in variants}


def step_time(variant: str, depth: int, width: int, batch: int, repeat: int = 3) -> float:
    """Best seconds per gradient computation (compiled, run on real data)."""
    g = grad_fn(variant)
    ws, x = init(depth, width, batch)
    return bench.timeit(g, ws, x, repeat=repeat, number=1, warmup=1).best


def policy_table(depth: int, width: int, batch: int, variants: Sequence[str] = tuple(VARIANTS),
                 repeat: int = 3) -> list[dict[str, Any]]:
    """Bytes and step time of every variant at one size, with ratios to no remat."""
    rows = []
    for v in variants:
        mem = activation_bytes(v, depth, width, batch)
        rows.append({"variant": v, "MiB": mem["total"] / 2**20, "temp MiB": mem["temp"] / 2**20,
                     "step ms": 1e3 * step_time(v, depth, width, batch, repeat), "temp bytes": mem["temp"]})
    base = next((r for r in rows if r["variant"] == "none"), rows[0])
    for r in rows:
        r["memory ratio"] = r["MiB"] / base["MiB"]
        r["time ratio"] = r["step ms"] / base["step ms"]
    return rows


def accumulation_bytes(depth: int, width: int, batch: int, micro_batches: Sequence[int],
                       variant: str = "none") -> list[dict[str, Any]]:
    """Compiled bytes of the classifier gradient with gradient accumulation (chapter 05's
    ``train.grad_memory_bytes``), for each number of micro-batches."""
    from scalelab import train

    model = DeepMLP(depth, width, variant, rngs=nnx.Rngs(0))
    rows = []
    for k in micro_batches:
        mem = train.grad_memory_bytes(model, batch, width, micro_batches=k)
        rows.append({"variant": variant, "micro_batches": k, "micro_batch": batch // k,
                     "total": mem["argument"] + mem["output"] + mem["temp"], **mem})
    return rows


def lever_model(reduction_accumulation: float, reduction_remat: float, micro_batches: int) -> dict[str, float]:
    """Predict what gradient accumulation and remat achieve together from each one alone.

    Model: total memory = F + A, where the fixed part F (parameters, the gradient, its
    accumulator, the full-batch inputs) is touched by neither lever and the activation part A
    is divided by ``a = micro_batches`` by accumulation and by an unknown ``b`` by remat. With
    ``f = F / (F + A)`` each lever alone reduces the total by ``1 / (f + (1 - f) / a)``
    (resp. ``b``), so the two measured reductions give ``f`` and ``b``, and both levers
    together give ``1 / (f + (1 - f) / (a b))``, at most ``1 / f`` however large ``a b``.
    Returns ``f``, ``b``, ``predicted`` and ``ceiling`` (``1 / f``).
    """
    r_acc, r_rem, a = float(reduction_accumulation), float(reduction_remat), micro_batches
    if isinstance(a, bool) or not isinstance(a, int | np.integer) or a < 2:
        raise ValueError(f"micro_batches must be an integer >= 2, got {micro_batches!r}")
    if not (1 < r_acc < a and r_rem > 1):
        raise ValueError(f"need 1 < reduction_accumulation < micro_batches and reduction_remat > 1, "
                         f"got {reduction_accumulation!r}, {reduction_remat!r}, {micro_batches!r}")
    f = (1 / r_acc - 1 / a) / (1 - 1 / a)
    if not 1 / r_rem > f:
        raise ValueError(f"remat alone ({r_rem:.3g}x) cannot exceed the ceiling 1/f = {1 / f:.3g}x "
                         "that accumulation's measurement implies")
    b = (1 - f) / (1 / r_rem - f)
    return {"f": f, "b": b, "predicted": 1 / (f + (1 - f) / (a * b)), "ceiling": 1 / f}


def loglog_axes(ax: Any, xticks: Sequence[float]) -> None:
    """Log-log axes with plain-number ticks: ``xticks`` on x, 1-2-5 steps on y."""
    from matplotlib.ticker import LogLocator, NullLocator

    ax.set(xscale="log", yscale="log")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(list(xticks), [f"{v:g}" for v in xticks])
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter("{x:g}")


# --------------------------------------------------------------------------- benchmark


def bench_remat(quick: bool = False) -> dict[str, Any]:
    """Benchmark ``remat``: activation memory vs depth without remat, with per-layer and
    sqrt(n) checkpointing (fitted log-log slopes), and the step-time cost of sqrt(n).

    Narrow layers (width 32) and a large batch (2048) make activations dominate the
    parameters: 256 KiB of activations per layer input against 4 KiB of weights.
    """
    width, batch = 32, 2048
    depths = [16, 64, 256] if quick else [16, 32, 64, 128, 256, 512, 1024]
    top = depths[-1]
    ws, x = init(top, width, batch)
    # allocator peaks (GPU) before anything else, the smaller run first: the peak only ever rises
    peak_sqrt = peak_bytes(grad_fn("sqrt"), ws, x)
    peak_none = peak_bytes(grad_fn("none"), ws, x)
    sweep = memory_sweep(["none", "sqrt", "full"], depths, width, batch)
    times = {v: bench.timeit(grad_fn(v), ws, x, repeat=3 if quick else 5, number=1).best
             for v in ("none", "sqrt", "full")}
    flops = {v: compiled_flops(grad_fn(v), *shapes(4, width, batch)) for v in ("none", "full")}
    return {
        "platform": jax.default_backend(),
        "width": width, "batch": batch, "depths": depths,
        "segment_at_max_depth": segment_sizes(top)[0],
        "baseline_bytes": sweep["none"], "sqrt_bytes": sweep["sqrt"], "full_remat_bytes": sweep["full"],
        "slope_baseline": fit_slope(depths, sweep["none"]),
        "slope_sqrt": fit_slope(depths, sweep["sqrt"]),
        "slope_full_remat": fit_slope(depths, sweep["full"]),
        "memory_ratio_at_max_depth": sweep["sqrt"][-1] / sweep["none"][-1],
        "full_remat_ratio_at_max_depth": sweep["full"][-1] / sweep["none"][-1],
        "step_s": times,
        "time_overhead_sqrt": times["sqrt"] / times["none"],
        "time_overhead_full": times["full"] / times["none"],
        "flops_ratio_full_per_layer": flops["full"] / flops["none"],
        "peak_bytes_baseline": peak_none,
        "peak_bytes_sqrt": peak_sqrt,
        "compiled_temp_output_bytes_baseline": _temp_output(activation_bytes("none", top, width, batch)),
        "compiled_temp_output_bytes_sqrt": _temp_output(activation_bytes("sqrt", top, width, batch)),
    }


def _temp_output(mem: dict[str, int]) -> int:
    return mem["temp"] + mem["output"] - mem["alias"]


# --------------------------------------------------------------------------- explorer

#: The variants the explorer compares: no remat, per-layer remat, sqrt(n)-style segments.
EXPLORER_VARIANTS = ("none", "full", "sqrt")
#: Arrays of (batch, width) floats a layer keeps without remat: h_i, tanh(z_i), 1 - tanh(z_i)
#: (section 1 of the chapter; XLA's CPU compiler keeps all three).
KEPT_PER_LAYER = 3
#: (batch, width) arrays of scratch every variant's step needs besides what it keeps (the
#: gradient flowing back and the current layer's values), read off the compiled CPU program.
SCRATCH_ARRAYS = 4


def remat_model(variant: str, depth: int, segment: int, width: int, batch: int,
                kept_per_layer: int = KEPT_PER_LAYER) -> dict[str, Any]:
    """Gradient-step memory and FLOPs of the deep MLP from the chapter's closed forms (pure:
    the explorer's model; nothing is compiled).

    Memory, counted in float32 arrays of shape (batch, width), ``A = 4 * batch * width`` bytes:
    without remat every layer keeps ``c = kept_per_layer`` of them (``c n``); per-layer remat
    keeps each layer's input (``n``); segments of ``k = segment`` layers keep the input of each of
    the ``ceil(n / k)`` segments (:func:`segment_sizes`) plus one segment's ``c k`` residuals while
    it is differentiated (and that segment's weights and their gradient, ``2 k d^2`` floats).
    Every variant adds :data:`SCRATCH_ARRAYS` arrays of scratch, the input ``x``, the weights and
    the gradient (``n d^2`` floats each). ``segment`` matters only for ``"sqrt"``.

    FLOPs per layer: the forward matmul ``2 B d^2``, the backward's two (``4 B d^2``) and
    ``6 B d`` of element-wise work; remat (per layer or segments) runs every layer's forward
    again, ``2 B d^2`` more: the 4/3 of the chapter.
    """
    if variant not in EXPLORER_VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(EXPLORER_VARIANTS)}, got {variant!r}")
    _check_sizes(depth=depth, segment=segment, width=width, batch=batch, kept_per_layer=kept_per_layer)
    k, full, rest = segment_sizes(depth, segment) if variant == "sqrt" else (int(segment), 0, 0)
    n, d, B, c = int(depth), int(width), int(batch), int(kept_per_layer)
    array = 4 * B * d
    if variant == "none":
        kept, extra = c * n, 0
    elif variant == "full":
        kept, extra = n, 0
    else:
        kept, extra = full + (1 if rest else 0) + c * k, 2 * k * d * d * 4
    fixed = 2 * n * d * d * 4 + array + SCRATCH_ARRAYS * array
    activation = kept * array
    total = fixed + activation + extra
    base_layer = 6 * B * d * d + 6 * B * d
    recompute_layer = 0 if variant == "none" else 2 * B * d * d
    flops_layer = base_layer + recompute_layer
    return {
        "kept_arrays": int(kept),
        "activation_bytes": int(activation),
        "total_bytes": int(total),
        "total_mib": float(total / 2**20),
        "segments": int(full + (1 if rest else 0)) if variant == "sqrt" else 0,
        "flops_per_layer": float(flops_layer),
        "step_flops": float(n * flops_layer),
        "recompute_flops": float(n * recompute_layer),
        "flop_ratio": float(flops_layer / base_layer),
        "memory_ratio": float(total / (fixed + c * n * array)),
    }


def measure_remat_point(variant: str, depth: int, segment: int, width: int, batch: int) -> dict[str, Any]:
    """Compile the real gradient step at that setting (nothing is run): XLA's total bytes
    (:func:`compiled_bytes`) and its FLOPs for one layer (:func:`flops_of`; XLA's cost model
    counts a loop body once, i.e. one layer, so the segmented variant is counted at a depth the
    segment divides; with a single segment XLA folds the outer loop away and its count is not
    one layer's)."""
    if variant not in EXPLORER_VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(EXPLORER_VARIANTS)}, got {variant!r}")
    remat_model(variant, depth, segment, width, batch)  # the same checks, the same message
    k, full, rest = segment_sizes(depth, segment) if variant == "sqrt" else (segment, 0, 0)
    seg = k if variant == "sqrt" else None
    compiled = grad_fn(variant, seg).lower(*shapes(depth, width, batch)).compile()
    from scalelab import parallel

    total = parallel.compiled_memory(compiled)["total"]
    if variant == "sqrt" and rest:  # one loop structure: whole segments only
        compiled = grad_fn(variant, seg).lower(*shapes(full * k, width, batch)).compile()
    return {"depth": int(depth), "total_bytes": int(total), "total_mib": total / 2**20,
            "flops_per_layer": flops_of(compiled)}


def remat_explorer(info: Any = None):
    """The remat explorer: a variant (no remat, per-layer, segments), depth, segment length,
    batch and width -> the gradient step's memory and recompute FLOPs from the closed forms;
    "measure this point" compiles the real step there and plots XLA's numbers beside them."""
    from scalelab import env, plot, widgets

    names = {"none": "no remat", "full": "per-layer remat", "sqrt": "segments"}

    def draw(settings, pred, points):
        fig, (left, right) = plot.figure(ncols=2, width=10, height=3.9)
        depth, k, d, B = settings["depth"], settings["segment"], settings["width"], settings["batch"]
        depths = np.unique(np.geomspace(max(k, 2), max(1024, 2 * depth), 60).astype(int))
        for i, v in enumerate(EXPLORER_VARIANTS):
            current = v == settings["variant"]
            kw = {"linewidth": 2.0 if current else 0.9, "alpha": 1.0 if current else 0.55, "color": f"C{i}"}
            label = names[v] + (f" (k = {k})" if v == "sqrt" else "") + (" (current)" if current else "")
            left.plot(depths, [remat_model(v, int(n), k, d, B)["total_mib"] for n in depths], label=label, **kw)
            right.plot(depths, [remat_model(v, int(n), k, d, B)["step_flops"] / 1e9 for n in depths],
                       ls="--" if v == "full" else "-", **kw)  # per-layer and segments: the same FLOPs
        sq = [remat_model("sqrt", int(n), max(1, round(math.sqrt(n))), d, B)["total_mib"] for n in depths]
        left.plot(depths, sq, color="C2", ls=":", lw=1, label="segments, k = round(sqrt(n))")
        colour = f"C{EXPLORER_VARIANTS.index(settings['variant'])}"
        left.scatter([depth], [pred["total_mib"]], s=60, color=colour, zorder=3,
                     label=f"this setting: {pred['total_mib']:.1f} MiB predicted")
        right.scatter([depth], [pred["step_flops"] / 1e9], s=60, color=colour, zorder=3)
        for j, p in enumerate(points):
            r = p["result"]
            left.scatter([r["depth"]], [r["total_mib"]], marker="*", s=140, color="C3", zorder=5,
                         label="compiled (measure)" if j == 0 else None)
            right.scatter([r["depth"]], [r["flops_per_layer"] * r["depth"] / 1e9], marker="*", s=140,
                          color="C3", zorder=5)
        left.set(xscale="log", yscale="log", xlabel="depth (layers)", ylabel="MiB (gradient step)",
                 title=f"memory, width {d}, batch {B}")
        right.set(xscale="log", yscale="log", xlabel="depth (layers)", ylabel="GFLOP per step",
                  title="arithmetic: remat x{:.2f} (one more forward)".format(
                      remat_model("full", depth, k, d, B)["flop_ratio"]))
        left.legend(fontsize=7, loc="upper left")
        plot.label(fig, info or env.describe(), source="closed-form model (stars: compiled by XLA)", devices=1)
        return fig

    controls = {
        "variant": widgets.dropdown("variant", [(names[v], v) for v in EXPLORER_VARIANTS], value="sqrt"),
        "depth": widgets.slider("depth (layers)", 64, 16, 1024, step=16, integer=True),
        "segment": widgets.slider("segment k", 8, 1, 64, integer=True),
        "batch": widgets.slider("batch", 2048, 256, 4096, step=256, integer=True),
        "width": widgets.slider("width", 32, 8, 128, step=8, integer=True),
    }
    return widgets.Explorer(
        "remat", "Rematerialisation explorer", controls, remat_model, draw,
        measure=measure_remat_point,
        shown=["total_mib", "kept_arrays", "segments", "memory_ratio", "recompute_flops", "flop_ratio"],
        labels={"total_mib": "predicted MiB", "kept_arrays": "kept (batch, width) arrays",
                "memory_ratio": "of no remat", "recompute_flops": "recompute FLOPs",
                "flop_ratio": "FLOPs vs no remat (x)"},
        note="'measure this point' compiles the real gradient step at this setting (nothing runs) and "
             "plots XLA's bytes and FLOPs.")
