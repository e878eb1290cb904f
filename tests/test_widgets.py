"""The explorer plumbing and the explorers' model functions."""

import json

import pytest

from scalelab import hardware, widgets


def test_roofline_model_is_the_roofline():
    h100 = next(s for s in hardware.SPECS if s.name.startswith("NVIDIA H100"))
    low = hardware.roofline_model(h100.name, "16-bit", 1.0, 64)
    assert low["bound"] == "memory" and low["attainable_flops"] == pytest.approx(h100.bandwidth)
    assert low["ridge"] == pytest.approx(h100.peak_16bit / h100.bandwidth)
    high = hardware.roofline_model(h100.name, "16-bit", 1e4, 8192)
    assert high["bound"] == "compute" and high["attainable_flops"] == pytest.approx(h100.peak_16bit)
    assert high["matmul_intensity"] == pytest.approx(8192 / 3)  # 2n^3 FLOPs / (3 n^2 x 2 bytes)
    assert hardware.roofline_model(h100.name, "fp32", 1.0, 600)["matmul_intensity"] == pytest.approx(100)
    tpu = next(s for s in hardware.SPECS if s.name == "TPU v5e")
    assert hardware.roofline_model(tpu.name, "fp32", 1e4, 64)["peak_flops"] == tpu.peak_16bit  # no fp32 spec
    here = hardware.roofline_model(hardware.THIS_MACHINE, "fp32", 2.0, 60, measured=[1e11, 1e10])
    assert here["attainable_flops"] == pytest.approx(2e10) and here["matmul_bound"] == "compute"


def test_roofline_model_refuses_bad_settings():
    for kwargs, match in [({"precision": "fp8"}, "precision"), ({"intensity": 0.0}, "intensity"),
                          ({"n": 0}, "matrix side"), ({"chip": "no such chip"}, "unknown chip")]:
        args = {"chip": hardware.SPECS[1].name, "precision": "fp32", "intensity": 1.0, "n": 64, **kwargs}
        with pytest.raises(ValueError, match=match):
            hardware.roofline_model(**args)
    with pytest.raises(ValueError, match="measured"):
        hardware.roofline_model(hardware.THIS_MACHINE, "fp32", 1.0, 64)


def test_explorer_follows_its_controls_and_carries_a_static_figure():
    e = hardware.roofline_explorer(1e11, 2e10)
    assert e.prediction == hardware.roofline_model(**e.settings, **e.context)
    e.set(n=2048)
    assert e.prediction["matmul_intensity"] == pytest.approx(2048 / 6)
    bundle = e._repr_mimebundle_()
    assert {"application/vnd.jupyter.widget-view+json", "image/png", "text/plain"} <= set(bundle)
    assert "matmul intensity" in bundle["text/plain"]
    assert 'data-model="scalelab.hardware:roofline_model"' in e.result.value
    settings = json.loads(e.result.value.split('data-settings="')[1].split('"')[0].replace("&quot;", '"'))
    assert settings["n"] == 2048 and settings["measured"] == [1e11, 2e10]
    with pytest.raises(KeyError, match="no control"):
        e.set(nope=1)


def test_explorer_redraws_outside_pyplot_from_any_thread():
    # JupyterLab delivers a widget's messages to a kernel subshell thread: the redraw must not touch
    # pyplot's global figures (there it gave a blank PNG), so it makes a figure of its own
    import threading

    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from scalelab import plot

    with plot.detached():
        fig, _ = plot.figure()
    assert isinstance(fig.canvas, FigureCanvasAgg) and fig not in map(plt.figure, plt.get_fignums())
    fig2, _ = plot.figure()  # outside the block: pyplot as before
    assert plt.fignum_exists(fig2.number)
    plt.close(fig2)
    e = hardware.roofline_explorer(1e11, 2e10)
    before, pngs = set(plt.get_fignums()), []
    t = threading.Thread(target=lambda: (setattr(e.controls["n"], "value", 1024), pngs.append(e._png)))
    t.start()
    t.join()
    assert set(plt.get_fignums()) == before and e.prediction["matmul_intensity"] == pytest.approx(1024 / 6)
    assert pngs[0].startswith(b"\x89PNG") and len(pngs[0]) > 10_000  # a drawn figure, not an empty canvas


def test_explorer_shows_a_refused_setting_and_a_failed_measurement():
    def bad(**_):
        raise RuntimeError("does not fit")

    e = widgets.Explorer("t", "test", {"x": widgets.slider("x", 1.0, 0.0, 2.0)}, hardware.roofline_model,
                         lambda *a: None, context={"chip": "nope", "precision": "fp32", "n": 4}, measure=bad)
    assert e.prediction == {} and "not a valid setting" in e.result.value
    assert e.measure_now() is None and "does not fit" in e.status.value


def test_explorer_needs_a_module_level_model_and_value_controls():
    def local_model(x):
        return {"x": x}

    with pytest.raises(TypeError, match="module-level"):
        widgets.Explorer("t", "t", {"x": widgets.slider("x", 1, 0, 2, integer=True)}, local_model, lambda *a: None)
    with pytest.raises(TypeError, match="value widget"):
        widgets.Explorer("t", "t", {"x": object()}, hardware.roofline_model, lambda *a: None)
    with pytest.raises(ValueError, match="at least one control"):
        widgets.Explorer("t", "t", {}, hardware.roofline_model, lambda *a: None)


def test_format_value():
    assert widgets.format_value(1234) == "1,234"
    assert widgets.format_value(2e10) == "2e+10"
    assert widgets.format_value(0.5) == "0.5"
    assert widgets.format_value("compute") == "compute"
