"""The claims helper: verdict lines with this run's numbers, invariants raise, one table."""

import numpy as np
import pytest

from scalelab import claims


@pytest.fixture(autouse=True)
def _fresh():
    claims.reset()
    yield
    claims.reset()


def test_at_least_prints_this_runs_value(capsys):
    c = claims.at_least("jit is {value} faster than Python at n=1e6", 150.2, 10, unit="x")
    out = capsys.readouterr().out.strip()
    assert out == "holds here: jit is 150x faster than Python at n=1e6 (expected >= 10x)"
    assert c.holds and not c.invariant and c.kind == "hardware"


def test_hardware_claim_that_fails_is_reported_not_raised(capsys):
    c = claims.at_least("bf16 is {value} faster than fp32", 0.8, 2, unit="x")
    assert not c.holds
    assert capsys.readouterr().out.startswith("does not hold here: bf16 is 0.8x faster")


def test_invariant_that_fails_raises():
    with pytest.raises(claims.ClaimFailed, match="3n - 2"):
        claims.equal("cycles = 3n - 2: {value}", 23, 22)
    # it is still recorded, so the table shows it
    assert [c.holds for c in claims.claims()] == [False]


def test_equal_and_close_are_invariants_by_default():
    assert claims.equal("count {value}", 7, 7).invariant
    assert claims.close("ratio {value}", 1.0001, 1.0, rtol=1e-3).holds
    with pytest.raises(claims.ClaimFailed):
        claims.close("ratio {value}", 1.1, 1.0, rtol=1e-3)


def test_equal_compares_arrays_elementwise():
    a = np.arange(6).reshape(2, 3)
    assert claims.equal("product equals numpy", a, a.copy(), fmt=lambda v: "array").holds
    with pytest.raises(claims.ClaimFailed):
        claims.equal("product equals numpy", a, a + 1, fmt=lambda v: "array")


def test_between_and_at_most():
    assert claims.between("efficiency {value}", 0.93, 0.9, 1.0).holds
    assert not claims.at_most("p99 {value}", 120.0, 100, unit="ms", quiet=True).holds
    with pytest.raises(ValueError, match="low <= high"):
        claims.between("x {value}", 1, 2, 1)


def test_rerun_replaces_instead_of_duplicating():
    claims.at_least("speed-up {value}", 3.0, 2, unit="x", quiet=True)
    claims.at_least("other {value}", 1.0, 0, quiet=True)
    claims.at_least("speed-up {value}", 1.0, 2, unit="x", quiet=True)
    items = claims.claims()
    assert [c.key for c in items] == ["other {value}", "speed-up {value}"]
    assert items[-1].text == "speed-up 1x" and not items[-1].holds


def test_summary_and_table(capsys):
    claims.at_least("a {value}", 3, 2, quiet=True)
    claims.at_most("b {value}", 3, 2, quiet=True)
    assert claims.summary() == "claims: 2 checked, 1 held, 1 did not hold"
    assert claims.parse_summary("x\n" + claims.summary() + "\n") == (2, 1)
    t = claims.table()
    assert "claims: 2 checked" in capsys.readouterr().out
    assert [r["verdict"] for r in t.rows] == ["holds here", "does not hold here"]
    assert "<table>" in t._repr_html_()


def test_template_without_placeholder_appends_value(capsys):
    claims.at_least("files per second", 1234.0, 10, quiet=True)
    assert claims.claims()[0].text == "files per second: 1,234"


def test_bad_input_is_named():
    with pytest.raises(TypeError, match="value must be a number"):
        claims.at_least("x {value}", "fast", 2)
    with pytest.raises(ValueError, match="non-empty"):
        claims.check("  ", True, measured="", expected="")
    with pytest.raises(ValueError, match="rtol"):
        claims.close("x {value}", 1, 1)
    with pytest.raises(RuntimeError, match="no claims"):
        claims.table()


def test_number_formatting():
    f = claims._fmt_number
    assert f(1.5e-7, None, "") == "1.50e-07"
    assert f(2_500_000.0, None, "B/s") == "2.50e+06 B/s"
    assert f(12345, None, "") == "12,345"
    assert f(0.4567, ".0%", "") == "46%"
