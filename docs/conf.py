"""Sphinx configuration of the onecycle docs: MyST Markdown pages, the furo theme, API pages from the docstrings and
the generated params and CLI references (``_ext/onecycle_reference.py``). ``make docs`` builds them offline with
warnings as errors."""

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent / "src"))
sys.path.insert(0, str(DOCS / "_ext"))

project = "onecycle"
author = "the onecycle developers"
copyright = "2026, the onecycle developers"
extensions = ["myst_parser", "sphinx.ext.autodoc", "onecycle_reference"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "*.js", "README.md"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3  # links to a page's section: page.md#section-title
html_theme = "furo"
html_title = "onecycle"
html_static_path = []
autodoc_default_options = {"members": True, "undoc-members": False}
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # signatures stay short; the docstrings say what the values are
suppress_warnings = ["myst.header"]
nitpicky = False
