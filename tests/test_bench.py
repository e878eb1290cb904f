import json
import subprocess
import sys
import types
from pathlib import Path

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


# Benchmarks a chapter runs with bench.run: `make test` runs that chapter under nbval in quick mode, which
# runs the benchmark (quick) there; running it again here would only double the time. The test below checks
# that each chapter still makes the call, and bench.run validates every result it returns.
RUN_BY_CHAPTER = {"hardware": "01", "storage": "03", "pipeline": "04", "train": "05", "remat": "10",
                  "precision": "11", "checkpoint": "12", "serve": "14"}
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(bench.REGISTRY) - set(RUN_BY_CHAPTER)))
def test_every_benchmark_runs_quick(name):
    result = bench.run(name, quick=True)
    assert REQUIRED <= set(result) and result["quick"] is True
    json.dumps(result)


@pytest.mark.parametrize("name", sorted(RUN_BY_CHAPTER))
def test_the_other_benchmarks_run_in_their_chapter(name):
    import nbformat

    assert name in bench.REGISTRY
    (path,) = sorted((ROOT / "notebooks").glob(f"{RUN_BY_CHAPTER[name]}_*.ipynb"))
    code = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
    assert f'bench.run("{name}"' in code, f"{path.name} no longer runs benchmark {name}: test it here again"


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
    result = {"name": "demo", "device": "NVIDIA H100 80GB HBM3", "backend": "gpu", "quick": False}
    path = bench.save(result, tmp_path)
    assert path.name == "demo-nvidia-h100-80gb-hbm3.json"
    assert bench.load_results("demo", tmp_path) == [result]
    quick = {**result, "quick": True}
    assert bench.save(quick, tmp_path).name.endswith("-quick.json")
    assert bench.load_results("demo", tmp_path) == [result]  # quick results left out
    assert len(bench.load_results("demo", tmp_path, include_quick=True)) == 2
    cpu = {"name": "demo", "device": "cpu", "backend": "cpu", "host": {"cpu": "AMD EPYC 9B14"}}
    assert bench.result_path(cpu, tmp_path).name == "demo-cpu-amd-epyc-9b14.json"


def test_results_dir_finds_the_checkout(tmp_path):
    root = Path(__file__).resolve().parents[1]
    assert bench.results_dir(root / "notebooks") == root / "results"
    assert bench.results_dir(tmp_path) == tmp_path / "results"


def test_outside_a_checkout_the_shipped_results_are_read_first(tmp_path, monkeypatch):
    shipped = tmp_path / "site" / "results"
    shipped.mkdir(parents=True)
    (shipped / "demo-gpu.json").write_text('{"name": "demo", "device": "gpu"}')
    (shipped / "demo-cpu.json").write_text('{"name": "demo", "device": "shipped cpu"}')
    work = tmp_path / "colab"
    (work / "results").mkdir(parents=True)
    (work / "results" / "demo-cpu.json").write_text('{"name": "demo", "device": "own cpu"}')
    monkeypatch.chdir(work)
    monkeypatch.setattr(bench, "packaged_results_dir", lambda: shipped)
    assert bench.checkout_root() is None
    assert bench.reference_dirs() == [shipped, work.resolve() / "results"]
    assert bench.results_dir() == work.resolve() / "results"  # --save writes here
    # one file name read once: the shipped copy wins, the runtime's own other files are added
    assert sorted(r["device"] for r in bench.load_results("demo")) == ["gpu", "shipped cpu"]


def test_a_checkout_reads_only_its_own_results():
    root = Path(__file__).resolve().parents[1]
    assert bench.reference_dirs(root / "notebooks") == [root / "results"]
    assert bench.packaged_results_dir() is None  # an editable install ships no copy


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
