import json
import subprocess
import sys
import types

import pytest
from scalelab import bench

REQUIRED = {"name", "device", "backend", "versions", "quick"}


def test_registry_targets_resolve():
    assert "abstractions" in bench.REGISTRY
    for b in bench.REGISTRY.values():
        assert callable(b.load()), b.name


def test_register_validates():
    with pytest.raises(ValueError, match="lower_snake_case"):
        bench.register("Bad-Name", "m:f", "")
    with pytest.raises(ValueError, match="module:function"):
        bench.register("ok_name", "no_colon", "")


def test_timeit_measures_and_validates():
    t = bench.timeit(lambda: sum(range(100)), repeat=3)
    assert len(t.times) == 3 and t.number >= 1 and 0 < t.best <= t.median
    assert bench.timeit(lambda: 1, repeat=2, number=5).number == 5
    with pytest.raises(ValueError):
        bench.timeit(lambda: 1, repeat=0)
    with pytest.raises(ValueError):
        bench.timeit(lambda: 1, number=0)


def test_run_adds_provenance():
    result = bench.run("abstractions", quick=True)
    assert REQUIRED <= set(result)
    assert result["quick"] is True and result["name"] == "abstractions"
    assert result["backend"] == "cpu" and result["device_count"] == 4
    assert set(result["speedup_vs_python"]) == {"python", "numpy", "jax.jit"}
    json.dumps(result)  # serialisable as is


def test_run_rejects_unknown_and_bad_results(monkeypatch):
    with pytest.raises(KeyError, match="unknown benchmark"):
        bench.run("nope")
    fake = types.ModuleType("fake_bench")
    fake.not_a_dict = lambda quick: [1]
    fake.clashes = lambda quick: {"device": "x"}
    monkeypatch.setitem(sys.modules, "fake_bench", fake)
    monkeypatch.setitem(bench.REGISTRY, "f1", bench.Benchmark("f1", "fake_bench:not_a_dict", ""))
    monkeypatch.setitem(bench.REGISTRY, "f2", bench.Benchmark("f2", "fake_bench:clashes", ""))
    with pytest.raises(TypeError, match="expected dict"):
        bench.run("f1")
    with pytest.raises(ValueError, match="reserved keys"):
        bench.run("f2")


def test_save_and_load_results(tmp_path):
    result = {"name": "demo", "device": "NVIDIA H100 80GB HBM3", "quick": False, "x": 1}
    path = bench.save(result, tmp_path)
    assert path.name == "demo-nvidia-h100-80gb-hbm3.json"
    assert bench.load_results("demo", tmp_path) == [result]
    assert bench.result_path({**result, "quick": True}, tmp_path).name.endswith("-quick.json")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "scalelab.bench", *args],
                          capture_output=True, text=True, timeout=300)


def test_cli_list():
    proc = _cli("--list")
    assert proc.returncode == 0 and "abstractions" in proc.stdout


def test_cli_json_smoke(tmp_path):
    out = tmp_path / "r.json"
    proc = _cli("abstractions", "--quick", "--json", "--cpu-devices", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert REQUIRED <= set(result) and result["quick"] is True
    assert json.loads(out.read_text()) == result


def test_cli_unknown_name_fails_clearly():
    proc = _cli("no_such_bench")
    assert proc.returncode != 0 and "unknown benchmark" in proc.stderr
