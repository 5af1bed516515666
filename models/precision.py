"""Compute precision of the models' big products: float32, or bfloat16 where it pays. Explicit casts, not
``torch.autocast``: the costly products (the fixed features read through folded weights) are few, so the features'
bfloat16 copy is made once per run, and the small products, whose precision matters more than their speed, stay float32.
Modules declaring ``precision = "fp32"`` are set by :func:`set_precision`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: What a model computes in: the trainer resolves the user's "auto" before it gets here.
PRECISIONS = ("fp32", "bf16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}")
    return precision


def compute_dtype(precision: str) -> torch.dtype:
    return _DTYPES[check_precision(precision)]


def set_precision(model: nn.Module, precision: str) -> None:
    check_precision(precision)
    for module in model.modules():
        if hasattr(type(module), "precision"):
            module.precision = precision


@contextmanager
def precision_scope(model: nn.Module, precision: str) -> Iterator[None]:
    """Run ``model`` in ``precision`` inside the block (e.g. float32 evaluation of a bf16 run)."""
    saved = [(m, m.precision) for m in model.modules() if hasattr(type(m), "precision")]
    set_precision(model, precision)
    try:
        yield
    finally:
        for module, value in saved:
            module.precision = value


class LowPrecisionCopies:
    """Low-dtype copies of FIXED tensors (raw features), made once per run, not per batch; not module state. A source
    that moved or was written in place (``_version``) is cast again. Never use it for parameters: fused optimisers
    update them in place without bumping ``_version``, so the copy would silently go stale."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[tuple[int, torch.device, int, torch.dtype], torch.Tensor]] = {}

    def get(self, name: str, source: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if source.requires_grad:
            raise ValueError(f"LowPrecisionCopies: {name!r} is trainable; cast it on every use instead")
        if source.dtype == dtype:
            return source.detach()
        stamp = (source.data_ptr(), source.device, source._version, dtype)
        hit = self._cache.get(name)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        copy = source.detach().to(dtype)
        self._cache[name] = (stamp, copy)
        return copy


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, precision: str, x_low: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with the product in ``precision``; float32 out. ``x_low``: a ready copy of a fixed
    ``x`` (gradients then reach ``weight`` only); else ``x`` is cast here and gets its gradient through the cast."""
    dtype = compute_dtype(precision)
    if dtype == torch.float32:
        return F.linear(x, weight, bias)
    return low_linear(x.to(dtype) if x_low is None else x_low, weight, bias)


def low_linear(
    x_low: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, weight_low: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear`` with the product in ``x_low``'s dtype, the bias added in float32. ``weight_low``: a ready copy of
    ``weight`` in that dtype; ``weight`` gets its float32 gradient either way."""
    w = weight.to(x_low.dtype) if weight_low is None else _ReadyCast.apply(weight, weight_low)
    out = F.linear(x_low, w).float()
    return out if bias is None else out + bias


class _ReadyCast(torch.autograd.Function):
    """``weight.to(dtype)`` served from a ready copy; the gradient flows back to ``weight`` in its dtype."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, weight_low: torch.Tensor) -> torch.Tensor:
        ctx.dtype = weight.dtype
        return weight_low.view_as(weight_low)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.to(ctx.dtype), None
