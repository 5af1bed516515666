"""sand: raw Amazon reviews to a trained, evaluated SAND recommender. The repository's top-level ``pipeline/``,
``flows/`` and ``models/`` install as ``sand.pipeline``, ``sand.flows`` and ``sand.models`` (``package-dir`` in
``pyproject.toml``). Why: top-level ``models`` or ``pipeline`` packages collide with the research code users keep next
to this project (MMRec and the SAND authors' code have a ``models/`` folder). ``from sand import run`` (:mod:`sand.api`)
loads lazily: ``import sand`` stays free of torch, pandas and Prefect."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["RunResult", "run"]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on demand
    from sand.api import RunResult, run


def __getattr__(name: str) -> Any:
    if name in __all__:
        from sand import api  # lazy: it loads pandas and the pipeline (see the module doc)
        return getattr(api, name)
    raise AttributeError(f"module 'sand' has no attribute {name!r}")
