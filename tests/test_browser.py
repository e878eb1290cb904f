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

The same browser also opens, with every network request refused: one chapter exported to HTML the
way ``make course`` exports it (its math must be typeset by the local MathJax and its explorer drawn
from the saved widget state), the course's index page, and chapter 14's ONNX page (the model run
by onnxruntime-web must give the exported model's probabilities).
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

# one xdist worker runs them all (`--dist loadgroup`): one JupyterLab and one browser, not one per worker
pytestmark = pytest.mark.xdist_group("browser")

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
    if chromium_path() is None:
        _skip_or_fail("Chromium is not installed")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _skip_or_fail("Playwright for Python is not installed")

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS)
        yield b
        b.close()


def _page(browser, errors: list[str]):
    page = browser.new_page(viewport={"width": 1400, "height": 2000})
    page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url} ({r.failure})"))
    # The test runs offline: a page's external resources (the Colab badge image in a title cell) are
    # answered empty here, so that only the course's own failures count as errors.
    page.route(lambda url: not url.startswith(("http://127.0.0.1", "file:", "data:", "blob:")),
               lambda route: route.fulfill(status=204, body=""))
    return page


# Each function finds the notebook by its path among the open documents, never "the current widget":
# whatever else the page holds (a restored layout, a dialog) cannot make a test drive another notebook.
FIND_NB = """const nb = Array.from(window.jupyterapp ? window.jupyterapp.shell.widgets('main') : [])
  .find(w => w.context && w.context.path === a.path && w.content && w.content.widgets);"""
KERNEL_IDLE = "(a) => { " + FIND_NB + """
  const k = nb && nb.sessionContext && nb.sessionContext.session && nb.sessionContext.session.kernel;
  return !!k && k.status === 'idle'; }"""
RUN_CELL = "async (a) => { " + FIND_NB + """
  window.jupyterapp.shell.activateById(nb.id);
  nb.content.activeCellIndex = a.i; await window.jupyterapp.commands.execute('notebook:run-cell'); }"""
CELL_DONE = "(a) => { " + FIND_NB + """
  const c = nb.content.widgets[a.i];
  return c.model.executionCount !== null && nb.sessionContext.session.kernel.status === 'idle'; }"""
CELL_ERROR = "(a) => { " + FIND_NB + """
  const e = nb.content.widgets[a.i].model.outputs.toJSON().find(o => o.output_type === 'error');
  return e ? e.ename + ': ' + e.evalue : ''; }"""

NB_ID = "(a) => { " + FIND_NB + """ return nb.id; }"""

PAINTED = """async (el) => { await Promise.all(Array.from(el.querySelectorAll('img')).map(i => i.decode().catch(() => null)));
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r))); }"""

INK = """el => { const i = el.querySelector('img'); if (!i) return 1;
  const c = document.createElement('canvas'); c.width = i.naturalWidth; c.height = i.naturalHeight;
  const g = c.getContext('2d'); g.drawImage(i, 0, 0); const d = g.getImageData(0, 0, c.width, c.height).data;
  let n = 0; for (let k = 0; k < d.length; k += 4) if (d[k + 3] > 0 && Math.min(d[k], d[k + 1], d[k + 2]) < 200) n++;
  return n / (c.width * c.height); }"""


def shut_down_kernels(base: str, token: str) -> None:
    """Every kernel of the lab shut down, so that one chapter's kernel neither holds memory nor
    competes for the cores while the next chapter runs."""
    def call(method: str, path: str):
        req = urllib.request.Request(f"{base}{path}?token={token}", method=method)
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read() or b"null")
    for session in call("GET", "/api/sessions"):
        with contextlib.suppress(OSError):
            call("DELETE", f"/api/sessions/{session['id']}")
    for kernel in call("GET", "/api/kernels"):
        with contextlib.suppress(OSError):
            call("DELETE", f"/api/kernels/{kernel['id']}")


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


