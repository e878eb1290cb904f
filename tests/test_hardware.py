import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scalelab import hardware

ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC 9B14
cpu MHz\t\t: 2600.000
flags\t\t: fpu sse sse2 avx fma avx2 avx512f avx512_bf16

processor\t: 1
model name\t: ignored second block
"""
SAPPHIRE = """vendor_id : GenuineIntel
cpu family : 6
model name : Intel Xeon Platinum 8480+
cpu MHz : 2000.0
flags : sse sse2 avx avx2 fma avx512f amx_bf16 amx_tile
"""
ARM = """processor : 0
Features : fp asimd evtstrm aes
CPU implementer : 0x41
"""


ZEN3 = """vendor_id : AuthenticAMD
cpu family : 25
model : 1
model name : AMD EPYC 7B13
cpu MHz : 2450.000
flags : sse sse2 avx fma avx2
"""
ZEN2 = """vendor_id : AuthenticAMD
cpu family : 23
model : 49
model name : AMD EPYC 7742
cpu MHz : 2250.000
flags : sse sse2 avx fma avx2
"""
ZEN1 = """vendor_id : AuthenticAMD
cpu family : 23
model : 1
model name : AMD EPYC 7601
cpu MHz : 2200.000
flags : sse sse2 avx fma avx2
"""
SILVER = """vendor_id : GenuineIntel
cpu family : 6
model : 85
model name : Intel(R) Xeon(R) Silver 4114 CPU @ 2.20GHz
cpu MHz : 2200.0
flags : sse sse2 avx avx2 fma avx512f
"""
HASWELL = """vendor_id : GenuineIntel
cpu family : 6
model : 63
model name : Intel(R) Xeon(R) CPU E5-2699 v3
cpu MHz : 2300.0
flags : sse sse2 avx avx2 fma
"""
SANDY = """vendor_id : GenuineIntel
cpu family : 6
model : 45
model name : Intel(R) Xeon(R) CPU E5-2670
cpu MHz : 2600.0
flags : sse sse2 avx
"""


def _cpu(text, cores, max_khz=None):
    cpu = hardware.cpu_info(text, max_freq_khz=max_khz)
    return hardware.CpuInfo(**{**cpu.__dict__, "cores": cores})


def test_cpu_info_parses_first_block():
    cpu = hardware.cpu_info(ZEN4)
    assert cpu.model == "AMD EPYC 9B14" and cpu.vendor == "AuthenticAMD" and cpu.family == 25
    assert cpu.model_number == 17 and cpu.max_clock_ghz is None  # no cpufreq given with a text
    assert cpu.clock_ghz == pytest.approx(2.6)
    assert {"avx512f", "fma", "avx512_bf16"} <= cpu.flags
    assert cpu.cores >= 1
    assert hardware.cpu_info(ZEN4, max_freq_khz="3700000\n").max_clock_ghz == pytest.approx(3.7)


def test_estimate_peak_zen4_counts_double_pumped_avx512():
    peak = hardware.estimate_peak(_cpu(ZEN4, 2))
    # 512-bit registers, but two 256-bit FMA pipes: 8 lanes x 2 (FMA) x 2 = 32 FLOPs/cycle/core
    assert peak.microarchitecture == "AMD Zen 4"
    assert (peak.simd_bits, peak.datapath_bits, peak.fma_units) == (512, 256, 2)
    assert peak.flops_per_cycle_fp32 == 32
    assert peak.fp32 == pytest.approx(2 * 2.6e9 * 32)
    assert peak.bf16 == pytest.approx(2 * peak.fp32)
    assert peak.clock_source.startswith("reported")
    assert any("double-pumped" in a for a in peak.assumptions)
    assert any("boost clock is unknown" in a for a in peak.assumptions)


def test_estimate_peak_uses_cpufreq_boost_clock():
    peak = hardware.estimate_peak(_cpu(ZEN4, 2, max_khz="3700000"))
    assert peak.clock_ghz == pytest.approx(3.7) and peak.reported_clock_ghz == pytest.approx(2.6)
    assert peak.clock_source == "cpufreq max (boost)"
    assert peak.fp32 == pytest.approx(2 * 3.7e9 * 32)


@pytest.mark.parametrize(("text", "name", "per_cycle"), [
    (ZEN3, "AMD Zen 3", 32), (ZEN2, "AMD Zen 2", 32), (ZEN1, "AMD Zen / Zen+", 16),
    (SAPPHIRE, "Intel core with AVX-512", 64), (SILVER, "Intel core with AVX-512", 32),
    (HASWELL, "Intel Haswell or later (AVX2)", 32), (SANDY, "Intel Sandy / Ivy Bridge (AVX, no FMA)", 16),
])
def test_estimate_peak_per_microarchitecture(text, name, per_cycle):
    cpu = _cpu(text, 4)
    peak = hardware.estimate_peak(cpu)
    assert peak.microarchitecture == name and hardware.microarchitecture(cpu).known
    assert peak.flops_per_cycle_fp32 == per_cycle
    assert peak.fp32 == pytest.approx(4 * cpu.clock_ghz * 1e9 * per_cycle)


def test_estimate_peak_amx_and_unknown_arm():
    peak = hardware.estimate_peak(_cpu(SAPPHIRE, 4))
    assert peak.bf16 == pytest.approx(4 * 2.0e9 * 1024)
    arm_cpu = hardware.CpuInfo(**{**_cpu(ARM, 1).__dict__, "arch": "aarch64"})
    arm = hardware.estimate_peak(arm_cpu)
    assert arm.microarchitecture == "unknown" and not hardware.microarchitecture(arm_cpu).known
    assert arm.simd_bits == 128 and arm.fp32 is None  # no clock reported: no estimate
    assert any("no estimate" in a for a in arm.assumptions)
    assert any("not identified" in a for a in arm.assumptions)


def test_reconcile_explains_a_fraction_above_one():
    peak = hardware.estimate_peak(_cpu(ZEN4, 2))  # 166.4 GFLOP/s at the reported 2.6 GHz
    above = hardware.reconcile(1.25 * peak.fp32, peak)
    assert above["fraction"] == pytest.approx(1.25)
    assert above["implied_clock_ghz"] == pytest.approx(1.25 * 2.6)
    assert "estimate is wrong" in above["explanation"] and "boost" in above["explanation"]
    below = hardware.reconcile(0.5 * peak.fp32, peak)
    assert below["fraction"] == pytest.approx(0.5) and "below it" in below["explanation"]
    boosted = hardware.estimate_peak(_cpu(ZEN4, 2, max_khz="3700000"))
    assert "above even the boost clock" in hardware.reconcile(2 * boosted.fp32, boosted)["explanation"]
    no_clock = hardware.estimate_peak(hardware.CpuInfo(**{**_cpu(ARM, 1).__dict__}))
    assert hardware.reconcile(1e9, no_clock)["fraction"] is None
    with pytest.raises(ValueError, match="positive"):
        hardware.reconcile(0.0, peak)


@settings(max_examples=60, deadline=None)
@given(st.floats(1e-3, 1e4), st.floats(1e9, 1e15), st.floats(1e9, 1e13))
def test_roofline_properties(intensity, peak, bw):
    y = float(hardware.attainable(intensity, peak, bw))
    assert y <= peak * (1 + 1e-12) and y <= intensity * bw * (1 + 1e-12)
    ridge = hardware.ridge_point(peak, bw)
    if intensity < ridge:
        assert y == pytest.approx(intensity * bw)
    else:
        assert y == pytest.approx(peak)
    assert float(hardware.attainable(intensity * 2, peak, bw)) >= y


def test_roofline_rejects_nonpositive():
    with pytest.raises(ValueError, match="positive"):
        hardware.ridge_point(0, 1)
    with pytest.raises(ValueError, match="positive"):
        hardware.attainable(1.0, 1.0, -1)


def test_scalar_vector_matrix_same_flops():
    rows = hardware.scalar_vector_matrix(16, repeat=1)
    assert [r["processing"] for r in rows] == ["interpreter", "scalar", "vector", "matrix"]
    assert {r["flops"] for r in rows} == {2 * 16**3}  # 4,096 elements: under the interpreter cap
    assert rows[3]["bytes_per_flop"] == pytest.approx(6 / 16)
    assert all(r["bytes_per_flop"] == pytest.approx(6) for r in rows[:3])
    with pytest.raises(ValueError, match="m must be"):
        hardware.scalar_vector_matrix(1)


def test_interpreter_row_is_capped(monkeypatch):
    monkeypatch.setattr(hardware, "INTERPRETER_MAX_ELEMENTS", 1000)
    rows = {r["processing"]: r for r in hardware.scalar_vector_matrix(16, repeat=1)}
    assert rows["interpreter"]["flops"] == 2000 and rows["scalar"]["flops"] == 2 * 16**3


def test_axpy_kernels_agree():
    x = np.arange(5, dtype=np.float32)
    y = np.ones(5, dtype=np.float32)
    assert hardware.axpy_python(2.0, x.tolist(), y.tolist()) == (2 * x + y).tolist()
    np.testing.assert_allclose(hardware.axpy_vector(np.float32(2), x, y), 2 * x + y)
    np.testing.assert_allclose(hardware.axpy_scalar(np.float32(2), x, y), 2 * x + y)
    step = hardware.InPlace(np.float32(2), x, y)
    np.testing.assert_allclose(step(), 2 * x + y)
    np.testing.assert_allclose(step(), 4 * x + y)  # y <- a*x + y again, in its own buffer
    a = np.arange(9, dtype=np.float32).reshape(3, 3)
    np.testing.assert_allclose(hardware.matmul(a, a), a @ a)
    np.testing.assert_allclose(hardware.matmul_highest(a, a), a @ a)


def test_float32_label_names_the_default_precision():
    assert hardware.float32_label("cpu") == "float32"
    assert "TF32" in hardware.float32_label("gpu") and "bf16" in hardware.float32_label("tpu")
    assert "default" in hardware.float32_label("other")


def test_matmul_sweep_rows_and_errors():
    rows = hardware.matmul_sweep([8, 16], dtypes=["float32", "bfloat16"], repeat=1)
    assert sorted((r["impl"], r["dtype"], r["precision"], r["n"]) for r in rows) == sorted(
        (impl, dtype, precision, n) for n in (8, 16) for impl, dtype, precision in [
            ("jax", "float32", "default"), ("jax", "float32", "highest"),
            ("jax", "bfloat16", "default"), ("numpy", "float32", "float32")])
    assert not any(r["precision"] == "highest" for r in hardware.matmul_sweep([8], repeat=1, highest=False))
    for r in rows:
        assert r["flops_per_s"] == pytest.approx(2 * r["n"] ** 3 / r["seconds"])
    with pytest.raises(ValueError, match="dtype"):
        hardware.matmul_sweep([8], dtypes=["int8"])
    with pytest.raises(ValueError, match="positive"):
        hardware.matmul_sweep([])


def test_bandwidth_counts_bytes():
    rows = hardware.bandwidth(1 << 20, repeat=1)
    n = (1 << 20) // 4
    assert {r["kernel"]: r["bytes"] for r in rows} == {
        "numpy copy": 8 * n, "numpy add": 12 * n, "jax triad x+2y, fresh output": 12 * n,
        "jax triad x+2y, in place": 12 * n}
    assert tuple(r["kernel"] for r in rows) == hardware.BANDWIDTH_KERNELS
    with pytest.raises(ValueError, match="4 KiB"):
        hardware.bandwidth(100)
    with pytest.raises(ValueError, match="repeat"):
        hardware.bandwidth(1 << 20, repeat=0)


def test_bandwidth_times_extra_kernels_in_the_same_rounds():
    calls = []
    rows = hardware.bandwidth(1 << 16, repeat=2, extra=[("mine", lambda: calls.append(1), 123)])
    assert rows[-1]["kernel"] == "mine" and rows[-1]["bytes"] == 123
    assert rows[-1]["bytes_per_s"] == pytest.approx(123 / rows[-1]["seconds"])
    assert len(calls) >= 2 + 2  # warm-up and at least one call per round


def test_cache_sizes_from_sysfs_and_fallback(tmp_path):
    for i, (level, kind, size) in enumerate([(1, "Data", "32K"), (1, "Instruction", "32K"),
                                             (2, "Unified", "1024K"), (3, "Unified", "32768K")]):
        d = tmp_path / f"index{i}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    sizes, source = hardware.cache_sizes(str(tmp_path))
    assert sizes == {1: 32 * 2**10, 2: 2**20, 3: 32 * 2**20} and source == "sysfs"
    sizes, source = hardware.cache_sizes(str(tmp_path / "missing"))
    assert sizes == hardware.CACHE_FALLBACK and source.startswith("assumed")


def test_cache_working_sets_fit_their_level():
    sizes = {2: 2**20, 3: 32 * 2**20}
    sets = dict(hardware.cache_working_sets(sizes, 256 * 2**20))
    assert list(sets) == ["L2", "L3", "DRAM"]
    assert 3 * sets["L2"] <= sizes[2] < 3 * sets["L3"] <= sizes[3] < sets["DRAM"]
    # an L3 barely larger than L2 gets no level of its own
    assert [k for k, _ in hardware.cache_working_sets({2: 2**20, 3: 2**21}, 2**28)] == ["L2", "DRAM"]
    with pytest.raises(ValueError, match="L2"):
        hardware.cache_working_sets({3: 2**25}, 2**28)


def test_roofline_points_use_cost_analysis():
    pts = {p["op"]: p for p in hardware.roofline_points(quick=True, repeat=1)}
    assert pts["matmul 256"]["flops"] == 2 * 256**3
    for p in pts.values():
        assert p["intensity"] == pytest.approx(p["flops"] / p["bytes"])
    # matmul intensity grows with size; elementwise stays below 1 FLOP/byte
    assert pts["matmul 512"]["intensity"] > pts["matmul 64"]["intensity"]
    assert pts["elementwise a*x+y"]["intensity"] < 1
    # the one-op helper the notebook's cell is checked against gives the same counts
    fn, args = hardware.roofline_ops(quick=True)["matmul 64"]
    one = hardware.roofline_point("matmul 64", fn, args, repeat=1)
    assert (one["flops"], one["bytes"]) == (pts["matmul 64"]["flops"], pts["matmul 64"]["bytes"])


def test_plots_skip_points_without_counts_and_overlay_committed(tmp_path):
    import matplotlib.pyplot as plt

    pts = [{"op": "a", "intensity": 0.2, "flops_per_s": 1e9},
           {"op": "gpu library call", "intensity": None, "flops_per_s": None},
           {"op": "b", "intensity": 50.0, "flops_per_s": 5e10}]
    fig = hardware.plot_roofline(pts, 2e10, 1e11, 2e11)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert any(lab.startswith("a (") for lab in labels) and not any("gpu library" in lab for lab in labels)
    with pytest.raises(ValueError, match="no roofline point"):
        hardware.plot_roofline(pts[1:2], 2e10, 1e11)
    this = {"backend": "cpu", "matmul_flops": {"float32": {"8": 1e9, "16": 2e9}},
            "matmul_flops_float32_highest": {"8": 1e9, "16": 2e9},
            "numpy_matmul_flops": {"8": 1e9, "16": 2e9}, "peak_flops_estimate": 3e9}
    gpu = {"backend": "gpu", "device": "GPU X", "date": "2026-01-01T00:00:00",
           "matmul_flops": {"float32": {"8": 1e10}, "bfloat16": {"8": 2e10}}}
    labels = hardware.plot_matmul_sweep(this, [gpu]).axes[0].get_legend_handles_labels()[1]
    assert "GPU X float32 = TF32 (default precision) (committed, 2026-01-01)" in labels
    assert "jax float32, precision=HIGHEST (true fp32) (this run)" in labels
    plt.close("all")


def test_spec_table_is_cited_and_labelled():
    rows = hardware.spec_table()
    names = " ".join(r["chip"] for r in rows)
    for chip in ("V100", "A100", "H100", "H200", "B200", "TPU v1", "TPU v4", "TPU v5e", "TPU v5p", "TPU v6e"):
        assert chip in names
    for r in rows:
        assert r["source"].startswith("https://")
        assert r["ridge FLOP/B"] == pytest.approx(r["16-bit peak TFLOP/s"] * 1e12 / (r["memory GB/s"] * 1e9))
    b200 = next(s for s in hardware.SPECS if s.name.startswith("NVIDIA B200"))
    assert "per GPU" in b200.note  # the HGX page also lists 8-GPU totals
    cpu = hardware.cpu_info(ZEN4)
    with_cpu = hardware.spec_table(cpu, hardware.estimate_peak(cpu), 20e9)
    assert "ESTIMATED" in with_cpu[0]["note"] and "MEASURED" in with_cpu[0]["note"]
