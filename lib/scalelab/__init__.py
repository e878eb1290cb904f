"""scalelab: the helper library of the Scalable ML Workbench.

Plumbing (``env``, ``plot``, ``bench``, ``io``) plus one module per chapter. Modules are
imported on demand (``from scalelab import env``) so that nothing touches JAX before
``env.setup`` has chosen the number of simulated devices.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("scalelab")
except _metadata.PackageNotFoundError:  # source tree without install
    __version__ = "0+unknown"

__all__ = ["__version__"]
