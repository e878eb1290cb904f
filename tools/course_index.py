"""Write BUILD_DIR/index.html: the course's front page, one card per executed chapter.

Usage: python tools/course_index.py BUILD_DIR NOTEBOOK [NOTEBOOK ...]

Each NOTEBOOK is an *executed* chapter (``make course`` passes the copies it executed), so the
page reports that build: its title (inline Markdown rendered), what it measures (the README's
curriculum table), how long it ran on the machine that built the page (the cells' execution
timestamps) and its claims table's summary (how many claims held in that run), linking its page.
Exits 1 (after writing the index) if a chapter's page is missing from BUILD_DIR.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import re
import sys
from pathlib import Path

from scalelab import claims, env, hardware, io

ROOT = Path(__file__).resolve().parents[1]


def _cells(notebook: Path) -> list[dict]:
    return json.loads(notebook.read_text(encoding="utf-8")).get("cells", [])


def _text(value) -> str:
    return "".join(value) if isinstance(value, list) else (value or "")


def chapter_title(notebook: Path) -> str:
    """The text of the notebook's first markdown '# ' heading (or its file name)."""
    for cell in _cells(notebook):
        if cell.get("cell_type") != "markdown":
            continue
        for line in _text(cell.get("source")).splitlines():
            if line.startswith("# "):
                return line[2:].strip()
    return notebook.stem


def inline_markdown(text: str) -> str:
    """HTML of one line of Markdown: `code`, **strong**, *emphasis*, [links](url); the rest escaped."""
    out, pos = [], 0
    for m in re.finditer(r"`([^`]+)`", text):
        out.append(_emphasis(text[pos:m.start()]))
        out.append(f"<code>{html.escape(m[1])}</code>")
        pos = m.end()
    out.append(_emphasis(text[pos:]))
    return "".join(out)


def _emphasis(text: str) -> str:
    s = html.escape(text, quote=False)
    s = re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", lambda m: f'<a href="{html.escape(m[2])}">{m[1]}</a>', s)
    s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
    return re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"<em>\1</em>", s)


def split_number(title: str) -> tuple[str, str]:
    """("07", "Data parallelism: ...") from "07 · Data parallelism: ..." (no number: ("", title))."""
    m = re.match(r"^(\d{2})\s*[·.:-]\s*(.*)$", title)
    return (m[1], m[2]) if m else ("", title)


def readme_measures(readme: Path = ROOT / "README.md") -> dict[str, str]:
    """Notebook file name -> the README curriculum table's 'what is measured' cell."""
    found = {}
    if not readme.exists():
        return found
    for line in readme.read_text(encoding="utf-8").splitlines():
        cols = [c.strip() for c in line.strip().strip("|").split("|")]
        m = re.search(r"\(notebooks/([^)]+\.ipynb)\)", line)
        if m and len(cols) >= 5:
            found[m[1]] = cols[3]
    return found


def run_seconds(notebook: Path) -> float | None:
    """Seconds from the first cell's start to the last cell's reply, from nbclient's timestamps."""
    starts, ends = [], []
    for cell in _cells(notebook):
        timing = cell.get("metadata", {}).get("execution", {})
        if "iopub.execute_input" in timing and "shell.execute_reply" in timing:
            starts.append(dt.datetime.fromisoformat(timing["iopub.execute_input"].replace("Z", "+00:00")))
            ends.append(dt.datetime.fromisoformat(timing["shell.execute_reply"].replace("Z", "+00:00")))
    if not starts:
        return None
    return (max(ends) - min(starts)).total_seconds()


