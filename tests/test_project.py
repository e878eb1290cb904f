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
    for heading in ("takeaways", "exercises", "references", "<details>"):
        assert heading in md, f"{path.name}: no {heading}"
