import math
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scalelab import hardware, monitor

# --------------------------------------------------------------------------- the sampler


def _sampler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "scalelab-sampler"]


def test_sampler_collects_at_about_the_interval_and_stops():
    sampler = monitor.Sampler(interval=0.02)
    with sampler:
        assert sampler.running
        time.sleep(0.4)
    samples = sampler.samples
    assert not sampler.running and not _sampler_threads()
    # about 20 readings; generous bounds, a shared machine may delay the thread
    assert 5 <= len(samples) <= 22
    times = [s.t for s in samples]
    assert times == sorted(times) and times[0] >= 0.02 * 0.9
    assert np.median(np.diff(times)) == pytest.approx(0.02, rel=1.0)
    for s in samples:
        assert s.process_cpu >= 0 and 0 <= s.system_cpu <= 100 and s.rss_bytes > 0
        assert s.children_cpu is None  # not asked for
    if jax.default_backend() == "cpu":
        assert all(s.device_bytes is None and s.gpu_util is None for s in samples)
    assert sampler.stop() == samples  # stopping again is harmless


def test_sampler_stops_when_the_body_raises():
    sampler = monitor.Sampler(interval=0.01)
    with pytest.raises(ZeroDivisionError), sampler:
        time.sleep(0.05)
        1 / 0  # noqa: B018
    assert not sampler.running and not _sampler_threads()
    assert len(sampler.samples) >= 1
    sampler.start()  # and it can run again
    time.sleep(0.03)
    assert len(sampler.stop()) >= 1


def test_sampler_reports_a_failure_in_its_thread(monkeypatch):
    sampler = monitor.Sampler(interval=0.01)

    def broken():
        raise OSError("no /proc")

    monkeypatch.setattr(sampler, "sample_once", broken)
    sampler.start()
    time.sleep(0.05)
    with pytest.raises(RuntimeError, match="sampler failed"):
        sampler.stop()
    assert not _sampler_threads()


def test_sampler_counts_child_processes():
    import subprocess
    import sys

    sampler = monitor.Sampler(interval=0.05, children=True, children_refresh=0.05)
    with sampler:
        child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 0.6: pass"])
        child.wait(timeout=30)
    samples = sampler.samples
    assert all(s.children_cpu is not None for s in samples)
    assert max(s.children_cpu for s in samples) > 10  # the busy child used a good part of a core


def test_sampler_rejects_bad_input():
    for bad in (0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="interval"):
            monitor.Sampler(interval=bad)
    with pytest.raises(TypeError, match="interval"):
        monitor.Sampler(interval="fast")
    with pytest.raises(TypeError, match="interval"):
        monitor.Sampler(interval=True)
    sampler = monitor.Sampler(0.05).start()
    try:
        with pytest.raises(RuntimeError, match="already running"):
            sampler.start()
    finally:
        sampler.stop()


def test_sample_cost_is_small_and_positive():
    cost = monitor.Sampler(0.1).sample_cost(n=5)
    assert 0 < cost < 0.1


def test_device_memory_matches_the_backend():
    mem = monitor.device_memory()
    if jax.default_backend() == "cpu":
        assert mem is None
    else:
        assert mem is not None and mem["peak_bytes_in_use"] >= mem["bytes_in_use"] >= 0


def test_nvml_absent_or_working_never_raises():
    reader = monitor.gpu_utilization_reader()
    assert reader is None or 0 <= reader() <= 100


# --------------------------------------------------------------------------- saving


def _samples(n: int = 4) -> list[monitor.Sample]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        out.append(monitor.Sample(t=0.1 * (i + 1) + 1e-13, process_cpu=float(rng.random() * 300),
                                  system_cpu=float(rng.random() * 100), rss_bytes=int(1e8) + i,
                                  children_cpu=None if i % 2 else 12.5, device_bytes=None if i == 0 else 2**33 + i,
                                  device_peak_bytes=None if i == 0 else 2**34, gpu_util=None if i < 2 else 97.0))
    return out


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_saved_samples_round_trip(tmp_path, suffix):
    samples = _samples()
    path = monitor.save_samples(samples, tmp_path / "sub" / f"samples{suffix}")
    assert path.exists() and not list(path.parent.glob("*.tmp"))
    assert monitor.load_samples(path) == samples


