import json
import os

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from scalelab import data


def _arrays(n=10):
    rng = np.random.default_rng(0)
    return {"x": rng.random((n, 4, 3)).astype(np.float32), "y": np.arange(n, dtype=np.int32)}


@pytest.mark.parametrize("layout", [data.Layout(), data.Layout(3), data.Layout(4, "lzf"),
                                    data.Layout(5, "gzip", 6)])
def test_roundtrip_and_attributes(tmp_path, layout):
    arrays = _arrays()
    path = data.write_store(tmp_path / "s.h5", arrays, provenance="unit test", layout=layout)
    with data.Store(path, schema=data.schema_of(arrays), verify=True) as store:
        assert len(store) == 10
        got = store.read(2, 7)
        np.testing.assert_array_equal(got["x"], arrays["x"][2:7])
        np.testing.assert_array_equal(got["y"], arrays["y"][2:7])
        np.testing.assert_array_equal(store.row(9, "x"), arrays["x"][9])
        attrs = store.attrs
        assert attrs["provenance"] == "unit test" and attrs["version"] == "1"
        assert attrs["format"] == data.STORE_FORMAT and "created" in attrs
        assert json.loads(attrs["schema"])["x"] == {"dtype": "float32", "shape": [4, 3]}
    assert [p.name for p in tmp_path.iterdir()] == ["s.h5"]  # no temporary left behind


@settings(max_examples=25, deadline=None)
@given(hnp.arrays(hnp.floating_dtypes(sizes=(32, 64)) | hnp.integer_dtypes(),
                  hnp.array_shapes(min_dims=1, max_dims=3, max_side=6)),
       st.integers(1, 8))
def test_roundtrip_property(tmp_path_factory, arr, chunk):
    path = tmp_path_factory.mktemp("p") / "s.h5"
    data.write_store(path, {"a": arr}, "prop", layout=data.Layout(chunk, "lzf"))
    with data.Store(path, verify=True) as store:
        np.testing.assert_array_equal(store.read(0, len(store))["a"], arr)


def test_crash_mid_write_leaves_old_file(tmp_path, monkeypatch):
    path = data.write_store(tmp_path / "s.h5", _arrays(), "v1")
    before = path.read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        data.write_store(path, _arrays(20), "v2")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.h5"]


def test_bad_input_errors(tmp_path):
    with pytest.raises(ValueError, match="same number of rows"):
        data.write_store(tmp_path / "a.h5", {"x": np.zeros(3), "y": np.zeros(4)}, "p")
    with pytest.raises(ValueError, match="numeric"):
        data.write_store(tmp_path / "a.h5", {"x": np.array(["a", "b"])}, "p")
    with pytest.raises(ValueError, match="at least one"):
        data.write_store(tmp_path / "a.h5", {}, "p")
    with pytest.raises(ValueError, match="compression"):
        data.Layout(None, "lzf")
    with pytest.raises(ValueError, match="compression must be"):
        data.Layout(4, "zstd")
    with pytest.raises(ValueError, match="chunk_rows"):
        data.Layout(0)


def test_read_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no store"):
        data.Store(tmp_path / "missing.h5")
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not an hdf5 file at all" * 10)
    with pytest.raises(data.StoreError, match="truncated or corrupt"):
        data.Store(garbage)
    good = data.write_store(tmp_path / "g.h5", _arrays(200), "p")
    truncated = tmp_path / "t.h5"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(data.StoreError):
        data.Store(truncated, verify=True)
    with pytest.raises(data.StoreError, match="expected"):
        data.Store(good, schema={"x": {"dtype": "float64", "shape": [4, 3]}})
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(data.StoreError, match="not a scalelab store"):
        data.Store(foreign)
    with data.Store(good) as store, pytest.raises(IndexError):
        store.read(150, 250)


def test_verify_detects_tampering(tmp_path):
    path = data.write_store(tmp_path / "s.h5", _arrays(), "p")
    with h5py.File(path, "r+") as f:
        f["x"][0, 0, 0] = 42.0
    with pytest.raises(data.StoreError, match="checksum"):
        data.Store(path, verify=True)


def test_measure_layout_keys(tmp_path):
    x = data.photo_patches(40, 8)
    for name, layout in data.storage_layouts(rows_per_chunk=8).items():
        res = data.measure_layout(x, layout, tmp_path, random_reads=20, block=8,
                                  tuned_cache_bytes=1 << 20)
        assert {"bytes", "write_bytes_per_s", "seq_read_samples_per_s",
                "random_read_samples_per_s", "random_block_read_samples_per_s"} <= set(res), name
        assert res["bytes"] > 0
    assert list(tmp_path.iterdir()) == []


def test_photo_patches():
    p = data.photo_patches(5, 16, seed=3)
    assert p.shape == (5, 16, 16, 3) and p.dtype == np.uint8
    np.testing.assert_array_equal(p, data.photo_patches(5, 16, seed=3))
    with pytest.raises(ValueError, match="size must be"):
        data.photo_patches(1, 1000)
