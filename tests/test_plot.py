import matplotlib

matplotlib.use("Agg")

import pytest

from scalelab import env, plot


def test_table_text_and_html():
    t = plot.table([{"a": 1, "b": 0.123456}, {"a": 22, "c": "x<y"}])
    assert t.columns == ["a", "b", "c"]
    text = str(t).splitlines()
    assert text[0].split() == ["a", "b", "c"] and "0.123" in text[2]
    html = t._repr_html_()
    assert "<th>c</th>" in html and "x&lt;y" in html
    with pytest.raises(ValueError, match="at least one row"):
        plot.table([])


def test_figure_carries_device_and_mode():
    fig, axes = plot.figure(ncols=2)
    assert len(axes) == 2 and fig.dpi == plot.DPI
    text = plot.label(fig)
    info = env.describe()
    assert text == f"measured on {info.label}"
    assert fig.get_supxlabel() == text
    assert "published spec" in plot.provenance(info, source="published spec")


def test_label_names_the_devices_that_ran_the_work():
    fig, _ = plot.figure()
    info = env.describe()
    text = plot.label(fig, info, devices=1)
    assert text == f"measured on {info.work_label(1)}" and fig.get_supxlabel() == text
    assert text.startswith("measured on 1 x ") and " device" in text
    assert plot.provenance(info, "simulated", devices=None) == f"simulated on {info.label}"
