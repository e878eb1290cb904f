import numpy as np
import pytest

from scalelab import data


def test_load_digits_split():
    s = data.load_digits()
    assert s.x_train.shape == (1347, 64) and s.x_test.shape == (450, 64)
    assert s.x_train.dtype == np.float32 and s.y_train.dtype == np.int32
    assert s.classes == 10 and s.features == 64
    assert 0.0 <= s.x_train.min() and s.x_train.max() <= 1.0
    # stratified: every class in both parts, in similar proportions
    tr = np.bincount(s.y_train) / len(s.y_train)
    te = np.bincount(s.y_test) / len(s.y_test)
    assert np.abs(tr - te).max() < 0.01


def test_load_digits_is_reproducible():
    a, b, c = data.load_digits(seed=0), data.load_digits(seed=0), data.load_digits(seed=1)
    assert np.array_equal(a.x_train, b.x_train)
    assert not np.array_equal(a.x_train, c.x_train)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 2])
def test_load_digits_rejects_bad_fraction(bad):
    with pytest.raises(ValueError, match="test_fraction"):
        data.load_digits(test_fraction=bad)
