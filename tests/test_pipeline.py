import contextlib
import itertools
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scalelab import pipeline as pl


class HangingAugment(pl.Augment):
    def __call__(self, images, epoch, batch):
        if batch == 1:
            time.sleep(8)  # a thread cannot be killed: keep the stuck one short-lived
        return super().__call__(images, epoch, batch)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return pl.make_patch_store(tmp_path_factory.mktemp("pipe") / "p.h5", rows=320, size=32)


def _source(store, **kw):
    return pl.HDF5Batches(store, batch_size=32, **kw)


def _aug():
    return pl.Augment(crop=24, out=16, seed=5)


def _expected(source, aug, epoch=0):
    return [aug(source.read(b), epoch, b) for b in source.order(epoch, aug.seed)]


def _pipeline_threads():
    """Live pipeline threads, ignoring any left sleeping by the stuck-stage test."""
    return [t for t in threading.enumerate()
            if t.name in ("producer", "loader") and not getattr(t, "_stuck_ok", False)]


def test_resize_weights():
    w = pl.resize_weights(5, 9)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(pl.resize_weights(4, 4), np.eye(4))
    with pytest.raises(ValueError, match="sizes"):
        pl.resize_weights(0, 3)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 4))
def test_numpy_and_jax_augment_agree(seed, n):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 12, 12, 3), dtype=np.uint8)
    aug = pl.Augment(crop=8, out=10, seed=seed % 100)
    params = aug.params(n, 12, epoch=1, batch=2)
    cpu = aug.numpy(images, params)
    dev = pl.augment_jax(images, {k: np.asarray(v) for k, v in params.items()}, 8, 10)
    assert cpu.shape == (n, 10, 10)
    np.testing.assert_allclose(np.asarray(dev), cpu, atol=1e-5)


def test_augment_errors_and_uint8():
    aug = pl.Augment(crop=8, out=8)
    with pytest.raises(ValueError, match="square RGB"):
        aug.numpy(np.zeros((2, 8, 9, 3), np.uint8), aug.params(2, 8, 0, 0))
    with pytest.raises(ValueError, match="larger than"):
        pl.Augment(crop=20).params(1, 16, 0, 0)
    out = aug(np.full((2, 8, 8, 3), 255, np.uint8), 0, 0)
    assert out.dtype == np.uint8 and out.max() == 255


def test_sharding_is_disjoint_and_complete(store):
    shards = [_source(store, process_index=i, process_count=3) for i in range(3)]
    ids = [b for s in shards for b in s.batches]
    assert sorted(ids) == list(range(10)) and len(set(ids)) == 10
    s = _source(store)
    assert s.order(0, 1) == s.order(0, 1) != s.order(1, 1)
    assert sorted(s.order(2, 1)) == list(range(10))
    with pytest.raises(ValueError, match="process_index"):
        _source(store, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="no dataset"):
        pl.HDF5Batches(store, 32, name="nope")
    with pytest.raises(FileNotFoundError):
        pl.HDF5Batches(store.parent / "missing.h5", 32)


@pytest.mark.parametrize("workers", [0, 2])
def test_pipeline_matches_sequential_and_resumes(store, workers):
    source, aug = _source(store), _aug()
    load = pl.make_loader(jax.devices()[:1])
    expected = _expected(source, aug)
    with pl.Pipeline(source, aug, load, workers=workers, timeout=60) as pipe:
        got = [np.asarray(x) for x in pipe]
        assert pipe.get_state() == {"epoch": 1, "position": 0, "seed": 5}
        it = iter(pipe)  # epoch 1
        for _ in range(4):
            next(it)
        state = pipe.get_state()
        after = np.asarray(next(it))
        it.close()
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)
    assert state == {"epoch": 1, "position": 4, "seed": 5}
    with pl.Pipeline(source, aug, load, workers=workers) as fresh:
        fresh.set_state(state)
        np.testing.assert_array_equal(np.asarray(next(iter(fresh))), after)
    np.testing.assert_array_equal(after, _expected(source, aug, epoch=1)[4])
    assert multiprocessing.active_children() == [] and _pipeline_threads() == []


