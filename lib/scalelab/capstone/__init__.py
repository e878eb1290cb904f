"""Chapter 15, the capstone: a small GPT from raw text to a served endpoint, every stage measured.

One module per stage, each reusing a chapter's code rather than forking it:

- :mod:`~scalelab.capstone.data` (chapters 03, 04): the Python standard library's own sources
  as byte tokens (offline on every machine, PSF License), held out by file, in the HDF5 store with
  a dataset card; a Grain pipeline over it, sharded by process, with exact resume.
- :mod:`~scalelab.capstone.model` (chapters 05, 08, 10, 14): the GPT in Flax NNX (float32 master
  weights, bfloat16 compute, remat), its parameter / FLOP / KV-cache formulas, cached decoding and
  the exported decode step.
- :mod:`~scalelab.capstone.training` (chapters 07-13): the 2-D data x model mesh (FSDP + Megatron
  tensor parallelism), the training loop with asynchronous Orbax checkpoints and exact resume, the
  crash test, the restore onto another mesh, the mesh's peak FLOP/s for MFU.
- :mod:`~scalelab.capstone.server` (chapter 14): streamed generation with continuous batching
  over the exported steps, and its load test.

:func:`bench_capstone` (benchmark ``capstone``) runs the chain and reports each stage's figure.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from scalelab.capstone.data import (
    LICENCE,
    VOCAB,
    Corpus,
    batches,
    build_corpus,
    decode,
    encode,
    pipeline_rate,
    stdlib_files,
    store_rows,
    store_tokens,
    unigram_loss,
    windows,
)
from scalelab.capstone.model import (
    GPT,
    Block,
    GPTConfig,
    count_params,
    decode_fns,
    export_decode,
    flat_params,
    flops_per_token,
    generate,
    init_cache,
    kv_cache_bytes,
    kv_speedups,
    nested_params,
    next_token_loss,
    param_count,
    remat_flops_per_token,
    run_exported_decode,
    xla_flops,
)
from scalelab.capstone.training import (
    PARAM_RULES,
    Run,
    crash_and_resume,
    evaluate,
    init_train_state,
    make_mesh,
    make_train_step,
    mesh_peak,
    mesh_shape,
    optimizer,
    param_spec,
    place,
    restore_final,
    setup,
    sharded_vs_single,
    state_shardings,
    step_seconds,
    train,
    worker,
)

__all__ = [
    "FULL",
    "GPT",
    "LICENCE",
    "PARAM_RULES",
    "QUICK",
    "VOCAB",
    "Block",
    "Corpus",
    "GPTConfig",
    "Run",
    "batches",
    "bench_capstone",
    "build_corpus",
    "count_params",
    "crash_and_resume",
    "decode",
    "decode_fns",
    "encode",
    "evaluate",
    "export_decode",
    "flat_params",
    "flops_per_token",
    "generate",
    "init_cache",
    "init_train_state",
    "kv_cache_bytes",
    "kv_speedups",
    "make_mesh",
    "make_train_step",
    "mesh_peak",
    "mesh_shape",
    "nested_params",
    "next_token_loss",
    "optimizer",
    "param_count",
    "param_spec",
    "pipeline_rate",
    "place",
    "remat_flops_per_token",
    "restore_final",
    "run_exported_decode",
    "setup",
    "sharded_vs_single",
    "state_shardings",
    "stdlib_files",
    "step_seconds",
    "store_rows",
    "store_tokens",
    "train",
    "unigram_loss",
    "windows",
    "worker",
    "xla_flops",
]

#: The chain's sizes. Quick mode (the tests) runs it in about two minutes on 2 CPU cores; full mode
#: is what a learner runs. ``serve_slots`` is the server's batch of decode slots.
QUICK = {"cfg": GPTConfig(d=64, layers=2, heads=4, seq_len=128), "steps": 60, "batch": 16, "max_bytes": 400_000,
         "serve_slots": 8, "serve_requests": 32, "serve_new_tokens": 24}
FULL = {"cfg": GPTConfig(d=128, layers=4, heads=4, seq_len=128), "steps": 400, "batch": 32, "max_bytes": 4_000_000,
        "serve_slots": 8, "serve_requests": 64, "serve_new_tokens": 48}


def bench_capstone(quick: bool = False, folder=None) -> dict[str, Any]:
    """The chain, measured: corpus, pipeline headroom, training on every device (tokens/s, MFU),
    validation loss against the unigram baseline, sharded == single, the crash test's bitwise
    resume, the KV cache, and the streaming server under load."""
    import tempfile

    from scalelab.capstone import server

    p = QUICK if quick else FULL
    cfg: GPTConfig = p["cfg"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(folder or tmp)
        corpus = build_corpus(work / "corpus", p["max_bytes"], cfg.seq_len)
        devices = jax.devices()
        run = train(cfg, corpus.train, p["steps"], p["batch"], devices)
        step_s = float(np.median(run["step_s"][len(run["step_s"]) // 2:]))
        tokens_per_step = p["batch"] * cfg.seq_len
        peak = mesh_peak(devices, cfg.dtype)
        flops = flops_per_token(cfg)["total"] * tokens_per_step
        params = jax.device_get(run["state"]["params"])
        val_loss = evaluate(run["graphdef"], params, store_rows(corpus.val), batch=p["batch"])
        unigram = unigram_loss(store_tokens(corpus.train), store_tokens(corpus.val))
        rate = pipeline_rate(corpus.train, p["batch"])
        rows = np.asarray(next(batches(corpus.train, 8, seed=1)))[:, : 33]
        small = GPTConfig(d=32, layers=2, heads=4, seq_len=32, dtype="float32")
        eq = sharded_vs_single(small, rows, devices) if len(devices) > 1 else {"params_max_abs_diff": None}  # nothing to compare on one device
        crash = crash_and_resume(work / "crash", QUICK["cfg"], corpus.train)
        model = nnx.merge(run["graphdef"], nnx.State(params))
        lengths = [n for n in (16, 64, 112) if n + 8 <= cfg.seq_len]
        kv = kv_speedups(model, lengths)
        served = server.export_for_serving(work / "serve", model, p["serve_slots"])
        with server.GenerationServer(served) as srv:
            prompts = ["def ", "import os\n", "class ", "    return "]
            one = server.load_test(srv.url, prompts, p["serve_new_tokens"], 1, p["serve_requests"] // 4)
            many = server.load_test(srv.url, prompts, p["serve_new_tokens"], p["serve_slots"], p["serve_requests"])
    return {
        "config": dataclasses.asdict(cfg), "steps": p["steps"], "batch": p["batch"],
        "corpus": corpus.card, "mesh": dict(zip(("data", "model"), run["mesh"], strict=True)),
        "step_s": step_s, "tokens_per_s": tokens_per_step / step_s,
        "model_flops_per_step": flops, "peak_flops": peak.flops, "peak_source": peak.source,
        "mfu": flops / step_s / peak.flops if peak.flops else None,
        "first_loss": run["losses"][0], "last_loss": float(np.mean(run["losses"][-5:])),
        "val_loss": val_loss, "unigram_val_loss": unigram,
        "pipeline_batches_per_s": rate, "training_batches_per_s": 1 / step_s, "pipeline_headroom": rate * step_s,
        "sharded_vs_single_max_abs_diff": eq["params_max_abs_diff"],
        "resume_bitwise_equal": crash["resume_bitwise_equal"], "resume": {k: v for k, v in crash.items()
                                                                           if k != "restart_output"},
        "kv_cache": kv, "kv_cache_speedup": {str(r["length"]): r["speedup"] for r in kv},
        "prefill_s_per_token": kv[-1]["prefill_s_per_token"], "decode_s_per_token": kv[-1]["cached_s_per_token"],
        "serve_tokens_per_s": many["tokens_per_s"], "serve_p99_ms": many["p99_ms"],
        "serve_ttft_p99_ms": many["ttft_p99_ms"], "serve_one_client_tokens_per_s": one["tokens_per_s"],
        "serve": {"one_client": one, "concurrent": many},
    }
