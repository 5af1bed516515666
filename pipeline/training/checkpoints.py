"""Reading training checkpoints (``best.pt``/``last.pt``, read by the resume, scoring and the report's figures): always
``weights_only=True``, as a checkpoint may be copied from anywhere, and a truncated or foreign file is a one-line
:class:`StageError`, not a torch traceback."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sand.pipeline.base.errors import StageError, one_line
from sand.pipeline.base.torch_files import load_tensors

if TYPE_CHECKING:
    import torch

#: File names the trainer writes into its output directory.
BEST_NAME, LAST_NAME = "best.pt", "last.pt"


def read_checkpoint(path: Path | str, device: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint's contents (tensors, numbers, strings, containers), mapped onto ``device``."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"checkpoint {path}: missing (train the model first)")
    try:
        return load_tensors(path, map_location=device)
    except Exception as exc:  # a truncated or foreign file: name it instead of a traceback
        raise StageError(f"checkpoint {path}: cannot be read ({type(exc).__name__}: {one_line(exc)})") from exc


def load_model_state(model: torch.nn.Module, state: dict[str, Any], path: Path | str) -> None:
    """``model.load_state_dict(state)``; a state that does not fit is a StageError naming ``path``."""
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise StageError(f"checkpoint {path}: does not fit this model ({one_line(exc)})") from exc


def load_weights(model: torch.nn.Module, path: Path | str, device: str | torch.device | None = None) -> dict[str, Any]:
    """Load a checkpoint's model weights into ``model`` (in place) and return the rest of the checkpoint (nothing for a
    bare state_dict); ``device`` None maps the tensors to the device of the model's parameters."""
    import torch  # lazy: torch takes seconds to import

    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ckpt = read_checkpoint(path, device)
    has_model = isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict)
    load_model_state(model, ckpt["model"] if has_model else ckpt, path)
    return {k: v for k, v in ckpt.items() if k != "model"} if has_model else {}
