"""Change detection: remote sources by conditional requests, local ones by size/mtime then hash.

The remote sources are a loopback HTTP server (the only thing faked is the internet).
"""

from __future__ import annotations

import os

import httpx
import pytest
from conftest import Reply, RequestInfo

from sand.pipeline.base.errors import DownloadError
from sand.pipeline.serving import changes
from sand.pipeline.serving.changes import detect_changes, remote_revision


def versioned(body: dict[str, bytes | str]):
    """A static file server: ETag and Last-Modified of the current version, 304 when the client has it."""

    def handler(info: RequestInfo) -> Reply:
        etag, modified = f'"{body["etag"]}"', body["modified"]
        if info.headers.get("If-None-Match") == etag:
            return Reply(304, b"")
        return Reply(200, body["bytes"], {"ETag": etag, "Last-Modified": modified})

    return handler


def test_remote_source_unchanged_is_a_304_and_a_new_etag_is_new_data(http_server):
    current = {"etag": "v1", "modified": "Mon, 01 Jun 2026 00:00:00 GMT", "bytes": b"x" * 100}
    http_server.routes["/reviews.json.gz"] = versioned(current)
    url = http_server.url("/reviews.json.gz")

    first = detect_changes({"reviews": url}, None)
    assert first.changed and "first seen" in first.reasons[0]
    assert first.states["reviews"] == {"kind": "remote", "etag": '"v1"', "last_modified": current["modified"],
                                       "content_length": "100"}
    again = detect_changes({"reviews": url}, first.states)
    assert not again.changed and again.states == first.states and "no new data" in again.message()
    # conditional HEAD requests only: the body was never downloaded
    assert all(r.headers.get("If-None-Match") == '"v1"' for r in http_server.requests[1:])

    current.update(etag="v2", bytes=b"x" * 150)
    grown = detect_changes({"reviews": url}, again.states)
    assert grown.changed and "etag" in grown.reasons[0] and "content_length" in grown.reasons[0]
    assert remote_revision(grown.states) != remote_revision(first.states)
    assert remote_revision(again.states) == remote_revision(first.states)


def test_server_without_etag_is_compared_by_length_and_date(http_server):
    replies = [Reply(200, b"a" * 10, {"Last-Modified": "Mon, 01 Jun 2026 00:00:00 GMT"}),
               Reply(200, b"a" * 10, {"Last-Modified": "Mon, 01 Jun 2026 00:00:00 GMT"}),
               Reply(200, b"a" * 12, {"Last-Modified": "Mon, 01 Jun 2026 00:00:00 GMT"})]
    http_server.routes["/meta.gz"] = replies
    url = http_server.url("/meta.gz")
    first = detect_changes({"meta": url}, None)
    assert not detect_changes({"meta": url}, first.states).changed
    assert detect_changes({"meta": url}, first.states).reasons == [f"{url}: content_length changed"]


def test_server_refusing_head_is_asked_with_get(http_server):
    def handler(info: RequestInfo) -> Reply:
        return Reply(405, b"") if info.method == "HEAD" else Reply(200, b"z" * 20, {"ETag": '"e"'})

    http_server.routes["/dump"] = handler
    state = detect_changes({"reviews": http_server.url("/dump")}, None).states["reviews"]
    assert state["etag"] == '"e"' and state["content_length"] == "20"


def test_unreachable_or_missing_source_is_one_line(http_server, tmp_path):
    http_server.routes["/gone"] = Reply(404, b"")
    with pytest.raises(DownloadError, match="cannot check .*/gone for new data: HTTP 404"):
        detect_changes({"reviews": http_server.url("/gone")}, None)
    with pytest.raises(DownloadError, match="no such file"):
        detect_changes({"reviews": str(tmp_path / "absent.json.gz")}, None)


def test_local_source_by_size_and_mtime_then_hash(tmp_path, monkeypatch):
    path = tmp_path / "reviews.json.gz"
    path.write_bytes(b"one")
    first = detect_changes({"reviews": str(path)}, None)
    assert first.changed and first.states["reviews"]["sha256"]

    def no_hashing(_path):
        raise AssertionError("an unchanged size and mtime must not hash the file")

    monkeypatch.setattr(changes, "sha256_file", no_hashing)
    assert not detect_changes({"reviews": str(path)}, first.states).changed
    monkeypatch.undo()

    os.utime(path, ns=(1, 1))  # touched: same bytes, so no new data
    touched = detect_changes({"reviews": str(path)}, first.states)
    assert not touched.changed and touched.states["reviews"]["mtime_ns"] == 1
    path.write_bytes(b"two!")
    assert detect_changes({"reviews": str(path)}, touched.states).changed
    assert detect_changes({}, touched.states).reasons == ["reviews: no longer a source"]


def test_bad_url_scheme_is_refused(tmp_path):
    with pytest.raises(DownloadError):
        detect_changes({"reviews": "ftp://example.invalid/x"}, None, client=httpx.Client())


def test_a_new_remote_version_is_a_new_snapshot_in_its_own_download_folder(http_server, tmp_path):
    """``acquire.revision`` (set by a retrain from the probed ETags) keys new remote bytes apart."""
    from sand.pipeline.base.config import load_config
    from sand.pipeline.runner import run_stage
    from sand.pipeline.serving.retrain import survey
    from sand.pipeline.stages import Context

    current = {"etag": "v1", "modified": "Mon, 01 Jun 2026 00:00:00 GMT", "bytes": b"first"}
    http_server.routes["/reviews.json.gz"] = versioned(current)
    http_server.routes["/meta.json.gz"] = versioned({"etag": "m", "modified": current["modified"], "bytes": b"m"})

    def acquired(revision: str | None):
        sets = [f"acquire.revision={revision}"] if revision else []
        cfg = load_config(None, {"data_root": str(tmp_path), "acquire.dataset": "shop", "acquire.format": "amazon2014",
                                 "acquire.reviews": http_server.url("/reviews.json.gz"),
                                 "acquire.meta": http_server.url("/meta.json.gz")}, sets)
        art = run_stage(Context.create(cfg, progress=False), "acquire", {}).artifact
        return cfg, art, (art.path / art.manifest["files"]["reviews"]).read_bytes()

    cfg, plain, body = acquired(None)
    found = survey(cfg)
    assert set(source_locations_of(found)) == {"reviews", "meta"} and found.changes.changed
    first_rev = remote_revision(found.changes.states)
    _, one, body_one = acquired(first_rev)
    current.update(etag="v2", bytes=b"second, longer")
    second_rev = remote_revision(detect_changes(source_locations_of(found), found.changes.states).states)
    _, two, body_two = acquired(second_rev)
    assert len({plain.key, one.key, two.key}) == 3
    assert (body, body_one, body_two) == (b"first", b"first", b"second, longer")
    assert (tmp_path / "downloads" / second_rev).is_dir()
    _, again, _ = acquired(first_rev)  # the older snapshot stays what it was
    assert again.key == one.key and (again.path / again.manifest["files"]["reviews"]).read_bytes() == b"first"


def source_locations_of(found) -> dict[str, str]:
    from sand.pipeline.acquire.sources import resolve_source
    from sand.pipeline.serving.changes import source_locations

    acfg = found.cfg.acquire
    return source_locations(resolve_source(acfg.dataset, acfg.format, acfg.reviews, acfg.meta), acfg)
