"""The artifact store: keys, atomic publication, locking, refresh without loss."""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from pathlib import Path

import pytest

from sand.pipeline.base.store import ArtifactStore, artifact_key


def _write(out: Path, text: str = "hello") -> dict:
    (out / "data.txt").write_text(text)
    return {"rows": 1}


def test_key_depends_on_params_version_and_inputs():
    base = artifact_key("graphs", "1", {"k": 10}, {"text": "abc"})
    assert base == artifact_key("graphs", "1", {"k": 10}, {"text": "abc"})
    assert base != artifact_key("graphs", "1", {"k": 11}, {"text": "abc"})
    assert base != artifact_key("graphs", "2", {"k": 10}, {"text": "abc"})
    assert base != artifact_key("graphs", "1", {"k": 10}, {"text": "abd"})


def test_second_run_is_cached_and_manifest_records_everything(tmp_path):
    store = ArtifactStore(tmp_path)
    calls = []

    def build(out):
        calls.append(out)
        return _write(out)

    first = store.run("s", "1", {"a": 1}, {}, build)
    second = store.run("s", "1", {"a": 1}, {}, build)
    assert not first.cached and second.cached and len(calls) == 1
    manifest = json.loads((first.artifact.path / "manifest.json").read_text())
    assert manifest["params"] == {"a": 1} and manifest["rows"] == 1 and manifest["version"] == "1"
    assert (first.artifact.path / "data.txt").read_text() == "hello"


def test_crash_mid_write_leaves_no_readable_artifact(tmp_path):
    store = ArtifactStore(tmp_path)

    def crashing(out):
        (out / "half.bin").write_bytes(b"x" * 100)
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        store.run("s", "1", {}, {}, crashing)
    key = artifact_key("s", "1", {}, {})
    assert store.lookup("s", key) is None
    assert not store.path("s", key).exists()
    assert list((tmp_path / "artifacts" / "s").glob(".tmp-*")) == []
    # the rerun after the "fix" builds it
    assert not store.run("s", "1", {}, {}, _write).cached


def test_directory_without_manifest_is_never_read(tmp_path):
    store = ArtifactStore(tmp_path)
    key = artifact_key("s", "1", {}, {})
    store.path("s", key).mkdir(parents=True)
    (store.path("s", key) / "data.txt").write_text("partial")
    assert store.lookup("s", key) is None


def test_refresh_failure_keeps_the_old_artifact(tmp_path):
    store = ArtifactStore(tmp_path)
    good = store.run("s", "1", {}, {}, _write)

    def failing(out):
        raise ValueError("bad")

    with pytest.raises(ValueError):
        store.run("s", "1", {}, {}, failing, refresh=True)
    assert (good.artifact.path / "data.txt").read_text() == "hello"
    rebuilt = store.run("s", "1", {}, {}, lambda out: _write(out, "new"), refresh=True)
    assert not rebuilt.cached and (rebuilt.artifact.path / "data.txt").read_text() == "new"


def _slow_build(root: str, results) -> None:
    store = ArtifactStore(root)

    def build(out):
        time.sleep(0.5)
        return _write(out)

    outcome = store.run("s", "1", {}, {}, build)
    results.put(outcome.cached)


def test_two_processes_on_one_root_build_once(tmp_path):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_slow_build, args=(str(tmp_path), results)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    cached = sorted(results.get(timeout=5) for _ in procs)
    assert cached == [False, True]
