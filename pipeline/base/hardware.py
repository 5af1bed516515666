"""Which device and which compute precision a training run uses.

``train.precision = auto`` must resolve alike in the trainer, the train stage's artifact key and the manifest, and the
answer depends on the machine: bfloat16 pays where the hardware multiplies it natively (CUDA GPUs with bf16; CPUs with
AMX-BF16 or AVX512-BF16) and costs where it is emulated. Models only see the resolved "fp32" or "bf16"."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

from sand.pipeline.base.errors import ConfigError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: What a user may ask for (``train.precision``, ``--precision``).
PRECISION_CHOICES = ("fp32", "bf16", "auto")
#: CPU feature flags that make bfloat16 products native (Linux /proc/cpuinfo names).
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_bf16_support() -> bool:
    """Whether this CPU reports AMX-BF16 or AVX512-BF16 (torch's own probe, else /proc/cpuinfo)."""
    import torch  # lazy: torch takes seconds to import

    with contextlib.suppress(AttributeError, RuntimeError):
        caps = torch.cpu.get_capabilities()
        return any(bool(caps.get(flag)) for flag in CPU_BF16_FLAGS)
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return any(flag in flags for flag in CPU_BF16_FLAGS)
    return False


def cuda_bf16_support(device: torch.device) -> bool:
    """Whether the CUDA device multiplies bfloat16 natively (compute capability >= 8.0)."""
    import torch  # lazy: torch takes seconds to import

    if not torch.cuda.is_available():
        return False
    with torch.cuda.device(device):
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def resolve_precision(requested: str, device: torch.device, setting: str = "train.precision") -> str:
    """``"fp32"`` or ``"bf16"`` for ``requested`` (fp32 | bf16 | auto) on ``device``; ``setting`` names the option in
    messages. ``auto``: bf16 where the device multiplies it natively, else fp32. An explicit bf16 without native support
    is kept (slow, not wrong: a warning says so)."""
    if requested not in PRECISION_CHOICES:
        raise ConfigError(f"{setting} must be one of {', '.join(PRECISION_CHOICES)}; got {requested!r}")
    native = cuda_bf16_support(device) if device.type == "cuda" else device.type == "cpu" and cpu_bf16_support()
    if requested == "auto":
        return "bf16" if native else "fp32"
    if requested == "bf16" and not native:
        log.warning("%s=bf16 on %s without native bfloat16 support: expect it to be slower", setting, device)
    return requested
