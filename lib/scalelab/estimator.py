"""Chapter 08: bytes per device and bytes communicated per step, estimated and checked.

:func:`estimate` is a pure cost model of chapter 08's deep residual MLP
(:class:`scalelab.parallel.DeepMLP` with ``hidden = 4 x width``, Adam) under data, tensor and
pipeline parallelism, ZeRO stages 0-3, mixed or float32 precision and rematerialisation.
:func:`compiled_memory` builds the real sharded training step for a setting (on as many of this
runtime's devices as ``dp x tp``), compiles it (nothing runs) and reads XLA's memory analysis, so the
estimate can be put beside what the compiler allocates. :func:`schedule_model` summarises a pipeline
schedule (GPipe or 1F1B). Two explorers wrap them.

What is compared with what (documented in :func:`compiled_memory`):

- **state** (parameters + Adam state + the local batch) = the step's compiled *arguments*;
- **backward peak** (gradients + activations kept for the backward pass) = *outputs + temporaries* of
  the gradient program (``jax.value_and_grad`` of the loss, the gradients laid out as the stage says);
- the full step's temporaries also hold the optimiser update's scratch buffers, which depend on how
  XLA's CPU backend fuses Adam and are not modelled; they are reported beside, not compared.
"""

from __future__ import annotations

from typing import Any

import numpy as np

FEATURES, CLASSES, HIDDEN_RATIO = 64, 10, 4  # the chapter's digits model: 64 inputs, 10 classes, hidden = 4 x width
PRECISIONS = ("float32", "mixed")
SCHEDULES = ("GPipe", "1F1B")
MB = 1e6


def _check(width, depth, batch, seq, precision, remat, zero, tp, pp, dp, micro_batches):
    for name, v in (("width", width), ("depth", depth), ("batch", batch), ("seq", seq), ("tp", tp),
                    ("pp", pp), ("dp", dp), ("micro_batches", micro_batches)):
        if not isinstance(v, int | np.integer) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"zero must be a ZeRO stage 0, 1, 2 or 3, got {zero!r}")
    if not isinstance(remat, bool):
        raise ValueError(f"remat must be True or False, got {remat!r}")
    if (HIDDEN_RATIO * width) % tp:
        raise ValueError(f"tp = {tp} must divide the hidden width {HIDDEN_RATIO * width}")
    if depth % pp:
        raise ValueError(f"pp = {pp} must divide the depth {depth}")
    if (batch * seq) % (dp * micro_batches):
        raise ValueError(f"dp x micro_batches = {dp * micro_batches} must divide batch x seq = {batch * seq}")


