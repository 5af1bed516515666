"""Compute devices: names a user may give, whether they exist here, and what ``None`` means.

The config checks a device's *spelling*; whether it exists here is checked separately (``check_available``), as a config
written on a laptop may be meant for a GPU worker. Artifact keys hold the resolved device *type* (``device_type``): CPU
and GPU kernels give different float bits, so an artifact computed on one is never served as the other's."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from sand.pipeline.base.errors import ConfigError

if TYPE_CHECKING:
    import torch

_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")
DEVICE_CHOICES = "cpu | cuda | cuda:N | mps"


def validate_device_name(value: str | None) -> str | None:
    """The device name, stripped; ``ValueError`` for anything torch would not accept from us."""
    if value is None:
        return None
    name = str(value).strip().lower()
    if not _DEVICE.match(name):
        raise ValueError(f"unknown device {value!r}: choose {DEVICE_CHOICES}")
    return name


def check_available(value: str | None, field: str) -> None:
    """A one-line ConfigError when ``value`` names a device this machine does not have (torch is imported only when a
    GPU is asked for, so a CPU run's checks stay instant)."""
    if value is None or value == "cpu":
        return
    import torch  # lazy: torch takes seconds to import

    if value.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{field}={value}: CUDA is not available on this machine (use cpu)")
        index = int(value.split(":")[1]) if ":" in value else 0
        count = torch.cuda.device_count()
        if index >= count:
            raise ConfigError(f"{field}={value}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    elif value == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{field}={value}: Apple MPS is not available on this machine (use cpu)")


def check_devices(cfg) -> None:
    """``check_available`` for every device field of a PipelineConfig."""
    for section in ("text_features", "image_features", "train"):
        check_available(getattr(cfg, section).device, f"{section}.device")


def resolve_device(device: str | torch.device | None, allow_mps: bool = False) -> torch.device:
    """The device to compute on: as given, else CUDA when present, else (``allow_mps``) MPS, else the CPU. The one place
    that decides what "no device given" means, for training, the image encoder, the k-NN graphs and artifact keys."""
    import torch  # lazy: torch takes seconds to import

    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("mps") if allow_mps and torch.backends.mps.is_available() else torch.device("cpu")


def device_type(value: str | None, allow_mps: bool = False) -> str:
    """The kind of device a stage computes on: ``cpu``, ``cuda`` or ``mps``. ``None`` resolves as the stage itself does
    (MPS too where the library picks it, as sentence-transformers does). The CUDA index is left out: it selects one of
    several identical accelerators, not a different computation."""
    return value.split(":")[0] if value is not None else resolve_device(None, allow_mps).type
