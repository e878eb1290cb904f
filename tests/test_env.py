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
