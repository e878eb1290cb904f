import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scalelab import hardware

ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
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


def test_cpu_info_parses_first_block():
    cpu = hardware.cpu_info(ZEN4)
    assert cpu.model == "AMD EPYC 9B14" and cpu.vendor == "AuthenticAMD" and cpu.family == 25
    assert cpu.clock_ghz == pytest.approx(2.6)
    assert {"avx512f", "fma", "avx512_bf16"} <= cpu.flags
    assert cpu.cores >= 1


def test_estimate_peak_avx512_zen4():
    cpu = hardware.cpu_info(ZEN4)
    cpu = hardware.CpuInfo(**{**cpu.__dict__, "cores": 2})
    peak = hardware.estimate_peak(cpu)
    # 16 fp32 lanes x 2 (FMA) x 2 units = 64 FLOPs/cycle/core
    assert peak.flops_per_cycle_fp32 == 64
    assert peak.fp32 == pytest.approx(2 * 2.6e9 * 64)
    assert peak.bf16 == pytest.approx(2 * peak.fp32)
    assert any("Zen 4" in a for a in peak.assumptions)


def test_estimate_peak_amx_and_arm():
    intel = hardware.CpuInfo(**{**hardware.cpu_info(SAPPHIRE).__dict__, "cores": 4})
    peak = hardware.estimate_peak(intel)
    assert peak.bf16 == pytest.approx(4 * 2.0e9 * 1024)
    arm = hardware.estimate_peak(hardware.CpuInfo(**{**hardware.cpu_info(ARM).__dict__,
                                                     "arch": "aarch64", "cores": 1}))
    assert arm.simd_bits == 128 and arm.fp32 is None  # no clock reported: no estimate
    assert any("no estimate" in a for a in arm.assumptions)


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
    assert [r["processing"] for r in rows] == ["scalar", "vector", "matrix"]
    assert len({r["flops"] for r in rows}) == 1 and rows[0]["flops"] == 2 * 16**3
    assert rows[2]["bytes_per_flop"] == pytest.approx(6 / 16)
    with pytest.raises(ValueError, match="m must be"):
        hardware.scalar_vector_matrix(1)


def test_axpy_kernels_agree():
    x = np.arange(5, dtype=np.float32)
    y = np.ones(5, dtype=np.float32)
    assert hardware.axpy_python(2.0, x.tolist(), y.tolist()) == (2 * x + y).tolist()
    np.testing.assert_allclose(hardware.axpy_vector(np.float32(2), x, y), 2 * x + y)
    a = np.arange(9, dtype=np.float32).reshape(3, 3)
    np.testing.assert_allclose(hardware.matmul(a, a), a @ a)


def test_matmul_sweep_rows_and_errors():
    rows = hardware.matmul_sweep([8, 16], dtypes=["float32", "bfloat16"], repeat=1)
    assert {(r["impl"], r["dtype"], r["n"]) for r in rows} == {
        ("jax", "float32", 8), ("jax", "bfloat16", 8), ("numpy", "float32", 8),
        ("jax", "float32", 16), ("jax", "bfloat16", 16), ("numpy", "float32", 16)}
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
        "numpy copy": 8 * n, "numpy add": 12 * n, "jax triad x+2y": 12 * n}
    with pytest.raises(ValueError, match="4 KiB"):
        hardware.bandwidth(100)


def test_roofline_points_use_cost_analysis():
    pts = {p["op"]: p for p in hardware.roofline_points(quick=True, repeat=1)}
    assert pts["matmul 256"]["flops"] == 2 * 256**3
    for p in pts.values():
        assert p["intensity"] == pytest.approx(p["flops"] / p["bytes"])
    # matmul intensity grows with size; elementwise stays below 1 FLOP/byte
    assert pts["matmul 512"]["intensity"] > pts["matmul 64"]["intensity"]
    assert pts["elementwise a*x+y"]["intensity"] < 1


def test_spec_table_is_cited_and_labelled():
    rows = hardware.spec_table()
    names = " ".join(r["chip"] for r in rows)
    for chip in ("V100", "A100", "H100", "B200", "TPU v1", "TPU v4", "TPU v5e", "TPU v5p", "TPU v6e"):
        assert chip in names
    for r in rows:
        assert r["source"].startswith("https://")
        assert r["ridge FLOP/B"] == pytest.approx(r["16-bit peak TFLOP/s"] * 1e12 / (r["memory GB/s"] * 1e9))
    cpu = hardware.cpu_info(ZEN4)
    with_cpu = hardware.spec_table(cpu, hardware.estimate_peak(cpu), 20e9)
    assert "ESTIMATED" in with_cpu[0]["note"] and "MEASURED" in with_cpu[0]["note"]