def test_save_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="no samples"):
        monitor.save_samples([], tmp_path / "s.csv")
    with pytest.raises(ValueError, match=r"\.csv or \.json"):
        monitor.save_samples(_samples(), tmp_path / "s.txt")
    with pytest.raises(TypeError, match="Sample"):
        monitor.save_samples([{"t": 1}], tmp_path / "s.csv")
    assert not list(tmp_path.iterdir())
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="header"):
        monitor.load_samples(tmp_path / "other.csv")


def test_summarize_and_its_errors():
    samples = _samples()
    s = monitor.summarize(samples)
    assert s["samples"] == 4 and s["seconds"] == samples[-1].t
    assert s["rss_peak_bytes"] == int(1e8) + 3
    assert s["process_cpu_max"] == max(x.process_cpu for x in samples)
    assert s["gpu_util_max"] == 97.0 and s["children_cpu_max"] == 12.5
    with pytest.raises(ValueError, match="no samples"):
        monitor.summarize([])
    with pytest.raises(ValueError, match="no samples"):
        monitor.plot_samples([])


def test_plot_samples_and_live_plot_headless():
    from scalelab import plot

    fig = monitor.plot_samples(_samples(), marks=[0.15])
    assert len(fig.axes) == 3  # CPU, memory, GPU (the samples have GPU readings)
    plot.plt.close(fig)
    sampler = monitor.Sampler(0.01)
    live = monitor.LivePlot(sampler, live=False)
    with sampler:
        live.on_train_begin(None, {})
        time.sleep(0.05)
        live.on_epoch_end(None, 0, {})
        live.on_train_end(None, [])
    assert live.figure is not None and live.redraws == 1 and len(live.marks) == 1
    plot.plt.close(live.figure)
    with pytest.raises(ValueError, match="live"):
        monitor.LivePlot(sampler, live="sometimes")


# --------------------------------------------------------------------------- overhead


def test_overhead_arithmetic():
    ov = monitor.Overhead(off_s=(1.0, 2.0, 1.0), on_s=(1.1, 2.2, 1.0), interval=0.1, steps_per_repeat=5,
                          samples=3, sample_cost_s=1e-4)
    assert ov.ratios == pytest.approx([1.1, 1.1, 1.0])
    assert ov.fraction == pytest.approx(0.1)
    assert ov.fraction_best == pytest.approx(0.0)
    assert ov.expected == pytest.approx(1e-3)
    assert ov.noise >= 0 and ov.as_dict()["pairs"] == 3


def test_measure_overhead_runs_both_conditions():
    calls = []

    def run():
        calls.append(time.perf_counter())
        time.sleep(0.02)
        return jnp.ones(())

    ov = monitor.measure_overhead(run, steps=2, repeats=2, interval=0.005)
    assert len(ov.off_s) == len(ov.on_s) == 2 and len(calls) == 5  # one warm-up + 2 pairs
    assert all(t == pytest.approx(0.01, rel=1.0) for t in ov.off_s + ov.on_s)
    assert ov.samples >= 2 and not _sampler_threads()
    with pytest.raises(ValueError, match="interval"):
        monitor.measure_overhead(run, steps=2, interval=0)


def test_repeat_steps_blocks_and_counts():
    count = []
    run = monitor.repeat_steps(lambda: count.append(1) or jnp.zeros(()), 25, block_every=10)
    run()
    assert len(count) == 25
    assert monitor.steps_for(lambda: jnp.zeros(()), 1e-6, block_every=10) == 10


# --------------------------------------------------------------------------- step timer and profiler


class FakeClock:
    def __init__(self, ticks):
        self.ticks = iter(ticks)

    def __call__(self):
        return next(self.ticks)


