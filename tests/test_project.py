"""The project's setup files agree with each other and with the README."""

import json
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_dependencies_are_lower_bounds_only():
    project = PYPROJECT["project"]
    specs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        specs += extra
    for spec in specs:
        assert "==" not in spec and "<" not in spec, f"exact or upper pin: {spec}"
        assert ">=" in spec, f"no lower bound: {spec}"
    assert {"dev", "cuda", "tpu"} <= set(project["optional-dependencies"])


def test_environment_yml_matches_pyproject():
    text = (ROOT / "environment.yml").read_text()
    python = re.search(r"-\s*python\s*([<>=!~].*)", text).group(1).strip()
    assert python == PYPROJECT["project"]["requires-python"]
    assert re.search(r"-\s*-e\s+\.\[dev\]", text), "environment.yml must pip-install -e .[dev]"


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in ci and "make test" in readme and "make course" in readme


def test_readme_dependency_table_covers_every_dependency():
    readme = (ROOT / "README.md").read_text().lower()
    for spec in PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["dev"]:
        name = re.split(r"[<>=\[ ]", spec)[0].lower()
        assert f"`{name}`" in readme, f"README dependency table misses {name}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_template(path):
    from scalelab import env

    nb = json.loads(path.read_text())
    cells = nb["cells"]
    title = "".join(cells[0]["source"])
    assert title.startswith("# ") and env.colab_badge(path.name) in title
    first_code = next("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    assert "env.setup(" in first_code
    assert f"git+{env.repository_url()}" in first_code  # the Colab install uses pyproject's URL
    md = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown").lower()
    for heading in ("takeaways", "exercises", "references"):
        assert heading in md, f"{path.name}: no {heading}"
    # exercise solutions are collapsed: measured code in a hidden-source cell, or a <details> block
    hidden_code = any(c["cell_type"] == "code" and c.get("metadata", {}).get("jupyter", {}).get("source_hidden")
                      for c in cells)
    assert hidden_code or "<details>" in md, f"{path.name}: no collapsed solutions"


def _readme_runtimes() -> dict[str, tuple[str, str]]:
    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        m = re.match(r"\| (\d\d) \| \[.*?\]\(notebooks/([^)]+)\) \|.*\| (~[^/|]+?) / (~[^|]+?) \|$", line)
        if m:
            rows[m[2]] = (m[3].strip(), m[4].strip())
    return rows


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_run_times_agree_with_readme_and_the_recorded_run(path):
    """One source: the header's run times equal the README's row, and the full-mode time is
    the one the committed outputs took (their execution timestamps), to the stated rounding."""
    import sys

    sys.path.insert(0, str(ROOT / "tools"))
    import runtimes

    header = runtimes.header_times(path)
    assert header, f"{path.name}: no '**Run time on a 2-core CPU:** quick mode ~.., full mode ~..' line"
    assert _readme_runtimes().get(path.name) == header, f"{path.name}: README row differs from header"
    recorded = runtimes.recorded_seconds(path)
    assert recorded is not None, f"{path.name}: committed without execution timestamps"
    stated = runtimes.parse(header[1])
    assert abs(recorded - stated) <= max(10.0, 0.3 * stated), (
        f"{path.name}: full mode stated {header[1]}, the committed run took {recorded:.0f} s"
    )


def test_readme_states_the_versions_the_committed_outputs_show():
    """The README's version line agrees with every chapter's stored setup line (for each package
    that line names), and the setup lines agree with each other."""
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"\*\*Versions of the committed outputs\*\*[^:]*: ([^\n]+(?:\n[^\n]+)*?)\.\n", readme)
    assert m, "README: no 'Versions of the committed outputs' line"
    stated = dict(re.findall(r"([a-z][a-z-]*) (\d[\w.]*)", m[1].replace("\n", " ")))
    assert {"python", "jax", "flax", "optax", "orbax-checkpoint", "grain"} <= stated.keys()
    for path in NOTEBOOKS:
        cells = json.loads(path.read_text())["cells"]
        setup = next(c for c in cells if c["cell_type"] == "code" and "env.setup(" in "".join(c["source"]))
        text = "".join("".join(o.get("text", "")) for o in setup.get("outputs", []))
        line = next((ln for ln in text.splitlines() if "| python " in ln), None)
        assert line, f"{path.name}: the setup cell's output has no version line"
        shown = dict(re.findall(r"([a-z][a-z-]*) (\d[\w.]*)", line.split("|")[0]))
        shown["python"] = re.search(r"\| python (\S+)", line)[1]
        for name, version in shown.items():
            assert stated.get(name) == version, f"{path.name} shows {name} {version}, README {stated.get(name)}"


def test_data_readme_snippet_runs(tmp_path, monkeypatch):
    """data/README.md's 'Using your own data' code runs as written (from an empty folder)."""
    text = (ROOT / "data" / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S)[1]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "data/README.md", "exec"), namespace)
    assert (tmp_path / "data" / "generated" / "mine.h5").exists()
    assert namespace["source"] is not None and set(namespace["store"].schema) == {"x", "y"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_failed_colab_install_says_so_in_one_line(path, monkeypatch):
    """When the install in the first cell failed, the cell stops with one clear line (what failed,
    what to do) instead of a ModuleNotFoundError traceback."""
    import sys

    cells = json.loads(path.read_text())["cells"]
    first = "".join(next(c for c in cells if c["cell_type"] == "code")["source"])
    code = "\n".join(ln for ln in first.splitlines() if not ln.lstrip().startswith("%pip"))
    code = code.split("\ninfo = env.setup(")[0].replace("if \"google.colab\" in sys.modules:", "if False:")
    code = code.replace("if False:  # Colab: install the course library first\n", "if False:\n    pass\n")
    monkeypatch.setitem(sys.modules, "scalelab", None)  # as if the install had failed
    with pytest.raises(SystemExit) as stop:
        exec(compile(code, path.name, "exec"), {})
    message = str(stop.value)
    assert "scalelab is not installed" in message and "install above failed" in message
    assert "\n" not in message
