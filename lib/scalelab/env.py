"""Runtime setup shared by every notebook: devices, quick mode, seeds, a one-line report.

The first code cell of each chapter is::

    from scalelab import env
    info = env.setup(cpu_devices=8, seed=0)

``setup`` must run before anything touches a JAX device, because the number of
simulated CPU devices can only be chosen before JAX initialises its backends.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import random
import sys
from importlib import metadata
from typing import Any

QUICK_ENV = "SCALELAB_QUICK"
CPU_DEVICES_ENV = "SCALELAB_CPU_DEVICES"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}

# Packages reported by ``setup`` and recorded with every benchmark result.
REPORTED_PACKAGES = ("scalelab", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy")
# The ones the first cell of every chapter prints (the README states them; a test compares).
SETUP_PACKAGES = ("scalelab", "jax", "flax", "optax", "orbax-checkpoint", "grain")


def _flag(name: str) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(f"{name} must be one of 1/0/true/false/yes/no, got {raw!r}")


def quick() -> bool:
    """True in quick mode (``SCALELAB_QUICK=1``), which shrinks sizes for the tests."""
    return _flag(QUICK_ENV)


def pick(full: Any, quick_value: Any) -> Any:
    """Return ``quick_value`` in quick mode and ``full`` otherwise.

    Quick mode only shrinks sizes; it must never change what a cell checks.
    """
    return quick_value if quick() else full


def in_colab() -> bool:
    """True inside a Google Colab runtime."""
    return "google.colab" in sys.modules


def repository_url() -> str:
    """The course repository, as declared once in pyproject's ``[project.urls]``."""
    try:
        urls = metadata.metadata("scalelab").get_all("Project-URL") or []
    except metadata.PackageNotFoundError:  # running from a source tree without install
        urls = []
    for entry in urls:
        label, _, url = entry.partition(",")
        if label.strip().lower() == "repository":
            return url.strip()
    raise RuntimeError(
        "scalelab is not installed with its metadata; install it with `pip install -e .`"
    )


def colab_badge(notebook: str) -> str:
    """Markdown for the Open-in-Colab badge of ``notebooks/<notebook>``."""
    repo = repository_url().removeprefix("https://github.com/")
    url = f"https://colab.research.google.com/github/{repo}/blob/main/notebooks/{notebook}"
    badge = "https://colab.research.google.com/assets/colab-badge.svg"
    return f"[![Open In Colab]({badge})]({url})"