def test_set_state_validates(store):
    pipe = pl.Pipeline(_source(store), _aug(), lambda x: x)
    with pytest.raises(ValueError, match="seed"):
        pipe.set_state({"epoch": 0, "position": 0, "seed": 99})
    with pytest.raises(ValueError, match="position"):
        pipe.set_state({"epoch": 0, "position": 99, "seed": 5})
    with pytest.raises(ValueError, match="workers"):
        pl.Pipeline(_source(store), _aug(), lambda x: x, workers=-1)


@pytest.mark.parametrize("workers", [0, 2])
def test_worker_error_reaches_consumer_with_traceback(store, workers):
    source = _source(store, shuffle=False)
    aug = pl.FailingAugment(crop=24, out=16, seed=5, fail_at=3)
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="failed on batch 3") as info:
        with pl.Pipeline(source, aug, lambda x: x, workers=workers, timeout=30) as pipe:
            for _ in pipe:
                pass
    assert time.perf_counter() - start < 30
    if workers:  # the worker's traceback travels as the cause
        assert "injected fault" in str(info.value.__cause__) and "in __call__" in str(info.value.__cause__)
    else:
        assert any(f.name == "__call__" for f in __import__("traceback").extract_tb(info.value.__traceback__))
    assert multiprocessing.active_children() == [] and _pipeline_threads() == []


@pytest.mark.parametrize("workers", [0, 1])
def test_stuck_stage_times_out(store, workers):
    source = _source(store, shuffle=False)
    start = time.perf_counter()
    with pytest.raises((TimeoutError, multiprocessing.TimeoutError)):
        with pl.Pipeline(source, HangingAugment(crop=24, out=16), lambda x: x, workers=workers,
                         timeout=3) as pipe:
            for _ in pipe:
                pass
    assert time.perf_counter() - start < 20
    assert multiprocessing.active_children() == []  # worker processes are terminated
    for t in threading.enumerate():  # a stuck *thread* ends when its sleep does
        if t.name == "producer":
            t._stuck_ok = True


def test_keyboard_interrupt_and_break_stop_workers(store):
    source = _source(store)
    with pytest.raises(KeyboardInterrupt):
        with pl.Pipeline(source, _aug(), lambda x: x, workers=2) as pipe:
            for i, _ in enumerate(pipe):
                if i == 2:
                    raise KeyboardInterrupt
    assert multiprocessing.active_children() == [] and _pipeline_threads() == []
    pipe = pl.Pipeline(source, _aug(), lambda x: x, workers=1)
    for i, _ in enumerate(pipe):
        if i == 1:
            break
    pipe.close()
    assert multiprocessing.active_children() == [] and _pipeline_threads() == []


def test_loader_shards_over_devices():
    load = pl.make_loader(jax.devices()[:4])
    x = load(np.arange(8 * 3, dtype=np.uint8).reshape(8, 3))
    assert len(x.sharding.device_set) == 4
    np.testing.assert_array_equal(np.asarray(x), np.arange(24).reshape(8, 3))
    with pytest.raises(ValueError, match="cannot be split"):
        load(np.zeros((6, 3), np.uint8))


def test_grain_gives_the_same_batches(store):
    aug = _aug()
    source = _source(store, shuffle=False)
    it = pl.grain_iterator(store, 32, aug, workers=0)
    for b in range(3):
        np.testing.assert_array_equal(next(it), aug(source.read(b), 0, b))
    it.close()
    batch = source.read(4)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(pl.BatchAugment(aug)))(4, batch), aug(batch, 0, 4))


