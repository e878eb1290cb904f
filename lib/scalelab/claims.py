"""Claims bound to this run's measurements.

A chapter states a claim (what the seed article or the chapter says), its expectation (a bound
or an equality) and the values this run measured; ``scalelab.claims`` prints one verdict line
with *this run's* numbers and records it, and the chapter ends with :func:`table`::

    from scalelab import claims

    claims.at_least("jit is {value} faster than Python at n=1e6", ratio, 10, unit="x")
    # holds here: jit is 150x faster than Python at n=1e6 (expected >= 10x)

    claims.equal("the simulator takes 3n - 2 cycles", res.cycles, 3 * n - 2, invariant=True)

Two kinds of claim:

* **invariant** (``invariant=True``): hardware-independent facts (equalities, exact counts,
  bounds that follow from the maths). A failing invariant raises :class:`ClaimFailed`, so a wrong
  result fails the notebook run.
* **hardware** (the default): depends on the machine. The verdict is printed and recorded, never
  raised; the chapter's prose discusses both outcomes.

Re-running a cell replaces the claim of the same wording instead of adding it twice. The claims
of a chapter live in a module-level :class:`Ledger` (:data:`LEDGER`); ``env.setup`` does not touch it,
call :func:`reset` to start over.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

__all__ = [
    "LEDGER",
    "Claim",
    "ClaimFailed",
    "Ledger",
    "at_least",
    "at_most",
    "between",
    "check",
    "claims",
    "close",
    "equal",
    "reset",
    "summary",
    "table",
]

HOLDS = "holds here"
FAILS = "does not hold here"
SUMMARY_RE = re.compile(r"claims: (\d+) checked, (\d+) held(?:, (\d+) did not hold)?")


class ClaimFailed(AssertionError):
    """An invariant (hardware-independent) claim did not hold: the result is wrong."""


@dataclasses.dataclass(frozen=True)
class Claim:
    """One checked claim: its wording (with this run's value filled in), expectation and verdict."""

    text: str
    measured: str
    expected: str
    holds: bool
    invariant: bool = False
    key: str = ""

    @property
    def verdict(self) -> str:
        return HOLDS if self.holds else FAILS

    @property
    def kind(self) -> str:
        return "invariant" if self.invariant else "hardware"

    def line(self) -> str:
        """The verdict line, e.g. ``holds here: jit is 150x faster ... (expected >= 10x)``."""
        return f"{self.verdict}: {self.text} (expected {self.expected})"

    def row(self) -> dict[str, Any]:
        return {"claim": self.text, "measured here": self.measured, "expected": self.expected,
                "kind": self.kind, "verdict": self.verdict}

    def __str__(self) -> str:
        return self.line()


class Ledger:
    """The claims checked so far, in order, keyed by their wording template."""

    def __init__(self) -> None:
        self._claims: dict[str, Claim] = {}

    def record(self, claim: Claim) -> Claim:
        self._claims.pop(claim.key, None)  # a re-run cell moves its claim to the end
        self._claims[claim.key] = claim
        return claim

    def reset(self) -> None:
        self._claims.clear()

    def __iter__(self):
        return iter(list(self._claims.values()))

    def __len__(self) -> int:
        return len(self._claims)


LEDGER = Ledger()


def _fmt_number(value: Any, fmt: str | Callable[[Any], str] | None, unit: str) -> str:
    if callable(fmt):
        text = fmt(value)
    elif fmt is not None:
        text = format(value, fmt)
    elif isinstance(value, bool):
        text = str(value)
    elif isinstance(value, int):
        text = f"{value:,}"
    elif isinstance(value, float):
        if value != 0 and math.isfinite(value) and (abs(value) >= 1e5 or abs(value) < 1e-3):
            text = f"{value:.2e}"
        elif math.isfinite(value) and abs(value) >= 100:
            text = f"{value:,.0f}"
        else:
            text = f"{value:.3g}"
    else:
        text = str(value)
    if not unit:
        return text
    return text + unit if unit in ("x", "%") or unit.startswith("/") else f"{text} {unit}"


def check(text: str, holds: bool, *, measured: str, expected: str, invariant: bool = False,
          key: str | None = None, quiet: bool = False) -> Claim:
    """Record a claim whose verdict the caller decided; print its verdict line.

    ``text`` is the claim with this run's values already in it, ``measured`` a short form of those
    values (for the table), ``expected`` the expectation in words or as a bound. An ``invariant``
    claim that does not hold raises :class:`ClaimFailed` after printing its line.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("a claim needs its wording as a non-empty string")
    claim = LEDGER.record(Claim(text=text, measured=str(measured), expected=str(expected),
                                holds=bool(holds), invariant=invariant, key=key or text))
    if not quiet:
        print(claim.line())
    if invariant and not claim.holds:
        raise ClaimFailed(claim.line())
    return claim


def _value_claim(template: str, value: Any, holds: bool, expected: str, *, unit: str,
                 fmt: str | Callable[[Any], str] | None, invariant: bool, quiet: bool,
                 measured: str | None = None) -> Claim:
    shown = _fmt_number(value, fmt, unit)
    if "{value}" in template:
        text = template.replace("{value}", shown)
    else:
        text = f"{template}: {shown}"
    return check(text, holds, measured=measured or shown, expected=expected, invariant=invariant,
                 key=template, quiet=quiet)


def _number(value: Any, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    return number


def at_least(template: str, value: float, bound: float, *, unit: str = "",
             fmt: str | Callable[[Any], str] | None = None, invariant: bool = False,
             quiet: bool = False) -> Claim:
    """The claim holds when ``value >= bound``. ``{value}`` in ``template`` is replaced by it."""
    v, b = _number(value, "value"), _number(bound, "bound")
    return _value_claim(template, value, v >= b, f">= {_fmt_number(bound, fmt, unit)}",
                        unit=unit, fmt=fmt, invariant=invariant, quiet=quiet)


def at_most(template: str, value: float, bound: float, *, unit: str = "",
            fmt: str | Callable[[Any], str] | None = None, invariant: bool = False,
            quiet: bool = False) -> Claim:
    """The claim holds when ``value <= bound``."""
    v, b = _number(value, "value"), _number(bound, "bound")
    return _value_claim(template, value, v <= b, f"<= {_fmt_number(bound, fmt, unit)}",
                        unit=unit, fmt=fmt, invariant=invariant, quiet=quiet)


def between(template: str, value: float, low: float, high: float, *, unit: str = "",
            fmt: str | Callable[[Any], str] | None = None, invariant: bool = False,
            quiet: bool = False) -> Claim:
    """The claim holds when ``low <= value <= high``."""
    v, lo, hi = _number(value, "value"), _number(low, "low"), _number(high, "high")
    if lo > hi:
        raise ValueError(f"between() needs low <= high, got {low!r} > {high!r}")
    expected = f"{_fmt_number(low, fmt, unit)} to {_fmt_number(high, fmt, unit)}"
    return _value_claim(template, value, lo <= v <= hi, expected, unit=unit, fmt=fmt,
                        invariant=invariant, quiet=quiet)


def _same(a: Any, b: Any) -> bool:
    if hasattr(a, "shape") or hasattr(b, "shape"):
        import numpy as np

        return bool(np.array_equal(np.asarray(a), np.asarray(b)))
    return bool(a == b)


def equal(template: str, value: Any, expected: Any, *, unit: str = "",
          fmt: str | Callable[[Any], str] | None = None, invariant: bool = True,
          quiet: bool = False) -> Claim:
    """The claim holds when ``value == expected`` exactly (an invariant unless told otherwise)."""
    return _value_claim(template, value, _same(value, expected),
                        f"= {_fmt_number(expected, fmt, unit)}", unit=unit, fmt=fmt,
                        invariant=invariant, quiet=quiet)


def close(template: str, value: float, expected: float, *, rtol: float = 0.0, atol: float = 0.0,
          unit: str = "", fmt: str | Callable[[Any], str] | None = None, invariant: bool = True,
          quiet: bool = False) -> Claim:
    """The claim holds when ``|value - expected| <= atol + rtol * |expected|``."""
    v, e = _number(value, "value"), _number(expected, "expected")
    if rtol < 0 or atol < 0 or (rtol == 0 and atol == 0):
        raise ValueError("close() needs rtol >= 0 and atol >= 0, not both zero")
    tol = atol + rtol * abs(e)
    within = f" within {rtol:.0%}" if rtol and not atol else f" within {_fmt_number(tol, fmt, unit)}"
    return _value_claim(template, value, math.isfinite(v) and abs(v - e) <= tol,
                        f"{_fmt_number(expected, fmt, unit)}{within}", unit=unit, fmt=fmt,
                        invariant=invariant, quiet=quiet)


def claims() -> list[Claim]:
    """The claims recorded so far, in order."""
    return list(LEDGER)


def reset() -> None:
    """Forget every recorded claim (a chapter normally never needs this)."""
    LEDGER.reset()


def summary() -> str:
    """``claims: N checked, H held, F did not hold`` (the course index reads this line)."""
    items = claims()
    held = sum(c.holds for c in items)
    text = f"claims: {len(items)} checked, {held} held"
    if held < len(items):
        text += f", {len(items) - held} did not hold"
    return text


def parse_summary(text: str) -> tuple[int, int] | None:
    """(checked, held) from a :func:`summary` line found in ``text``, or None."""
    match = SUMMARY_RE.search(text)
    return (int(match[1]), int(match[2])) if match else None


def table():
    """The chapter's claims table (every claim checked in this run, with its verdict).

    Prints the summary line and returns a :class:`scalelab.plot.Table` for display.
    """
    from scalelab import plot  # plot imports matplotlib: only when a table is drawn

    items = claims()
    if not items:
        raise RuntimeError("no claims were checked in this run: run the chapter's cells first")
    print(summary())
    return plot.table([{"#": i, **c.row()} for i, c in enumerate(items, 1)])
