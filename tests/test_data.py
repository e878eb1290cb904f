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


def test_dataset_card():
    card = data.dataset_card(data.load_digits())
    assert card["examples"] == 1797 and card["classes"] == 10
    assert 0.9 < card["balance (min/max)"] <= 1.0
    assert "UCI" in card["provenance"]


def test_vae_trains_and_synthesizes():
    s = data.load_digits()
    run = data.train_vae(s.x_train, s.y_train, s.classes, steps=60, batch=64)
    assert len(run.losses) == 2 and run.losses[-1] < run.losses[0]
    assert run.flops_per_step > 0 and run.train_flops == run.flops_per_step * 60
    x, y = data.synthesize(run, 3, s.classes)
    assert x.shape == (30, 64) and 0 <= x.min() and x.max() <= 1
    assert np.array_equal(y, np.repeat(np.arange(10), 3))
    with pytest.raises(ValueError, match="steps"):
        data.train_vae(s.x_train, s.y_train, 10, steps=0)


def test_synthetic_value_rows():
    s = data.load_digits()
    rows = data.synthetic_value(s, s.x_train[:200], s.y_train[:200], seeds=(0,))
    assert [r["training data"] for r in rows] == ["real", "synthetic", "real + synthetic"]
    assert rows[0]["real test accuracy"] > 0.9
    assert rows[2]["examples"] == len(s.y_train) + 200


def test_class_diversity():
    x = np.array([[0.0], [2.0], [5.0], [5.0]])
    y = np.array([0, 0, 1, 1])
    assert data.class_diversity(x, y) == pytest.approx(0.5)