def versions() -> dict[str, str]:
    """Installed versions of the packages the course depends on most."""
    out = {"python": platform.python_version()}
    for name in REPORTED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def cpu_cores() -> int:
    """CPU cores this process may use (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def requested_cpu_devices(default: int) -> int:
    """The simulated CPU device count: ``SCALELAB_CPU_DEVICES`` overrides ``default``."""
    raw = os.environ.get(CPU_DEVICES_ENV, "").strip()
    value: Any = raw or default
    try:
        count = int(value)
    except ValueError:
        raise ValueError(f"{CPU_DEVICES_ENV} must be a positive integer, got {raw!r}") from None
    if count < 1:
        raise ValueError(f"the CPU device count must be >= 1, got {count}")
    return count


@dataclasses.dataclass(frozen=True)
class EnvInfo:
    """What ``setup`` found: backend, devices, mode and versions."""

    backend: str
    device_kind: str
    device_count: int
    cpu_device_count: int
    simulated: bool
    quick: bool
    seed: int
    colab: bool
    versions: dict[str, str]

    @property
    def label(self) -> str:
        """Short description used on figures and in benchmark results."""
        sim = " simulated" if self.simulated else ""
        mode = "quick" if self.quick else "full"
        return f"{self.device_count} x {self.device_kind}{sim} ({self.backend}), {mode} mode"

    def work_label(self, devices: Any = None) -> str:
        """Like :attr:`label`, but naming the devices that ran one piece of work.

        ``devices`` is how many devices of the default backend did the work (an int), or the
        devices themselves (a sequence of JAX devices, e.g. ``env.devices(2)`` or
        ``array.devices()``); None gives :attr:`label`. A single-device kernel on 8 simulated
        CPU devices reads ``1 x cpu device (of 8 simulated), full mode``; on a one-GPU runtime
        ``1 x NVIDIA H200 device, full mode``.
        """
        if devices is None:
            return self.label
        kind, total, simulated = self.device_kind, self.device_count, self.simulated
        if isinstance(devices, bool) or not isinstance(devices, int):
            try:
                devs = list(devices)
            except TypeError:
                raise TypeError(
                    f"devices must be a count or a sequence of devices, got {devices!r}") from None
            if not devs:
                raise ValueError("devices must name at least one device")
            platform = getattr(devs[0], "platform", self.backend)
            kind = getattr(devs[0], "device_kind", kind)
            if platform != self.backend:  # e.g. simulated CPU devices on a GPU runtime
                total = self.cpu_device_count if platform == "cpu" else len(devs)
                simulated = platform == "cpu" and total > 1
            count = len(devs)
        else:
            count = devices
        if not 1 <= count <= total:
            raise ValueError(f"devices must be between 1 and {total} here, got {count}")
        noun = "device" if count == 1 else "devices"
        sim = " simulated" if simulated else ""
        of = sim if count == total else f" (of {total}{sim})"
        mode = "quick" if self.quick else "full"
        return f"{count} x {kind} {noun}{of}, {mode} mode"

    def summary(self) -> str:
        v = self.versions
        pkgs = " ".join(f"{k} {v[k]}" for k in SETUP_PACKAGES if k in v)
        extra = ""
        if self.backend != "cpu":
            extra = f" + {self.cpu_device_count} simulated cpu"
        return f"{pkgs} | python {v['python']} | {self.label}{extra}" + (
            " | colab" if self.colab else ""
        )


def _configure_cpu_devices(count: int) -> tuple[bool, int]:
    """Ask JAX for ``count`` CPU devices. Returns (applied, cpu devices available)."""
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", count)
        applied = True
    except RuntimeError:  # backends already initialised in this process
        applied = False
    return applied, len(jax.devices("cpu"))


def describe() -> EnvInfo:
    """Describe the current JAX runtime without changing it."""
    import jax

    devs = jax.devices()
    backend = jax.default_backend()
    return EnvInfo(
        backend=backend,
        device_kind=devs[0].device_kind,
        device_count=len(devs),
        cpu_device_count=len(jax.devices("cpu")),
        simulated=backend == "cpu" and len(devs) > 1,
        quick=quick(),
        seed=_last_seed,
        colab=in_colab(),
        versions=versions(),
    )


_last_seed = 0


def setup(cpu_devices: int = 8, seed: int = 0, verbose: bool = True) -> EnvInfo:
    """Prepare the runtime for a chapter and print a one-line report.

    - asks JAX for ``cpu_devices`` simulated CPU devices (``SCALELAB_CPU_DEVICES``
      overrides), which must happen before JAX's first operation;
    - seeds Python's and NumPy's global generators with ``seed``;
    - reports versions, backend, device kind and count, and quick/full mode.

    Calling it again is harmless. If JAX was already initialised with fewer CPU
    devices than asked for, it says so and asks for a kernel restart.
    """
    global _last_seed
    count = requested_cpu_devices(cpu_devices)
    applied, available = _configure_cpu_devices(count)
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002  (the global generator learners' code may use)
    _last_seed = seed
    info = describe()
    if verbose:
        print(info.summary())
        if not applied and available < count:
            print(
                f"WARNING: JAX was already initialised with {available} CPU device(s), "
                f"not the {count} asked for. Restart the kernel and run this cell first."
            )
    return info


def all_devices() -> list:
    """Every device a multi-device chapter can use.

    The accelerators when there are several (or no simulated CPU devices beside them), else every
    CPU device, simulated ones included: on a single-accelerator runtime (one GPU, Colab's TPU
    v5e-1) that is the fallback :func:`devices` announces once.
    """
    import jax

    return devices(max(len(jax.devices()), len(jax.devices("cpu"))))


_FALLBACKS_SAID: set[int] = set()


def fallback_notice(n: int, accelerators: int, backend: str, cpus: int) -> str:
    """What a chapter prints when it asks for more devices than the accelerator runtime has."""
    return (f"{n} devices requested, this runtime has {accelerators} {backend} device(s): using {n} of "
            f"{cpus} simulated CPU devices instead (values and communication patterns are faithful, "
            f"speed is not); measurements that need one device still use the {backend}")


def _say_fallback_once(n: int, accelerators: int, backend: str, cpus: int) -> None:
    if n not in _FALLBACKS_SAID:
        _FALLBACKS_SAID.add(n)
        print(fallback_notice(n, accelerators, backend, cpus))


def devices(n: int) -> list:
    """Return ``n`` devices: accelerators when there are that many, else simulated CPUs.

    Raises ValueError naming the setting to change when neither has ``n`` devices.
    """
    import jax

    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"devices(n) needs a positive integer n, got {n!r}")
    default = jax.devices()
    if jax.default_backend() != "cpu" and len(default) >= n:
        return list(default[:n])
    cpu = jax.devices("cpu")
    if len(cpu) >= n:
        if jax.default_backend() != "cpu":
            _say_fallback_once(n, len(default), jax.default_backend(), len(cpu))
        return list(cpu[:n])
    backend = jax.default_backend()
    have = f"{len(cpu)} CPU device(s)"
    if backend != "cpu":
        have = f"{len(default)} {backend} device(s) and {have}"
    raise ValueError(
        f"{n} devices requested but this runtime has {have}. "
        f"Set {CPU_DEVICES_ENV}={n} (or call env.setup(cpu_devices={n})) and restart the kernel."
    )
