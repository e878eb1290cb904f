"""Chapter 14: deployment — a batching inference server under load, cold starts, the browser.

- :class:`Predictor` serves the model exported in chapter 12 (StableHLO + weights): no
  model code, one compiled program per batch-size bucket.
- :func:`create_app` is an HTTP service (FastAPI on uvicorn): ``POST /predict``,
  ``GET /health``, ``GET /metrics``. Requests queue in a :class:`Batcher` (dynamic
  batching: dispatch at once when the model is idle, collect while it is busy, up to a
  maximum batch) — or, unbatched, run one at a time. Every request that is not a valid
  input gets a 4xx answer naming what was expected, never a 500: 400 malformed JSON
  (including over-deep nesting and over-long integer literals), 408 a body not complete
  within ``body_timeout_s`` (default 5 s) of starting to read it, 413 a body over
  ``max_body_bytes`` (counted while streaming, whatever the transfer encoding) or too many
  rows, 415 a Content-Type other than ``application/json``, 422 wrong shape, non-numbers,
  non-finite or out-of-float32 values, or inputs whose outputs overflow to NaN/inf. An
  upload the client aborts is logged as one info line. (Stalled request *headers* are
  uvicorn's to time out, not this module's.)
- :func:`hostile_bodies`, :func:`chunked_upload` and :func:`stalled_upload` produce the
  hostile requests, the last two over a raw socket.
- ``python -m scalelab.serve`` starts it, with several worker processes behind one
  address if asked (the load-balancer arrangement); :class:`ServerProcess` starts and
  always stops it from Python.
- :func:`load_test` drives it with a bounded number of concurrent async clients and
  reports throughput and latency percentiles.
- :func:`cold_start` measures process start to first prediction three ways, and
  :func:`simulate_serving` turns those numbers into the cost and latency of an always-on
  server vs a pay-per-request platform.
- :func:`to_onnx` writes the same network as ONNX for onnxruntime and the browser.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import concurrent.futures
import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Request  # at module level: FastAPI resolves the handler's annotations here

ENV_PREFIX = "SCALELAB_SERVE_"


class BadRequest(ValueError):
    """A request the server refuses, with the HTTP status to answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------- the model


class Predictor:
    """An exported model (``model.stablehlo`` + ``weights.npz``, chapter 12) ready to
    serve. Batches are padded up to a power of two, so at most log2(max_batch) + 1
    programs are ever compiled, all of them by :meth:`warmup`."""

    def __init__(self, directory: str | os.PathLike, max_batch: int = 64):
        import jax

        directory = Path(directory)
        missing = [f for f in ("model.stablehlo", "weights.npz") if not (directory / f).exists()]
        if missing:
            raise FileNotFoundError(f"{directory} is not an exported model: missing {missing}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        exported = jax.export.deserialize(bytearray((directory / "model.stablehlo").read_bytes()))
        with np.load(directory / "weights.npz") as w:
            self.weights = [jax.device_put(w[f"arr_{i}"]) for i in range(len(w.files))]
        self.features = int(exported.in_avals[-1].shape[1])
        self.classes = int(exported.out_avals[0].shape[1])
        self.max_batch = max_batch
        self.buckets = [2**k for k in range(max_batch.bit_length()) if 2**k < max_batch] + [max_batch]
        self._call = jax.jit(exported.call)

    @property
    def weight_bytes(self) -> int:
        return int(sum(np.asarray(w).nbytes for w in self.weights))

    def bucket(self, rows: int) -> int:
        return next(b for b in self.buckets if b >= rows)

    def warmup(self) -> None:
        for b in self.buckets:
            self(np.zeros((b, self.features), np.float32))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        rows = len(x)
        if rows > self.max_batch:
            return np.concatenate([self(x[i:i + self.max_batch]) for i in range(0, rows, self.max_batch)])
        padded = np.zeros((self.bucket(rows), self.features), np.float32)
        padded[:rows] = x
        return np.asarray(self._call(self.weights, padded))[:rows]


def mlp_layers(params: dict[str, Any]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The chapter-12 MLP's (kernel, bias) pairs in order (``layers`` then ``head``)."""
    layers = [params["layers"][k] for k in sorted(params["layers"], key=int)] + [params["head"]]
    return [(np.asarray(la["kernel"], np.float32), np.asarray(la["bias"], np.float32)) for la in layers]


def _int8_forward(layers, x):
    """Softmax probabilities of the MLP with weight-only int8 kernels: each product is a
    multiply-and-sum over the input axis that reads the int8 weights and converts them on
    the fly (XLA fuses the conversion into the loop, so no float32 copy of a weight is
    ever written), then the per-channel scale, the bias and the ReLU in float32."""
    import jax
    import jax.numpy as jnp

    for i, (qt, scale, bias) in enumerate(layers):
        x = jnp.sum(qt.astype(jnp.float32)[None] * x[:, None, :], axis=-1) * scale + bias
        if i < len(layers) - 1:
            x = jax.nn.relu(x)
    return jax.nn.softmax(x, axis=-1)


class Int8Predictor(Predictor):
    """Weight-only int8 serving of the same MLP: every kernel quantised per output channel
    with chapter 11's :func:`scalelab.precision.quantize_per_channel` (int8 values, one
    float32 scale per column), activations kept in float32. A quarter of the weight bytes
    to stream per call, which is what a memory-bound batch-1 call pays for. Batches are
    padded to at least two rows: this XLA CPU version compiles the one-row product of the
    fused kernel into a much slower program."""

    def __init__(self, params: dict[str, Any], max_batch: int = 64):
        import jax

        from scalelab import precision

        if max_batch < 2:
            raise ValueError(f"max_batch must be >= 2, got {max_batch}")
        self.weights = []
        for kernel, bias in mlp_layers(params):
            q = precision.quantize_per_channel(kernel)
            self.weights.append((jax.device_put(np.asarray(q.q).T.copy()), q.scale, jax.device_put(bias)))
        self.features = int(self.weights[0][0].shape[1])
        self.classes = int(self.weights[-1][0].shape[0])
        self.max_batch = max_batch
        self.buckets = [2**k for k in range(1, max_batch.bit_length()) if 2**k < max_batch] + [max_batch]
        self._call = jax.jit(_int8_forward)

    @property
    def weight_bytes(self) -> int:
        return int(sum(np.asarray(a).nbytes for layer in self.weights for a in layer))


def parse_inputs(body: bytes, features: int, max_rows: int, max_body_bytes: int) -> np.ndarray:
    """The ``inputs`` of a JSON request body as a (rows, features) float32 array, or a
    :class:`BadRequest` naming what was wrong (400 malformed, 413 too large, 422 wrong
    shape, type or magnitude). Never raises anything else, whatever the bytes."""
    if len(body) > max_body_bytes:
        raise BadRequest(413, f"request body of {len(body)} bytes exceeds the limit of {max_body_bytes}")
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadRequest(400, f"malformed JSON: {err}") from None
    except RecursionError:
        raise BadRequest(400, 'malformed JSON: nested too deeply; expected {"inputs": [[...], ...]}') from None
    except ValueError as err:  # e.g. an integer literal longer than Python's int-string limit
        raise BadRequest(400, f"malformed JSON: {err}; expected numbers of float32 range") from None
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise BadRequest(422, 'expected a JSON object {"inputs": [[...], ...]}')
    rows = payload["inputs"]
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows):
        raise BadRequest(422, f"'inputs' must be a non-empty list of rows of {features} numbers")
    if len(rows) > max_rows:
        raise BadRequest(413, f"{len(rows)} rows exceed the limit of {max_rows} per request")
    bad = next((i for i, r in enumerate(rows) if len(r) != features), None)
    if bad is not None:
        raise BadRequest(422, f"row {bad} has {len(rows[bad])} values, expected {features}")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for r in rows for v in r):
        raise BadRequest(422, "'inputs' must contain only numbers (int or float)")
    finite = "'inputs' must be finite numbers within float32 range (|x| < 3.4e38)"
    try:
        with np.errstate(over="ignore"):
            x = np.asarray(rows, np.float32)
    except (OverflowError, ValueError):  # an integer too large for a float
        raise BadRequest(422, finite) from None
    if not np.isfinite(x).all():
        raise BadRequest(422, finite)
    return x


# --------------------------------------------------------------------------- dynamic batching


@dataclasses.dataclass
class BatchStats:
    requests: int = 0
    rows: int = 0
    batches: int = 0
    rejected: int = 0
    # seconds summed over the answered requests: reading + parsing the body, waiting in the
    # queue for a model call, the model call itself (each request is charged its batch's
    # whole call), encoding the answer
    parse_s: float = 0.0
    queue_s: float = 0.0
    model_s: float = 0.0
    encode_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "mean_batch_rows": self.rows / self.batches if self.batches else 0.0}


PHASES = ("parse", "queue", "model", "encode")


