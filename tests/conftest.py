"""Shared test setup: 4 simulated CPU devices, configured before JAX initialises."""

import os

os.environ.setdefault("SCALELAB_CPU_DEVICES", "4")

from scalelab import env

env.setup(cpu_devices=4, verbose=False)
