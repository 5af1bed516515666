"""One-line error text and the default compute device: each decided in one place."""

from __future__ import annotations

import pytest
import torch

from sand.pipeline.base.devices import device_type, resolve_device
from sand.pipeline.base.errors import ConfigError, one_line


def test_one_line_keeps_the_first_line_collapsed_and_bounded() -> None:
    err = RuntimeError("\n  Error(s) in loading   state_dict:\n\tsize mismatch for user\n")
    assert one_line(err) == "Error(s) in loading state_dict:"
    assert one_line(err, with_type=True) == "RuntimeError: Error(s) in loading state_dict:"
    assert one_line(KeyError()) == "KeyError"  # no message: the type says what happened
    assert one_line(OSError(), with_type=True) == "OSError"
    assert one_line("") == ""
    long = one_line(ValueError("x" * 1000))
    assert len(long) == 300 and long.endswith("...")
    assert one_line("y" * 1000, limit=None) == "y" * 1000
    assert one_line(ConfigError("train.lr: must be > 0; got -1")) == "train.lr: must be > 0; got -1"


def test_resolve_device_is_the_one_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device(None, allow_mps=True) == torch.device("mps")
    assert device_type(None) == "cpu" and device_type(None, allow_mps=True) == "mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None, allow_mps=True) == torch.device("cuda")
    assert device_type(None) == "cuda" and device_type("cuda:1") == "cuda"
