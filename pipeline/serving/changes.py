"""Has the data behind a dataset changed since the last retrain? Answered cheaply, without a download.

Why: re-acquiring a multi-GB dump to find nothing new would cost most of a scheduled retrain. So a remote file is probed
by a conditional ``HEAD`` (ETag, Last-Modified, Content-Length), a local one by size and mtime, then sha256 (the same
bytes copied over are not new data). Remote states also give the snapshot's *revision*, part of the acquire key, so new
remote bytes become a new snapshot instead of replacing the old one."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from sand.pipeline.acquire.sources import SourceSpec
from sand.pipeline.base.config import AcquireConfig
from sand.pipeline.base.errors import DownloadError
from sand.pipeline.base.files import sha256_file
from sand.pipeline.base.locations import is_remote, local_path
from sand.pipeline.base.store import canonical_json

#: Response headers that identify a remote file's version.
VALIDATORS = ("etag", "last_modified", "content_length")
#: Status codes of servers that refuse ``HEAD``: the probe retries with a ``GET`` whose body it never reads.
_NO_HEAD = {403, 405, 501}
State = dict[str, Any]


@dataclass(frozen=True)
class ChangeReport:
    """Per source: its new state and, where it changed, why."""

    states: dict[str, State]
    reasons: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.reasons)

    def message(self) -> str:
        if not self.changed:
            return f"no new data: {len(self.states)} source(s) unchanged since the last retrain"
        return "new data: " + "; ".join(self.reasons)


def source_locations(spec: SourceSpec, acfg: AcquireConfig) -> dict[str, str]:
    """Name -> URL or path of every file the acquire stage reads for ``spec``."""
    if spec.format == "sample":
        return {"sample": f"sample:seed{acfg.sample_seed}-{acfg.sample_users}x{acfg.sample_items}"}
    if spec.mmrec_dir is not None:
        return {p.name: str(p) for p in sorted(Path(spec.mmrec_dir).iterdir()) if p.is_file()}
    return {role: src for role, src in (("reviews", spec.reviews), ("meta", spec.meta)) if src}


def probe_local(path: Path, previous: State | None) -> tuple[State, str | None]:
    """(state, reason it changed or None): size and mtime first, the sha256 only when they moved."""
    if not path.is_file():
        raise DownloadError(f"cannot read source {path}: no such file")
    st = path.stat()
    state: State = {"kind": "local", "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if previous and previous.get("size") == st.st_size and previous.get("mtime_ns") == st.st_mtime_ns:
        return {**state, "sha256": previous.get("sha256")}, None
    state["sha256"] = sha256_file(path)
    if previous is None:
        return state, f"{path.name}: first seen"
    if previous.get("sha256") == state["sha256"]:
        return state, None  # touched or copied over with the same bytes
    return state, f"{path.name}: {previous.get('size')} -> {st.st_size} bytes, new content"


def probe_remote(url: str, previous: State | None, client: httpx.Client) -> tuple[State, str | None]:
    """(state, reason it changed or None) from a conditional ``HEAD`` (a ``GET`` for servers refusing HEAD)."""
    last = previous or {}
    conditions = {"If-None-Match": last.get("etag"), "If-Modified-Since": last.get("last_modified")}
    headers = {"Accept-Encoding": "identity", **{k: v for k, v in conditions.items() if v}}
    try:
        resp = client.head(url, headers=headers, follow_redirects=True)
        if resp.status_code in _NO_HEAD:
            with client.stream("GET", url, headers=headers, follow_redirects=True) as streamed:
                resp = streamed  # headers only: the body is never read
    except httpx.HTTPError as err:
        raise DownloadError(f"cannot check {url} for new data: {type(err).__name__}: {err}") from None
    if resp.status_code == 304 and previous is not None:
        return dict(previous), None
    if resp.status_code >= 400:
        raise DownloadError(f"cannot check {url} for new data: HTTP {resp.status_code} {resp.reason_phrase}".rstrip())
    got = resp.headers
    state: State = {"kind": "remote", "etag": got.get("ETag"), "last_modified": got.get("Last-Modified"),
                    "content_length": got.get("Content-Length")}
    if previous is None:
        return state, f"{url}: first seen"
    moved = [name for name in VALIDATORS if state[name] != previous.get(name)]
    if not any(state[name] for name in VALIDATORS):
        return state, f"{url}: the server gives no ETag, Last-Modified or Content-Length, so it counts as new"
    return state, f"{url}: {', '.join(moved)} changed" if moved else None


def detect_changes(locations: Mapping[str, str], previous: Mapping[str, State] | None, *, timeout: float = 60.0,
                   client: httpx.Client | None = None) -> ChangeReport:
    """Probe every source against its last state (``previous``: None when there was no retrain yet)."""
    previous = previous or {}
    states: dict[str, State] = {}
    reasons = [f"{name}: no longer a source" for name in sorted(set(previous) - set(locations))]
    with contextlib.nullcontext(client) if client is not None else httpx.Client(timeout=timeout) as http:
        for name, source in locations.items():
            before = previous.get(name)
            if source.startswith("sample:"):
                state: State = {"kind": "sample", "settings": source}
                reason = None if before == state else f"{name}: {source}"
            elif is_remote(source):
                state, reason = probe_remote(source, before, http)
            else:
                if (path := local_path(source)) is None:
                    raise DownloadError(f"cannot check {source} for new data: not a URL or a path")
                state, reason = probe_local(path, before)
            states[name] = state
            if reason:
                reasons.append(reason)
    return ChangeReport(states, reasons)


def remote_revision(states: Mapping[str, State]) -> str | None:
    """16 hex chars naming the remote sources' versions (None when none is remote): ``acquire.revision``, in the key."""
    remote = {name: {k: s.get(k) for k in VALIDATORS} for name, s in states.items() if s.get("kind") == "remote"}
    return None if not remote else hashlib.sha256(canonical_json(remote).encode()).hexdigest()[:16]