def test_timeline_and_bound(store):
    tl = pl.Timeline()
    source = _source(store, shuffle=False)
    seconds = pl.run_sequential(source, _aug(), lambda x: x, pl.emulated_step(0.001), 3, timeline=tl)
    assert seconds > 0.003
    assert {e.stage for e in tl.events} == {"extract", "transform", "load", "compute"}
    assert set(tl.mean_seconds()) == set(tl.median_seconds()) == {"extract", "transform", "load", "compute"}
    assert set(pl.stage_seconds(source, _aug(), lambda x: x, batches=2, repeats=2)) == {"extract", "transform", "load"}
    assert set(pl.stage_seconds(source, _aug(), lambda x: x, 2, 1, thread=True)) == {"extract", "transform", "load"}
    assert pl.in_thread(lambda a, b=0: threading.current_thread().name + str(a + b), 1, b=2) == "measure3"
    with pytest.raises(ZeroDivisionError):
        pl.in_thread(lambda: 1 / 0)
    assert pl.bound_seconds({"extract": 1, "transform": 3, "load": 0.5}, 1.5, workers=2) == 2
    assert pl.bound_seconds({"extract": 1, "transform": 3, "load": 0.5}, 1.5, workers=0) == 4
    steady = tl.steady(1)
    assert min(e.start for e in steady.events) == sorted(e.start for e in tl.events if e.stage == "compute")[1]
    with pytest.raises(ValueError, match="skip"):
        tl.steady(3)
    fig = pl.plot_timeline(tl, "test")
    assert fig.axes
    with pytest.raises(ValueError, match="empty"):
        pl.plot_timeline(pl.Timeline(), "x")
    with pytest.raises(ValueError, match="seconds"):
        pl.emulated_step(-1)


@pytest.mark.parametrize("kind,workers", [("sequential", 1), ("thread", 2), ("process", 2)])
@pytest.mark.parametrize("task", ["augment", "row reads", "batch reads"])
def test_transform_scaling_runs(store, kind, workers, task):
    assert pl.transform_scaling(_source(store), _aug(), batches=4, workers=workers, kind=kind, task=task) > 0


def test_transform_scaling_rejects_bad_options(store):
    with pytest.raises(ValueError, match="kind"):
        pl.transform_scaling(_source(store), _aug(), 2, 1, "fiber")
    with pytest.raises(ValueError, match="task"):
        pl.transform_scaling(_source(store), _aug(), 2, 1, "thread", "compress")
    with pytest.raises(ValueError, match="exactly 1"):
        pl.transform_scaling(_source(store), _aug(), 2, 2, "sequential")
    with pytest.raises(ValueError, match="repeats"):
        pl.transform_scaling(_source(store), _aug(), 2, 1, "sequential", repeats=0)
    assert pl.transform_scaling(_source(store), _aug(), 2, 2, "thread", repeats=3) > 0


def test_slow_reads_give_the_same_batches_after_the_wait(store):
    source = _source(store, shuffle=True)
    slow = pl.SlowReads(source, latency=0.05)
    assert len(slow) == len(source) and slow.batches == source.batches
    assert slow.order(1, 5) == source.order(1, 5)
    start = time.perf_counter()
    np.testing.assert_array_equal(slow.read(3), source.read(3))
    assert time.perf_counter() - start >= 0.05
    clone = pickle.loads(pickle.dumps(slow))  # worker processes and Grain pickle sources
    np.testing.assert_array_equal(clone.read(2), source.read(2))
    with pytest.raises(ValueError, match="latency"):
        pl.SlowReads(source, latency=-1)


def test_parallel_reads_keep_the_order(store):
    source = _source(store)
    ids = [7, 2, 9, 0, 4]
    got = pl.parallel_reads(pl.SlowReads(source, 0.01), ids, readers=3)
    for b, x in zip(ids, got, strict=True):
        np.testing.assert_array_equal(x, source.read(b))
    with pytest.raises(ValueError, match="readers"):
        pl.parallel_reads(source, ids, 0)
    rows = pl.read_scaling(pl.SlowReads(source, 0.001), [1, 4], batches=4)
    assert [r["readers"] for r in rows] == [1, 4] and all(r["s_per_batch"] > 0.001 / 4 for r in rows)