def test_step_timer_accounting():
    # per step: input, dispatch, device
    phases = [(0.5, 3.0, 0.2), (0.1, 0.01, 0.05), (0.2, 0.02, 0.04), (0.1, 0.01, 0.06)]
    ticks, t = [], 10.0
    for phase in phases:
        ticks.append(t)
        for d in phase:
            t += d
            ticks.append(t)
    timer = monitor.StepTimer(clock=FakeClock(ticks), block=lambda out: out)
    seen = []
    records = timer.run(iter([(i,) for i in range(4)]), lambda i: seen.append(i) or i, 4)
    assert seen == [0, 1, 2, 3] and len(records) == 4
    for r, (i, d, dev) in zip(records, phases, strict=True):
        assert (r.input_s, r.dispatch_s, r.device_s) == pytest.approx((i, d, dev))
        assert r.total_s == pytest.approx(i + d + dev)
    totals = timer.totals()
    assert totals["total_s"] == pytest.approx(t - 10.0)
    assert totals["total_s"] == pytest.approx(totals["input_s"] + totals["dispatch_s"] + totals["device_s"])
    b = timer.breakdown()
    assert b["steady"]["input_s"] == pytest.approx(0.1) and b["steady"]["device_s"] == pytest.approx(0.05)
    assert b["steady"]["dispatch_s"] == pytest.approx(0.01)
    assert b["compile_s"] == pytest.approx(3.0 + 0.2 - 0.01 - 0.05)
    assert b["first"]["total_s"] == pytest.approx(3.7)


def test_step_timer_errors():
    timer = monitor.StepTimer()
    with pytest.raises(ValueError, match="no steps"):
        timer.totals()
    with pytest.raises(ValueError, match="at least 2"):
        timer.breakdown()
    with pytest.raises(ValueError, match="ran out after 2 of 3"):
        timer.run(iter([(1,), (2,)]), lambda x: x, 3)
    with pytest.raises(ValueError, match="steps"):
        timer.run([], lambda: None, 0)


def test_step_timer_times_a_real_jitted_step():
    f = jax.jit(lambda x: (x @ x).sum())
    x = jnp.ones((64, 64))
    timer = monitor.StepTimer()
    timer.run(monitor.slow_input(((x,) for _ in range(3)), 0.01), f, 3)
    b = timer.breakdown()
    assert b["steady"]["input_s"] >= 0.009  # the emulated slow input
    assert b["first"]["dispatch_s"] > b["steady"]["dispatch_s"]  # the first call compiled


def test_profile_steps_writes_a_trace(tmp_path):
    f = jax.jit(lambda x: jnp.tanh(x @ x).sum())
    x = jnp.ones((32, 32))
    files = monitor.profile_steps(lambda: f(x), 2, tmp_path / "trace")
    names = [r["file"] for r in files]
    assert any(n.endswith(".xplane.pb") for n in names)
    perfetto = [n for n in names if n.endswith("perfetto_trace.json.gz")]
    assert perfetto and all(r["bytes"] > 0 for r in files)
    rows = monitor.trace_summary(tmp_path / "trace" / perfetto[0])
    assert rows == sorted(rows, key=lambda r: -r["total ms"])
    with pytest.raises(ValueError, match="steps"):
        monitor.profile_steps(lambda: f(x), 0, tmp_path / "x")


def test_busy_fraction_counts_overlaps_once():
    from scalelab import pipeline as pl

    tl = pl.Timeline()
    tl.record("compute", "main", 0, 0.0, 1.0)
    tl.record("compute", "main", 1, 0.5, 1.5)
    tl.record("compute", "main", 2, 3.0, 4.0)
    tl.record("transform", "w", 0, 1.5, 3.0)
    assert monitor.busy_fraction(tl, "compute", 0.0, 4.0) == pytest.approx(2.5 / 4)
    assert monitor.busy_fraction(tl, "compute", 1.0, 3.5) == pytest.approx(1.0 / 2.5)
    assert monitor.busy_fraction(tl, "load", 0.0, 4.0) == 0.0
    with pytest.raises(ValueError, match="end > start"):
        monitor.busy_fraction(tl, "compute", 1.0, 1.0)


# --------------------------------------------------------------------------- fit, FLOPs and cost


@settings(max_examples=40, deadline=None)
@given(a=st.floats(0, 1), b=st.floats(1e-12, 1e-6),
       work=st.lists(st.floats(1e3, 1e10), min_size=2, max_size=8, unique=True))
def test_fit_recovers_a_line(a, b, work):
    if max(work) - min(work) < 1e-3 * max(work):
        return  # too close together to determine a slope
    seconds = [a + b * w for w in work]
    fit = monitor.fit_linear(work, seconds)
    assert fit.b == pytest.approx(b, rel=1e-5)
    assert fit.a == pytest.approx(a, rel=1e-5, abs=1e-9 + 1e-6 * b * max(work))
    target = 10 * max(work)
    assert fit.predict(target) == pytest.approx(a + b * target, rel=1e-5)
    assert fit.r2 == pytest.approx(1.0, abs=1e-6)
    assert monitor.relative_error(fit.predict(target), a + b * target) == pytest.approx(0, abs=1e-5)