def settled_result(page, explorer, chapter: str, timeout_s: float = 60) -> dict:
    """The result line once the kernel is idle and two reads half a second apart agree."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        page.wait_for_function(KERNEL_IDLE, arg={"path": chapter}, timeout=60_000)
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
        # a workspace of its own, reset: the page opens this chapter alone, not a restored layout
        page.goto(f"{base}/lab/workspaces/test-{Path(chapter).stem}/tree/{chapter}?reset&token={token}")
        page.wait_for_function(KERNEL_IDLE, arg={"path": chapter}, timeout=120_000)
        for i in run:
            page.evaluate(RUN_CELL, {"path": chapter, "i": i})
            page.wait_for_function(CELL_DONE, arg={"path": chapter, "i": i}, timeout=300_000)
            failed = page.evaluate(CELL_ERROR, {"path": chapter, "i": i})
            assert not failed, f"cell {i} of {chapter} raised: {failed}"
        SHOTS.mkdir(parents=True, exist_ok=True)
        panel = page.locator("#" + page.evaluate(NB_ID, {"path": chapter}))
        for i in explorer_cells:
            cell = panel.locator(".jp-Cell").nth(i)
            for explorer in cell.locator(".scalelab-explorer").all():
                explorer.locator(".scalelab-explorer-result").wait_for(timeout=60_000)
                before = settled_result(page, explorer, chapter)
                check_against_model(before)
                moved = move_controls(page, explorer)
                assert moved, f"{before['model']}: the explorer has no slider or dropdown to move"
                page.wait_for_function(
                    "([el, old]) => el.querySelector('.scalelab-explorer-result').dataset.settings !== old",
                    arg=[explorer.element_handle(), json.dumps(before["settings"], sort_keys=True)],
                    timeout=60_000)
                after = settled_result(page, explorer, chapter)
                assert after["settings"] != before["settings"]
                check_against_model(after)
                page.wait_for_function(  # the redrawn figure has loaded before the screenshot
                    "el => { const i = el.querySelector('img'); return !i || (i.complete && i.naturalHeight > 0); }",
                    arg=explorer.element_handle(), timeout=30_000)
                # the figure's update carries a binary buffer, deserialised asynchronously in the page:
                # it may land after the result line's; wait until its image has stopped changing
                last_src, deadline = None, time.monotonic() + 30
                while time.monotonic() < deadline:
                    src = explorer.evaluate("el => { const i = el.querySelector('img'); return i ? i.src : ''; }")
                    if src == last_src:
                        break
                    last_src = src
                    page.wait_for_timeout(1000)
                explorer.scroll_into_view_if_needed()
                explorer.evaluate(PAINTED)  # every image decoded, then two frames painted
                ink = explorer.evaluate(INK)
                assert ink > 0.01, f"{chapter}: the redrawn figure is nearly blank ({ink:.1%} of its pixels drawn)"
                name = explorer.locator(".scalelab-explorer-result").get_attribute("data-explorer")
                # an element screenshot: scrolled into the notebook's own scrolling panel, where a clip
                # of the page would catch the part outside the panel's view unpainted
                explorer.screenshot(path=str(SHOTS / f"{Path(chapter).stem[:2]}-{name}.png"))
    finally:
        page.close()
        shut_down_kernels(base, token)
    assert not errors, "JavaScript errors in the page:\n" + "\n".join(errors)


OFFLINE_CHAPTER = "01_hardware.ipynb"  # math in its prose and an explorer with saved widget state


def _offline_page(browser, errors: list[str], blocked: list[str]):
    """A page that may load only local files (and 127.0.0.1): every other request is recorded and
    answered empty. A test then allows only images there (the title cell's Colab badge)."""
    page = browser.new_page(viewport={"width": 1300, "height": 1500})
    page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url} ({r.failure})")
            if not any(b.endswith(r.url) for b in blocked) else None)

    def refuse(route):  # recorded, and answered empty as an offline machine would not answer at all
        blocked.append(f"{route.request.resource_type}: {route.request.url}")
        route.fulfill(status=204, body="")

    page.route(lambda url: not url.startswith(("file:", "data:", "blob:", "http://127.0.0.1")), refuse)
    return page


@pytest.fixture(scope="module")
def exported_course(tmp_path_factory):
    """One chapter exported as `make course` exports it (from its committed full run, not
    re-executed), next to the local scripts, and the index page built from the committed runs."""
    web = ROOT / "build" / "web" / "node_modules"
    if not (web / "mathjax" / "MathJax.js").exists():
        _skip_or_fail("the local MathJax is not installed")
    root = tmp_path_factory.mktemp("site")
    (root / "web").symlink_to(ROOT / "build" / "web", target_is_directory=True)
    course = root / "course"
    subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--config", str(ROOT / "nbconvert_config.py"),
                    "--ExecutePreprocessor.enabled=False", "--to", "html", "--output-dir", str(course),
                    str(ROOT / "notebooks" / OFFLINE_CHAPTER)], check=True, capture_output=True, cwd=ROOT)
    notebooks = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    subprocess.run([sys.executable, str(ROOT / "tools" / "course_index.py"), str(course), *map(str, notebooks)],
                   capture_output=True, cwd=ROOT)  # exits 1: only one chapter's page is built here
    assert (course / "index.html").exists()
    return course