@pytest.mark.parametrize("workers", [0, 2])
def test_pipeline_over_slow_reads_matches_sequential(store, workers):
    source, aug = _source(store), _aug()
    with pl.Pipeline(pl.SlowReads(source, 0.005), aug, lambda x: x, workers=workers, timeout=60) as pipe:
        got = list(pipe)
    for a, b in zip(got, _expected(source, aug), strict=True):
        np.testing.assert_array_equal(a, b)
    assert multiprocessing.active_children() == [] and _pipeline_threads() == []


def test_bound_with_cores_and_waits():
    stages = {"extract": 2.0, "transform": 1.5, "load": 0.5}
    # no core limit: the producers divide extract + transform
    assert pl.bound_seconds(stages, 0.0, workers=4) == 0.875
    # 2 cores: the host's CPU work (4 s with the load) cannot go below 4 / 2 per batch
    assert pl.bound_seconds(stages, 0.0, workers=4, cores=2) == 2.0
    # half of extract is waiting: the CPU part is 3 s, 3 / 2 = 1.5 s per batch on 2 cores
    assert pl.bound_seconds(stages, 0.0, workers=4, cores=2, wait_s=1.0) == 1.5
    assert pl.bound_seconds(stages, 0.0, workers=0, cores=2) == 3.5
    assert pl.bound_seconds(stages, 5.0, workers=4, cores=2) == 5.0
    with pytest.raises(ValueError, match="cores"):
        pl.bound_seconds(stages, 0.0, 1, cores=0)


def test_step_fraction_separates_thread_and_workers():
    # the chapter's contrast: the step is as long as the workers' time per batch, so they are
    # step-bound, and one thread (slower than the workers) is producer-bound
    assert 0.9 <= pl.STEP_FRACTION <= 1.0
    stages = {"extract": 0.1, "transform": 0.9, "load": 0.05}
    step = pl.STEP_FRACTION * 0.5  # two workers deliver a batch every 0.5
    assert pl.bound_seconds(stages, step, 0) == 1.0 > step == pl.bound_seconds(stages, step, 2)


def test_calibrate_step_from_the_pipeline(store):
    source = pl.HDF5Batches(store, batch_size=8, shuffle=False)  # enough batches for the start-up skip
    cal = pl.calibrate_step(source, _aug(), lambda x: x, workers=2, batches=4, repeats=1)
    assert set(cal) == {"thread", "workers", "step"} and cal["thread"] > 0 and cal["workers"] > 0
    assert cal["step"] == pl.STEP_FRACTION * cal["workers"]
    assert pl.producer_seconds(source, _aug(), lambda x: x, 0, batches=3, repeats=1) > 0


def test_workers_sweep_rows(store):
    rows = pl.workers_sweep(_source(store), _aug(), lambda x: x, pl.emulated_step(0), [0, 1], batches=6, skip=2)
    assert pl.steady_skip(2, 4) > 2 + 4
    assert [r["workers"] for r in rows] == [0, 1] and all(r["s_per_batch"] > 0 for r in rows)


# --------------------------------------------------------------------------- dead and stuck workers


class MarkedAugment(pl.Augment):
    """Writes a marker file when a worker starts a batch, then sleeps ``hang`` seconds on the
    batches in ``slow`` (all batches if empty): a busy worker the test can find and kill."""

    def __init__(self, folder, hang=60.0, slow=(), exit_code=None, **kw):
        super().__init__(**kw)
        object.__setattr__(self, "folder", str(folder))
        object.__setattr__(self, "hang", hang)
        object.__setattr__(self, "slow", tuple(slow))
        object.__setattr__(self, "exit_code", exit_code)

    def __call__(self, images, epoch, batch):
        Path(self.folder, f"{os.getpid()}-{batch}").touch()
        if not self.slow or batch in self.slow:
            if self.exit_code is not None:
                os._exit(self.exit_code)
            time.sleep(self.hang)
        return super().__call__(images, epoch, batch)


