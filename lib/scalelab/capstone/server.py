"""The capstone's server: streamed generation with continuous batching over exported steps.

- :func:`slot_fns` are the two steps a generation server runs: ``prefill_slot`` writes one
  prompt's keys and values into one *slot* of a shared KV cache, ``decode_slots`` advances every
  slot by one token at once, each at its own position. :func:`export_for_serving` exports both
  with ``jax.export`` beside the weights: the server runs them with no model code.
- :class:`Scheduler` is **continuous batching**: a request joins the running batch as soon as a
  slot is free (its prefill runs between two decode steps) and leaves it the step it ends, so
  short and long requests share the decode steps without waiting for one another (a static
  batcher, chapter 14's, would hold a batch until its longest request ends).
- :func:`create_app`: ``POST /generate`` streams one JSON line per token (``application/x-ndjson``),
  ``GET /health``, ``GET /metrics``; bad input gets a 4xx naming what was expected (chapter 14's
  body limits: 413, 415, 408; 400 malformed JSON or fields, 422 a prompt that does not fit).
- :class:`GenerationServer` starts it in its own process (chapter 14's :class:`ServerProcess`),
  :func:`load_test` drives it with concurrent streaming clients: tokens/s, time to first token,
  latency percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import dataclasses
import json
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from fastapi import Request  # at module level: FastAPI resolves the handler's annotations here
from flax import nnx

from scalelab import io, serve
from scalelab.capstone.data import encode
from scalelab.capstone.model import GPT, GPTConfig, flat_params, init_cache, nested_params

NDJSON = "application/x-ndjson"
FILES = ("config.json", "params.npz", "prefill.bin", "decode.bin")


# --------------------------------------------------------------------------- the two steps


def slot_fns(model: GPT):
    """``(state, prefill_slot, decode_slots)`` over the model's flat parameter dict ``state``:

    - ``prefill_slot(state, cache, tokens, length, slot) -> (logits, cache)``: ``tokens`` is one
      prompt padded to the context (``(seq_len,)``), ``length`` its real length; its keys and values
      fill slot ``slot`` of ``cache`` (``(layers, slots, seq_len, heads, d / heads)``), ``logits``
      are those after its last real token. The padding's keys land at positions the causal mask
      hides until a decode step overwrites them.
    - ``decode_slots(state, tokens, cache, pos) -> (logits, cache)``: one token per slot
      (``(slots,)``) at each slot's own position ``pos`` (``(slots,)``)."""
    graphdef, state = nnx.split(model)
    state = flat_params(nnx.to_pure_dict(state))

    def merged(state):
        return nnx.merge(graphdef, nnx.State(nested_params(state)))

    def prefill_slot(state, cache, tokens, length, slot):
        row = jax.tree.map(lambda c: jax.lax.dynamic_slice_in_dim(c, slot, 1, axis=1), cache)
        logits, row = merged(state).cached(tokens[None, :], row, jnp.int32(0))
        cache = jax.tree.map(lambda c, r: jax.lax.dynamic_update_slice_in_dim(c, r, slot, axis=1), cache, row)
        return jax.lax.dynamic_index_in_dim(logits[0], length - 1, keepdims=False), cache

    def decode_one(state, token, row, pos):  # one slot: row is (layers, 1, seq_len, heads, dh)
        logits, row = merged(state).cached(token[None, None], row, pos)
        return logits[0, -1], row

    def decode_slots(state, tokens, cache, pos):
        per_slot = jax.vmap(decode_one, in_axes=(None, 0, 1, 0), out_axes=(0, 1))
        rows = jax.tree.map(lambda c: c[:, :, None], cache)  # each slot its own batch of one
        logits, rows = per_slot(state, tokens, rows, pos)
        return logits, jax.tree.map(lambda r: r[:, :, 0], rows)

    return state, jax.jit(prefill_slot), jax.jit(decode_slots)


