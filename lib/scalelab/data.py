"""Datasets used across the course (chapter 03 extends this with synthetic data and HDF5).

Everything here ships with an installed package: no downloads at run time.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Split:
    """A train/test split of features ``x`` (float32) and integer labels ``y``."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int

    @property
    def features(self) -> int:
        return int(self.x_train.shape[1])


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> Split:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes).

    Pixels are scaled from 0..16 to 0..1 and flattened to 64 features; the split is
    stratified by class and reproducible for a given ``seed``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    bunch = _load()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return Split(x_tr, y_tr, x_te, y_te, classes=int(y.max()) + 1)