def _alive(pid):
    """True while any thread of ``pid`` runs (the leader of a dying process turns zombie before
    its other threads have exited and its files are closed, so every thread is looked at)."""
    tasks = Path(f"/proc/{pid}/task")
    if Path("/proc/self/task").exists():
        try:
            states = [(t / "stat").read_text().rsplit(")", 1)[1].split()[0] for t in tasks.iterdir()]
        except (FileNotFoundError, ProcessLookupError):
            return False
        return any(s not in ("Z", "X") for s in states)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for(predicate, seconds=60.0):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def _settle(folder, quiet=1.0):
    """Wait until no worker has started a batch (written a marker) for ``quiet`` seconds."""
    seen = {"n": -1, "since": time.monotonic()}

    def settled():
        n = len(list(folder.iterdir()))
        if n != seen["n"]:
            seen.update(n=n, since=time.monotonic())
        return time.monotonic() - seen["since"] > quiet

    _wait_for(settled)


def _busy_pids(folder, pids):
    """Worker pids that have started a batch (their marker file exists)."""
    started = {int(p.name.split("-")[0]) for p in folder.iterdir()}
    return [p for p in pids if p in started]


def _kill_when(pipe, folder, pick, killed):
    """In a thread: once ``pick(pipe, folder)`` names a pid, SIGKILL it and note when."""

    def run():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            pid = pick(pipe, folder) if pipe.worker_pids else None
            if pid:
                killed["pid"], killed["at"] = pid, time.monotonic()
                os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.02)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_killed_busy_worker_is_named_at_once(store, tmp_path):
    # class: a worker killed in the middle of a task -> WorkerDiedError at once, not a timeout
    source = _source(store, shuffle=False)
    aug = MarkedAugment(tmp_path, hang=60.0, crop=24, out=16, seed=5)
    killed = {}
    pipe = pl.Pipeline(source, aug, lambda x: x, workers=2, timeout=60)
    it = iter(pipe)
    t = _kill_when(pipe, tmp_path, lambda p, f: (_busy_pids(f, p.worker_pids) or [None])[0], killed)
    with pytest.raises(pl.WorkerDiedError) as info:
        next(it)
    raised_at = time.monotonic()
    t.join()
    assert raised_at - killed["at"] < 3.0  # detected by the process sentinel, not a 60 s timeout
    err = info.value
    assert err.pid == killed["pid"] and err.signal == "SIGKILL" and err.exitcode == -9
    assert err.batch in source.batches[:4]
    assert str(err).startswith(f"worker {err.worker} (pid {err.pid}) died with signal SIGKILL "
                               f"while producing batch {err.batch}")
    assert pipe.worker_pids == [] and multiprocessing.active_children() == []  # the others were stopped
    start = time.perf_counter()
    pipe.close()
    assert time.perf_counter() - start < 1.0


def test_killed_idle_worker_fails_fast_and_iteration_resumes_exactly(store, tmp_path):
    # class: a worker killed while idle (during an iteration, and between iterations) ->
    # WorkerDiedError "while idle"; iterating again resumes at the same position with new workers

    source = pl.HDF5Batches(store, batch_size=8)  # 40 batches: more than the queues hold
    aug = MarkedAugment(tmp_path, slow=(-1,), crop=24, out=16, seed=5)  # marks each batch started, never slow
    expected = _expected(source, aug)
    for f in tmp_path.iterdir():
        f.unlink()
    with pl.Pipeline(source, aug, lambda x: x, workers=2, prefetch=2, timeout=60) as pipe:
        it = iter(pipe)
        got = [next(it)]
        # the queues fill up, the producer waits for room, the workers have nothing to do
        _settle(tmp_path)
        assert len(list(tmp_path.iterdir())) < len(source)
        pid = pipe.worker_pids[0]
        os.kill(pid, signal.SIGKILL)
        start = time.monotonic()
        time.sleep(0.5)  # the consumer computes meanwhile: the pipeline notices without it
        with pytest.raises(pl.WorkerDiedError, match=rf"worker 1 \(pid {pid}\) died with signal SIGKILL while idle"):
            for x in it:
                got.append(x)
        assert time.monotonic() - start < 3.0 and len(got) == 1  # raised before the queued batches
        assert pipe.get_state()["position"] == len(got) and multiprocessing.active_children() == []
        got += list(pipe)  # resume: new workers, the next batch
        assert pipe.get_state() == {"epoch": 1, "position": 0, "seed": 5}
        # between iterations (after a break the workers stay up, idle)
        for _ in pipe:
            break
        _settle(tmp_path)  # the tasks sent ahead before the break are done
        pid = pipe.worker_pids[1]
        os.kill(pid, signal.SIGKILL)
        _wait_for(lambda: not _alive(pid) or multiprocessing.active_children() == [], 10)
        with pytest.raises(pl.WorkerDiedError, match=r"worker 2 .* while idle"):
            next(iter(pipe))
        assert pipe.get_state() == {"epoch": 1, "position": 1, "seed": 5}
        after = next(iter(pipe))
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(after, _expected(source, aug, epoch=1)[1])
    assert multiprocessing.active_children() == [] and _pipeline_threads() == []


