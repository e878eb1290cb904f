import json

import numpy as np
import pytest

from scalelab import io


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "sub" / "f.txt"
    io.write_text(target, "one")
    io.write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["f.txt"]


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "f.txt"
    io.write_text(target, "old")
    with pytest.raises(RuntimeError), io.atomic_open(target) as handle:
        handle.write("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_write_json_handles_numpy(tmp_path):
    path = io.write_json(tmp_path / "r.json", {"a": np.float32(1.5), "b": np.arange(3)})
    assert json.loads(path.read_text()) == {"a": 1.5, "b": [0, 1, 2]}
    with pytest.raises(TypeError, match="cannot write object"):
        io.write_json(tmp_path / "bad.json", {"x": object()})
    assert not (tmp_path / "bad.json").exists()


def test_atomic_open_rejects_append(tmp_path):
    with pytest.raises(ValueError, match="mode"), io.atomic_open(tmp_path / "x", "a"):
        pass
