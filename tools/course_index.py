"""Write build/course/index.html linking each executed chapter's HTML page.

Usage: python tools/course_index.py BUILD_DIR NOTEBOOK [NOTEBOOK ...]
Exits 1 (after writing the index) if a chapter's page is missing from BUILD_DIR.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import sys
from pathlib import Path

from scalelab import env, io


def chapter_title(notebook: Path) -> str:
    """The text of the notebook's first markdown '# ' heading (or its file name)."""
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "markdown":
            continue
        src = cell.get("source", "")
        for line in ("".join(src) if isinstance(src, list) else src).splitlines():
            if line.startswith("# "):
                return line[2:].strip()
    return notebook.stem


def render(build: Path, notebooks: list[Path]) -> tuple[str, list[str]]:
    """The index page and the list of chapters whose page is missing."""
    items, missing = [], []
    for nb in notebooks:
        page = build / f"{nb.stem}.html"
        title = html.escape(chapter_title(nb))
        if page.exists():
            items.append(f'<li><a href="{html.escape(page.name)}">{title}</a></li>')
        else:
            items.append(f"<li>{title} <em>(not built)</em></li>")
            missing.append(nb.name)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    info = env.versions()
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Scalable ML Workbench</title>
<style>body{{font-family:system-ui,sans-serif;max-width:48rem;margin:2rem auto;line-height:1.5}}
li{{margin:.3rem 0}} footer{{color:#666;font-size:.85rem}}</style></head>
<body><h1>Scalable ML Workbench</h1>
<p>Every chapter below was executed top to bottom on the machine that built this page.</p>
<ol>
{chr(10).join(items)}
</ol>
<footer>Built {stamp} with scalelab {html.escape(info["scalelab"])}, jax {html.escape(info["jax"])}.</footer>
</body></html>
"""
    return page, missing


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    build = Path(argv[0])
    notebooks = [Path(p) for p in argv[1:]]
    page, missing = render(build, notebooks)
    io.write_text(build / "index.html", page)
    print(f"wrote {build / 'index.html'} ({len(notebooks) - len(missing)} chapters)")
    if missing:
        print(f"missing pages: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
