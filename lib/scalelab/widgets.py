"""Explorers: a chapter's model of the world under a few controls.

An explorer is three small pieces, two of them pure:

- a **model** ``model(**settings, **context) -> dict``, a module-level function (pure, unit-tested
  in the chapter's test file): the prediction for one setting of the controls (``context`` holds
  fixed inputs such as this run's measured ceilings);
- a **draw** ``draw(settings, prediction, measured) -> matplotlib Figure``: the picture of it, with
  every point measured so far (``measured``: a list of ``{"settings", "result"}``) beside the curve;
- optionally a **measure** ``measure(**settings) -> dict``: the real thing at that setting, run when
  the learner presses "measure this point" (only where it takes a second or two).

:class:`Explorer` wires them to ipywidgets controls. It renders three ways:

- in a live kernel (JupyterLab, Colab): the controls, a result line, the figure and the button;
  every change of a control recomputes the model and redraws;
- in an exported page with the widget state saved (``make course``): the last rendered state;
- where no widget can render (an export without widget state, GitHub, a CI log): the same cell
  output also carries the figure of the current setting as a PNG and the result line as text, so
  the cell shows a static figure, never an empty box.

The result line is HTML whose values carry ``data-key`` / ``data-value`` attributes, and which names
the model (``data-model``, ``module:function``) and the settings it was computed at
(``data-settings``, JSON with the context), so a browser test reads the number the page shows and
compares it with the model called in the test process.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

Model = Callable[..., dict[str, Any]]
Draw = Callable[[dict[str, Any], dict[str, Any], list[dict[str, Any]]], Any]
Measure = Callable[..., dict[str, Any]]


def figure_png(fig: Any, dpi: int = 90) -> bytes:
    """PNG bytes of a matplotlib figure (then closed, so explorers do not pile up figures)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)  # a no-op for a figure outside pyplot (see plot.detached)
    return buf.getvalue()


