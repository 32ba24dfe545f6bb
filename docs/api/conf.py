"""Sphinx configuration of the API reference (built offline by ``bin/docs``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

import mtlkit  # noqa: E402

project = "mtlkit"
release = version = mtlkit.__version__
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
html_theme = "alabaster"
exclude_patterns = ["_build"]
