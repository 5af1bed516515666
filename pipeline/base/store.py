"""Content-addressed artifact store: ``<root>/artifacts/<stage>/<key>/``.

A stage's key hashes its name, code version, parameters and input keys, so caching falls out of naming and any upstream
change yields new keys downstream. An artifact is built in a temporary sibling directory, ``manifest.json`` written
last, and renamed into place only when complete, so a crash never leaves one that looks finished. A per-artifact file
lock lets two runs on one data root share work (the second waits, then finds the first's artifact). A complete artifact
is never modified, so reading takes no lock and writes nothing: a read-only data root still serves what it holds."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

from sand.pipeline.base.errors import ConfigError, StageError
from sand.pipeline.base.files import write_json_atomic as write_json_atomic  # re-exported: callers import it from here

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def artifact_key(stage: str, version: str, params: dict[str, Any], inputs: dict[str, str]) -> str:
    """Hash of everything that determines a stage's output (16 hex chars)."""
    payload = canonical_json({"stage": stage, "version": version, "params": params, "inputs": inputs})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Artifact:
    """A completed artifact: where it is and what its manifest says."""

    stage: str
    key: str
    path: Path
    manifest: dict[str, Any] = field(default_factory=dict)

    def file(self, name: str) -> Path:
        return self.path / name


@dataclass
class StageOutcome:
    """What running (or reusing) a stage produced; small enough to pass through Prefect."""

    artifact: Artifact
    cached: bool
    seconds: float

    def summary(self) -> dict[str, Any]:
        return {"cached": self.cached, "seconds": round(self.seconds, 3), "artifact": str(self.artifact.path)}


class ArtifactStore:
    def __init__(self, data_root: Path | str) -> None:
        self.data_root = Path(data_root)
        self.root = self.data_root / "artifacts"

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def work_dir(self, stage: str, key: str) -> Path:
        """A persistent scratch directory for resumable work (checkpoints, partial shards)."""
        path = self.data_root / "work" / stage / key
        path.mkdir(parents=True, exist_ok=True)
        return path

    def cache_dir(self, name: str) -> Path:
        """Per-item caches shared across artifacts (downloaded images, text embeddings)."""
        path = self.data_root / "cache" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @contextmanager
    def lock(self, stage: str, key: str, timeout: float = -1) -> Iterator[None]:
        """Exclusive right to build ``stage/key``; a data root that cannot be written is one clear error."""
        lock_dir = self.root / ".locks"
        try:
            lock_dir.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(lock_dir / f"{stage}-{key}.lock"), timeout=timeout)
            lock.acquire()
        except OSError as err:
            raise StageError(f"data root {self.data_root} is not writable ({err.strerror or err}): cannot build "
                             f"{stage} artifact {key} there (only complete artifacts can be read); use a writable "
                             "--data-root") from None
        try:
            yield
        finally:
            lock.release()

    def check_writable(self) -> bool:
        """True when runs can write here; False for a read-only root that holds artifacts to serve; else a one-line
        ConfigError naming the path (missing parent, a file in the way, no permission, no artifacts). Probes with a real
        file: permission bits do not tell the truth for root, read-only mounts or network file systems."""
        try:
            self.data_root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.data_root, prefix=".sand-write-probe-"):
                return True
        except OSError as err:
            reason = err.strerror or errno.errorcode.get(err.errno or 0, str(err))
            if self.root.is_dir() and any(p for p in self.root.iterdir() if not p.name.startswith(".")):
                log.info("data root %s is not writable (%s): serving cached artifacts only", self.data_root, reason)
                return False
            raise ConfigError(f"data root {self.data_root} is not writable ({reason}): choose another with --data-root "
                              "or SAND_DATA_ROOT") from None

    def lookup(self, stage: str, key: str) -> Artifact | None:
        """The complete artifact, or None (a directory without a manifest is never complete)."""
        path = self.path(stage, key)
        manifest = path / MANIFEST
        if not manifest.is_file():
            return None
        try:
            data = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError):
            log.warning("ignoring artifact %s: unreadable manifest", path)
            return None
        return Artifact(stage, key, path, data)

    def list(self, stage: str) -> list[Artifact]:
        base = self.root / stage
        if not base.is_dir():
            return []
        found = (self.lookup(stage, p.name) for p in sorted(base.iterdir()) if not p.name.startswith("."))
        return [a for a in found if a is not None]

    @contextmanager
    def _staging(self, stage: str, key: str) -> Iterator[Path]:
        base = self.root / stage
        base.mkdir(parents=True, exist_ok=True)
        for stale in base.glob(f".tmp-{key}-*"):  # left by a killed run: never complete, safe to drop
            shutil.rmtree(stale, ignore_errors=True)
        tmp = base / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _publish(self, tmp: Path, final: Path) -> None:
        """Move a finished staging directory into place; an older copy is replaced, not lost first."""
        trash = None
        if final.exists():
            trash = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}")
            os.rename(final, trash)
        os.rename(tmp, final)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)

    def run(self, stage: str, version: str, params: dict[str, Any], inputs: dict[str, Artifact],
            build: Callable[[Path], dict[str, Any] | None], refresh: bool = False) -> StageOutcome:
        """Reuse the stage's artifact or build it with ``build(staging_dir) -> manifest extras``."""
        key = artifact_key(stage, version, params, {name: art.key for name, art in inputs.items()})
        start = time.perf_counter()
        existing = None if refresh else self.lookup(stage, key)
        if existing is not None:  # complete artifacts never change: no lock, no write
            log.info("%s: cached (%s)", stage, existing.path)
            return StageOutcome(existing, True, time.perf_counter() - start)
        with self.lock(stage, key):
            existing = self.lookup(stage, key)
            if existing is not None and not refresh:
                log.info("%s: cached (%s)", stage, existing.path)
                return StageOutcome(existing, True, time.perf_counter() - start)
            with self._staging(stage, key) as tmp:
                extras = build(tmp) or {}
                seconds = time.perf_counter() - start
                manifest = {"stage": stage, "key": key, "version": version, "params": params,
                            "inputs": {n: {"key": a.key, "path": str(a.path)} for n, a in inputs.items()},
                            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            "seconds": round(seconds, 3), **extras}
                write_json_atomic(tmp / MANIFEST, manifest)
                final = self.path(stage, key)
                self._publish(tmp, final)
        log.info("%s: built in %.1fs (%s)", stage, seconds, final)
        return StageOutcome(Artifact(stage, key, final, manifest), False, seconds)
