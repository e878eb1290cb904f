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


def test_measure_layout_tuned_cache_is_a_second_epoch(tmp_path):
    x = data.photo_patches(64, 8)
    res = data.measure_layout(x, data.Layout(8, "gzip"), tmp_path, random_reads=20, block=8,
                              tuned_cache_bytes=1 << 20)
    # the first (cache-filling) epoch and the timed second epoch are reported separately
    assert res["random_read_tuned_epoch1_samples_per_s"] > 0
    assert res["random_read_tuned_samples_per_s"] > 0
    assert "random_read_tuned_samples_per_s" not in data.measure_layout(x, data.Layout(), tmp_path,
                                                                        random_reads=4, block=8,
                                                                        tuned_cache_bytes=1 << 20)


def test_write_shards_split_the_rows(tmp_path):
    x = data.photo_patches(10, 4)
    paths = data.write_shards(tmp_path, x, 3, data.Layout(2, "lzf"))
    parts = []
    for p in paths:
        with data.Store(p) as store:
            parts.append(store.read(0, len(store))["x"])
    assert [len(p) for p in parts] == [3, 3, 4]
    np.testing.assert_array_equal(np.concatenate(parts), x)


@pytest.mark.parametrize("mode", ["threads", "processes"])
def test_parallel_read_covers_every_row_once(tmp_path, mode):
    x = data.photo_patches(37, 4)
    expected = int(x.sum(dtype=np.uint64))
    shared = data.write_store(tmp_path / "s.h5", {"x": x}, "p", layout=data.Layout(5, "gzip"))
    res = data.parallel_read([shared], 3, batch=4, epochs=2, mode=mode)
    assert res["rows"] == 2 * 37 and res["byte_sum"] == 2 * expected
    assert res["readers"] == 3 and res["files"] == 1 and len(res["reader_seconds"]) == 3
    assert res["samples_per_s"] == pytest.approx(res["rows"] / res["seconds"])
    shards = data.write_shards(tmp_path, x, 2, data.Layout(5))
    res = data.parallel_read(shards, 2, batch=4, mode=mode)
    assert res["rows"] == 37 and res["byte_sum"] == expected and res["files"] == 2


def test_parallel_read_errors(tmp_path):
    x = data.photo_patches(8, 4)
    shared = data.write_store(tmp_path / "s.h5", {"x": x}, "p")
    with pytest.raises(ValueError, match="one file per reader"):
        data.parallel_read([shared, shared], 3)
    with pytest.raises(ValueError, match="readers"):
        data.parallel_read([shared], 0)
    with pytest.raises(ValueError, match="mode"):
        data.parallel_read([shared], 1, mode="fibres")
    foreign = tmp_path / "foreign.h5"  # no dataset "x": the readers fail and say so
    with h5py.File(foreign, "w") as f:
        f["y"] = np.zeros(3)
    with pytest.raises(KeyError):
        data.parallel_read([foreign], 1)


def test_parallel_read_benchmark_rows(tmp_path):
    res = data.parallel_read_benchmark(24, readers=(1, 2), layout=data.Layout(4, "lzf"), batch=4,
                                       size=4, folder=tmp_path)
    assert [r["readers"] for r in res["shared"]] == [1, 2] == res["readers"]
    assert len(res["per_reader_files"]) == len(res["threads"]) == 2
    table = data.parallel_table(res)
    assert table[0]["shared file vs 1 reader"] == 1.0 and len(table) == 2
    assert "1, 2 readers" in data.plot_parallel(res).get_supxlabel()
    assert list(tmp_path.iterdir()) == []