def phase_breakdown(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """Mean milliseconds per answered request in each server-side phase (:data:`PHASES`)
    between two :func:`metrics` snapshots of one server."""
    n = after["requests"] - before["requests"]
    if n <= 0:
        raise ValueError("no request was answered between the two snapshots")
    return {p: (after[f"{p}_s"] - before[f"{p}_s"]) / n * 1e3 for p in PHASES}


class Batcher:
    """Dynamic batching with the standard rule: **dispatch at once when the model is idle,
    collect while it is busy.**

    - The model is idle and a request arrives: it runs at once, with whatever else is
      queued (up to ``max_batch`` rows). A lone request never waits.
    - The model is busy: new requests queue. When the call returns, the next batch is what
      arrived during it (up to ``max_batch`` rows; the rest waits for the call after).
    - ``max_wait_s`` (default 0: never wait) only lets a partial batch wait, with the model
      free, for requests the server has already started to receive (see :meth:`arriving`)
      — never for requests that do not exist, so it adds no latency at one client.

    ``batched=False`` serves one request at a time (the baseline). The model runs in one
    worker thread so the event loop keeps accepting requests while it computes."""

    def __init__(self, predict, max_batch: int = 64, max_wait_s: float = 0.0, batched: bool = True):
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError(f"need max_batch >= 1 and max_wait_s >= 0, got {max_batch}, {max_wait_s}")
        self.predict, self.max_batch, self.max_wait_s, self.batched = predict, max_batch, max_wait_s, batched
        self.stats = BatchStats()
        self.busy = False  # a model call is running
        self._incoming = 0  # requests being received (body not yet read), see arriving()
        self._queue: asyncio.Queue | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")
        self._carry = None

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())
        self._pool.submit(lambda: None).result()  # start the model thread now, from the current thread

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._pool.shutdown(wait=False, cancel_futures=True)

    @contextlib.contextmanager
    def arriving(self):
        """Mark a request as on its way (its body is being read and parsed): a partial
        batch may wait up to ``max_wait_s`` for it."""
        self._incoming += 1
        try:
            yield
        finally:
            self._incoming -= 1
            if self._wake is not None:
                self._wake.set()

    async def submit(self, x: np.ndarray) -> np.ndarray:
        fut = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((x, fut, time.perf_counter()))
        self._wake.set()
        return await fut

    def _take(self, items: list, rows: int) -> int:
        """Move queued requests into ``items`` while they fit in ``max_batch`` rows."""
        while rows < self.max_batch and self._carry is None:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            if rows + len(item[0]) > self.max_batch:
                self._carry = item  # starts the next batch
                break
            items.append(item)
            rows += len(item[0])
        return rows

    async def _collect(self) -> list:
        loop = asyncio.get_running_loop()
        first = self._carry if self._carry is not None else await self._queue.get()
        self._carry = None
        items, rows = [first], len(first[0])
        if not self.batched:
            return items
        rows = self._take(items, rows)  # everything that queued while the model was busy
        deadline = loop.time() + self.max_wait_s
        # the model is free: wait only for requests already being received, and at most max_wait_s
        while rows < self.max_batch and self._carry is None and self._incoming > 0:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), remaining)
            rows = self._take(items, rows)
        return items

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = await self._collect()
            x = np.concatenate([i[0] for i in items])
            self.busy = True
            dispatched = time.perf_counter()
            try:
                out = await loop.run_in_executor(self._pool, self.predict, x)
            except Exception as err:  # the model failed: fail these requests, keep serving
                for _, fut, _ in items:
                    if not fut.done():
                        fut.set_exception(err)
                continue
            finally:
                self.busy = False
            call = time.perf_counter() - dispatched
            self.stats.batches += 1
            self.stats.requests += len(items)
            self.stats.rows += len(x)
            self.stats.model_s += call * len(items)
            self.stats.queue_s += sum(dispatched - i[2] for i in items)
            start = 0
            for xi, fut, _ in items:
                if not fut.done():
                    fut.set_result(out[start:start + len(xi)])
                start += len(xi)


