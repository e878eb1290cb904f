"""Build hook: the wheel carries the committed benchmark results as package data.

``results/`` in the checkout is the one source of truth (``--save`` writes there). Building a
wheel copies ``results/*.json`` into ``scalelab/results/`` inside it, so an installed course
(Colab, a fresh virtual environment) overlays the same reference results; nothing is copied by
hand and the checkout holds no second copy.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithResults(build_py):
    def run(self):
        super().run()
        if self.editable_mode:  # an editable install reads the checkout's results/ directly
            return
        target = Path(self.build_lib) / "scalelab" / "results"
        target.mkdir(parents=True, exist_ok=True)
        for path in sorted((ROOT / "results").glob("*.json")):
            shutil.copyfile(path, target / path.name)


setup(cmdclass={"build_py": BuildPyWithResults})
