"""The course in a real browser: JupyterLab in headless Chromium, driven by Playwright.

Playwright drives the system Chromium by its path (no browser download). Where Chromium or
Playwright is missing these tests skip with a message naming ``make browser-deps``; CI sets
``SCALELAB_REQUIRE_BROWSER=1`` so that they fail instead.

For every chapter with explorers (cells tagged ``explorer``), the test starts JupyterLab on
127.0.0.1 with a fresh token and the course's kernel, opens a copy of the chapter, runs its setup
cell, the cells tagged ``explorer-input`` and the explorer cells, moves one slider and one
dropdown of each explorer, and checks that every value the page shows is what the explorer's model
function (named in the page) gives for the settings the page shows; with no JavaScript error in the
console. A screenshot of each explorer goes to ``build/browser/``.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import json
import math
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "build" / "browser"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SETTINGS = {  # JupyterLab user settings for a test: every cell in the DOM, no autosave, no news
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                        "checkForUpdates": False},
}


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


def _skip_or_fail(reason: str) -> None:
    message = f"{reason}: run `make browser-deps` (installs Chromium and the pages' JavaScript)"
    if os.environ.get("SCALELAB_REQUIRE_BROWSER") == "1":
        pytest.fail(message)
    pytest.skip(message)


def explorer_chapters() -> list[Path]:
    """The chapters that have at least one cell tagged ``explorer``."""
    return [nb for nb in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
            if any("explorer" in c.get("metadata", {}).get("tags", [])
                   for c in json.loads(nb.read_text(encoding="utf-8"))["cells"])]


def cells_to_run(nb_path: Path) -> tuple[list[int], list[int]]:
    """(indices of the cells to run in order, indices of the explorer cells among them)."""
    cells = json.loads(nb_path.read_text(encoding="utf-8"))["cells"]
    run, explorers = [], []
    for i, cell in enumerate(cells):
        if cell["cell_type"] != "code":
            continue
        tags = cell.get("metadata", {}).get("tags", [])
        source = "".join(cell["source"])
        if "env.setup(" in source and not run:
            run.append(i)
        elif "explorer" in tags or "explorer-input" in tags:
            run.append(i)
            if "explorer" in tags:
                explorers.append(i)
    return run, explorers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab on a copy of the notebooks: (base URL, token, root folder)."""
    if chromium_path() is None:
        _skip_or_fail("Chromium is not installed")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _skip_or_fail("Playwright for Python is not installed")
    root = tmp_path_factory.mktemp("lab")
    for nb in explorer_chapters():
        shutil.copy(nb, root / nb.name)
    settings = root / ".settings"
    for rel, value in SETTINGS.items():
        (settings / rel).parent.mkdir(parents=True, exist_ok=True)
        (settings / rel).write_text(json.dumps(value))
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, SCALELAB_QUICK="1", SCALELAB_PROGRESS="0", JUPYTERLAB_SETTINGS_DIR=str(settings),
               JUPYTERLAB_WORKSPACES_DIR=str(root / ".workspaces"), JUPYTER_CONFIG_DIR=str(root / ".config"))
    log = open(root / "lab.log", "w")  # closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", f"--port={port}", "--ip=127.0.0.1",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         "--LabApp.expose_app_in_browser=True", "--LabApp.extension_manager=readonly"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2).read()
                break
            except OSError as err:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("JupyterLab did not start:\n"
                                       + (root / "lab.log").read_text()[-3000:]) from err
                time.sleep(0.5)
        yield base, token, root
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(15)
        if proc.poll() is None:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS)
        yield b
        b.close()


def _page(browser, errors: list[str]):
    page = browser.new_page(viewport={"width": 1400, "height": 1600})
    page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url} ({r.failure})"))
    # The test runs offline: a page's external resources (the Colab badge image in a title cell) are
    # answered empty here, so that only the course's own failures count as errors.
    page.route(lambda url: not url.startswith(("http://127.0.0.1", "file:", "data:", "blob:")),
               lambda route: route.fulfill(status=204, body=""))
    return page


KERNEL_IDLE = """() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
  return !!k && k.status === 'idle'; }"""
RUN_CELL = """async (i) => { const app = window.jupyterapp; const nb = app.shell.currentWidget;
  nb.content.activeCellIndex = i; await app.commands.execute('notebook:run-cell'); }"""
CELL_DONE = """(i) => { const nb = window.jupyterapp.shell.currentWidget; const c = nb.content.widgets[i];
  return c.model.executionCount !== null && nb.sessionContext.session.kernel.status === 'idle'; }"""

CELL_ERROR = """(i) => { const c = window.jupyterapp.shell.currentWidget.content.widgets[i];
  const e = c.model.outputs.toJSON().find(o => o.output_type === 'error');
  return e ? e.ename + ': ' + e.evalue : ''; }"""


