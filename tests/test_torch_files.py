"""torch files: a malicious legacy-pickle weights file refused in one line, and saved checkpoints byte-stable."""

from __future__ import annotations

import os
import pickle
import warnings

import pytest

from sand.pipeline.base.errors import SandError


class _Payload:
    """Unpickling this would run code (create ``marker``); weights_only must refuse it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mknod, (self.marker,))


def _legacy_pickle(tmp_path):
    """A plain pickle (protocol 4, no torch zip container): torch warns about the protocol before refusing."""
    path = tmp_path / "weights.pt"
    path.write_bytes(pickle.dumps({"conv1.weight": _Payload(str(tmp_path / "pwned"))}, protocol=4))
    return path


def _read_checkpoint(path):
    from sand.pipeline.training.checkpoints import read_checkpoint

    return read_checkpoint(path)


def _read_cnn_weights(path):
    from sand.pipeline.features.image_encoder import build_cnn

    return build_cnn("resnet18", str(path))


@pytest.mark.parametrize("reader", [_read_checkpoint, _read_cnn_weights], ids=["checkpoint", "cnn-weights"])
def test_a_malicious_legacy_pickle_is_one_error_and_no_warning(reader, tmp_path, capfd):
    path = _legacy_pickle(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(SandError) as err:
            reader(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert [str(w.message) for w in caught] == []
    assert capfd.readouterr().err == ""
    assert not (tmp_path / "pwned").exists()


def test_the_same_tensors_saved_twice_give_the_same_bytes(tmp_path):
    """Two runs of one seed write the same checkpoint bytes (torch.save given a path names the records after it)."""
    import torch

    from sand.pipeline.base.torch_files import load_tensors, save_tensors

    state = {"model": {"w": torch.arange(12.0).reshape(3, 4)}, "epoch": 3, "valid": {"recall@20": 0.5}}
    first, second = tmp_path / "a" / "best.pt", tmp_path / "b" / "best.pt"
    save_tensors(state, first)
    save_tensors(state, second)
    assert first.read_bytes() == second.read_bytes()
    assert torch.equal(load_tensors(first)["model"]["w"], state["model"]["w"])
    assert list(first.parent.iterdir()) == [first]  # no temporary file left beside it