def test_an_exported_chapter_renders_offline(browser, exported_course):
    page_path = exported_course / OFFLINE_CHAPTER.replace(".ipynb", ".html")
    text = page_path.read_text(encoding="utf-8")
    assert "../web/node_modules/mathjax/MathJax.js" in text, "the page does not use the local MathJax"
    assert "application/vnd.jupyter.widget-state+json" in text, "the page carries no widget state"
    errors, blocked = [], []
    page = _offline_page(browser, errors, blocked)
    try:
        page.goto(page_path.as_uri())
        page.wait_for_function("() => window.MathJax && MathJax.Hub && MathJax.Hub.queue.running === 0 "
                               "&& MathJax.Hub.queue.pending === 0 && document.querySelectorAll('.MathJax_CHTML').length > 0",
                               timeout=120_000)
        typeset = page.evaluate("document.querySelectorAll('.MathJax_CHTML').length")
        raw = page.evaluate(r"""() => { const w = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
          const found = []; let n; while ((n = w.nextNode())) {
            if (n.parentElement.closest('script, pre, code, .MathJax_Preview')) continue;
            if (/\\[a-z]+|\$[^$\s][^$]*\$/.test(n.textContent)) found.push(n.textContent.slice(0, 80)); }
          return found; }""")
        assert typeset > 5, f"only {typeset} formulas typeset"
        assert not raw, f"math left as raw TeX: {raw[:5]}"
        explorer = page.locator(".scalelab-explorer").first
        explorer.wait_for(timeout=60_000)  # drawn by the widgets' HTML manager from the saved state
        result = explorer.locator(".scalelab-explorer-result")
        assert result.count() == 1 and result.get_attribute("data-model") == "scalelab.hardware:roofline_model"
        shown = read_result(explorer)
        check_against_model(shown)  # the saved state is the model's value at the saved setting
        assert explorer.locator(".widget-slider").count() >= 2 and explorer.locator("img").count() == 1
        SHOTS.mkdir(parents=True, exist_ok=True)
        explorer.scroll_into_view_if_needed()
        page.wait_for_timeout(500)
        explorer.screenshot(path=str(SHOTS / "offline-01-explorer.png"))
        first_math = page.locator(".MathJax_CHTML").first
        first_math.scroll_into_view_if_needed()
        box = first_math.bounding_box()
        page.screenshot(path=str(SHOTS / "offline-01-math.png"),
                        clip={"x": 0, "y": max(box["y"] - 120, 0), "width": 1300, "height": 300})
    finally:
        page.close()
    assert not errors, "JavaScript errors in the exported page:\n" + "\n".join(errors)
    needed = [b for b in blocked if not b.startswith("image: ")]
    assert not needed, f"the exported page needs the network for: {needed[:5]}"


def test_the_course_index_is_a_page_to_open(browser, exported_course):
    errors, blocked = [], []
    page = _offline_page(browser, errors, blocked)
    try:
        page.goto((exported_course / "index.html").as_uri())
        cards = page.locator("li.chapter")
        notebooks = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
        assert cards.count() == len(notebooks)
        titles = cards.locator("h2").all_inner_texts()
        assert not [t for t in titles if "`" in t or t[:2].isdigit()], titles  # rendered, numbered once
        assert cards.locator("h2 code").count() >= 1  # inline code rendered as code
        numbers = cards.locator(".num").all_inner_texts()
        assert numbers == [nb.name[:2] for nb in notebooks]
        link = cards.locator("h2 a")
        assert link.count() == 1 and link.get_attribute("href") == OFFLINE_CHAPTER.replace(".ipynb", ".html")
        metas = cards.locator(".meta").all_inner_texts()
        assert all(" s" in m or " min" in m for m in metas), metas
        assert all("claims held" in m for m in metas), metas
        assert cards.locator(".measures").count() == len(notebooks)
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / "course-index.png"), full_page=True)
    finally:
        page.close()
    assert not errors and not blocked, (errors, blocked)


@contextlib.contextmanager
def _static_server(directory: Path):
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_chapter_14s_onnx_page_gives_the_models_probabilities(browser, tmp_path):
    import numpy as np

    from scalelab import serve

    ort = serve.local_ort_web()
    if ort is None:
        _skip_or_fail("onnxruntime-web is not installed")
    model = serve.serving_model(tmp_path / "model", hidden=(64,), steps=5)
    predictor = serve.Predictor(model["exported"], max_batch=16)
    onnx_path = serve.to_onnx(model["params"], tmp_path / "model.onnx")
    x = np.random.default_rng(2).random((4, 64), np.float32).round(4)
    site = serve.write_web_demo(tmp_path / "site", onnx_path, x, ort_src=ort)
    errors, blocked = [], []
    page = _offline_page(browser, errors, blocked)
    try:
        with _static_server(site) as base:
            page.goto(f"{base}/index.html")
            page.wait_for_function("() => { const r = document.getElementById('result');"
                                   " return r && r.textContent.trim().startsWith('{'); }", timeout=60_000)
            result = json.loads(page.locator("#result").inner_text())
            SHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SHOTS / "14-onnx-page.png"), full_page=True)
    finally:
        page.close()
    np.testing.assert_allclose(result["probabilities"], predictor(x), atol=1e-5)
    assert not errors and not blocked, (errors, blocked)
