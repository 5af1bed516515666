"""Atomic writes leave the old file or the new one, never half of one; sha256 streams in chunks."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from sand.pipeline.base import files
from sand.pipeline.base.files import atomic_path, sha256_file, write_bytes_atomic, write_json_atomic, write_text_atomic


def test_writes_replace_the_file_and_leave_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.json"
    write_json_atomic(target, {"b": 1, "a": Path("/x")})
    assert json.loads(target.read_text()) == {"a": "/x", "b": 1}
    assert target.read_text() == json.dumps({"a": "/x", "b": 1}, indent=2, sort_keys=True)
    write_text_atomic(target, "second")
    assert target.read_text() == "second"
    write_bytes_atomic(target, b"\x00third")
    assert target.read_bytes() == b"\x00third"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def test_an_error_mid_write_keeps_the_old_file_and_removes_the_temporary(tmp_path: Path) -> None:
    target = tmp_path / "vectors.npy"
    np.save(target, np.arange(4))
    before = target.read_bytes()
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(target) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(b"half of a new file")
        raise RuntimeError("disk full")
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["vectors.npy"]


def test_a_writer_that_wants_a_file_name_gets_one(tmp_path: Path) -> None:
    target = tmp_path / "a.npy"
    with atomic_path(target, suffix=".npy") as tmp:
        np.save(tmp, np.arange(5))  # np.save keeps a name that already ends in .npy
    assert np.load(target).tolist() == [0, 1, 2, 3, 4]
    assert [p.name for p in tmp_path.iterdir()] == ["a.npy"]


def test_a_process_killed_mid_write_leaves_the_old_file_intact(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    write_json_atomic(target, {"epoch": 1})
    script = (
        "import os, sys\n"
        "from sand.pipeline.base.files import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n"
        "    open(tmp, 'w').write('{\"epoch\": 2, \"trunc')\n"
        "    os._exit(9)  # killed: no cleanup, no rename\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(target)], check=False)
    assert proc.returncode == 9
    assert json.loads(target.read_text()) == {"epoch": 1}
    leftovers = [p.name for p in tmp_path.iterdir() if p != target]
    assert len(leftovers) == 1 and leftovers[0].startswith(".state.json.")  # hidden, never mistaken for it


def test_sha256_streams_a_multi_chunk_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = np.random.default_rng(0).bytes(8 << 20)
    path = tmp_path / "dump.bin"
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    del data

    reads: list[int] = []
    real_open = open

    class Spy:
        def __init__(self, fh):
            self.fh = fh

        def read(self, n: int = -1) -> bytes:
            reads.append(n)
            return self.fh.read(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.fh.close()

    monkeypatch.setattr(files, "open", lambda *a, **k: Spy(real_open(*a, **k)), raising=False)
    chunk = 64 << 10
    tracemalloc.start()
    try:
        got = sha256_file(path, chunk_size=chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == expected
    assert reads and all(0 < n <= chunk for n in reads)  # never a whole-file read()
    assert len(reads) == (8 << 20) // chunk + 1  # every chunk, then the empty read at the end
    assert peak < 1 << 20  # an 8 MiB file hashed in well under 1 MiB


def test_sha256_of_an_empty_file(tmp_path: Path) -> None:
    (tmp_path / "e").write_bytes(b"")
    assert sha256_file(tmp_path / "e") == hashlib.sha256(b"").hexdigest()