def test_fit_and_error_reject_bad_input():
    with pytest.raises(ValueError, match="2 distinct"):
        monitor.fit_linear([1.0], [2.0])
    with pytest.raises(ValueError, match="2 distinct"):
        monitor.fit_linear([1.0, 1.0], [2.0, 3.0])
    with pytest.raises(ValueError, match="equal length"):
        monitor.fit_linear([1.0, 2.0], [2.0])
    with pytest.raises(ValueError, match="finite"):
        monitor.fit_linear([1.0, float("nan")], [2.0, 3.0])
    with pytest.raises(ValueError, match="positive measured"):
        monitor.relative_error(1.0, 0.0)
    assert monitor.relative_error(1.5, 1.0) == pytest.approx(0.5)


def test_train_step_flops_scale_with_the_batch():
    small = monitor.train_step_flops(lambda: monitor.mini_model(32), 16, 64)
    big = monitor.train_step_flops(lambda: monitor.mini_model(32), 64, 64)
    # the matmuls dominate: forward + backward ~ 6 x (64*32 + 32*32 + 32*10) FLOPs per example
    per_example = 6 * (64 * 32 + 32 * 32 + 32 * 10)
    assert (big - small) / 48 == pytest.approx(per_example, rel=0.25)
    step = monitor.CompiledStep(monitor.mini_model(32), 16, 64)
    assert step.flops == pytest.approx(small, rel=1e-6)
    losses = [float(step()) for _ in range(5)]
    assert losses[-1] < losses[0]  # it trains


def test_cost_estimate_arithmetic():
    p = monitor.price("Lambda H100 SXM")
    peak = monitor.peak_flops(p.chip)
    assert peak == next(s.peak_16bit for s in hardware.SPECS if s.name == p.chip)
    flops = peak * 0.5 * 3600  # one hour at 50% utilisation
    one = monitor.estimate_run(flops, p.name, mfu=0.5)
    assert one["hours"] == pytest.approx(1.0) and one["usd"] == pytest.approx(p.usd_per_chip_hour)
    eight = monitor.estimate_run(flops, p.name, mfu=0.5, chips=8)
    assert eight["hours"] == pytest.approx(1 / 8) and eight["usd"] == pytest.approx(one["usd"])
    quarter = monitor.estimate_run(flops, p.name, mfu=0.25)
    assert quarter["hours"] == pytest.approx(2.0) and quarter["usd"] == pytest.approx(2 * p.usd_per_chip_hour)
    rows = monitor.cost_table(flops, 0.5)
    assert [r["hardware"] for r in rows] == [q.name for q in monitor.PRICES]


def test_price_table_has_provenance_for_every_row():
    for p in monitor.PRICES:
        assert p.usd_per_chip_hour > 0 and p.vendor_url.startswith("https://")
        assert p.transcribed_by.startswith("https://") and len(p.read_on) == 10
        assert monitor.peak_flops(p.chip) > 0  # every chip has a published spec
    assert len(monitor.price_table()) == len(monitor.PRICES)


def test_cost_estimate_rejects_bad_input():
    with pytest.raises(ValueError, match=r"unknown hardware 'H900'.*Lambda H100 SXM"):
        monitor.estimate_run(1e18, "H900", 0.4)
    with pytest.raises(TypeError, match="string"):
        monitor.price(3)
    for mfu in (0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="mfu"):
            monitor.estimate_run(1e18, "Lambda H100 SXM", mfu)
    for flops in (0, -1.0, math.inf):
        with pytest.raises(ValueError, match="total_flops"):
            monitor.estimate_run(flops, "Lambda H100 SXM", 0.4)
    with pytest.raises(ValueError, match="chips"):
        monitor.estimate_run(1e18, "Lambda H100 SXM", 0.4, chips=0)
    with pytest.raises(ValueError, match="no published spec"):
        monitor.peak_flops("TPU v9")


