import re
import tomllib
from pathlib import Path

import jax
import numpy as np
import pytest

from scalelab import env

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("raw", "expected"), [("1", True), ("true", True), ("YES", True),
                                               ("0", False), ("", False), ("off", False)])
def test_quick_flag(monkeypatch, raw, expected):
    monkeypatch.setenv(env.QUICK_ENV, raw)
    assert env.quick() is expected
    assert env.pick(full=10, quick_value=2) == (2 if expected else 10)


def test_quick_flag_rejects_garbage(monkeypatch):
    monkeypatch.setenv(env.QUICK_ENV, "maybe")
    with pytest.raises(ValueError, match="SCALELAB_QUICK"):
        env.quick()


def test_cpu_device_override(monkeypatch):
    monkeypatch.delenv(env.CPU_DEVICES_ENV, raising=False)
    assert env.requested_cpu_devices(8) == 8
    monkeypatch.setenv(env.CPU_DEVICES_ENV, "2")
    assert env.requested_cpu_devices(8) == 2
    monkeypatch.setenv(env.CPU_DEVICES_ENV, "two")
    with pytest.raises(ValueError, match="SCALELAB_CPU_DEVICES"):
        env.requested_cpu_devices(8)
    monkeypatch.setenv(env.CPU_DEVICES_ENV, "0")
    with pytest.raises(ValueError, match=">= 1"):
        env.requested_cpu_devices(8)


def test_setup_is_idempotent_and_reports(capsys, monkeypatch):
    monkeypatch.setenv(env.CPU_DEVICES_ENV, "4")
    info = env.setup(cpu_devices=4, seed=3)
    line = capsys.readouterr().out.strip()
    assert "jax" in line and "4 x cpu" in line and "mode" in line
    assert info.device_count == len(jax.devices()) == 4
    assert info.seed == 3
    # seeding is deterministic
    env.setup(cpu_devices=4, seed=3, verbose=False)
    a = np.random.rand()
    env.setup(cpu_devices=4, seed=3, verbose=False)
    assert np.random.rand() == a


def test_setup_asks_for_restart_when_too_few_devices(capsys, monkeypatch):
    monkeypatch.setenv(env.CPU_DEVICES_ENV, "16")
    env.setup(cpu_devices=16)
    out = capsys.readouterr().out
    assert "WARNING" in out and "Restart the kernel" in out
    assert len(jax.devices("cpu")) == 4  # unchanged: JAX was initialised already


def test_devices_returns_requested_count():
    for n in (1, 2, 4):
        devs = env.devices(n)
        assert len(devs) == n and len(set(devs)) == n


def test_devices_errors_name_the_setting():
    with pytest.raises(ValueError, match=r"SCALELAB_CPU_DEVICES=5.*restart the kernel"):
        env.devices(5)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            env.devices(bad)


def test_repository_url_comes_from_pyproject():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    assert env.repository_url() == declared
    badge = env.colab_badge("00_x.ipynb")
    repo = declared.removeprefix("https://github.com/")
    assert f"colab.research.google.com/github/{repo}/blob/main/notebooks/00_x.ipynb" in badge


def test_versions_and_label():
    v = env.versions()
    assert re.match(r"\d+\.\d+", v["jax"]) and v["scalelab"] != "not installed"
    info = env.describe()
    assert info.label.startswith(f"{info.device_count} x ")


def _info(**kw):
    base = dict(backend="cpu", device_kind="cpu", device_count=8, cpu_device_count=8,
                simulated=True, quick=False, seed=0, colab=False, versions={"python": "3"})
    return env.EnvInfo(**{**base, **kw})


class _Dev:
    def __init__(self, platform, kind):
        self.platform, self.device_kind = platform, kind


def test_work_label_names_the_devices_that_ran_the_work():
    info = _info()
    assert info.work_label() == info.label == "8 x cpu simulated (cpu), full mode"
    assert info.work_label(1) == "1 x cpu device (of 8 simulated), full mode"
    assert info.work_label(8) == "8 x cpu devices simulated, full mode"
    assert _info(quick=True).work_label(2) == "2 x cpu devices (of 8 simulated), quick mode"
    one = _info(device_count=1, cpu_device_count=1, simulated=False)
    assert one.work_label(1) == "1 x cpu device, full mode"
    gpu = _info(backend="gpu", device_kind="NVIDIA H200", device_count=1, simulated=False)
    assert gpu.work_label(1) == "1 x NVIDIA H200 device, full mode"
    # devices given as objects: their platform and kind win (simulated CPUs on a GPU runtime)
    assert gpu.work_label([_Dev("cpu", "cpu")] * 2) == "2 x cpu devices (of 8 simulated), full mode"
    assert info.work_label(jax.devices()[:1]).startswith("1 x ")
    for bad in (0, 9):
        with pytest.raises(ValueError, match="between 1 and 8"):
            info.work_label(bad)
    with pytest.raises(ValueError, match="at least one"):
        info.work_label([])
    with pytest.raises(TypeError, match="count or a sequence"):
        info.work_label(1.5)


def test_single_accelerator_runtime_falls_back_to_cpu_devices_and_says_so(monkeypatch, capsys):
    """A Colab TPU v5e-1 or a one-GPU runtime: multi-device chapters get simulated CPU devices
    and the output says so (once per count); one device still comes from the accelerator."""
    import jax

    cpus = jax.devices("cpu")
    tpu = object()
    real_devices = jax.devices
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    monkeypatch.setattr(jax, "devices", lambda backend=None: cpus if backend == "cpu" else [tpu])
    monkeypatch.setattr(env, "_FALLBACKS_SAID", set())
    assert env.devices(1) == [tpu]
    assert capsys.readouterr().out == ""
    n = min(2, len(cpus))
    if n < 2:
        monkeypatch.setattr(jax, "devices", real_devices)
        return
    assert env.devices(n) == cpus[:n]
    out = capsys.readouterr().out
    assert "this runtime has 1 tpu device(s)" in out and "simulated CPU devices instead" in out
    env.devices(n)
    assert capsys.readouterr().out == ""  # said once


def test_all_devices_takes_every_cpu_device_beside_one_accelerator(monkeypatch, capsys):
    """A multi-device chapter on a one-accelerator runtime gets every simulated CPU device (and the
    notice); several accelerators are used as they are; a CPU-only runtime gets its CPU devices."""
    import jax

    cpus = jax.devices("cpu")
    assert env.all_devices() == cpus  # the test session runs on CPU only
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(env, "_FALLBACKS_SAID", set())
    gpu = object()
    monkeypatch.setattr(jax, "devices", lambda backend=None: cpus if backend == "cpu" else [gpu])
    got = env.all_devices()
    if len(cpus) > 1:
        assert got == cpus and "this runtime has 1 gpu device(s)" in capsys.readouterr().out
    else:
        assert got == [gpu]
    gpus = [object() for _ in range(len(cpus) + 1)]
    monkeypatch.setattr(jax, "devices", lambda backend=None: cpus if backend == "cpu" else gpus)
    assert env.all_devices() == gpus