# --------------------------------------------------------------------------- the HTTP service


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    model_dir: str
    max_batch: int = 64
    max_wait_ms: float = 5.0
    batched: bool = True
    max_rows: int = 64
    max_body_bytes: int = 1_000_000
    body_timeout_s: float = 5.0
    loop_nice: int = 10

    def to_env(self) -> dict[str, str]:
        return {ENV_PREFIX + k.upper(): str(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_env(cls) -> ServerConfig:
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = os.environ.get(ENV_PREFIX + f.name.upper())
            if raw is None:
                continue
            if f.name == "model_dir":
                kw[f.name] = raw
            elif isinstance(f.default, bool):
                kw[f.name] = raw.lower() == "true"
            else:
                kw[f.name] = type(f.default)(raw)  # int or float, as the field's default
        if "model_dir" not in kw:
            raise ValueError(f"set {ENV_PREFIX}MODEL_DIR to the exported model's folder")
        return cls(**kw)


def server_log() -> logging.Logger:
    """The server's own logger (``scalelab.serve``): one line per event on stderr, at info level."""
    log = logging.getLogger("scalelab.serve")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


async def read_body(request: Request, max_body_bytes: int, timeout_s: float) -> bytes:
    """The request body, read from the stream with two limits, whatever the transfer
    encoding (Content-Length or chunked): 413 as soon as more than ``max_body_bytes`` have
    arrived (or are announced), 408 if the whole body has not arrived ``timeout_s`` seconds
    after the handler started reading it (a stalled or trickling upload)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
        raise BadRequest(413, f"request body of {int(declared)} bytes exceeds the limit of {max_body_bytes}")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_body_bytes:
                    raise BadRequest(413, f"request body of more than {max_body_bytes} bytes exceeds the limit "
                                          f"of {max_body_bytes}")
                chunks.append(chunk)
    except TimeoutError:
        raise BadRequest(408, f"the request body did not arrive within {timeout_s:g} s "
                              f"({size} bytes received)") from None
    return b"".join(chunks)


async def read_inputs(request: Request, config: ServerConfig, features: int) -> np.ndarray:
    """A /predict request's inputs, or a :class:`BadRequest`: 415 unless the Content-Type
    is ``application/json``, then :func:`read_body`'s limits, then :func:`parse_inputs`."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise BadRequest(415, f"Content-Type {media or '(none)'!r} is not supported: expected application/json")
    body = await read_body(request, config.max_body_bytes, config.body_timeout_s)
    return parse_inputs(body, features, config.max_rows, config.max_body_bytes)


def create_app(config: ServerConfig | None = None):
    """The FastAPI application (``config`` from ``SCALELAB_SERVE_*`` variables if None,
    which is how uvicorn's worker processes build it)."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response
    from starlette.requests import ClientDisconnect

    config = config or ServerConfig.from_env()
    log = server_log()
    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        predictor = Predictor(config.model_dir, max_batch=config.max_batch)
        predictor.warmup()  # compile every bucket before taking traffic
        batcher = Batcher(predictor, config.max_batch, config.max_wait_ms / 1e3, config.batched)
        batcher.start()
        gc.freeze()  # the start-up objects (JAX, FastAPI, the model) leave the collector's scans
        if config.loop_nice:  # see ServerConfig: the HTTP work yields the cores to the model's threads
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), config.loop_nice)
        state.update(predictor=predictor, batcher=batcher, started=time.time())
        yield
        await batcher.stop()

    app = FastAPI(title="scalelab digits classifier", lifespan=lifespan)

    @app.post("/predict")
    async def predict(request: Request):
        predictor, batcher = state["predictor"], state["batcher"]
        t0 = time.perf_counter()
        try:
            with batcher.arriving():
                x = await read_inputs(request, config, predictor.features)
        except BadRequest as err:
            batcher.stats.rejected += 1
            # the rest of an oversized or stalled body is not read: close the connection after answering
            headers = {"connection": "close"} if err.status in (408, 413) else None
            return JSONResponse({"error": str(err)}, status_code=err.status, headers=headers)
        except ClientDisconnect:
            batcher.stats.rejected += 1
            log.info("client disconnected during the upload of a /predict body; nothing to answer")
            return Response(status_code=400)
        t1 = time.perf_counter()
        probs = await batcher.submit(x)
        t2 = time.perf_counter()
        if not np.isfinite(probs).all():
            batcher.stats.rejected += 1
            return JSONResponse({"error": "the model's outputs for these inputs overflow to NaN or inf: "
                                 "expected inputs of the magnitude the model was trained on (digits: 0 to 16)"},
                                status_code=422)
        body = json.dumps({"classes": np.argmax(probs, axis=-1).tolist(), "probabilities": np.round(probs, 6).tolist(),
                           "worker": os.getpid()}).encode()  # encoded here (and timed), not by FastAPI's encoder
        batcher.stats.parse_s += t1 - t0
        batcher.stats.encode_s += time.perf_counter() - t2
        return Response(body, media_type="application/json")

    @app.get("/health")
    async def health():
        return {"status": "ok" if "batcher" in state else "starting", "pid": os.getpid()}

    @app.get("/metrics")
    async def metrics():
        return {"pid": os.getpid(), "uptime_s": time.time() - state.get("started", time.time()),
                "batched": config.batched, "max_batch": config.max_batch, "max_wait_ms": config.max_wait_ms,
                **state["batcher"].stats.as_dict()}

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m scalelab.serve`` in its own process group, started and waited for (until
    every worker process has answered ``/health``), and always stopped (SIGTERM, then
    SIGKILL for the whole group) — use it with ``with``."""

    def __init__(self, config: ServerConfig, workers: int = 1, port: int | None = None, timeout: float = 120.0):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.config, self.workers, self.timeout = config, workers, timeout
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.worker_pids: list[int] = []  # the processes that answered /health at start

    def start(self) -> ServerProcess:
        import urllib.error

        env = {**os.environ, **self.environment(), "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.command(), env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.timeout
        ready: set[int] = set()  # worker processes that have answered: each starts (and warms up) on its own
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._log.seek(0)
                raise RuntimeError(f"the server exited with code {self.proc.returncode}:\n"
                                   f"{self._log.read().decode(errors='replace')[-2000:]}")
            try:
                status, health = http_json(self.url + "/health", timeout=2)  # a new connection each time
                if status == 200 and health["status"] == "ok":
                    ready.add(health["pid"])
                    if len(ready) >= self.workers:
                        self.worker_pids = sorted(ready)
                        return self
                    continue
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"the server did not answer /health within {self.timeout} s")

    def command(self) -> list[str]:
        """The server's command line (a subclass serves something else the same way)."""
        return [sys.executable, "-m", "scalelab.serve", "--port", str(self.port), "--workers", str(self.workers)]

    def environment(self) -> dict[str, str]:
        """Variables added to the server's environment (its configuration)."""
        return self.config.to_env()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)

    def log_text(self) -> str:
        """What the server has written to stdout and stderr so far."""
        if getattr(self, "_log", None) is None or self._log.closed:
            return ""
        self._log.flush()
        self._log.seek(0)
        text = self._log.read().decode(errors="replace")
        self._log.seek(0, os.SEEK_END)
        return text

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------- load testing


JSON = "application/json"


def hostile_bodies(features: int = 64) -> dict[str, tuple[bytes, str]]:
    """One request of every class of bad input the server must refuse with a 4xx, as
    (body, Content-Type), by name. (Chunked, stalled and aborted uploads need a raw
    socket: :func:`chunked_upload`, :func:`stalled_upload`.)"""
    row = [0.5] * features
    return {
        "truncated JSON": (b'{"inputs": [[1, 2', JSON),
        "not an object": (b"[1, 2, 3]", JSON),
        "no inputs key": (json.dumps({"rows": []}).encode(), JSON),
        "wrong width": (json.dumps({"inputs": [row[:-1]]}).encode(), JSON),
        "strings": (json.dumps({"inputs": [["x"] * features]}).encode(), JSON),
        "too many rows": (json.dumps({"inputs": [row] * 1000}).encode(), JSON),
        "NaN literal": (b'{"inputs": [[NaN' + b", 0" * (features - 1) + b"]]}", JSON),
        "outputs overflow": (json.dumps({"inputs": [[3e38] * features]}).encode(), JSON),
        "int beyond float": (b'{"inputs": [[1' + b"0" * 400 + b", 0" * (features - 1) + b"]]}", JSON),
        "int beyond str limit": (b'{"inputs": [[' + b"9" * 5000 + b", 0" * (features - 1) + b"]]}", JSON),
        "deep nesting": (b'{"inputs": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", JSON),
        "wrong Content-Type": (json.dumps({"inputs": [row]}).encode(), "text/plain"),
    }


def _payloads(features: int, count: int, rows: int, bad_fraction: float, seed: int) -> list[tuple]:
    """(body, good, inputs or None, Content-Type) per request; a ``bad_fraction`` share is
    one of the :func:`hostile_bodies`, in turn."""
    rng = np.random.default_rng(seed)
    bad_kinds = list(hostile_bodies(features).values())
    out = []
    for i in range(count):
        if rng.random() < bad_fraction:
            body, ctype = bad_kinds[i % len(bad_kinds)]
            out.append((body, False, None, ctype))
        else:
            x = rng.random((rows, features)).round(3)
            out.append((json.dumps({"inputs": x.tolist()}).encode(), True, x, JSON))
    return out


_WORKER = re.compile(rb'"worker":\s*(\d+)')


class _Connection:
    """One keep-alive HTTP/1.1 connection over a raw asyncio stream: a request is a few
    pre-encoded bytes and a response is its status line, headers and Content-Length body.
    Far cheaper per request than a general HTTP client, which matters when the load
    generator shares the cores with the server it measures."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def post(self, path: str, body: bytes, content_type: str = JSON) -> tuple[int, bytes]:
        """(status, body) of one POST; reopens the connection if the server closed it."""
        for attempt in (0, 1):
            if self.writer is None:
                await self.open()
            try:
                self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: {content_type}\r\n"
                                  f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                head = await self.reader.readuntil(b"\r\n\r\n")
            except (ConnectionError, asyncio.IncompleteReadError):
                self.close()  # a keep-alive connection the server had closed: retry once on a new one
                if attempt:
                    raise
                continue
            lines = head.split(b"\r\n")
            status = int(lines[0].split()[1])
            length, close = 0, False
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
            answer = await self.reader.readexactly(length) if length else b""
            if close:
                self.close()
            return status, answer
        raise ConnectionError("unreachable")


def _host_port(url: str) -> tuple[str, int]:
    import urllib.parse

    u = urllib.parse.urlsplit(url)
    return u.hostname, u.port or 80


async def _drive(url: str, payloads, concurrency: int, timeout: float, keep: bool = False) -> list[tuple]:
    """Closed loop: ``concurrency`` clients, each on its own keep-alive connection, sends its
    next request when the last is answered. (good, status, seconds, worker pid, answer
    bytes if ``keep`` and good) per request."""
    host, port = _host_port(url)
    queue: asyncio.Queue = asyncio.Queue()
    for p in payloads:
        queue.put_nowait(p)
    results: list[tuple] = []

    async def client():
        conn = _Connection(host, port)
        try:
            while True:
                try:
                    body, good, x, ctype = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                start, worker, answer = time.perf_counter(), 0, b""
                try:
                    async with asyncio.timeout(timeout):
                        status, answer = await conn.post("/predict", body, ctype)
                    m = _WORKER.search(answer)
                    worker = int(m.group(1)) if m else 0
                except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError, IndexError):
                    status = 0  # no answer at all
                    conn.close()
                results.append((good, status, time.perf_counter() - start, worker,
                                (x, answer) if keep and good else None))
        finally:
            conn.close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return results


async def _open_loop(url: str, arrivals: np.ndarray, bodies: list[bytes], timeout: float,
                     connections: int) -> list[tuple]:
    """Open loop: request i is sent at ``arrivals[i]`` seconds after the start whatever
    happened to the earlier ones (on an idle connection, a new one if none is idle, up to
    ``connections``; beyond that it waits for one, and that wait counts). Latency is
    measured from the *scheduled* send time. (status, latency s, send lateness s, seconds from
    the start to the answer) each."""
    host, port = _host_port(url)
    idle: list[_Connection] = []
    opened = 0
    free = asyncio.Condition()
    for _ in range(min(connections, 64)):  # open a pool before the clock starts
        c = _Connection(host, port)
        await c.open()
        idle.append(c)
        opened += 1
    results: list[tuple] = []
    loop = asyncio.get_running_loop()

    async def one(scheduled: float, body: bytes):
        nonlocal opened
        late = loop.time() - scheduled
        async with free:
            while not idle and opened >= connections:
                await free.wait()
            if idle:
                conn = idle.pop()
            else:
                conn, opened = _Connection(host, port), opened + 1
        try:
            async with asyncio.timeout(max(timeout - (loop.time() - scheduled), 0.001)):
                status, _ = await conn.post("/predict", body)
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError, IndexError):
            status = 0
            conn.close()
        results.append((status, loop.time() - scheduled, late, loop.time() - t0))
        async with free:
            idle.append(conn)
            free.notify()

    t0 = loop.time() + 0.05
    tasks = []
    for t, body in zip(arrivals, bodies, strict=True):
        delay = t0 + t - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(t0 + t, body)))
    await asyncio.gather(*tasks)
    for c in idle:
        c.close()
    return results


@contextlib.contextmanager
def _collector_paused():
    """Pause Python's cyclic garbage collector for a load run (a full collection in the
    load generator stalls every client at once and shows up as a server's tail latency)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def run_async(coro):
    """``asyncio.run``, also from inside a running event loop (a Jupyter kernel): then in a thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def http_json(url: str, body: Any = None, timeout: float = 10.0, content_type: str = JSON) -> tuple[int, Any]:
    """A plain (blocking) GET, or POST of ``body`` as JSON; returns (status, parsed JSON),
    or (status, the body as text) when the answer is not JSON (a proxy's error page, say)."""
    import urllib.error
    import urllib.request

    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, headers={"content-type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, _json_or_text(r.read())
    except urllib.error.HTTPError as err:
        return err.code, _json_or_text(err.read())


def _json_or_text(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return raw.decode(errors="replace")


def _raw_response(sock: socket.socket, timeout: float) -> tuple[int, str]:
    """Read one HTTP/1.1 response (with a Content-Length) from ``sock``: (status, body);
    status 0 if none came within ``timeout``."""
    sock.settimeout(timeout)
    data, length = b"", None
    with contextlib.suppress(TimeoutError, ConnectionError):
        while length is None or len(data.partition(b"\r\n\r\n")[2]) < length:
            part = sock.recv(65536)
            if not part:
                break
            data += part
            if length is None and b"\r\n\r\n" in data:
                m = re.search(rb"(?im)^content-length:\s*(\d+)", data.partition(b"\r\n\r\n")[0])
                length = int(m.group(1)) if m else 0
    if not data.startswith(b"HTTP/"):
        return 0, data.decode(errors="replace")
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode(errors="replace")


def chunked_upload(url: str, total_bytes: int = 0, chunk_bytes: int = 65536, timeout: float = 30.0,
                   content_type: str = JSON, body: bytes | None = None) -> dict[str, Any]:
    """POST ``body`` (default: ``total_bytes`` of spaces) to ``url`` with ``Transfer-Encoding:
    chunked`` (no Content-Length) over a raw socket, stopping as soon as the server
    answers. Returns the status, the answer's text and how many body bytes were sent."""
    import select
    import urllib.parse

    u = urllib.parse.urlsplit(url)
    sent = 0
    with socket.create_connection((u.hostname, u.port), timeout=timeout) as sock:
        sock.sendall(f"POST {u.path} HTTP/1.1\r\nHost: {u.hostname}\r\nContent-Type: {content_type}\r\n"
                     f"Transfer-Encoding: chunked\r\n\r\n".encode())
        piece = b" " * chunk_bytes
        total_bytes = total_bytes if body is None else len(body)
        deadline = time.monotonic() + timeout
        try:
            while sent < total_bytes and time.monotonic() < deadline:
                if select.select([sock], [], [], 0)[0]:
                    break  # the server has answered (or closed): stop sending
                n = min(chunk_bytes, total_bytes - sent)
                data = piece[:n] if body is None else body[sent:sent + n]
                sock.sendall(f"{n:x}\r\n".encode() + data + b"\r\n")
                sent += n
            else:
                sock.sendall(b"0\r\n\r\n")
        except ConnectionError:
            pass
        status, text = _raw_response(sock, timeout)
    return {"status": status, "text": text, "sent_bytes": sent}


def stalled_upload(url: str, declared_bytes: int = 1000, sent_bytes: int = 10, timeout: float = 30.0,
                   abort: bool = False) -> dict[str, Any]:
    """POST with ``Content-Length: declared_bytes`` but send only ``sent_bytes`` of the body,
    then wait for the answer (a stalled upload) — or, with ``abort``, close the connection
    (an aborted upload). Returns the status (0: none), the answer's text and the seconds
    until it came."""
    import urllib.parse

    u = urllib.parse.urlsplit(url)
    start = time.perf_counter()
    with socket.create_connection((u.hostname, u.port), timeout=timeout) as sock:
        sock.sendall(f"POST {u.path} HTTP/1.1\r\nHost: {u.hostname}\r\nContent-Type: {JSON}\r\n"
                     f"Content-Length: {declared_bytes}\r\n\r\n".encode() + b"{" + b" " * (sent_bytes - 1))
        if abort:
            time.sleep(0.2)  # let the server start reading the body
            return {"status": 0, "text": "", "seconds": time.perf_counter() - start}
        status, text = _raw_response(sock, timeout)
    return {"status": status, "text": text, "seconds": time.perf_counter() - start}


def load_test(url: str, requests: int = 1000, concurrency: int = 32, rows: int = 1, bad_fraction: float = 0.0,
              features: int = 64, seed: int = 0, timeout: float = 30.0, reference=None,
              atol: float = 2e-6) -> dict[str, Any]:
    """Send ``requests`` POSTs with at most ``concurrency`` in flight (closed loop: each
    client sends its next request when the last is answered; see :func:`open_loop` for
    the open loop); a ``bad_fraction`` share is
    hostile (:func:`hostile_bodies`). Returns throughput, latency percentiles of the good
    requests, and status counts; with ``reference`` (the model as a function), also
    ``good_mismatch``: good answers whose probabilities differ from ``reference(x)`` by more
    than ``atol`` (the server batches rows; a batch may round differently from a row alone),
    and ``good_max_abs_diff``."""
    if requests < 1 or concurrency < 1 or not 0 <= bad_fraction <= 1:
        raise ValueError(f"need requests >= 1, concurrency >= 1, 0 <= bad_fraction <= 1; "
                         f"got {requests}, {concurrency}, {bad_fraction}")
    payloads = _payloads(features, requests, rows, bad_fraction, seed)
    with _collector_paused():
        start = time.perf_counter()
        results = run_async(_drive(url, payloads, concurrency, timeout, keep=reference is not None))
        wall = time.perf_counter() - start
    mismatch = max_diff = None
    if reference is not None:  # a batch's rows may round differently from a row alone: compare within atol
        mismatch, max_diff = 0, 0.0
        for r in results:
            if r[0] and r[1] == 200:
                x, answer = r[4]
                diff = float(np.max(np.abs(np.asarray(json.loads(answer)["probabilities"])
                                           - reference(x.astype(np.float32)))))
                mismatch += diff > atol
                max_diff = max(max_diff, diff)
    good = [r for r in results if r[0]]
    lat = np.array([r[2] for r in good if r[1] == 200]) * 1e3
    statuses: dict[str, int] = {}
    workers: dict[str, int] = {}
    for _, status, _, worker, _ in results:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        if worker:
            workers[str(worker)] = workers.get(str(worker), 0) + 1
    return {
        "requests": len(results), "concurrency": concurrency, "rows_per_request": rows, "wall_s": wall,
        "rps": len(results) / wall, "good_requests": len(good), "good_ok": int(np.sum([r[1] == 200 for r in good])),
        "bad_requests": len(results) - len(good),
        "bad_4xx": sum(1 for r in results if not r[0] and 400 <= r[1] < 500),
        "status_5xx": sum(1 for r in results if r[1] >= 500), "no_answer": sum(1 for r in results if r[1] == 0),
        "mean_ms": float(np.mean(lat)) if len(lat) else None,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p95_ms": float(np.percentile(lat, 95)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "statuses": statuses, "answered_by_worker": workers, "good_mismatch": mismatch,
        "good_max_abs_diff": max_diff,
    }


def open_loop(url: str, rate_rps: float, duration_s: float = 3.0, rows: int = 1, features: int = 64, seed: int = 0,
              timeout: float = 10.0, connections: int = 512) -> dict[str, Any]:
    """Offer ``rate_rps`` requests per second for ``duration_s`` as a Poisson process (an
    **open loop**: the send times are drawn in advance and kept whatever the server does)
    and measure each latency from its *scheduled* send time, so a server that falls
    behind is charged for the queue it builds (no coordinated omission). Returns offered and
    achieved rates (answers per second, from the start to the last answer; ``sent_rps`` is
    the rate this draw of the Poisson process really offered) and latency percentiles; a request not
    answered within ``timeout`` of its scheduled time counts as ``timed_out`` at ``timeout``."""
    if rate_rps <= 0 or duration_s <= 0:
        raise ValueError(f"need rate_rps > 0 and duration_s > 0, got {rate_rps}, {duration_s}")
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate_rps, int(rate_rps * duration_s * 1.5) + 10))
    arrivals = arrivals[arrivals < duration_s]
    bodies = [p[0] for p in _payloads(features, len(arrivals), rows, 0.0, seed)]
    with _collector_paused():
        start = time.perf_counter()
        results = run_async(_open_loop(url, arrivals, bodies, timeout, connections))
        wall = time.perf_counter() - start
    ok = np.array([r[1] for r in results if r[0] == 200]) * 1e3
    lat = np.array([r[1] if r[0] == 200 else timeout for r in results]) * 1e3  # failures count at the timeout
    late = np.array([r[2] for r in results]) * 1e3

    def pct(q):
        return float(np.percentile(lat, q)) if len(lat) else None

    last = max((r[3] for r in results if r[0] == 200), default=duration_s)
    return {"offered_rps": rate_rps, "sent_rps": len(results) / duration_s, "requests": len(results),
            "answered": len(ok), "achieved_rps": len(ok) / max(last, duration_s), "duration_s": duration_s,
            "wall_s": wall,
            "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
            "timed_out": int(sum(r[0] == 0 for r in results)), "status_5xx": int(sum(r[0] >= 500 for r in results)),
            "send_late_p99_ms": float(np.percentile(late, 99)) if len(late) else None}


def open_loop_sweep(url: str, rates: Sequence[float], duration_s: float = 3.0, stop_after_saturation: bool = True,
                    **kw) -> list[dict[str, Any]]:
    """:func:`open_loop` at each rate, in increasing order; with ``stop_after_saturation``,
    stop after the first rate the server cannot keep up with (:func:`saturated`): beyond it,
    latency only grows with the length of the run."""
    out = []
    for rate in sorted(rates):
        r = open_loop(url, rate, duration_s, **kw)
        out.append(r)
        if stop_after_saturation and saturated(r):
            break
    return out


def saturated(point: dict[str, Any]) -> bool:
    """An :func:`open_loop` point the server did not keep up with: it answered at under 90%
    of the rate the requests were sent, or some were not answered within the timeout."""
    return point["achieved_rps"] < 0.9 * point["sent_rps"] or point["timed_out"] > 0


def metrics(url: str) -> dict[str, Any]:
    """The server's counters (requests, rows, batches, rejected, mean batch size)."""
    return http_json(url + "/metrics")[1]


# --------------------------------------------------------------------------- cold starts

_COLD_CODE = """
import time, sys
t0 = time.perf_counter()
import numpy as np
from flax import nnx
from scalelab import checkpoint
model, cfg, _ = checkpoint.load_model(sys.argv[1])
predict = nnx.jit(lambda m, x: m(x))
np.asarray(predict(model, np.zeros((1, cfg.features), np.float32)))
print(time.perf_counter() - t0)
"""

_COLD_EXPORTED = """
import time, sys
t0 = time.perf_counter()
import jax, numpy as np
exported = jax.export.deserialize(bytearray(open(sys.argv[1] + "/model.stablehlo", "rb").read()))
w = np.load(sys.argv[1] + "/weights.npz")
weights = [w[f"arr_{i}"] for i in range(len(w.files))]
np.asarray(jax.jit(exported.call)(weights, np.zeros((1, exported.in_avals[-1].shape[1]), np.float32)))
print(time.perf_counter() - t0)
"""


_COLD_PHASES = """
import time
t = [time.time()]  # the interpreter is up: the first statement of the script
import sys, json
import numpy as np
import jax
jax.devices()
t.append(time.time())
import fastapi, uvicorn  # the web stack a server also imports
t.append(time.time())
d = sys.argv[1]
exported = jax.export.deserialize(bytearray(open(d + "/model.stablehlo", "rb").read()))
with np.load(d + "/weights.npz") as w:
    weights = [jax.device_put(w[f"arr_{i}"]) for i in range(len(w.files))]
x = np.zeros((1, exported.in_avals[-1].shape[1]), np.float32)
t.append(time.time())
compiled = jax.jit(exported.call).lower(weights, x).compile()
t.append(time.time())
np.asarray(compiled(weights, x))
t.append(time.time())
np.asarray(compiled(weights, x))
t.append(time.time())
print(json.dumps(t))
"""

COLD_PHASES = ("interpreter", "import numpy + jax", "import fastapi + uvicorn", "load export + weights",
               "compile", "first prediction", "second prediction")


def cold_start_phases(directory: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                      timeout: float = 300.0) -> dict[str, float]:
    """Seconds of each phase of a cold start of the exported model (:data:`COLD_PHASES`):
    from launching the interpreter to its first statement, importing JAX, importing the web
    stack, reading the export and weights, compiling (with ``cache_dir``: reading the
    compiled program from JAX's persistent cache, once an earlier start has filled it),
    the first prediction, and a second one (warm, for scale)."""
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    if cache_dir is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    launched = time.time()
    out = subprocess.run([sys.executable, "-c", _COLD_PHASES, str(Path(directory).resolve())], env=env,
                         capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"cold start (phases) failed:\n{out.stderr[-2000:]}")
    stamps = [launched, *json.loads(out.stdout.strip().splitlines()[-1])]
    return {name: b - a for name, a, b in zip(COLD_PHASES, stamps[:-1], stamps[1:], strict=True)}


def cold_start(kind: str, directory: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
               timeout: float = 300.0) -> dict[str, float]:
    """Seconds from starting a process to its first prediction: ``kind="code"`` rebuilds
    the model from configuration + parameters and traces and compiles it; ``"exported"``
    loads the StableHLO and compiles it. With ``cache_dir``, JAX's persistent compilation
    cache is on (the first run fills it, so call twice and keep the second). Returns the
    wall time seen from outside and the time the process measured after its start."""
    scripts = {"code": _COLD_CODE, "exported": _COLD_EXPORTED}
    if kind not in scripts:
        raise ValueError(f"unknown cold-start kind {kind!r}; expected one of {sorted(scripts)}")
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    if cache_dir is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", scripts[kind], str(Path(directory).resolve())], env=env,
                         capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"cold start ({kind}) failed:\n{out.stderr[-2000:]}")
    return {"wall_s": wall, "inside_s": float(out.stdout.strip().splitlines()[-1])}


# --------------------------------------------------------------------------- serverless vs always-on


# Published list prices (on-demand, USD); check the pages for current figures.
PRICES = {
    "always_on_per_hour": {"value": 0.067006, "what": "Google Compute Engine e2-standard-2 (2 vCPU, 8 GB), us-central1",
                           "source": "https://cloud.google.com/compute/vm-instance-pricing"},
    "serverless_per_gb_s": {"value": 0.0000166667, "what": "AWS Lambda, x86, per GB-second",
                            "source": "https://aws.amazon.com/lambda/pricing/"},
    "serverless_per_request": {"value": 0.20 / 1e6, "what": "AWS Lambda, per request",
                               "source": "https://aws.amazon.com/lambda/pricing/"},
}


def traffic(kind: str, duration_s: float, mean_rps: float, seed: int = 0) -> np.ndarray:
    """Request arrival times: ``steady`` (Poisson at ``mean_rps``) or ``spiky`` (quiet,
    with bursts at 20x the quiet rate, the same mean)."""
    if duration_s <= 0 or mean_rps <= 0:
        raise ValueError(f"duration_s and mean_rps must be > 0, got {duration_s}, {mean_rps}")
    rng = np.random.default_rng(seed)
    if kind == "steady":
        n = rng.poisson(mean_rps * duration_s)
        return np.sort(rng.uniform(0, duration_s, n))
    if kind == "spiky":
        times, t = [], 0.0
        quiet = mean_rps / (0.9 + 0.1 * 20)  # 90% of the time quiet, 10% bursting at 20x
        while t < duration_s:
            burst = rng.random() < 0.1
            span = rng.exponential(30.0)
            rate = quiet * (20 if burst else 1)
            n = rng.poisson(rate * min(span, duration_s - t))
            times.extend(rng.uniform(t, min(t + span, duration_s), n))
            t += span
        return np.sort(np.asarray(times))
    raise ValueError(f"unknown traffic kind {kind!r}; expected 'steady' or 'spiky'")


def simulate_serving(arrivals: np.ndarray, service_s: float, cold_start_s: float, keep_alive_s: float = 600.0,
                     memory_gb: float = 2.0, servers: int = 1, prices: dict[str, Any] | None = None) -> dict[str, Any]:
    """Cost and latency of the same traffic on ``servers`` always-on machines vs a
    pay-per-request platform whose instances (one request at a time each) are started on
    demand (a cold start) and reclaimed after ``keep_alive_s`` idle."""
    prices = prices or PRICES
    arrivals = np.sort(np.asarray(arrivals, float))
    duration = float(arrivals[-1]) if len(arrivals) else 0.0
    # always-on: FIFO over `servers` machines, no cold starts
    free = np.zeros(servers)
    on_lat = []
    for t in arrivals:
        i = int(np.argmin(free))
        begin = max(t, free[i])
        free[i] = begin + service_s
        on_lat.append(free[i] - t)
    # pay-per-request: warm idle instance if one exists, else start one
    instances: list[list[float]] = []  # [busy_until, last_used]
    pp_lat, billed, colds = [], 0.0, 0
    for t in arrivals:
        warm = [inst for inst in instances if inst[0] <= t and t - inst[1] <= keep_alive_s]
        if warm:
            inst = max(warm, key=lambda i: i[1])
            latency = service_s
        else:
            inst = [0.0, 0.0]
            instances.append(inst)
            latency = cold_start_s + service_s
            colds += 1
        inst[0] = t + latency
        inst[1] = t + latency
        pp_lat.append(latency)
        billed += latency
        instances = [i for i in instances if t - i[1] <= keep_alive_s or i[0] > t]

    def pct(a, q):
        return float(np.percentile(a, q)) if len(a) else None

    hours = duration / 3600
    return {
        "requests": len(arrivals), "duration_h": hours,
        "always_on_cost": servers * hours * prices["always_on_per_hour"]["value"],
        "always_on_p50_ms": pct(on_lat, 50) * 1e3 if on_lat else None,
        "always_on_p99_ms": pct(on_lat, 99) * 1e3 if on_lat else None,
        "serverless_cost": billed * memory_gb * prices["serverless_per_gb_s"]["value"]
        + len(arrivals) * prices["serverless_per_request"]["value"],
        "serverless_p50_ms": pct(pp_lat, 50) * 1e3 if pp_lat else None,
        "serverless_p99_ms": pct(pp_lat, 99) * 1e3 if pp_lat else None,
        "serverless_p999_ms": pct(pp_lat, 99.9) * 1e3 if pp_lat else None,
        "serverless_mean_ms": float(np.mean(pp_lat)) * 1e3 if pp_lat else None,
        "cold_starts": colds, "cold_start_share": colds / len(arrivals) if len(arrivals) else 0.0,
    }


# --------------------------------------------------------------------------- ONNX and the browser


def to_onnx(params: dict[str, Any], path: str | os.PathLike, features: int = 64) -> Path:
    """The chapter-12 MLP (``params`` as saved: ``layers`` then ``head``, each with a
    ``kernel`` and ``bias``) as an ONNX graph: MatMul + Add + Relu per layer, then the
    head and a Softmax. The batch dimension is symbolic."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    layers = [params["layers"][k] for k in sorted(params["layers"], key=int)] + [params["head"]]
    nodes, inits, x = [], [], "inputs"
    for i, layer in enumerate(layers):
        w, b = np.asarray(layer["kernel"], np.float32), np.asarray(layer["bias"], np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"mm{i}"]),
                  helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"z{i}"])]
        x = f"z{i}"
        if i < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [x], [f"h{i}"]))
            x = f"h{i}"
    nodes.append(helper.make_node("Softmax", [x], ["probabilities"], axis=-1))
    classes = int(np.asarray(layers[-1]["bias"]).shape[0])
    graph = helper.make_graph(
        nodes, "scalelab_mlp",
        [helper.make_tensor_value_info("inputs", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="scalelab",
                              ir_version=9)  # opset 17 needs IR >= 8; older runtimes (the web one) stop at 10
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from scalelab import io

    with io.atomic_open(path, "wb") as f:
        f.write(model.SerializeToString())
    return path


def onnx_predict(path: str | os.PathLike, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"inputs": np.asarray(x, np.float32)})[0]


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Digits in your browser</title>
<script src="{ort_src}"></script></head>
<body>
<h1>A digits classifier running in this page</h1>
<p>The model (<code>model.onnx</code>, {kb:.0f} kB) was downloaded by your browser and runs here with
onnxruntime-web (WebAssembly): no server computes anything. Which also means anyone can download the weights.</p>
<pre id="result">running...</pre>
<script>
async function main() {{
  ort.env.wasm.numThreads = 1;
  const samples = await (await fetch("samples.json")).json();
  const session = await ort.InferenceSession.create("model.onnx", {{executionProviders: ["wasm"]}});
  const n = samples.inputs.length, f = samples.inputs[0].length;
  const x = new ort.Tensor("float32", Float32Array.from(samples.inputs.flat()), [n, f]);
  const t0 = performance.now();
  const out = await session.run({{inputs: x}});
  const ms = performance.now() - t0;
  const p = out.probabilities.data, c = p.length / n;
  const probs = [...Array(n).keys()].map(i => Array.from(p.slice(i * c, (i + 1) * c)));
  document.getElementById("result").textContent = JSON.stringify({{ms: ms, probabilities: probs}});
}}
main().catch(e => {{ document.getElementById("result").textContent = "ERROR " + e; }});
</script>
</body></html>
"""




ORT_WEB_VERSION = "1.30.0"
ORT_CDN = f"https://cdn.jsdelivr.net/npm/onnxruntime-web@{ORT_WEB_VERSION}/dist/ort.min.js"


def local_ort_web(start: str | os.PathLike | None = None) -> Path | None:
    """A local copy of onnxruntime-web's ``dist`` folder: ``$SCALELAB_ORT_WEB``, or
    ``build/onnxruntime-web/dist`` in the checkout (:func:`fetch_ort_web` puts it there)."""
    from scalelab import bench

    candidates = [os.environ.get("SCALELAB_ORT_WEB"),
                  bench.results_dir(start).parent / "build" / "onnxruntime-web" / "dist"]
    for c in candidates:
        if c and (Path(c) / "ort.min.js").exists():
            return Path(c)
    return None


def fetch_ort_web(dest: str | os.PathLike | None = None, version: str = ORT_WEB_VERSION) -> Path:
    """Download onnxruntime-web from npm (``npm pack``) and unpack its ``dist`` folder
    into ``dest`` (default ``build/onnxruntime-web``). Needs ``npm``."""
    import shutil
    import tarfile

    from scalelab import bench

    dest = Path(dest) if dest else bench.results_dir().parent / "build" / "onnxruntime-web"
    if shutil.which("npm") is None:
        raise RuntimeError("npm is not installed; get onnxruntime-web's dist/ folder some other way")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["npm", "pack", f"onnxruntime-web@{version}", "--silent"], cwd=tmp, check=True,
                       capture_output=True, timeout=300)
        tgz = next(Path(tmp).glob("onnxruntime-web-*.tgz"))
        with tarfile.open(tgz) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("package/dist/")
                       and (m.name.endswith(("ort.min.js", ".wasm")) or "ort-wasm-simd-threaded" in m.name)]
            tar.extractall(tmp, members=members, filter="data")
        if (dest / "dist").exists():
            shutil.rmtree(dest / "dist")
        shutil.move(str(Path(tmp) / "package" / "dist"), dest / "dist")
    return dest / "dist"