def test_round_robin_takes_turns():
    calls = []
    fns = [lambda i=i: calls.append(i) or jnp.zeros(()) for i in range(3)]
    times = monitor.time_round_robin(fns, repeat=4, min_time=0.0, warmup=1)
    assert [len(t) for t in times] == [4, 4, 4] and all(t >= 0 for row in times for t in row)
    assert calls[-12:] == [0, 1, 2] * 4  # rounds, each function once per round
    with pytest.raises(ValueError, match="repeat"):
        monitor.time_round_robin(fns, repeat=0)


# --------------------------------------------------------------------------- traces as timelines


def _write_trace(path, events):
    import gzip
    import json

    with gzip.open(path, "wt", encoding="utf-8") as handle:
        json.dump({"displayTimeUnit": "ns", "traceEvents": events}, handle)
    return path


def _meta(pid, tid, name, index):
    return [{"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": name}},
            {"ph": "M", "pid": pid, "tid": tid, "name": "thread_sort_index", "args": {"sort_index": index}}]


def test_trace_events_threads_categories_and_nesting(tmp_path):
    events = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
              *_meta(1, 10, "python", 1), *_meta(1, 20, "tf_XLAEigen/123", 2), *_meta(1, 30, "tf_XLAEigen/-456", 3)]
    x = lambda tid, name, ts, dur: {"ph": "X", "pid": 1, "tid": tid, "name": name, "ts": ts, "dur": dur}  # noqa: E731
    events += [x(10, "train", 1000, 500), x(10, "PjitFunction(step)", 1010, 100), x(10, "$foo.py:1 f", 1020, 10),
               x(10, "DevicePut", 1050, 20), x(20, "ThunkExecutor::Execute", 1100, 300),
               x(20, "dot.1", 1150, 100), x(20, "ThreadpoolListener::Record", 1160, 1), x(20, "end: dot.1", 1250, 0),
               x(30, "fusion.2", 1200, 50)]
    path = _write_trace(tmp_path / "t.json.gz", events)
    ev = monitor.trace_events(path)
    assert [e.thread for e in ev] == ["python"] * 3 + ["XLAEigen #1"] * 2 + ["XLAEigen #2"]
    cat = {e.name: (e.category, e.depth) for e in ev}
    assert cat == {"train": ("step", 0), "PjitFunction(step)": ("dispatch", 0), "DevicePut": ("runtime", 1),
                   "ThunkExecutor::Execute": ("program", 0), "dot.1": ("kernel", 1), "fusion.2": ("kernel", 0)}
    assert ev[0].start_ms == 0.0 and ev[0].end_ms == pytest.approx(0.5)
    assert any(e.category == "python" for e in monitor.trace_events(path, python=True))
    rows = {r["thread"]: r for r in monitor.trace_threads(ev)}
    assert rows["python"]["busy ms"] == pytest.approx(0.1) and rows["python"]["kernels"] == 0
    assert rows["XLAEigen #1"]["kernels"] == 1 and rows["XLAEigen #1"]["kernel ms"] == pytest.approx(0.1)
    fig = monitor.plot_trace(ev, title="t")
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["python", "XLAEigen #1", "XLAEigen #2"]
    with pytest.raises(ValueError, match="no trace events"):
        monitor.plot_trace([])
    assert monitor.trace_events(_write_trace(tmp_path / "empty.json.gz", [])) == []


def test_trace_of_a_real_step_and_shown_paths(tmp_path):
    import socket

    f = jax.jit(lambda x: jnp.tanh(x @ x).sum())
    x = jnp.ones((64, 64))
    files = monitor.profile_steps(lambda: f(x), 3, tmp_path / "trace")
    host = socket.gethostname()
    for r in files:
        assert r["shown"].startswith("plugins/profile/RUN/") and (host not in r["shown"] or host == "HOST")
    perfetto = next(r["file"] for r in files if r["file"].endswith("perfetto_trace.json.gz"))
    ev = monitor.trace_events(tmp_path / "trace" / perfetto)
    assert sum(e.category == "step" for e in ev) == 3
    assert any(e.category in ("program", "kernel") for e in ev)
    assert monitor._shown_path(f"plugins/profile/2026_01_01_00_00_00/{host}.xplane.pb") == \
        "plugins/profile/RUN/HOST.xplane.pb"


# --------------------------------------------------------------------------- MFU and HFU