def _leaves(width: int, depth: int, tp: int, pp: int) -> list[tuple[str, tuple[int, ...], int]]:
    """(name, local shape after TP/PP, index of the layer axis or -1) for every parameter leaf;
    TP splits w1/b1 by hidden columns and w2 by rows (chapter 08's ``tp_specs``), PP the layer axis."""
    d, h, n = width, HIDDEN_RATIO * width, depth // pp
    return [("embed.w", (FEATURES, d), -1), ("embed.b", (d,), -1),
            ("blocks.w1", (n, d, h // tp), 0), ("blocks.b1", (n, h // tp), 0),
            ("blocks.w2", (n, h // tp, d), 0), ("blocks.b2", (n, d), 0),
            ("head.w", (d, CLASSES), -1), ("head.b", (CLASSES,), -1)]


def _zero_values(shape: tuple[int, ...], layer_axis: int, dp: int) -> int:
    """Values one device keeps of a leaf sharded over ``dp`` along its first dimension (after the
    layer axis) that ``dp`` divides, as chapter 08's ``fsdp_specs``; else the whole leaf."""
    total = int(np.prod(shape))
    for dim in range(layer_axis + 1, len(shape)):
        if shape[dim] % dp == 0 and shape[dim] >= dp:
            return total // dp
    return total


def estimate(width: int = 256, depth: int = 8, batch: int = 512, seq: int = 1, precision: str = "float32",
             remat: bool = False, zero: int = 0, tp: int = 1, pp: int = 1, dp: int = 1,
             micro_batches: int = 1) -> dict[str, Any]:
    """Bytes per device and bytes one device sends per training step (pure arithmetic).

    The model: chapter 08's deep MLP (64 features -> ``depth`` residual blocks of width ``width``
    and hidden ``4 x width`` -> 10 classes), ``batch x seq`` rows per step (``seq`` tokens per
    example, each a row), Adam. ``dp`` x ``tp`` x ``pp`` devices.

    - parameters: ``precision="float32"`` 4 bytes each, ``"mixed"`` 2 (bf16); sharded by TP
      (the block matrices), PP (the layers) and, at ZeRO-3, over ``dp``;
    - gradients: as the parameters (after TP and PP). With ``dp > 1`` the backward pass produces
      each device's full local gradient and the reduction writes its result into a new buffer
      while the local one is live: the all-reduced copy (ZeRO 0-1) or, from ZeRO-2, the
      reduce-scattered shard (the programs here reduce once, not bucket by bucket), both counted;
    - optimiser: Adam's two moments (4 bytes each) plus, in mixed precision, float32 master weights;
      sharded over ``dp`` from ZeRO-1; plus Adam's step count;
    - activations kept for the backward pass, per layer and row: the block input and output
      (2 x width values) and the hidden pre-activation and ReLU output (2 x hidden / tp); with
      ``remat`` only each block's input, plus one block's worth recomputed in the backward pass;
      the embedding output and the logits; a pipeline stage keeps its ``depth / pp`` layers for
      the micro-batches in flight (GPipe: all ``micro_batches``); without a pipeline,
      ``micro_batches`` is gradient accumulation (one micro-batch's activations at a time);
    - communication (ring collectives): DP all-reduce of the gradients 2(n-1)/n x G (ZeRO-1 adds
      the all-gather of the updated parameters: 3(n-1)/n; ZeRO-2 reduce-scatters: 2(n-1)/n;
      ZeRO-3 gathers the weights forward and backward and reduce-scatters: 3(n-1)/n); TP two
      all-reduces of the (rows, width) activations per layer (forward and backward); PP each stage
      passes a micro-batch's activations on and their gradient back on each of m + p - 1 ticks.
    """
    _check(width, depth, batch, seq, precision, remat, zero, tp, pp, dp, micro_batches)
    p_bytes = 4 if precision == "float32" else 2
    opt_per_value = 8 if precision == "float32" else 12  # two moments (+ float32 masters in mixed)
    d, h = width, HIDDEN_RATIO * width
    leaves = _leaves(width, depth, tp, pp)
    local = sum(int(np.prod(s)) for _, s, _ in leaves)  # values per device after TP and PP
    sharded = sum(_zero_values(s, a, dp) for _, s, a in leaves)  # ... and after ZeRO over dp
    params = (sharded if zero >= 3 else local) * p_bytes
    # the reduction (all-reduce, or reduce-scatter from ZeRO-2) writes a new buffer while the local
    # gradient is still live: with dp > 1 both are held at once
    grads = (local + (sharded if zero >= 2 else local) if dp > 1 else local) * p_bytes
    optimizer = (sharded if zero >= 1 else local) * opt_per_value + 4
    rows = batch * seq // dp  # rows per data-parallel replica per step
    micro_rows = rows // micro_batches
    layers = depth // pp
    per_layer = (d + (d + 2 * h // tp) if not remat else d) * p_bytes
    recompute = (d + 2 * h // tp) * p_bytes if remat else 0
    kept_micro = micro_batches if pp > 1 else 1  # GPipe keeps every micro-batch until its backward
    act_rows = micro_rows * kept_micro
    activations = act_rows * (layers * per_layer + recompute + (d + CLASSES) * p_bytes)
    batch_bytes = rows * (FEATURES * 4 + 4)
    total = params + grads + optimizer + activations + batch_bytes
    # communication per device per step
    g = local * p_bytes
    n = dp
    dp_comm = {0: 2, 1: 3, 2: 2, 3: 3}[zero] * (n - 1) / n * g if n > 1 else 0.0
    tp_comm = layers * 2 * 2 * (tp - 1) / tp * rows * d * p_bytes
    pp_comm = 2 * (micro_batches + pp - 1) * micro_rows * d * p_bytes if pp > 1 else 0.0
    return {
        "devices": dp * tp * pp,
        "params_MB": params / MB, "grads_MB": grads / MB, "optimizer_MB": optimizer / MB,
        "activations_MB": activations / MB, "batch_MB": batch_bytes / MB,
        "state_MB": (params + optimizer + batch_bytes) / MB, "backward_MB": (grads + activations) / MB,
        "total_MB": total / MB,
        "comm_dp_MB": dp_comm / MB, "comm_tp_MB": tp_comm / MB, "comm_pp_MB": pp_comm / MB,
        "comm_MB": (dp_comm + tp_comm + pp_comm) / MB,
        "param_count": int(depth * (2 * d * h + h + d) + FEATURES * d + d + d * CLASSES + CLASSES),
    }


def memory_model(width: int, depth: int, batch: int, seq: int, precision: str, remat: str, zero: int, tp: int,
                 pp: int, dp: int, micro_batches: int) -> dict[str, Any]:
    """The explorer's model: :func:`estimate`, with ``remat`` given as ``"off"`` / ``"on"``."""
    if remat not in ("off", "on"):
        raise ValueError(f"remat must be 'off' or 'on', got {remat!r}")
    out = estimate(width=width, depth=depth, batch=batch, seq=seq, precision=precision, remat=remat == "on",
                   zero=zero, tp=tp, pp=pp, dp=dp, micro_batches=micro_batches)
    return {k: (float(v) if isinstance(v, float) else int(v)) for k, v in out.items()}


# --------------------------------------------------------------------------- the compiled program


def _programs(width, depth, batch, seq, remat, zero, tp, dp, devices):
    """The real sharded step and its gradient program for a setting, lowered on abstract arrays."""
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from scalelab.parallel import model_parallel as mp

    cfg = mp.DeepMLP(features=FEATURES, width=width, hidden=HIDDEN_RATIO * width, layers=depth, classes=CLASSES)
    params = jax.eval_shape(cfg.init, jax.random.key(0))
    mesh = mp.model_mesh(list(devices)[:dp * tp], ("data", "model"), shape=(dp, tp))
    base = mp.tp_specs(params) if tp > 1 else mp.dp_specs(params)

    def zero_spec(group, spec, shape):  # chapter 08's fsdp_specs rule, on top of the TP split
        spec = list(tuple(spec)) + [None] * (len(shape) - len(tuple(spec)))
        for dim in range(1 if group == "blocks" else 0, len(shape)):
            if spec[dim] is None and shape[dim] % dp == 0 and shape[dim] >= dp:
                spec[dim] = "data"
                break
        return P(*spec)

    sharded = {g: {k: zero_spec(g, base[g][k], params[g][k].shape) for k in params[g]} for g in params}
    p_specs = sharded if zero >= 3 else base
    o_specs = sharded if zero >= 1 else base
    g_specs = sharded if zero >= 2 else base
    tx = mp.adam()

    def named(specs):
        return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))

    block = jax.checkpoint(mp.mlp_block) if remat else mp.mlp_block

    def loss(prm, x, y):  # chapter 08's deep_loss, each block optionally rematerialised
        hid = x @ prm["embed"]["w"] + prm["embed"]["b"]
        for i in range(depth):
            hid = block(hid, *mp._layer(prm["blocks"], i))
        logits = hid @ prm["head"]["w"] + prm["head"]["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def grads_of(prm, x, y):
        value, grads = jax.value_and_grad(loss)(prm, x, y)
        return jax.lax.with_sharding_constraint(grads, named(g_specs)), value

    def step(prm, opt_state, x, y):  # chapter 08's gspmd_step with these layouts
        grads, value = grads_of(prm, x, y)
        prm, opt_state = mp._adam_update(tx, prm, grads, opt_state)
        return jax.lax.with_sharding_constraint(prm, named(p_specs)), opt_state, value

    def abstract(tree, specs):
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, s)),
                            tree, specs, is_leaf=lambda s: isinstance(s, P))

    state = jax.eval_shape(tx.init, params)
    rows = batch * seq
    x = jax.ShapeDtypeStruct((rows, FEATURES), jnp.float32, sharding=NamedSharding(mesh, P("data")))
    y = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=NamedSharding(mesh, P("data")))
    prm = abstract(params, p_specs)
    step_c = jax.jit(step, donate_argnums=(0, 1)).lower(prm, abstract(state, mp.opt_state_specs(tx, params, o_specs)),
                                                        x, y).compile()
    grad_c = jax.jit(grads_of).lower(prm, x, y).compile()
    return step_c, grad_c


def compiled_memory(width: int = 256, depth: int = 8, batch: int = 512, seq: int = 1, remat: bool = False,
                    zero: int = 0, tp: int = 1, dp: int = 1, devices: Any = None) -> dict[str, Any]:
    """Compile the real float32 training step of a setting on ``dp x tp`` devices (default: this
    runtime's) and read XLA's memory analysis per device; nothing runs.

    Returns, in MB per device: ``state_MB`` = the step's arguments (parameters + Adam state + the
    local batch; compare :func:`estimate`'s ``state_MB``), ``backward_MB`` = outputs + temporaries of
    the gradient program (gradients + kept activations; compare ``backward_MB``), ``total_MB`` their
    sum (compare ``total_MB``), and, not compared, the step's own ``step_temp_MB`` and
    ``step_total_MB`` (arguments + outputs + temporaries - aliased, state donated), whose temporaries
    also hold the optimiser update's scratch. Pipelines (``pp > 1``) are estimate-only.
    """
    import jax

    from scalelab.parallel import model_parallel as mp

    _check(width, depth, batch, seq, "float32", remat, zero, tp, 1, dp, 1)
    devices = list(devices if devices is not None else jax.devices())
    if dp * tp > len(devices):
        raise ValueError(f"dp x tp = {dp * tp} devices do not fit the {len(devices)} of this runtime")
    step_c, grad_c = _programs(width, depth, batch, seq, remat, zero, tp, dp, devices)
    s, g = mp.compiled_memory(step_c), mp.compiled_memory(grad_c)
    state, backward = s["argument"], g["output"] + g["temp"]
    return {"state_MB": state / MB, "backward_MB": backward / MB, "total_MB": (state + backward) / MB,
            "step_temp_MB": s["temp"] / MB, "step_total_MB": s["total"] / MB}


def check_grid(settings: list[dict[str, Any]], devices: Any = None) -> list[dict[str, Any]]:
    """Estimate beside compiled for each setting: total and the relative error of each term."""
    rows = []
    for st in settings:
        est = estimate(**st)
        got = compiled_memory(**st, devices=devices)
        row = {**st}
        for key in ("state_MB", "backward_MB", "total_MB"):
            row[f"estimate {key}"] = est[key]
            row[f"compiled {key}"] = got[key]
        row["rel. error (total)"] = est["total_MB"] / got["total_MB"] - 1
        row["compiled step_total_MB"] = got["step_total_MB"]
        rows.append(row)
    return rows


# The checked grid: ZeRO stages, TP, DP and batch sizes on at most 4 devices (float32, remat off:
# XLA's CPU scheduler may run a rematerialised block's recomputation early, so the compiled program
# need not show remat's saving; the notebook shows a remat row beside the grid).
GRID: tuple[dict[str, Any], ...] = (
    {"width": 128, "depth": 8, "batch": 2048, "zero": 0, "tp": 1, "dp": 1},
    {"width": 128, "depth": 8, "batch": 2048, "zero": 0, "tp": 1, "dp": 4},
    {"width": 128, "depth": 8, "batch": 2048, "zero": 1, "tp": 1, "dp": 4},
    {"width": 128, "depth": 8, "batch": 2048, "zero": 2, "tp": 1, "dp": 4},
    {"width": 128, "depth": 8, "batch": 2048, "zero": 3, "tp": 1, "dp": 4},
    {"width": 128, "depth": 8, "batch": 2048, "zero": 0, "tp": 4, "dp": 1},
    {"width": 128, "depth": 8, "batch": 2048, "zero": 0, "tp": 2, "dp": 2},
    {"width": 128, "depth": 8, "batch": 2048, "zero": 3, "tp": 2, "dp": 2},
    {"width": 256, "depth": 8, "batch": 512, "zero": 0, "tp": 1, "dp": 2},
    {"width": 256, "depth": 8, "batch": 512, "zero": 1, "tp": 1, "dp": 4},
    {"width": 64, "depth": 4, "batch": 4096, "seq": 2, "zero": 2, "tp": 1, "dp": 4},
)


# --------------------------------------------------------------------------- the explorers

_KINDS = (("parameters", "params_MB"), ("gradients", "grads_MB"), ("optimiser state", "optimizer_MB"),
          ("activations", "activations_MB"), ("batch", "batch_MB"))


def measure_memory(width: int, depth: int, batch: int, seq: int, precision: str, remat: str, zero: int, tp: int,
                   pp: int, dp: int, micro_batches: int) -> dict[str, float]:
    """The explorer's measurement: :func:`compiled_memory` at the setting (float32, no pipeline,
    no gradient accumulation; the devices must hold dp x tp)."""
    if precision != "float32" or pp != 1 or micro_batches != 1:
        raise ValueError("only float32 settings with pp = 1 and micro_batches = 1 compile here "
                         "(mixed precision, pipelines and accumulation are estimate-only)")
    got = compiled_memory(width=width, depth=depth, batch=batch, seq=seq, remat=remat == "on", zero=zero, tp=tp,
                          dp=dp)
    return {"compiled_state_MB": got["state_MB"], "compiled_backward_MB": got["backward_MB"],
            "compiled_total_MB": got["total_MB"]}


def estimator_explorer(info: Any = None):
    """Memory and communication per device: ZeRO stage, precision, remat, sizes and the
    DP / TP / PP degrees -> a stacked bar of bytes per device by kind, and bytes sent per step;
    "measure this point" compiles the real step at the setting and puts its compiled bytes beside."""
    from scalelab import env, plot, widgets

    def draw(settings, pred, points):
        fig, (ax, bx) = plot.figure(ncols=2, width=8.6, height=3.6)
        bottom = 0.0
        for i, (label, key) in enumerate(_KINDS):
            ax.bar(["estimate"], [pred[key]], bottom=bottom, color=f"C{i}", label=label)
            bottom += pred[key]
        mine = [p["result"] for p in points if p["settings"] == settings]
        if mine:
            r = mine[-1]
            ax.bar(["compiled"], [r["compiled_state_MB"]], color="0.55", label="compiled: arguments (state)")
            ax.bar(["compiled"], [r["compiled_backward_MB"]], bottom=[r["compiled_state_MB"]], color="0.8",
                   label="compiled: gradient program (out + temp)")
        ax.set(ylabel="MB per device", title=f"{pred['devices']} device(s), ZeRO-{settings['zero']}")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, not on them
        comm = [pred["comm_dp_MB"], pred["comm_tp_MB"], pred["comm_pp_MB"]]
        bx.bar(["DP / ZeRO", "TP", "PP"], comm, color=["C5", "C6", "C7"])
        bx.set(ylabel="MB sent per device per step", title="communication (ring collectives)")
        plot.label(fig, info or env.describe(), source="estimate; grey: compiled here (XLA memory analysis)")
        return fig

    controls = {
        "zero": widgets.dropdown("ZeRO stage", [0, 1, 2, 3]),
        "precision": widgets.dropdown("precision", list(PRECISIONS)),
        "remat": widgets.dropdown("remat", ["off", "on"]),
        "width": widgets.slider("width", 128, 64, 1024, step=64, integer=True),
        "depth": widgets.slider("depth", 8, 4, 32, step=4, integer=True),
        "batch": widgets.slider("batch", 2048, 256, 8192, step=256, integer=True),
        "seq": widgets.dropdown("seq (rows per example)", [1, 2, 4, 8]),
        "dp": widgets.dropdown("DP", [1, 2, 4, 8], value=2),
        "tp": widgets.dropdown("TP", [1, 2, 4, 8], value=2),
        "pp": widgets.dropdown("PP", [1, 2, 4]),
        "micro_batches": widgets.dropdown("micro-batches", [1, 2, 4, 8]),
    }
    return widgets.Explorer(
        "estimator", "Memory and communication per device (chapter 08's deep MLP, Adam)", controls, memory_model,
        draw, measure=measure_memory,
        shown=["total_MB", "params_MB", "grads_MB", "optimizer_MB", "activations_MB", "comm_MB"],
        labels={"total_MB": "MB per device", "params_MB": "parameters", "grads_MB": "gradients",
                "optimizer_MB": "optimiser", "activations_MB": "activations", "comm_MB": "MB sent per step"},
        note="measure compiles the float32 step (pp = 1, micro-batches = 1) on dp x tp of this runtime's devices "
             "(a few seconds); pipelines and mixed precision are estimate-only.")


def schedule_model(p: int, m: int, kind: str) -> dict[str, Any]:
    """A pipeline schedule of ``p`` stages and ``m`` micro-batches (``kind`` GPipe or 1F1B):
    slots, the idle share of (stage, slot) places beside GPipe's (p - 1) / (m + p - 1), and the
    most micro-batches any stage keeps in flight (activations held at once)."""
    from scalelab.parallel import model_parallel as mp

    if kind not in SCHEDULES:
        raise ValueError(f"kind must be one of {SCHEDULES}, got {kind!r}")
    if not isinstance(p, int | np.integer) or not isinstance(m, int | np.integer) or p < 1 or m < 1:
        raise ValueError(f"p (stages) and m (micro-batches) must be integers >= 1, got {p!r}, {m!r}")
    k, j = mp.gpipe_kinds(p, m) if kind == "GPipe" else mp.one_f_one_b_schedule(p, m)
    return {"slots": int(k.shape[1]), "bubble_fraction": float(mp.bubble_fraction(j)),
            "predicted_bubble": float(mp.predicted_bubble(p, m)),
            "peak_in_flight": int(mp.in_flight(k, j).max())}


def schedule_explorer(info: Any = None):
    """GPipe or 1F1B with p stages and m micro-batches: the schedule drawn, its bubble share beside
    (p - 1) / (m + p - 1), and the peak micro-batches in flight. Pure schedule: nothing to measure."""
    from scalelab import plot, widgets
    from scalelab.parallel import model_parallel as mp

    def draw(settings, pred, points):
        p, m = settings["p"], settings["m"]
        sched = mp.gpipe_schedule(p, m) if settings["kind"] == "GPipe" else mp.one_f_one_b_schedule(p, m)
        fig, ax = plot.figure(width=9.0, height=1.4 + 0.42 * p)
        mp.plot_schedule(sched, ax=ax, title=f"{settings['kind']}: p = {p}, m = {m}; idle "
                         f"{pred['bubble_fraction']:.0%} (GPipe formula {pred['predicted_bubble']:.0%}), "
                         f"peak in flight {pred['peak_in_flight']}")
        plot.footer(fig, "schedule tables (formulas, nothing measured)")
        return fig

    controls = {
        "kind": widgets.dropdown("schedule", list(SCHEDULES)),
        "p": widgets.slider("stages p", 4, 1, 8, integer=True),
        "m": widgets.slider("micro-batches m", 8, 1, 16, integer=True),
    }
    return widgets.Explorer("schedule", "Pipeline schedules: GPipe and 1F1B", controls, schedule_model, draw,
                            labels={"bubble_fraction": "idle share", "predicted_bubble": "(p-1)/(m+p-1)",
                                    "peak_in_flight": "peak in flight"})
