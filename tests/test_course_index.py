import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import course_index


def _nb(path: Path, title: str) -> Path:
    cells = [{"cell_type": "markdown", "metadata": {}, "source": [f"# {title}\n", "text"]}]
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    return path


def test_index_links_built_chapters(tmp_path):
    build = tmp_path / "build"
    build.mkdir()
    a = _nb(tmp_path / "00_a.ipynb", "00 · Alpha & co")
    b = _nb(tmp_path / "01_b.ipynb", "01 · Beta")
    (build / "00_a.html").write_text("<html></html>")
    assert course_index.main([str(build), str(a), str(b)]) == 1  # 01 missing
    page = (build / "index.html").read_text()
    assert '<a href="00_a.html">00 · Alpha &amp; co</a>' in page
    assert "01 · Beta <em>(not built)</em>" in page
    (build / "01_b.html").write_text("<html></html>")
    assert course_index.main([str(build), str(a), str(b)]) == 0