def write_web_demo(directory: str | os.PathLike, onnx_path: str | os.PathLike, samples: np.ndarray,
                   ort_src: str | os.PathLike = ORT_CDN) -> Path:
    """A static page that runs the ONNX model client-side with onnxruntime-web on
    ``samples`` and shows the probabilities (open it through any static web server).
    ``ort_src``: a URL of ``ort.min.js``, or a local ``dist`` folder to copy next to the page."""
    import shutil

    from scalelab import io

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if not str(ort_src).startswith(("http://", "https://")):
        local = Path(ort_src)
        for f in local.iterdir():
            if f.name == "ort.min.js" or (f.name.startswith("ort-wasm-simd-threaded") and f.suffix in (".wasm", ".mjs")):
                shutil.copyfile(f, directory / f.name)
        ort_src = "ort.min.js"
    shutil.copyfile(onnx_path, directory / "model.onnx")
    io.write_json(directory / "samples.json", {"inputs": np.asarray(samples, np.float32).round(4).tolist()})
    kb = (directory / "model.onnx").stat().st_size / 1e3
    io.write_text(directory / "index.html", PAGE.format(ort_src=ort_src, kb=kb))
    return directory


def find_chromium() -> str | None:
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def run_in_browser(directory: str | os.PathLike, chromium: str | None = None, timeout: float = 60.0) -> dict[str, Any]:
    """Serve ``directory`` on a local port and load its page in headless Chromium; return
    what the page computed. Raises RuntimeError if no Chromium is installed."""
    import functools
    import http.server
    import threading

    chromium = chromium or find_chromium()
    if chromium is None:
        raise RuntimeError("no Chromium or Chrome found (install the 'chromium' package)")
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # no access log on stderr
            pass

    handler = functools.partial(Quiet, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/index.html"
        with tempfile.TemporaryDirectory() as profile:
            out = subprocess.run([chromium, "--headless=new", "--no-sandbox", "--disable-gpu",
                                  f"--user-data-dir={profile}", "--virtual-time-budget=20000", "--dump-dom", url],
                                 capture_output=True, text=True, timeout=timeout)
    finally:
        server.shutdown()
        server.server_close()
    m = re.search(r'<pre id="result">(.*?)</pre>', out.stdout, re.S)
    text = m.group(1) if m else ""
    if not text.startswith("{"):
        raise RuntimeError(f"the page did not compute a result: {text[:300] or out.stderr[-500:]}")
    return json.loads(text)


# --------------------------------------------------------------------------- the batching model (explorer)


SERVICE_BASE_MS = 2.0  # the whole server's time per batch on a 2-core CPU: the model call's fixed part ...
SERVICE_PER_ITEM_MS = 0.35  # ... plus, per request, its rows' share of the call and its HTTP and JSON work


def batching_model(arrival_rate: float, service_base_ms: float, service_per_item_ms: float, max_batch: int,
                   max_wait_ms: float, requests: int = 4000, seed: int = 0) -> dict[str, Any]:
    """A batching server as a queue (pure, deterministic: the explorer's model).

    ``requests`` requests arrive as a Poisson process at ``arrival_rate`` per second (drawn with
    ``numpy.random.default_rng(seed)``); one worker serves them in batches. When the worker is
    free it takes a batch as soon as ``max_batch`` requests are waiting or the oldest has waited
    ``max_wait_ms`` (0: whatever is waiting, at once — the chapter's "dispatch when idle, collect
    while busy"); a batch of ``b`` takes ``service_base_ms + service_per_item_ms * b``.
    Latency is from a request's arrival to the end of its batch.

    Returns the throughput (requests answered per second, over the run until the last answer),
    p50/p95/p99/mean latency in ms, the mean batch size, the worker's utilisation, the capacity
    (``max_batch`` requests per full-batch service time) and ``saturated`` (offered rate above
    capacity: then the queue, and the latency percentiles, grow with ``requests``).
    """
    if not arrival_rate > 0 or not math.isfinite(arrival_rate):
        raise ValueError(f"arrival_rate must be a positive number of requests per second, got {arrival_rate!r}")
    if not service_base_ms >= 0 or not service_per_item_ms >= 0 or service_base_ms + service_per_item_ms <= 0:
        raise ValueError("service times must be >= 0 ms with a positive total (base + per item), got "
                         f"base {service_base_ms!r} and per item {service_per_item_ms!r}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int | np.integer) or max_batch < 1:
        raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
    if not max_wait_ms >= 0 or not math.isfinite(max_wait_ms):
        raise ValueError(f"max_wait_ms must be >= 0 ms, got {max_wait_ms!r}")
    if isinstance(requests, bool) or not isinstance(requests, int | np.integer) or requests < 1:
        raise ValueError(f"requests must be an integer >= 1, got {requests!r}")
    max_batch, n = int(max_batch), int(requests)
    arrivals = np.cumsum(np.random.default_rng(seed).exponential(1e3 / arrival_rate, n))  # ms
    at = arrivals.tolist()  # plain floats: the loop below indexes one at a time
    done = [0.0] * n
    batches = 0
    free, busy, i = 0.0, 0.0, 0
    wait, base, per_item = float(max_wait_ms), float(service_base_ms), float(service_per_item_ms)
    while i < n:
        full = at[i + max_batch - 1] if i + max_batch <= n else math.inf
        start = max(free, min(full, at[i] + wait))
        size = min(max_batch, bisect.bisect_right(at, start, i, min(n, i + max_batch)) - i)
        service = base + per_item * size
        free = start + service
        done[i:i + size] = [free] * size
        busy += service
        batches += 1
        i += size
    latency = np.asarray(done) - arrivals
    span = max(free, at[-1])
    capacity = max_batch / (service_base_ms + service_per_item_ms * max_batch) * 1e3
    p50, p95, p99 = (float(v) for v in np.percentile(latency, [50, 95, 99]))
    return {"throughput_rps": n / span * 1e3, "p50_ms": p50, "p95_ms": p95, "p99_ms": p99,
            "mean_ms": float(latency.mean()), "mean_batch": n / batches, "utilisation": busy / span,
            "capacity_rps": float(capacity), "offered_rps": float(arrival_rate),
            "saturated": bool(arrival_rate > capacity)}


_MEASURE_SERVER: dict[str, Any] = {}  # the explorer's server, kept between presses of "measure this point"


def _stop_measure_server() -> None:
    server = _MEASURE_SERVER.pop("server", None)
    if server is not None:
        server.stop()


def measure_batching_point(arrival_rate: float, max_batch: int, max_wait_ms: float,
                           model_dir: str | os.PathLike | None = None, duration_s: float = 2.0) -> dict[str, Any]:
    """Run the chapter's batched server at ``max_batch`` / ``max_wait_ms`` under an open loop
    (:func:`open_loop`) at ``arrival_rate`` for ``duration_s``: measured p50/p99 and throughput.

    The server (on ``model_dir``, an exported model; a freshly initialised serving model if None)
    is started on the first call and kept for the next ones at the same setting, so only the
    first press pays its start-up. The server's ``max_wait`` only waits for requests it is already
    receiving (see :class:`Batcher`), a shorter wait than the model's."""
    import atexit

    if model_dir is None:
        if "model_dir" not in _MEASURE_SERVER:
            tmp = tempfile.mkdtemp(prefix="scalelab-batching-")
            _MEASURE_SERVER["model_dir"] = str(serving_model(tmp, steps=1)["exported"])
        model_dir = _MEASURE_SERVER["model_dir"]
    key = (str(model_dir), int(max_batch), float(max_wait_ms))
    if _MEASURE_SERVER.get("key") != key:
        _stop_measure_server()
        server = ServerProcess(ServerConfig(str(model_dir), max_batch=int(max_batch), max_wait_ms=float(max_wait_ms)))
        server.start()
        if not _MEASURE_SERVER.get("atexit"):
            atexit.register(_stop_measure_server)
            _MEASURE_SERVER["atexit"] = True
        _MEASURE_SERVER.update(server=server, key=key)
        load_test(server.url, requests=100, concurrency=8)  # warm the connections
    r = open_loop(_MEASURE_SERVER["server"].url, float(arrival_rate), duration_s=duration_s)
    return {"p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"], "throughput_rps": r["achieved_rps"],
            "sent_rps": r["sent_rps"], "timed_out": r["timed_out"]}


BATCHING_RATES = [float(r) for r in np.logspace(math.log10(30), math.log10(10_000), 20)]


def batching_explorer(service_base_ms: float = SERVICE_BASE_MS, service_per_item_ms: float = SERVICE_PER_ITEM_MS,
                      model_dir: str | os.PathLike | None = None, requests: int = 4000, info: Any = None):
    """The batching explorer: a max batch, an arrival rate and a max wait -> the queue's
    throughput and latency (:func:`batching_model`), drawn against the arrival rate beside the
    unbatched server (max batch 1); "measure this point" runs the real batched server there for
    about two seconds (:func:`measure_batching_point`; the first press also starts it)."""
    from scalelab import env, plot, widgets

    context = {"service_base_ms": float(service_base_ms), "service_per_item_ms": float(service_per_item_ms),
               "requests": int(requests), "seed": 0}

    def curve(max_batch, max_wait_ms):
        return [batching_model(r, max_batch=max_batch, max_wait_ms=max_wait_ms, **context) for r in BATCHING_RATES]

    def draw(settings, pred, points):
        fig, (ax1, ax2) = plot.figure(ncols=2, width=10.0, height=3.8)
        mine = curve(settings["max_batch"], settings["max_wait_ms"])
        one = curve(1, settings["max_wait_ms"]) if settings["max_batch"] != 1 else None
        here = f"max batch {settings['max_batch']}, wait {settings['max_wait_ms']:g} ms"
        for pts, color, what in ((mine, "C0", here), (one, "C3", "unbatched (max batch 1)")):
            if pts is None:
                continue
            ax1.plot(BATCHING_RATES, [p["p50_ms"] for p in pts], "-", color=color, label=f"{what}: p50")
            ax1.plot(BATCHING_RATES, [p["p99_ms"] for p in pts], ":", color=color, label=f"{what}: p99")
            ax2.plot(BATCHING_RATES, [p["throughput_rps"] for p in pts], "-", color=color, label=what)
            ax2.axhline(pts[0]["capacity_rps"], color=color, ls="--", lw=0.8)
        rate = settings["arrival_rate"]
        ax1.scatter([rate, rate], [pred["p50_ms"], pred["p99_ms"]], s=50, color="C0", zorder=3,
                    label=f"this setting: {rate:.0f} req/s")
        ax2.scatter([rate], [pred["throughput_rps"]], s=50, color="C0", zorder=3, label="this setting")
        for i, p in enumerate(points):
            r, m = p["settings"]["arrival_rate"], p["result"]
            ax1.scatter([r, r], [m["p50_ms"], m["p99_ms"]], marker="*", s=120, color="C2", zorder=4,
                        label="measured: p50, p99" if i == 0 else None)
            ax2.scatter([r], [m["throughput_rps"]], marker="*", s=120, color="C2", zorder=4,
                        label="measured" if i == 0 else None)
        ax1.set(xscale="log", yscale="log", xlabel="arrival rate (requests / s, Poisson)", ylabel="latency (ms)",
                title="Latency: flat, then the queue's wall")
        ax2.plot(BATCHING_RATES, BATCHING_RATES, color="0.7", lw=0.8, label="throughput = arrival rate")
        ax2.set(xscale="log", yscale="log", xlabel="arrival rate (requests / s, Poisson)",
                ylabel="throughput (requests / s)", title="Throughput: up to capacity (dashed)")
        ax1.legend(fontsize=6.5, loc="upper left")
        ax2.legend(fontsize=6.5, loc="upper left")
        plot.label(fig, info or env.describe(), source="queueing model; stars: measured on the real server",
                   devices=1)
        return fig

    controls = {
        "max_batch": widgets.dropdown("max batch", [1, 8, 32, 64], value=64),
        "arrival_rate": widgets.slider("arrival rate (req/s)", 500.0, 30.0, 10_000.0, log=True),
        "max_wait_ms": widgets.slider("max wait (ms)", 0.0, 0.0, 20.0, step=0.5),
    }
    return widgets.Explorer(
        "batching", "Batching explorer", controls, batching_model, draw, context=context,
        measure=lambda arrival_rate, max_batch, max_wait_ms: measure_batching_point(
            arrival_rate, max_batch, max_wait_ms, model_dir=model_dir),
        shown=["throughput_rps", "p50_ms", "p99_ms", "mean_batch", "utilisation", "capacity_rps", "saturated"],
        labels={"throughput_rps": "throughput (req/s)", "p50_ms": "p50 ms", "p99_ms": "p99 ms",
                "capacity_rps": "capacity (req/s)"},
        note=f"service time per batch of b = {service_base_ms:g} ms + {service_per_item_ms:g} ms x b; "
             f"{requests} Poisson arrivals. 'measure this point' runs the real batched server at this setting "
             "for about 2 s (the first press also starts it).")


# --------------------------------------------------------------------------- serving model and benchmark


SERVING_HIDDEN = (4096, 4096)  # 17M parameters: one call streams 68 MB of weights, a few ms on a laptop core


def serving_model(directory: str | os.PathLike, hidden: Sequence[int] = SERVING_HIDDEN, steps: int = 200,
                  seed: int = 0) -> dict[str, Path]:
    """Train the chapter-12 MLP briefly and save it both ways: ``saved`` (configuration +
    parameters) and ``exported`` (StableHLO + weights). Returns the two folders."""
    from scalelab import checkpoint as ck

    cfg = ck.ModelConfig(hidden=tuple(hidden), dropout=0.0)
    state, step = ck.init_state(cfg, seed=seed)
    it, _ = ck.digits_data(batch_size=64, seed=seed)
    state, _ = ck.train(state, step, it, steps)
    directory = Path(directory)
    saved = ck.save_model(directory / "saved", cfg, state["params"])
    exported = ck.export_inference(directory / "exported", cfg, state["params"])
    return {"saved": saved, "exported": exported, "params": state["params"], "config": cfg}


def measured_load(url: str, requests: int, concurrency: int, **kw) -> dict[str, Any]:
    """:func:`load_test`, plus what the server saw in that window: the mean batch and the
    mean milliseconds per request in each server-side phase (``phases_ms``), and the rest
    of the client's mean latency (HTTP, sockets, the client itself) as ``outside_ms``."""
    before = metrics(url)
    r = load_test(url, requests=requests, concurrency=concurrency, **kw)
    after = metrics(url)
    r["phases_ms"] = phase_breakdown(before, after)
    r["outside_ms"] = r["mean_ms"] - sum(r["phases_ms"].values())
    r["mean_batch_rows"] = (after["rows"] - before["rows"]) / max(after["batches"] - before["batches"], 1)
    return r


def compare_int8(model: dict[str, Any], repeat: int = 7) -> dict[str, Any]:
    """float32 (the export) vs weight-only int8 (:class:`Int8Predictor`) on the digits test
    set: accuracy, agreement of the predicted classes, batch-1 latency, rows per second at
    the largest batch, and the weight bytes each streams per call."""
    from scalelab import bench, data

    split = data.load_digits()
    out: dict[str, Any] = {}
    preds = {}
    for name, p in (("float32", Predictor(model["exported"])), ("int8", Int8Predictor(model["params"]))):
        p.warmup()
        preds[name] = np.argmax(p(split.x_test), axis=-1)
        one = split.x_test[:1]
        full = split.x_test[:p.max_batch]
        out[name] = {"accuracy": float(np.mean(preds[name] == split.y_test)),
                     "latency_ms_batch1": bench.timeit(p, one, repeat=repeat).best * 1e3,
                     "rows_per_s_batch64": len(full) / bench.timeit(p, full, repeat=repeat).best,
                     "weight_bytes": p.weight_bytes}
    out["test_rows"] = len(split.y_test)
    out["class_agreement"] = float(np.mean(preds["float32"] == preds["int8"]))
    out["latency_ratio_int8_over_float32"] = out["int8"]["latency_ms_batch1"] / out["float32"]["latency_ms_batch1"]
    out["throughput_ratio_int8_over_float32"] = out["int8"]["rows_per_s_batch64"] / out["float32"]["rows_per_s_batch64"]
    out["bytes_ratio_int8_over_float32"] = out["int8"]["weight_bytes"] / out["float32"]["weight_bytes"]
    return out


OPEN_LOOP_RATES = (100, 200, 300, 450, 700, 1000, 1400, 2000, 2800)


def bench_serve(quick: bool = False) -> dict[str, Any]:
    """Benchmark ``serve``: the batched and the unbatched server (the same server stack
    and settings, ``batched`` aside) under the same closed-loop load (32 clients, then one
    client: batching must cost nothing there) with the server-side phases of a request; an
    open-loop (Poisson) sweep of offered rates up to each server's saturation; weight-only
    int8 vs float32; cold starts (model code, exported, with the compilation cache) and the
    phases of one."""
    requests = 600 if quick else 3000
    rates = (100, 300, 900) if quick else OPEN_LOOP_RATES
    with tempfile.TemporaryDirectory() as tmp:
        model = serving_model(tmp, hidden=(2048, 2048) if quick else SERVING_HIDDEN, steps=20 if quick else 200)
        runs, sweeps = {}, {}
        for name, batched in (("batched", True), ("unbatched", False)):
            cfg = ServerConfig(str(model["exported"]), max_batch=64, max_wait_ms=0.0, batched=batched)
            with ServerProcess(cfg) as server:
                load_test(server.url, requests=200, concurrency=32)  # warm the connections
                runs[name] = measured_load(server.url, requests, 32)
                runs[name]["one"] = measured_load(server.url, requests // 5, 1)
                sweeps[name] = open_loop_sweep(server.url, rates, duration_s=1.5 if quick else 3.0)
        int8 = compare_int8(model)
        cache = Path(tmp) / "jax-cache"
        cold = {"code": cold_start("code", model["saved"])["wall_s"],
                "exported": cold_start("exported", model["exported"])["wall_s"]}
        cold_start("code", model["saved"], cache_dir=cache)  # fills the cache
        cold["cached"] = cold_start("code", model["saved"], cache_dir=cache)["wall_s"]
        cold_start("exported", model["exported"], cache_dir=cache)
        cold["exported_cached"] = cold_start("exported", model["exported"], cache_dir=cache)["wall_s"]
        phases = cold_start_phases(model["exported"])
        pcache = Path(tmp) / "jax-cache-phases"
        cold_start_phases(model["exported"], cache_dir=pcache)  # fills it
        phases_cached = cold_start_phases(model["exported"], cache_dir=pcache)
    keep = ("offered_rps", "sent_rps", "achieved_rps", "p50_ms", "p95_ms", "p99_ms", "timed_out")
    b, u = runs["batched"], runs["unbatched"]
    return {
        "model_hidden": list(model["config"].hidden), "requests": requests, "concurrency": 32,
        "batched_rps": b["rps"], "unbatched_rps": u["rps"], "batching_speedup": b["rps"] / u["rps"],
        "p50_ms_batched": b["p50_ms"], "p95_ms_batched": b["p95_ms"], "p99_ms_batched": b["p99_ms"],
        "p50_ms_unbatched": u["p50_ms"], "p95_ms_unbatched": u["p95_ms"], "p99_ms_unbatched": u["p99_ms"],
        "mean_batch_rows": b["mean_batch_rows"],
        "request_phases_ms_batched": {**b["phases_ms"], "outside": b["outside_ms"]},
        "request_phases_ms_unbatched": {**u["phases_ms"], "outside": u["outside_ms"]},
        "one_client_rps_batched": b["one"]["rps"], "one_client_rps_unbatched": u["one"]["rps"],
        "one_client_batched_over_unbatched": b["one"]["rps"] / u["one"]["rps"],
        "one_client_p50_ms_batched": b["one"]["p50_ms"], "one_client_p95_ms_batched": b["one"]["p95_ms"],
        "one_client_p99_ms_batched": b["one"]["p99_ms"],
        "one_client_p50_ms_unbatched": u["one"]["p50_ms"], "one_client_p95_ms_unbatched": u["one"]["p95_ms"],
        "one_client_p99_ms_unbatched": u["one"]["p99_ms"],
        "one_client_request_phases_ms": {**b["one"]["phases_ms"], "outside": b["one"]["outside_ms"]},
        "open_loop": {name: [{k: r[k] for k in keep} for r in sweep] for name, sweep in sweeps.items()},
        "open_loop_duration_s": 1.5 if quick else 3.0,
        "status_5xx": sum(r["status_5xx"] + r["one"]["status_5xx"] for r in runs.values())
        + sum(r["status_5xx"] for sweep in sweeps.values() for r in sweep),
        "int8": int8,
        "cold_start_s_code": cold["code"], "cold_start_s_exported": cold["exported"],
        "cold_start_s_cached": cold["cached"], "cold_start_s_exported_cached": cold["exported_cached"],
        "cached_means": "model code with JAX's persistent compilation cache filled by an earlier start",
        "cold_start_phases_s": phases, "cold_start_phases_s_cached": phases_cached,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m scalelab.serve", description="Serve an exported model over HTTP.")
    ap.add_argument("--model", help=f"exported model folder (or {ENV_PREFIX}MODEL_DIR)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--workers", type=int, default=1, help="server processes behind the one address")
    ap.add_argument("--max-batch", type=int)
    ap.add_argument("--max-wait-ms", type=float)
    ap.add_argument("--unbatched", action="store_true", help="one request at a time (the baseline)")
    a = ap.parse_args(argv)
    import uvicorn

    overrides = {"MODEL_DIR": a.model, "MAX_BATCH": a.max_batch, "MAX_WAIT_MS": a.max_wait_ms,
                 "BATCHED": "false" if a.unbatched else None}
    for key, value in overrides.items():
        if value is not None:
            os.environ[ENV_PREFIX + key] = str(value)
    ServerConfig.from_env()  # fail early, with the message, if the configuration is incomplete
    uvicorn.run("scalelab.serve:create_app", factory=True, host=a.host, port=a.port, workers=a.workers, access_log=False,
                log_level="warning")


if __name__ == "__main__":
    main()