def export_for_serving(folder, model: GPT, slots: int) -> Path:
    """Write the model for the server: ``config.json`` (the GPT's configuration and the slot count),
    ``params.npz`` (the weights), ``prefill.bin`` and ``decode.bin`` (the two steps exported with
    ``jax.export`` for ``slots`` slots). Each file is written atomically."""
    from jax import export

    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
        raise ValueError(f"slots must be a positive integer, got {slots!r}")
    folder = Path(folder)
    cfg = model.cfg
    state, prefill, decode = slot_fns(model)
    cache = init_cache(cfg, slots)

    def spec(tree):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)

    i32 = jax.ShapeDtypeStruct((), jnp.int32)
    blobs = {
        "prefill.bin": export.export(prefill)(spec(state), spec(cache), jax.ShapeDtypeStruct((cfg.seq_len,), jnp.int32),
                                              i32, i32),
        "decode.bin": export.export(decode)(spec(state), jax.ShapeDtypeStruct((slots,), jnp.int32), spec(cache),
                                            jax.ShapeDtypeStruct((slots,), jnp.int32)),
    }
    for name, exp in blobs.items():
        with io.atomic_open(folder / name, "wb") as f:
            f.write(exp.serialize())
    with io.atomic_open(folder / "params.npz", "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in state.items()})
    io.write_json(folder / "config.json", {"gpt": dataclasses.asdict(cfg), "slots": slots})
    return folder


class Engine:
    """The exported steps and weights loaded from a :func:`export_for_serving` folder."""

    def __init__(self, folder):
        from jax import export

        folder = Path(folder)
        missing = [n for n in FILES if not (folder / n).exists()]
        if missing:
            raise FileNotFoundError(f"{folder} is not a serving folder: missing {', '.join(missing)}")
        meta = json.loads((folder / "config.json").read_text())
        self.cfg, self.slots = GPTConfig(**meta["gpt"]), int(meta["slots"])
        with np.load(folder / "params.npz") as z:
            self.state = {k: jnp.asarray(z[k]) for k in z.files}
        self._prefill = jax.jit(export.deserialize(bytearray((folder / "prefill.bin").read_bytes())).call)
        self._decode = jax.jit(export.deserialize(bytearray((folder / "decode.bin").read_bytes())).call)
        self.cache = init_cache(self.cfg, self.slots)

    def prefill(self, prompt: np.ndarray, slot: int) -> np.ndarray:
        """Fill slot ``slot`` with a prompt; the logits after its last token."""
        tokens = np.zeros(self.cfg.seq_len, np.int32)
        tokens[: len(prompt)] = prompt
        logits, self.cache = self._prefill(self.state, self.cache, jnp.asarray(tokens), jnp.int32(len(prompt)),
                                           jnp.int32(slot))
        return np.asarray(logits)

    def decode(self, tokens: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """One token for every slot at its position; the logits of the next, per slot."""
        logits, self.cache = self._decode(self.state, jnp.asarray(tokens, jnp.int32), self.cache,
                                          jnp.asarray(pos, jnp.int32))
        return np.asarray(logits)

    def warmup(self) -> None:
        self.prefill(np.zeros(1, np.int32), 0)
        self.decode(np.zeros(self.slots, np.int32), np.zeros(self.slots, np.int32))
        self.cache = init_cache(self.cfg, self.slots)


# --------------------------------------------------------------------------- continuous batching


@dataclasses.dataclass(eq=False)
class Generation:
    """One generation: the prompt's tokens, how many to add, sampling, and where its tokens go
    (``emit(item)`` is called from the scheduler's thread for each token, then with ``None``)."""

    prompt: np.ndarray
    max_new: int
    temperature: float
    seed: int
    emit: Any
    made: int = 0
    cancelled: bool = False
    arrived: float = dataclasses.field(default_factory=time.perf_counter)


def pick(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    """The next token: the most likely one at temperature 0, else a sample of softmax(logits / T)."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = (logits - logits.max()) / temperature
    p = np.exp(z)
    return int(rng.choice(len(p), p=p / p.sum()))


class Scheduler:
    """Continuous batching over an :class:`Engine`'s slots, in one thread.

    Each turn: every free slot takes a waiting request (its prefill gives its first token), then
    one decode step advances every busy slot. A request leaves its slot the step it has made its
    tokens (or its client has gone). ``stats`` counts decode steps, the busy slots they served,
    and tokens."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.waiting: queue.Queue[Generation] = queue.Queue()
        self.stats = {"requests": 0, "tokens": 0, "prefills": 0, "decode_steps": 0, "busy_slot_steps": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)

    def start(self) -> Scheduler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def submit(self, request: Generation) -> None:
        self.waiting.put(request)

    def _emit(self, req: Generation, token: int) -> None:
        req.made += 1
        self.stats["tokens"] += 1
        req.emit(token)

    def _run(self) -> None:
        eng = self.engine
        slots: list[Generation | None] = [None] * eng.slots
        rngs: list[np.random.Generator | None] = [None] * eng.slots
        tokens = np.zeros(eng.slots, np.int32)
        pos = np.zeros(eng.slots, np.int32)
        while not self._stop.is_set():
            for s in range(eng.slots):  # admit waiting requests into free slots
                if slots[s] is not None:
                    continue
                try:
                    req = self.waiting.get(timeout=0.05) if not any(slots) else self.waiting.get_nowait()
                except queue.Empty:
                    break
                rngs[s] = np.random.default_rng(req.seed)
                tok = pick(eng.prefill(req.prompt, s), req.temperature, rngs[s])
                self.stats["prefills"] += 1
                self.stats["requests"] += 1
                self._emit(req, tok)
                slots[s], tokens[s], pos[s] = req, tok, len(req.prompt)
                self._finish_if_done(slots, s)
            busy = [s for s, r in enumerate(slots) if r is not None]
            if not busy:
                continue
            logits = eng.decode(tokens, pos)
            self.stats["decode_steps"] += 1
            self.stats["busy_slot_steps"] += len(busy)
            for s in busy:
                req = slots[s]
                tok = pick(logits[s], req.temperature, rngs[s])
                self._emit(req, tok)
                tokens[s], pos[s] = tok, pos[s] + 1
                self._finish_if_done(slots, s)

    @staticmethod
    def _finish_if_done(slots: list, s: int) -> None:
        req = slots[s]
        if req.made >= req.max_new or req.cancelled:
            req.emit(None)
            slots[s] = None


# --------------------------------------------------------------------------- the HTTP service


FIELDS = {"prompt", "max_new_tokens", "temperature", "seed"}


def parse_generate(body: bytes, cfg: GPTConfig, max_new_limit: int) -> dict[str, Any]:
    """A /generate request's fields, or a :class:`scalelab.serve.BadRequest` naming what was
    expected: 400 for malformed JSON or fields, 422 for a prompt that does not fit the context."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError) as err:
        raise serve.BadRequest(400, f"the body is not valid JSON: {err}") from None
    if not isinstance(obj, dict):
        raise serve.BadRequest(400, 'expected a JSON object like {"prompt": "def ", "max_new_tokens": 32}')
    unknown = sorted(set(obj) - FIELDS)
    if unknown:
        raise serve.BadRequest(400, f"unknown field(s) {', '.join(unknown)}; expected {', '.join(sorted(FIELDS))}")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise serve.BadRequest(400, "prompt must be a non-empty string")
    n = obj.get("max_new_tokens", 32)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= max_new_limit:
        raise serve.BadRequest(400, f"max_new_tokens must be an integer in 1..{max_new_limit}, got {n!r}")
    t = obj.get("temperature", 0.0)
    if isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t <= 10:
        raise serve.BadRequest(400, f"temperature must be a number in [0, 10], got {t!r}")
    seed = obj.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise serve.BadRequest(400, f"seed must be an integer in [0, 2**32), got {seed!r}")
    tokens = encode(prompt).astype(np.int32)
    if len(tokens) + n > cfg.seq_len:
        raise serve.BadRequest(422, f"a prompt of {len(tokens)} byte tokens and {n} new tokens exceed the context "
                                    f"of {cfg.seq_len}: shorten the prompt or ask for fewer tokens")
    return {"prompt": tokens, "max_new": n, "temperature": float(t), "seed": seed}


def create_app(folder: str | None = None, max_body_bytes: int = 65536, body_timeout_s: float = 5.0):
    """The FastAPI application serving the folder written by :func:`export_for_serving`
    (``SCALELAB_LM_FOLDER`` if ``folder`` is None)."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse

    folder = folder or os.environ.get("SCALELAB_LM_FOLDER")
    if not folder:
        raise ValueError("set SCALELAB_LM_FOLDER to the folder export_for_serving wrote")
    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine = Engine(folder)
        engine.warmup()  # compile both steps before taking traffic
        state.update(engine=engine, scheduler=Scheduler(engine).start(), started=time.time(), rejected=0)
        yield
        state["scheduler"].stop()

    app = FastAPI(title="scalelab capstone GPT", lifespan=lifespan)

    @app.post("/generate")
    async def generate(request: Request):
        engine, scheduler = state["engine"], state["scheduler"]
        try:
            media = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if media != serve.JSON:
                raise serve.BadRequest(415, f"Content-Type {media or '(none)'!r} is not supported: expected "
                                            "application/json")
            body = await serve.read_body(request, max_body_bytes, body_timeout_s)
            fields = parse_generate(body, engine.cfg, engine.cfg.seq_len - 1)
        except serve.BadRequest as err:
            state["rejected"] += 1
            headers = {"connection": "close"} if err.status in (408, 413) else None
            return JSONResponse({"error": str(err)}, status_code=err.status, headers=headers)
        loop, out = asyncio.get_running_loop(), asyncio.Queue()
        req = Generation(emit=lambda item: loop.call_soon_threadsafe(out.put_nowait, item), **fields)
        scheduler.submit(req)

        async def lines():
            text = codecs.getincrementaldecoder("utf-8")(errors="replace")
            try:
                while (tok := await out.get()) is not None:
                    yield json.dumps({"token": tok, "text": text.decode(bytes([tok]))}) + "\n"
                yield json.dumps({"done": True, "tokens": req.made, "text": text.decode(b"", final=True)}) + "\n"
            finally:
                req.cancelled = True  # a client that went away frees its slot at the next step

        return StreamingResponse(lines(), media_type=NDJSON)

    @app.get("/health")
    async def health():
        return {"status": "ok" if "scheduler" in state else "starting", "pid": os.getpid()}

    @app.get("/metrics")
    async def metrics():
        s = dict(state["scheduler"].stats)
        s["mean_batch"] = s["busy_slot_steps"] / s["decode_steps"] if s["decode_steps"] else 0.0
        return {"pid": os.getpid(), "slots": state["engine"].slots, "rejected": state["rejected"],
                "uptime_s": time.time() - state["started"], **s}

    return app


class GenerationServer(serve.ServerProcess):
    """``python -m scalelab.capstone.server`` on a folder, started and always stopped (``with``)."""

    def __init__(self, folder, port: int | None = None, timeout: float = 120.0):
        super().__init__(config=None, workers=1, port=port, timeout=timeout)
        self.folder = Path(folder)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "scalelab.capstone.server", "--folder", str(self.folder), "--port", str(self.port)]

    def environment(self) -> dict[str, str]:
        return {}


# --------------------------------------------------------------------------- load test


async def _stream(client, url: str, body: dict, t0: float) -> dict[str, Any]:
    start = time.perf_counter()
    first, tokens, text = None, 0, []
    async with client.stream("POST", url + "/generate", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"status": r.status_code}
        async for line in r.aiter_lines():
            if not line:
                continue
            item = json.loads(line)
            if "token" in item:
                tokens += 1
                first = first if first is not None else time.perf_counter()
                text.append(item["text"])
    end = time.perf_counter()
    return {"status": 200, "tokens": tokens, "ttft_s": (first or end) - start, "latency_s": end - start,
            "end": end - t0, "text": "".join(text)}


def load_test(url: str, prompts: list[str], max_new: int, concurrency: int, requests: int,
              timeout: float = 120.0) -> dict[str, Any]:
    """``requests`` streamed generations (prompts in turn, greedy), ``concurrency`` at a time, after
    one untimed warm-up request (the client's first connection). Returns generated tokens per second (over the whole run), time to first token and request
    latency percentiles, and the non-200 answers."""
    import httpx

    if concurrency < 1 or requests < 1:
        raise ValueError(f"need concurrency >= 1 and requests >= 1, got {concurrency}, {requests}")

    async def main():
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            await _stream(client, url, {"prompt": prompts[0], "max_new_tokens": 2}, time.perf_counter())  # warm-up
            sem, t0 = asyncio.Semaphore(concurrency), time.perf_counter()

            async def one(i):
                async with sem:
                    return await _stream(client, url, {"prompt": prompts[i % len(prompts)], "max_new_tokens": max_new}, t0)

            results = await asyncio.gather(*(one(i) for i in range(requests)))
            return results, time.perf_counter() - t0

    results, wall = serve.run_async(main())
    ok = [r for r in results if r["status"] == 200]
    if not ok:
        raise RuntimeError(f"no request succeeded: {sorted({r['status'] for r in results})}")
    ttft = np.array([r["ttft_s"] for r in ok]) * 1e3
    lat = np.array([r["latency_s"] for r in ok]) * 1e3
    return {"requests": requests, "concurrency": concurrency, "max_new_tokens": max_new, "wall_s": wall,
            "tokens": int(sum(r["tokens"] for r in ok)), "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
            "ttft_p50_ms": float(np.percentile(ttft, 50)), "ttft_p99_ms": float(np.percentile(ttft, 99)),
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "errors": len(results) - len(ok), "sample": ok[0]["text"]}


def complete(url: str, prompt: str, max_new: int, temperature: float = 0.0, seed: int = 0,
             timeout: float = 60.0) -> str:
    """The text the server streams for one request (its token lines joined)."""
    import httpx

    body = {"prompt": prompt, "max_new_tokens": max_new, "temperature": temperature, "seed": seed}
    with httpx.stream("POST", url + "/generate", json=body, timeout=timeout) as r:
        if r.status_code != 200:
            raise RuntimeError(f"/generate answered {r.status_code}: {r.read().decode(errors='replace')}")
        return "".join(item.get("text", "") for item in map(json.loads, r.iter_lines()) if item)


def hostile_requests(seq_len: int) -> dict[str, tuple[bytes, str]]:
    """One bad /generate request of each kind, as (body, Content-Type), by name."""
    j = serve.JSON
    return {
        "truncated JSON": (b'{"prompt": "de', j),
        "not an object": (b'["def "]', j),
        "no prompt": (b'{"max_new_tokens": 4}', j),
        "empty prompt": (b'{"prompt": ""}', j),
        "unknown field": (b'{"prompt": "x", "top_k": 5}', j),
        "max_new_tokens not an integer": (b'{"prompt": "x", "max_new_tokens": "many"}', j),
        "max_new_tokens 0": (b'{"prompt": "x", "max_new_tokens": 0}', j),
        "negative temperature": (b'{"prompt": "x", "temperature": -1}', j),
        "prompt longer than the context": (json.dumps({"prompt": "x" * seq_len, "max_new_tokens": 1}).encode(), j),
        "not JSON content": (b"prompt=def", "application/x-www-form-urlencoded"),
        "body over the limit": (json.dumps({"prompt": "x" * 70000}).encode(), j),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m scalelab.capstone.server", description="Serve the capstone GPT.")
    ap.add_argument("--folder", required=True, help="the folder export_for_serving wrote")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    a = ap.parse_args(argv)
    import uvicorn

    os.environ["SCALELAB_LM_FOLDER"] = str(Path(a.folder).resolve())
    uvicorn.run("scalelab.capstone.server:create_app", factory=True, host=a.host, port=a.port, access_log=False,
                log_level="warning")


if __name__ == "__main__":
    main()
