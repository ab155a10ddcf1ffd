"""Sphinx configuration for ekf-plugin's documentation (built with warnings as errors: tox -e docs)."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))
from ekf_plugin.__about__ import __version__  # noqa: E402

project = "ekf-plugin"
author = "ekf-plugin developers"
release = version = __version__
extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
html_theme = "furo"
html_title = f"ekf-plugin {version}"
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}
nitpicky = False
suppress_warnings = ["myst.header"]
autodoc_inherit_docstrings = False  # host classes (Lightning) have docstrings that are not valid reST here