def test_worker_that_exits_is_named_with_its_exit_code(store, tmp_path):
    # class: a worker that ends on its own (os._exit in native code, a crashing extension)
    source = _source(store, shuffle=False)
    aug = MarkedAugment(tmp_path, slow=(source.batches[2],), exit_code=3, crop=24, out=16, seed=5)
    start = time.perf_counter()
    with pytest.raises(pl.WorkerDiedError, match=rf"exited with code 3 while producing batch {source.batches[2]}"):
        with pl.Pipeline(source, aug, lambda x: x, workers=2, timeout=60) as pipe:
            list(pipe)
    assert time.perf_counter() - start < 20 and multiprocessing.active_children() == []


def test_stuck_worker_timeout_says_where(store, tmp_path):
    # class: a worker alive but stuck -> TimeoutError naming the batch and the worker
    source = _source(store, shuffle=False)
    aug = MarkedAugment(tmp_path, hang=30.0, slow=(source.batches[1],), crop=24, out=16, seed=5)
    with pytest.raises(TimeoutError, match=r"batch 1 is with worker \d \(pid \d+\), alive but not finished"):
        with pl.Pipeline(source, aug, lambda x: x, workers=2, timeout=6) as pipe:
            list(pipe)
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.3])
def test_worker_killed_during_close(store, tmp_path, delay):
    # class: a worker killed while close() runs (one worker busy, one idle) -> close returns promptly

    source = _source(store, shuffle=False)
    aug = MarkedAugment(tmp_path, hang=60.0, slow=(source.batches[0],), crop=24, out=16, seed=5)
    pipe = pl.Pipeline(source, aug, lambda x: x, workers=2, timeout=60)
    it = iter(pipe)
    def consume():  # the consumer may see the killed worker before close() stops everything
        with contextlib.suppress(pl.WorkerDiedError):
            next(it, None)

    done = threading.Thread(target=consume, daemon=True)
    done.start()
    _wait_for(lambda: len(list(tmp_path.iterdir())) >= 2)
    pids = pipe.worker_pids

    def kill():
        time.sleep(delay)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                return

    killer = threading.Thread(target=kill)
    start = time.perf_counter()
    killer.start()
    pipe.close()
    elapsed = time.perf_counter() - start
    killer.join()
    done.join(10)
    assert elapsed < 3.0
    assert multiprocessing.active_children() == [] and not any(_alive(p) for p in pids)


def test_close_returns_promptly_after_an_idle_worker_is_killed(store):
    # the deadlock of a shared task queue: a worker killed holding its lock hung close()

    pipe = pl.Pipeline(_source(store), _aug(), lambda x: x, workers=2, timeout=60)
    for _ in pipe:
        break
    for pid in pipe.worker_pids:
        os.kill(pid, signal.SIGKILL)
    start = time.perf_counter()
    pipe.close()
    assert time.perf_counter() - start < 2.0 and multiprocessing.active_children() == []


