"""sand: raw Amazon reviews to a trained, evaluated SAND recommender.

The repository keeps the layout the project was designed with (``pipeline/``,
``flows/`` and ``models/`` at the top), but installs them under this one
namespace as ``sand.pipeline``, ``sand.flows`` and ``sand.models``
(setuptools ``package-dir`` mapping in ``pyproject.toml``). Why: top-level
packages named ``models`` or ``pipeline`` collide with the research code users
keep next to this project (MMRec and the SAND authors' code have a ``models/``
folder of their own), and a namespace of our own cannot.
"""

from __future__ import annotations

__version__ = "0.1.0"