def claims_summary(notebook: Path) -> tuple[int, int] | None:
    """(checked, held) of the last claims summary line the chapter printed, or None."""
    found = None
    for cell in _cells(notebook):
        for out in cell.get("outputs", []):
            text = _text(out.get("text")) or _text(out.get("data", {}).get("text/plain"))
            for line in text.splitlines():
                if (parsed := claims.parse_summary(line)) is not None:
                    found = parsed
    return found


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "not timed"
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def card(nb: Path, build: Path, measures: dict[str, str]) -> tuple[str, bool]:
    """One chapter's card and whether its page exists."""
    number, title = split_number(chapter_title(nb))
    page = build / f"{nb.stem}.html"
    heading = inline_markdown(title)
    if page.exists():
        heading = f'<a href="{html.escape(page.name)}">{heading}</a>'
    else:
        heading += " <em>(not built)</em>"
    summary = claims_summary(nb)
    if summary is None:
        verdict = '<span class="claims none">no claims table</span>'
    else:
        checked, held = summary
        cls = "all" if held == checked else "some"
        verdict = f'<span class="claims {cls}">{held} of {checked} claims held</span>'
    what = measures.get(nb.name, "")
    return (f'<li class="chapter" data-chapter="{html.escape(number or nb.stem)}"><span class="num">{html.escape(number)}</span>'
            f'<div><h2>{heading}</h2>'
            + (f'<p class="measures">{inline_markdown(what)}</p>' if what else "")
            + f'<p class="meta">ran in <span class="time">{format_duration(run_seconds(nb))}</span> · {verdict}</p>'
            "</div></li>", page.exists())


def render(build: Path, notebooks: list[Path]) -> tuple[str, list[str]]:
    """The index page and the list of chapters whose page is missing."""
    measures = readme_measures()
    items, missing = [], []
    for nb in notebooks:
        item, built = card(nb, build, measures)
        items.append(item)
        if not built:
            missing.append(nb.name)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    info, cpu = env.versions(), hardware.cpu_info()
    host = f"{cpu.model}, {cpu.cores} core(s)"
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Scalable ML Workbench</title>
<style>body{{font-family:system-ui,sans-serif;max-width:56rem;margin:2rem auto;padding:0 1rem;line-height:1.45;color:#222}}
ol{{list-style:none;padding:0}} li.chapter{{display:flex;gap:1rem;border-top:1px solid #ddd;padding:.7rem 0}}
.num{{font-size:1.6rem;font-weight:600;color:#888;min-width:2.2rem}} h2{{font-size:1.1rem;margin:0}}
h2 a{{color:#0645ad;text-decoration:none}} p{{margin:.25rem 0}} .measures{{font-size:.92rem}}
.meta{{font-size:.85rem;color:#555}} .claims.all{{color:#17662a}} .claims.some{{color:#a15c00}}
code{{background:#f3f3f3;padding:0 .2rem;border-radius:3px}} footer{{color:#666;font-size:.85rem;margin-top:1.5rem}}</style></head>
<body><h1>Scalable ML Workbench</h1>
<p>How machine learning is scaled, measured rather than stated. Every chapter below was executed top to
bottom on the machine that built this page; its run time and the verdicts of its claims table are from
that run.</p>
<ol>
{chr(10).join(items)}
</ol>
<footer>Built {stamp} on {html.escape(host)}
with scalelab {html.escape(info["scalelab"])}, jax {html.escape(info["jax"])}.</footer>
</body></html>
"""
    return page, missing


WIDGET_DIST = ROOT / "build" / "web" / "node_modules" / "@jupyter-widgets" / "html-manager" / "dist"


def copy_widget_fonts(build: Path, dist: Path = WIDGET_DIST) -> int:
    """Copy the widgets' icon fonts where the HTML manager's styles look for them (relative to the
    page: ``@jupyter-widgets/`` and ``@jupyter-widgets/html-manager/dist/``), so that an exported
    page opened offline finds them. Returns how many files were copied (0 without a local manager)."""
    import shutil

    if not dist.is_dir():
        return 0
    copied = 0
    for target in (build / "@jupyter-widgets", build / "@jupyter-widgets" / "html-manager" / "dist"):
        target.mkdir(parents=True, exist_ok=True)
        for font in dist.iterdir():
            if font.suffix in (".woff2", ".woff", ".ttf", ".eot", ".svg"):
                shutil.copyfile(font, target / font.name)
                copied += 1
    return copied


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    build = Path(argv[0])
    notebooks = [Path(p) for p in argv[1:]]
    page, missing = render(build, notebooks)
    io.write_text(build / "index.html", page)
    copy_widget_fonts(build)
    print(f"wrote {build / 'index.html'} ({len(notebooks) - len(missing)} chapters)")
    if missing:
        print(f"missing pages: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