CONSUMER = """
import os, sys, threading, time
from pathlib import Path

from scalelab import pipeline as pl


class Hang(pl.Augment):
    def __call__(self, images, epoch, batch):
        Path(sys.argv[2], str(os.getpid())).touch()
        time.sleep(600)


def consume(pipe):
    next(iter(pipe))


if __name__ == "__main__":
    pipe = pl.Pipeline(pl.HDF5Batches(sys.argv[1], 32, shuffle=False), Hang(crop=24, out=16), lambda x: x,
                       workers=2, timeout=600)
    if sys.argv[3] == "main":
        consume(pipe)
    else:  # workers started from another thread: the fallback (parent-watch) path
        t = threading.Thread(target=consume, args=(pipe,), daemon=True)
        t.start()
        t.join()
"""


@pytest.mark.parametrize("thread", ["main", "other"])
def test_workers_exit_when_the_consumer_is_killed(store, tmp_path, thread):
    # class: a consumer SIGKILLed while its workers hang -> the workers exit by themselves

    script = tmp_path / "consumer.py"
    script.write_text(CONSUMER)
    marks = tmp_path / "marks"
    marks.mkdir()
    proc = subprocess.Popen([sys.executable, str(script), str(store), str(marks), thread])
    try:
        _wait_for(lambda: len(list(marks.iterdir())) >= 2 or proc.poll() is not None, 120)
        assert proc.poll() is None, "the consumer ended early"
        pids = [int(p.name) for p in marks.iterdir()]
        assert all(_alive(p) for p in pids)  # both workers are inside the hanging transform
    finally:
        proc.kill()
        proc.wait()
    start = time.monotonic()
    try:
        _wait_for(lambda: not any(_alive(p) for p in pids), 5.0)
        assert time.monotonic() - start < 5.0
    finally:  # should the workers have outlived their consumer, do not leave them behind
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                if _alive(p):
                    os.kill(p, signal.SIGKILL)


# --------------------------------------------------------------------------- the explorer's model


def _model_ms(**kw):
    return pl.pipeline_model(**{"extract_ms": 2.0, "transform_ms": 12.0, "load_ms": 2.0, "step_ms": 4.0,
                                "workers": 2, "prefetch": 2, **kw})


def test_pipeline_model_sequential_is_the_sum_of_stages():
    m = _model_ms(workers=1, prefetch=0)
    assert m["ms_per_batch"] == pytest.approx(20.0, rel=1e-12)
    assert m["batches_per_s"] == pytest.approx(m["sequential_batches_per_s"], rel=1e-12)
    assert m["speedup_vs_sequential"] == pytest.approx(1.0, rel=1e-12)
    assert m["step_utilisation"] == pytest.approx(4.0 / 20.0, rel=1e-12)
    # one batch after another: every span starts when the previous one ends
    spans = sorted(m["spans"], key=lambda s: s[3])
    assert all(a[4] == pytest.approx(b[3]) for a, b in itertools.pairwise(spans))


@pytest.mark.parametrize("e,t,ld,s,w", [(2, 12, 2, 4, 2), (2, 12, 2, 4, 3), (1, 30, 3, 3, 4), (0, 5, 10, 2, 1),
                                        (4.5, 7.5, 0.5, 9.0, 8)])
def test_pipeline_model_with_room_enough_is_the_slowest_stage(e, t, ld, s, w):
    m = pl.pipeline_model(e, t, ld, s, w, prefetch=64, batches=256)
    expected = max(ld + s, (e + t) / w)
    assert m["ms_per_batch"] == pytest.approx(expected, rel=1e-9)
    assert m["bound"] == ("producers" if (e + t) / w >= ld + s else "consumer")
    # the library's bound (load in its own thread) agrees when loading costs nothing
    stages = {"extract": e / 1e3, "transform": t / 1e3, "load": 0.0}
    m0 = pl.pipeline_model(e, t, 0.0, ld + s, w, prefetch=64, batches=256)
    assert m0["ms_per_batch"] / 1e3 == pytest.approx(pl.bound_seconds(stages, (ld + s) / 1e3, w), rel=1e-9)


