"""The one place notebook execution settings live (used by `make course` and `make notebooks`).

Check it is read with: jupyter nbconvert --config nbconvert_config.py --show-config
"""

c = get_config()  # noqa: F821  (provided by traitlets when nbconvert loads this file)

# Execute every notebook top to bottom before exporting it.
c.ExecutePreprocessor.enabled = True
c.ExecutePreprocessor.timeout = 1800  # seconds per cell; full mode on 2 CPU cores
c.ExecutePreprocessor.kernel_name = "python3"  # the kernel of the environment running nbconvert
c.ExecutePreprocessor.allow_errors = False

# Cells tagged "remove-cell" are dropped from the exported pages; "remove-input" keeps
# only the output. (TagRemovePreprocessor runs before execution, so removed cells never run.)
c.TagRemovePreprocessor.enabled = True
c.TagRemovePreprocessor.remove_cell_tags = ("remove-cell",)
c.TagRemovePreprocessor.remove_input_tags = ("remove-input",)

# Default export: one HTML page per chapter under build/course/.
c.NbConvertApp.export_format = "html"
c.FilesWriter.build_directory = "build/course"

# Explorers: keep the widgets' state in the exported pages, so each shows its last rendered setting
# (an explorer's cell also carries a static PNG for viewers that render no widgets).
c.ExecutePreprocessor.store_widget_state = True

# An offline course: MathJax 2, require.js and the widgets' HTML manager from build/web/ (installed by
# `make browser-deps`), the CDN defaults where they are missing. Pages live in build/course/.
import pathlib  # noqa: E402

_web = pathlib.Path(__file__).resolve().parent / "build" / "web" / "node_modules"
_local = {
    "mathjax_url": ("mathjax/MathJax.js", "?config=TeX-AMS_CHTML-full,Safe"),
    "require_js_url": ("requirejs/require.js", ""),
    "widget_renderer_url": ("@jupyter-widgets/html-manager/dist/embed-amd.js", ""),
}
for _trait, (_rel, _query) in _local.items():
    if (_web / _rel).exists():
        setattr(c.HTMLExporter, _trait, f"../web/node_modules/{_rel}{_query}")
