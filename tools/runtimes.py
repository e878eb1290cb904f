"""Run times of the committed notebooks, read from their own execution records.

Every executed cell stores when it started and finished (``metadata.execution``); the span from
the first to the last timestamp is the notebook's full-mode run time on the machine that made
the committed outputs (kernel start not included). The README's curriculum table and each
chapter's header state these times; ``tests/test_project.py`` keeps the three in agreement.

Usage: python tools/runtimes.py [NOTEBOOK ...]   (default: every chapter)
"""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER_RE = re.compile(r"\*\*Run time on a 2-core CPU:\*\* quick mode (~[\d.]+ (?:s|min)), "
                       r"full mode (~[\d.]+ (?:s|min))\.")


def recorded_seconds(notebook: Path) -> float | None:
    """Seconds between the first and the last execution timestamp stored in the notebook."""
    stamps = []
    for cell in json.loads(notebook.read_text(encoding="utf-8"))["cells"]:
        for value in cell.get("metadata", {}).get("execution", {}).values():
            stamps.append(dt.datetime.fromisoformat(value.replace("Z", "+00:00")))
    if len(stamps) < 2:
        return None
    return (max(stamps) - min(stamps)).total_seconds()


def fmt(seconds: float) -> str:
    """``~35 s`` below 90 s (5 s steps), else ``~2.5 min`` (half-minute steps)."""
    if seconds < 90:
        return f"~{max(5, 5 * round(seconds / 5))} s"
    minutes = round(seconds / 30) / 2
    return f"~{minutes:g} min"


def parse(text: str) -> float:
    """Seconds from ``~35 s`` or ``~2.5 min``."""
    m = re.fullmatch(r"~([\d.]+) (s|min)", text.strip())
    if not m:
        raise ValueError(f"a run time looks like '~35 s' or '~2.5 min', got {text!r}")
    return float(m[1]) * (60 if m[2] == "min" else 1)


def header_times(notebook: Path) -> tuple[str, str] | None:
    """(quick, full) from the chapter's title cell, or None when the line is missing."""
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    m = HEADER_RE.search("".join(cells[0]["source"]))
    return (m[1], m[2]) if m else None


def main(argv: list[str]) -> int:
    paths = [Path(p) for p in argv] or sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    for path in paths:
        sec = recorded_seconds(path)
        stated = header_times(path)
        print(f"{path.name:42s} recorded {fmt(sec) if sec else '?':>9s}   header {stated}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
