"""``torch.load`` of a file from disk: tensors and plain containers only, torch's warnings kept off the console.

Why one function: training checkpoints and CNN weight files are files a user may have copied from anywhere, so both are
read with ``weights_only=True``. On a foreign file (a legacy pickle, pickle protocol 4) torch warns before it refuses,
and Python prints that warning as two extra lines around the ``error:`` line the caller raises. The warnings say nothing
the error does not, so they go to the log file (DEBUG), never to the console."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

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