def test_pipeline_model_invariants():
    base = _model_ms()
    for w in (1, 2, 3, 4, 8):
        for p in (0, 1, 2, 4):
            m = _model_ms(workers=w, prefetch=p)
            # never faster than any stage allows, never slower than the sequential loop
            assert m["ms_per_batch"] >= max(6.0, 14.0 / w) - 1e-9
            assert m["ms_per_batch"] <= 20.0 + 1e-9
            assert 0 < m["step_utilisation"] <= 1 + 1e-12
            # more workers or more prefetch never slow it down
            assert _model_ms(workers=w + 1, prefetch=p)["ms_per_batch"] <= m["ms_per_batch"] + 1e-9
            assert _model_ms(workers=w, prefetch=p + 1)["ms_per_batch"] <= m["ms_per_batch"] + 1e-9
    assert base == _model_ms()  # deterministic
    assert _model_ms(workers=2, prefetch=0)["bound"] == "prefetch depth"  # (14 + 6) / 2 > 14 / 2 and 6
    lanes = {s[0] for s in base["spans"]}
    assert lanes == {"main", "worker 1", "worker 2"}
    assert {s[1] for s in base["spans"]} == {"extract", "transform", "load", "compute"}
    assert len(base["spans"]) == 4 * 12 and all(s[4] >= s[3] for s in base["spans"])
    tl = pl.model_timeline(base["spans"])
    assert len(tl.events) == 48 and set(tl.median_seconds()) == {"extract", "transform", "load", "compute"}


@pytest.mark.parametrize("kw,match", [({"extract_ms": -1.0}, "extract_ms must be a finite number"),
                                      ({"step_ms": float("nan")}, "step_ms must be"),
                                      ({"load_ms": "2"}, "load_ms must be"),
                                      ({"workers": 0}, "workers must be an integer >= 1"),
                                      ({"workers": 1.5}, "workers must be an integer"),
                                      ({"prefetch": -1}, "prefetch must be an integer >= 0"),
                                      ({"batches": 4}, "batches must be an integer >= 8"),
                                      ({"extract_ms": 0.0, "transform_ms": 0.0, "load_ms": 0.0, "step_ms": 0.0},
                                       "at least one stage time must be positive")])
def test_pipeline_model_rejects_bad_input(kw, match):
    with pytest.raises(ValueError, match=match):
        _model_ms(**kw)


def test_sleep_stages_pickle_and_run():
    src, aug = pl.SleepBatches(4, 0.0), pl.SleepAugment(transform_s=0.0)
    src2, aug2 = pickle.loads(pickle.dumps(src)), pickle.loads(pickle.dumps(aug))
    assert len(src2) == 4 and src2.order(0, 0) == [0, 1, 2, 3] and aug2.transform_s == 0.0
    assert aug2(src2.read(3), 0, 3).ravel()[0] == 3
    with pytest.raises(ValueError, match="extract_s"):
        pl.SleepBatches(4, -1.0)


def test_pipeline_explorer_and_measure():
    e = pl.pipeline_explorer()
    assert e.prediction == pl.pipeline_model(**e.settings, **e.context)
    e.set(workers=3, prefetch=4)
    assert e.settings["workers"] == 3
    assert e.prediction == pl.pipeline_model(**e.settings, **e.context)
    assert "image/png" in e._repr_mimebundle_()
    start = time.perf_counter()
    got = e.measure_now()
    assert time.perf_counter() - start < 10
    assert got is not None and got["workers"] == 3
    # sleeping stages: the real pipeline comes close to the model, never faster than its bound
    assert 0.6 * e.prediction["batches_per_s"] < got["batches_per_s"] < 1.1 * e.prediction["batches_per_s"]
    assert len(e.measured) == 1 and multiprocessing.active_children() == []
