import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import course_index


def _nb(path: Path, title: str, outputs: list | None = None, timing: list | None = None) -> Path:
    cells = [{"cell_type": "markdown", "metadata": {}, "source": [f"# {title}\n", "text"]}]
    for i, (start, end) in enumerate(timing or []):
        cells.append({"cell_type": "code", "metadata": {"execution": {"iopub.execute_input": start,
                                                                      "shell.execute_reply": end}},
                      "source": "", "outputs": outputs if i == len(timing) - 1 else [], "execution_count": i})
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    return path


def test_index_links_built_chapters_with_rendered_titles(tmp_path):
    build = tmp_path / "build"
    build.mkdir()
    out = [{"output_type": "stream", "name": "stdout", "text": ["claims: 5 checked, 4 held, 1 did not hold\n"]}]
    a = _nb(tmp_path / "00_a.ipynb", "00 · Alpha & `co`", out,
            [("2026-01-01T00:00:00Z", "2026-01-01T00:00:01Z"), ("2026-01-01T00:00:02Z", "2026-01-01T00:02:02Z")])
    b = _nb(tmp_path / "01_b.ipynb", "01 · *Beta*")
    (build / "00_a.html").write_text("<html></html>")
    assert course_index.main([str(build), str(a), str(b)]) == 1  # 01 missing
    page = (build / "index.html").read_text()
    assert '<a href="00_a.html">Alpha &amp; <code>co</code></a>' in page
    assert '<span class="num">00</span>' in page and "00 ·" not in page  # numbered once
    assert "<em>Beta</em> <em>(not built)</em>" in page
    assert "ran in <span class=\"time\">2.0 min</span>" in page and "4 of 5 claims held" in page
    assert "not timed" in page and "no claims table" in page
    (build / "01_b.html").write_text("<html></html>")
    assert course_index.main([str(build), str(a), str(b)]) == 0


def test_inline_markdown_and_the_readme_column():
    assert course_index.inline_markdown("a `x*y` *b* **c** [d](https://e)") == (
        'a <code>x*y</code> <em>b</em> <strong>c</strong> <a href="https://e">d</a>')
    assert course_index.inline_markdown("<script>") == "&lt;script&gt;"
    assert course_index.split_number("07 · Data parallelism") == ("07", "Data parallelism")
    measures = course_index.readme_measures()
    assert len(measures) >= 15 and "3n-2" in measures["02_systolic_array.ipynb"]
