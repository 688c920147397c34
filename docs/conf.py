"""Sphinx configuration of the sb3-fasttd3 documentation (MyST Markdown pages, autodoc for the API)."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

from sb3_fasttd3.version import __version__

project = "sb3-fasttd3"
author = "the sb3-fasttd3 authors"
copyright = "the sb3-fasttd3 authors"
version = release = __version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# The API pages document what a user imports; the heavy simulators (JAX, MuJoCo Playground) are not imported
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"show-inheritance": True}
autodoc_mock_imports = ["jax", "mujoco_playground"]

# Nothing is downloaded at build time: no intersphinx, no remote images
html_theme = "sphinx_rtd_theme"
html_title = f"sb3-fasttd3 {release}"
html_static_path = []