def format_value(value: Any) -> str:
    """How a result line shows one value: 4 significant digits, thousands separated."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return html.escape(str(value))
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
        return f"{value:.4g}"
    return f"{value:,.4g}"


def result_html(name: str, items: Mapping[str, Any], labels: Mapping[str, str] | None = None,
                model: str = "", settings: Mapping[str, Any] | None = None) -> str:
    """The result line: ``label: value`` pairs, each value tagged with its key and raw value; the
    enclosing div names the model and the settings (JSON) the values were computed at."""
    labels = labels or {}
    parts = []
    for key, value in items.items():
        raw = html.escape(repr(value), quote=True)
        label = html.escape(labels.get(key, key.replace("_", " ")))
        parts.append(f'{label}: <b><span data-key="{html.escape(key, quote=True)}" data-value="{raw}">'
                     f"{format_value(value)}</span></b>")
    attrs = (f'data-explorer="{html.escape(name, quote=True)}" data-model="{html.escape(model, quote=True)}" '
             f'data-settings="{html.escape(json.dumps(dict(settings or {}), sort_keys=True), quote=True)}"')
    return f'<div class="scalelab-explorer-result" {attrs}>' + " &nbsp;|&nbsp; ".join(parts) + "</div>"


def result_text(items: Mapping[str, Any], labels: Mapping[str, str] | None = None) -> str:
    """The result line as plain text (the static fallback)."""
    labels = labels or {}
    return " | ".join(f"{labels.get(k, k.replace('_', ' '))}: {format_value(v)}" for k, v in items.items())


class Explorer:
    """Controls -> ``model`` -> a result line and ``draw``'s figure; optionally ``measure``.

    ``controls`` maps each keyword of ``model`` to an ipywidgets value widget (slider, dropdown,
    checkbox...); ``context`` holds the model's other keywords (JSON-serialisable). ``shown`` picks the prediction keys the result line shows (all by default) and
    ``labels`` names them. ``measure`` runs the real thing at the current setting; its result is
    appended to :attr:`measured` and drawn beside the prediction.
    """

    def __init__(self, name: str, title: str, controls: Mapping[str, Any], model: Model, draw: Draw, *,
                 context: Mapping[str, Any] | None = None, measure: Measure | None = None,
                 shown: Sequence[str] | None = None, labels: Mapping[str, str] | None = None,
                 note: str = "") -> None:
        import ipywidgets as widgets

        if not controls:
            raise ValueError("an explorer needs at least one control")
        for key, control in controls.items():
            if not hasattr(control, "value") or not hasattr(control, "observe"):
                raise TypeError(f"control {key!r} must be an ipywidgets value widget, got {type(control).__name__}")
        self.name, self.title = name, title
        self.controls = dict(controls)
        if not callable(model) or "<locals>" in getattr(model, "__qualname__", "<locals>"):
            raise TypeError("the model must be a module-level function (a browser test imports it by name)")
        self.model, self.draw, self.measure_fn = model, draw, measure
        self.context = dict(context or {})
        self.model_ref = f"{model.__module__}:{model.__qualname__}"
        self.shown, self.labels = (list(shown) if shown else None), dict(labels or {})
        self.measured: list[dict[str, Any]] = []
        self.prediction: dict[str, Any] = {}
        self._lock = threading.RLock()
        self._png = b""
        self.result = widgets.HTML()
        self.image = widgets.Image(format="png")
        self.status = widgets.HTML()
        rows = [widgets.HTML(f"<b>{html.escape(title)}</b>" + (f"<br><small>{html.escape(note)}</small>"
                                                                  if note else ""))]
        rows.append(widgets.HBox(list(self.controls.values()), layout=widgets.Layout(flex_flow="row wrap")))
        if measure is not None:
            self.button = widgets.Button(description="measure this point", icon="play",
                                         tooltip="run the real thing at this setting",
                                         layout=widgets.Layout(width="13rem"))
            self.button.on_click(lambda _: self.measure_now())
            rows.append(widgets.HBox([self.button, self.status]))
        else:
            self.button = None
        rows += [self.result, self.image]
        self.widget = widgets.VBox(rows)
        self.widget.add_class("scalelab-explorer")
        for control in self.controls.values():
            control.observe(lambda _change: self.update(), names="value")
        self.update()

    @property
    def settings(self) -> dict[str, Any]:
        """The current value of every control, by the model's keyword."""
        return {key: control.value for key, control in self.controls.items()}

    def set(self, **values: Any) -> dict[str, Any]:
        """Move controls as a learner would (``explorer.set(tau=10, workers=8)``, in that order);
        returns the prediction at the new setting."""
        unknown = set(values) - set(self.controls)
        if unknown:
            raise KeyError(f"explorer {self.name!r} has no control {sorted(unknown)}; it has {sorted(self.controls)}")
        for key, value in values.items():
            self.controls[key].value = value
        return self.prediction

    def shown_items(self) -> dict[str, Any]:
        keys = self.shown or list(self.prediction)
        return {k: self.prediction[k] for k in keys if k in self.prediction}

    def update(self) -> dict[str, Any]:
        """Recompute the model at the current setting and redraw; returns the prediction.

        One update at a time (a lock): JupyterLab may deliver two controls' messages on different
        threads, and a result line must never pair one setting with another's values."""
        with self._lock:
            return self._update()

    def _update(self) -> dict[str, Any]:
        from scalelab import plot

        settings = self.settings
        try:
            prediction = dict(self.model(**settings, **self.context))
        except (ValueError, TypeError) as err:  # a setting the model refuses: say so, keep the page
            self.prediction = {}
            self.result.value = (f'<div class="scalelab-explorer-result" data-explorer="{html.escape(self.name)}">'
                                 f"<b>not a valid setting:</b> {html.escape(str(err))}</div>")
            return {}
        # the figure first, the result line last: once the page shows this setting's result line,
        # this setting's figure has been sent before it (a test screenshots the page then)
        with plot.detached():  # the redraw may run off the main thread (a widget message's subshell)
            png = figure_png(self.draw(settings, prediction, self.measured))
        self.prediction, self._png = prediction, png
        self.image.value = png
        self.result.value = result_html(self.name, self.shown_items(), self.labels, self.model_ref,
                                        {**settings, **self.context})
        return prediction

    def measure_now(self) -> dict[str, Any] | None:
        """Run ``measure`` at the current setting, keep the point and redraw with it."""
        if self.measure_fn is None:
            raise RuntimeError(f"explorer {self.name!r} has no measurement")
        settings = self.settings
        if self.button is not None:
            self.button.disabled = True
        self.status.value = "measuring..."
        try:
            result = dict(self.measure_fn(**settings))
        except Exception as err:  # shown in the page: a learner's setting may not fit this machine
            self.status.value = f"<span style='color:#b00'>measurement failed: {html.escape(str(err))}</span>"
            return None
        finally:
            if self.button is not None:
                self.button.disabled = False
        self.measured.append({"settings": settings, "result": result})
        self.status.value = "measured: " + html.escape(result_text(result, self.labels))
        self.update()
        return result

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        bundle = dict(self.widget._repr_mimebundle_(**kwargs) or {})
        bundle["image/png"] = base64.b64encode(self._png).decode("ascii")
        bundle["text/plain"] = f"{self.title}: {result_text(self.shown_items(), self.labels)}"
        return bundle


def slider(description: str, value: float, lo: float, hi: float, step: float | None = None, *,
           integer: bool = False, log: bool = False, width: str = "22rem") -> Any:
    """A labelled slider (IntSlider, FloatSlider or FloatLogSlider) wide enough to read."""
    import ipywidgets as widgets

    style, layout = {"description_width": "initial"}, widgets.Layout(width=width)
    if log:
        return widgets.FloatLogSlider(value=value, base=10, min=math.log10(lo), max=math.log10(hi),
                                      step=step or 0.05, description=description, style=style,
                                      layout=layout, continuous_update=False)
    cls = widgets.IntSlider if integer else widgets.FloatSlider
    kw = {"step": step} if step is not None else {}
    return cls(value=value, min=lo, max=hi, description=description, style=style, layout=layout,
               continuous_update=False, **kw)


def dropdown(description: str, options: Sequence[Any], value: Any = None) -> Any:
    """A labelled dropdown."""
    import ipywidgets as widgets

    options = list(options)
    if not options:
        raise ValueError(f"dropdown {description!r} needs at least one option")
    first = options[0][1] if isinstance(options[0], tuple) else options[0]
    return widgets.Dropdown(options=options, value=first if value is None else value,
                            description=description, style={"description_width": "initial"})
