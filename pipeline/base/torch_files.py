"""``torch.load`` of a file from disk: tensors and plain containers only, torch's warnings kept off the console.

Checkpoints and CNN weight files may come from anywhere, so they are read with ``weights_only=True``; the warning torch
gives before refusing a foreign file says nothing the caller's ``error:`` line does not, so it goes to the DEBUG log."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from sand.pipeline.base.files import atomic_path

log = logging.getLogger(__name__)


def load_tensors(path: Path | str, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; any warning torch emits is logged at DEBUG instead."""
    import torch  # lazy: torch takes seconds to import

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        finally:
            for warning in caught:
                log.debug("torch.load(%s): %s", path, warning.message)


def save_tensors(obj: Any, path: Path | str) -> None:
    """``torch.save`` that replaces ``path`` atomically, with the same bytes for the same tensors. Why a file object:
    given a path, torch names the archive's records after it, here a random temporary name, so two runs' identical
    checkpoints differed in bytes."""
    import torch  # lazy: torch takes seconds to import

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)