def test_device_peak_on_cpu_is_the_hardware_estimate():
    peak = monitor.device_peak(jax.devices("cpu")[0])
    est = hardware.estimate_peak(hardware.cpu_info())
    assert peak.estimated and peak.flops == est.fp32 and "estimate" in peak.source
    assert monitor.device_peak(jax.devices("cpu")[0], "bfloat16").flops == (est.bf16 or est.fp32)
    with pytest.raises(ValueError, match="dtype"):
        monitor.device_peak(dtype="int8")


def test_device_peak_maps_accelerator_kinds_to_specs():
    class Fake:
        def __init__(self, platform, kind):
            self.platform, self.device_kind = platform, kind

    spec = {s.name: s for s in hardware.SPECS}
    h200 = monitor.device_peak(Fake("gpu", "NVIDIA H200"))
    assert not h200.estimated and h200.flops == spec["NVIDIA H200 SXM"].peak_tf32
    assert monitor.device_peak(Fake("gpu", "NVIDIA A100-SXM4-80GB"), "bfloat16").flops == 312e12
    assert monitor.device_peak(Fake("tpu", "TPU v5 lite")).flops == spec["TPU v5e"].peak_16bit
    unknown = monitor.device_peak(Fake("gpu", "Some GPU"))
    assert unknown.flops is None and "no spec" in unknown.source


def test_utilisation_arithmetic_and_errors():
    assert monitor.utilisation(2e9, 0.01, 1e12) == pytest.approx(0.2)
    for bad in (0, -1.0, math.nan, math.inf, True):
        with pytest.raises(ValueError):
            monitor.utilisation(bad, 0.01, 1e12)
    pred = {"target_flops": 1e9, "measured_s": 0.01}
    peak = monitor.DevicePeak("x", "float32", 1e11, True, "test")
    assert monitor.measured_mfu(pred, peak) == {"mfu": pytest.approx(1.0), "usable": pytest.approx(1.0),
                                                "peak_flops": 1e11, "peak_estimated": True, "peak_source": "test"}
    assert monitor.measured_mfu({"target_flops": 4e9, "measured_s": 0.01}, peak)["usable"] == 1.0


def test_scanned_flops_count_every_layer_and_the_recompute():
    depth, width, batch = 4, 64, 32
    plain = monitor.scanned_flops("none", depth, width, batch)
    remat = monitor.scanned_flops("full", depth, width, batch)
    if jax.default_backend() == "cpu":
        assert plain["body_counted_once"] and plain["flops"] == depth * plain["counted"]
    assert plain["flops"] == pytest.approx(6 * batch * width * width * depth, rel=0.05)
    assert remat["flops"] / plain["flops"] == pytest.approx(4 / 3, rel=0.05)


def test_remat_utilisation_reports_consistent_mfu_and_hfu():
    r = monitor.remat_utilisation(2, 64, 64, repeat=2)
    assert r["recompute_ratio"] > 1
    assert r["remat_hfu"] / r["remat_mfu"] == pytest.approx(r["recompute_ratio"])
    assert r["mfu"] == pytest.approx(r["model_flops"] / r["step_s"] / r["peak_flops"])
    with pytest.raises(ValueError, match="no peak"):
        monitor.remat_utilisation(2, 64, 64, peak=monitor.DevicePeak("x", "float32", None, False, "none"))


def test_cpu_by_stage_splits_readings_by_stage():
    from scalelab import pipeline as pl

    tl = pl.Timeline()
    tl.record("extract", "main", 0, 10.0, 10.1)
    tl.record("compute", "main", 0, 10.1, 10.2)
    tl.record("extract", "main", 1, 10.2, 10.3)
    samples = [monitor.Sample(t=t, process_cpu=c, system_cpu=0.0, rss_bytes=1) for t, c in
               ((0.1, 100.0), (0.2, 10.0), (0.3, 90.0))]
    run = monitor.PipelineRun("seq", tl, samples, offset=0.0, seconds_per_batch=0.1, compute_busy=1 / 3, host_cores=0.6)
    split = monitor.cpu_by_stage(run, "compute", interval=0.1)
    assert split["during"] == pytest.approx(0.1) and split["otherwise"] == pytest.approx(0.95)
    assert split["readings_during"] == 1 and split["readings_otherwise"] == 2
    with pytest.raises(ValueError, match="no events"):
        monitor.cpu_by_stage(monitor.PipelineRun("e", pl.Timeline(), samples, 0.0, 0.1, 0.0, 0.0))