READ_RESULT = """(el) => { const d = el.querySelector('.scalelab-explorer-result');
  if (!d) return null;
  const values = {}; d.querySelectorAll('[data-key]').forEach(s => { values[s.dataset.key] = s.dataset.value; });
  return {model: d.dataset.model || '', settings: d.dataset.settings || '{}', values: values}; }"""


def read_result(explorer) -> dict:
    """What one explorer's result line shows (model, settings, every value), read in one go."""
    raw = explorer.evaluate(READ_RESULT)
    assert raw is not None, "the explorer shows no result line"
    return {"model": raw["model"], "settings": json.loads(raw["settings"]),
            "values": {k: ast.literal_eval(v) for k, v in raw["values"].items()}}


def settled_result(page, explorer, timeout_s: float = 60) -> dict:
    """The result line once the kernel is idle and two reads half a second apart agree."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        page.wait_for_function(KERNEL_IDLE, timeout=60_000)
        now = read_result(explorer)
        if now == last:
            return now
        last = now
        page.wait_for_timeout(500)
    raise AssertionError("the explorer's result line kept changing")


def check_against_model(shown: dict) -> None:
    module, _, name = shown["model"].partition(":")
    expected = getattr(importlib.import_module(module), name)(**shown["settings"])
    for key, value in shown["values"].items():
        want = expected[key]
        if isinstance(want, float | int) and not isinstance(want, bool):
            assert math.isclose(value, want, rel_tol=1e-9, abs_tol=1e-12), (key, value, want, shown["settings"])
        else:
            assert value == want, (key, value, want, shown["settings"])


def move_controls(page, explorer) -> list[str]:
    """Move the first slider two steps right and pick the next option of the first dropdown."""
    moved = []
    handles = explorer.locator(".widget-slider .noUi-handle")
    if handles.count():
        handles.first.focus()
        page.keyboard.press("ArrowRight")
        page.keyboard.press("ArrowRight")
        moved.append("slider")
    selects = explorer.locator(".widget-dropdown select")
    if selects.count():
        select = selects.first
        n = select.locator("option").count()
        current = select.evaluate("s => s.selectedIndex")
        if n > 1:
            select.select_option(index=(current + 1) % n)
            moved.append("dropdown")
    return moved


@pytest.mark.parametrize("chapter", [nb.name for nb in explorer_chapters()] or ["(none)"])
def test_explorers_follow_their_models_in_jupyterlab(lab, browser, chapter):
    if chapter == "(none)":
        pytest.skip("no chapter has an explorer cell")
    base, token, root = lab
    run, explorer_cells = cells_to_run(root / chapter)
    errors: list[str] = []
    page = _page(browser, errors)
    try:
        page.goto(f"{base}/lab/tree/{chapter}?token={token}")
        page.wait_for_function(KERNEL_IDLE, timeout=120_000)
        for i in run:
            page.evaluate(RUN_CELL, i)
            page.wait_for_function(CELL_DONE, arg=i, timeout=300_000)
            failed = page.evaluate(CELL_ERROR, i)
            assert not failed, f"cell {i} of {chapter} raised: {failed}"
        SHOTS.mkdir(parents=True, exist_ok=True)
        for i in explorer_cells:
            cell = page.locator(".jp-Cell").nth(i)
            for explorer in cell.locator(".scalelab-explorer").all():
                explorer.locator(".scalelab-explorer-result").wait_for(timeout=60_000)
                before = settled_result(page, explorer)
                check_against_model(before)
                moved = move_controls(page, explorer)
                assert moved, f"{before['model']}: the explorer has no slider or dropdown to move"
                page.wait_for_function(
                    "([el, old]) => el.querySelector('.scalelab-explorer-result').dataset.settings !== old",
                    arg=[explorer.element_handle(), json.dumps(before["settings"], sort_keys=True)],
                    timeout=60_000)
                after = settled_result(page, explorer)
                assert after["settings"] != before["settings"]
                check_against_model(after)
                page.wait_for_function(  # the redrawn figure has loaded before the screenshot
                    "el => { const i = el.querySelector('img'); return !i || (i.complete && i.naturalHeight > 0); }",
                    arg=explorer.element_handle(), timeout=30_000)
                explorer.scroll_into_view_if_needed()
                page.wait_for_timeout(1000)  # let the new image be decoded and painted
                name = explorer.locator(".scalelab-explorer-result").get_attribute("data-explorer")
                page.screenshot(path=str(SHOTS / f"{Path(chapter).stem[:2]}-{name}.png"), clip=explorer.bounding_box())
    finally:
        page.close()
    assert not errors, "JavaScript errors in the page:\n" + "\n".join(errors)
