"""One figure style for the course; every figure says which device and mode made it."""

from __future__ import annotations

import contextlib
import contextvars
import html
from collections.abc import Iterator, Sequence
from typing import Any

import matplotlib as mpl
import matplotlib.pyplot as plt
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from scalelab import env

DPI = 80
STYLE: dict[str, Any] = {
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "figure.figsize": (6.4, 3.8),
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "legend.frameon": False,
    "font.size": 10,
}


def use_style() -> None:
    """Apply the course style to every later figure."""
    mpl.rcParams.update(STYLE)


@contextlib.contextmanager
def style() -> Iterator[None]:
    """Use the course style for the figures made inside the ``with`` block."""
    with mpl.rc_context(STYLE):
        yield


def provenance(info: env.EnvInfo | None = None, source: str = "measured",
               devices: Any = None) -> str:
    """The caption every figure carries, e.g. ``measured on 8 x cpu simulated (cpu), full mode``.

    ``devices`` names the devices that ran the work when it is not all of them (a count or the
    devices themselves, see :meth:`env.EnvInfo.work_label`): ``devices=1`` on 8 simulated CPU
    devices gives ``measured on 1 x cpu device (of 8 simulated), full mode``.
    """
    info = info or env.describe()
    return f"{source} on {info.work_label(devices)}"


def figure(
    ncols: int = 1, nrows: int = 1, width: float | None = None, height: float | None = None,
    **kwargs: Any,
) -> tuple[plt.Figure, Any]:
    """A styled figure with ``nrows x ncols`` axes (sized by the number of panels)."""
    use_style()
    w = width or 4.6 * ncols
    h = height or 3.4 * nrows
    if _DETACHED.get():
        fig = Figure(figsize=(w, h), layout="constrained")
        FigureCanvasAgg(fig)
        return fig, fig.subplots(nrows, ncols, **kwargs)
    fig, axes = plt.subplots(nrows, ncols, figsize=(w, h), layout="constrained", **kwargs)
    return fig, axes


_DETACHED: contextvars.ContextVar[bool] = contextvars.ContextVar("scalelab_plot_detached", default=False)


@contextlib.contextmanager
def detached() -> Iterator[None]:
    """Inside the block, :func:`figure` makes figures outside pyplot (an Agg canvas of their own).

    For figures drawn off the notebook's main thread: an explorer redraws in the thread that
    handles the widget's message (a kernel subshell in JupyterLab), where pyplot's global figure
    state and the inline backend are not safe to touch; such a figure is only saved as PNG.
    """
    token = _DETACHED.set(True)
    try:
        yield
    finally:
        _DETACHED.reset(token)


def label(fig: plt.Figure, info: env.EnvInfo | None = None, source: str = "measured",
          devices: Any = None) -> str:
    """Write the device and mode under the figure's bottom-right corner; returns the text.

    It is placed as the figure's ``supxlabel`` so the constrained layout makes room for it.
    Pass ``devices`` (a count, or the devices) when the work ran on fewer devices than the
    runtime has, e.g. a single-device kernel: ``plot.label(fig, info, devices=1)``.
    """
    return footer(fig, provenance(info, source, devices))


def footer(fig: plt.Figure, text: str) -> str:
    """Write ``text`` as the figure's provenance footer (bottom-right, small grey); returns it.

    :func:`label` writes the usual "measured on <devices>, <mode> mode"; use this directly for
    figures whose work did not run on the JAX devices (host CPU, formulas only).
    """
    fig.supxlabel(text, x=0.99, ha="right", fontsize=7, color="0.4")
    return text


def table(rows: Sequence[dict[str, Any]], floatfmt: str = ".3g") -> Table:
    """Display a list of dicts as a table (HTML in Jupyter, aligned text elsewhere)."""
    return Table(list(rows), floatfmt)


class Table:
    """A small table that renders as HTML in notebooks and as text in terminals."""

    def __init__(self, rows: list[dict[str, Any]], floatfmt: str = ".3g"):
        if not rows:
            raise ValueError("table() needs at least one row")
        self.rows = rows
        self.columns: list[str] = []
        for row in rows:
            self.columns += [c for c in row if c not in self.columns]
        self.floatfmt = floatfmt

    def _cell(self, value: Any) -> str:
        if isinstance(value, float):
            return format(value, self.floatfmt)
        return "" if value is None else str(value)

    def __str__(self) -> str:
        cells = [[self._cell(r.get(c)) for c in self.columns] for r in self.rows]
        widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(self.columns)]
        head = "  ".join(c.rjust(w) for c, w in zip(self.columns, widths, strict=True))
        body = ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
        return "\n".join([head, "  ".join("-" * w for w in widths), *body])

    __repr__ = __str__

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(self._cell(r.get(c)))}</td>" for c in self.columns)
            + "</tr>"
            for r in self.rows
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def image_grid(images, ncols: int, row_labels: Sequence[str] | None = None,
               cmap: str = "gray_r", cell: float = 0.55, title: str | None = None):
    """Show images (N x H x W or N x H x W x 3) in a grid, ``ncols`` per row."""
    import numpy as np

    images = np.asarray(images)
    if images.ndim not in (3, 4) or len(images) == 0:
        raise ValueError(f"image_grid needs N x H x W (x 3) images, got shape {images.shape}")
    nrows = -(-len(images) // ncols)
    use_style()
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * cell + 0.6, nrows * cell + 0.4),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
        if i < len(images):
            ax.imshow(images[i], cmap=None if images.ndim == 4 else cmap)
        if row_labels is not None and i % ncols == 0 and i // ncols < len(row_labels):
            ax.set_ylabel(row_labels[i // ncols], rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
