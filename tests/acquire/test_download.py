"""Tests for sand.pipeline.acquire.download against a loopback HTTP server (the only thing faked)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from conftest import Reply, RequestInfo
from support import range_headers, range_route

from sand.pipeline.acquire.download import FileRecord, fetch_file, safe_name
from sand.pipeline.base.errors import DownloadError
from sand.pipeline.base.files import sha256_file

BODY = bytes(range(256)) * 400 + b"tail"  # 102,404 bytes, not a multiple of the chunk size
FAST = {"backoff_base": 0.01, "progress": False, "timeout": 5, "chunk_size": 4096}


def test_full_download_writes_file_hash_and_sidecar(http_server, tmp_path):
    http_server.routes["/d/reviews_Baby_5.json.gz"] = range_route(BODY)
    url = http_server.url("/d/reviews_Baby_5.json.gz")
    rec = fetch_file(url, tmp_path, **FAST)
    assert rec.path == tmp_path / "reviews_Baby_5.json.gz"
    assert rec.path.read_bytes() == BODY
    assert rec.size == len(BODY)
    assert rec.sha256 == hashlib.sha256(BODY).hexdigest() == sha256_file(rec.path)
    assert rec.source == url
    sidecar = json.loads((tmp_path / "reviews_Baby_5.json.gz.sha256.json").read_text())
    assert FileRecord.from_dict(sidecar) == rec
    assert not (tmp_path / "reviews_Baby_5.json.gz.part").exists()
    assert http_server.hits["/d/reviews_Baby_5.json.gz"] == 1

    again = fetch_file(url, tmp_path, **FAST)
    assert again == rec
    assert http_server.hits["/d/reviews_Baby_5.json.gz"] == 1  # no network work the second time


def test_record_round_trips_through_json():
    rec = FileRecord(Path("/x/y.gz"), "http://h/y.gz", 12, "ab" * 32)
    assert FileRecord.from_dict(json.loads(json.dumps(rec.to_dict()))) == rec


def test_resume_sends_one_range_request_and_is_byte_identical(http_server, tmp_path):
    http_server.routes["/f.bin"] = range_route(BODY)
    half = len(BODY) // 2
    (tmp_path / "f.bin.part").write_bytes(BODY[:half])
    rec = fetch_file(http_server.url("/f.bin"), tmp_path, **FAST)
    assert http_server.hits["/f.bin"] == 1
    assert range_headers(http_server) == [f"bytes={half}-"]
    assert rec.path.read_bytes() == BODY
    assert rec.sha256 == hashlib.sha256(BODY).hexdigest()


def test_server_ignoring_range_restarts_from_zero(http_server, tmp_path):
    http_server.routes["/f.bin"] = range_route(BODY, honour=False)
    (tmp_path / "f.bin.part").write_bytes(b"garbage that is not the prefix")
    rec = fetch_file(http_server.url("/f.bin"), tmp_path, **FAST)
    assert range_headers(http_server) == ["bytes=30-"]
    assert rec.path.read_bytes() == BODY
    assert rec.sha256 == hashlib.sha256(BODY).hexdigest()


def test_part_already_complete_is_finished_via_416(http_server, tmp_path):
    http_server.routes["/f.bin"] = range_route(BODY)
    (tmp_path / "f.bin.part").write_bytes(BODY)
    rec = fetch_file(http_server.url("/f.bin"), tmp_path, **FAST)
    assert http_server.hits["/f.bin"] == 1
    assert rec.path.read_bytes() == BODY and rec.size == len(BODY)


def test_416_with_wrong_total_restarts(http_server, tmp_path):
    http_server.routes["/f.bin"] = range_route(BODY)
    (tmp_path / "f.bin.part").write_bytes(BODY + b"extra bytes from an older version")
    rec = fetch_file(http_server.url("/f.bin"), tmp_path, **FAST)
    assert range_headers(http_server) == [f"bytes={len(BODY) + 33}-", None]
    assert rec.path.read_bytes() == BODY


def test_interrupted_transfer_resumes_and_completes(http_server, tmp_path):
    cut = len(BODY) // 2
    real = range_route(BODY)
    calls = {"n": 0}

    def flaky(info: RequestInfo) -> Reply:
        calls["n"] += 1
        if calls["n"] == 1:
            return Reply(200, BODY, truncate_to=cut)  # connection closed half way
        return real(info)

    http_server.routes["/f.bin"] = flaky
    rec = fetch_file(http_server.url("/f.bin"), tmp_path, **FAST)
    assert http_server.hits["/f.bin"] == 2
    assert range_headers(http_server) == [None, f"bytes={cut}-"]
    assert rec.path.read_bytes() == BODY
    assert rec.sha256 == hashlib.sha256(BODY).hexdigest()


def test_always_truncated_fails_without_promoting_part(http_server, tmp_path):
    http_server.routes["/f.bin"] = Reply(200, BODY, truncate_to=100)  # ignores Range, always cut
    with pytest.raises(DownloadError, match=r"cannot download .*/f\.bin after 3 attempts"):
        fetch_file(http_server.url("/f.bin"), tmp_path, retries=2, **FAST)
    assert not (tmp_path / "f.bin").exists()
    assert not (tmp_path / "f.bin.sha256.json").exists()
    assert (tmp_path / "f.bin.part").stat().st_size == 100  # kept for a later resume, never "complete"


def test_part_file_is_never_taken_for_complete(http_server, tmp_path):
    http_server.routes["/f.bin"] = range_route(BODY)
    (tmp_path / "f.bin.part").write_bytes(BODY[:10])
    (tmp_path / "f.bin.sha256.json").write_text(
        json.dumps(FileRecord(tmp_path / "f.bin", http_server.url("/f.bin"), 10, "0" * 64).to_dict())
    )
    rec = fetch_file(http_server.url("/f.bin"), tmp_path, **FAST)
    assert http_server.hits["/f.bin"] == 1
    assert rec.path.read_bytes() == BODY


def test_sidecar_with_other_size_triggers_download(http_server, tmp_path):
    http_server.routes["/f.bin"] = range_route(BODY)
    (tmp_path / "f.bin").write_bytes(b"old")
    (tmp_path / "f.bin.sha256.json").write_text(
        json.dumps(FileRecord(tmp_path / "f.bin", http_server.url("/f.bin"), 999, "0" * 64).to_dict())
    )
    rec = fetch_file(http_server.url("/f.bin"), tmp_path, **FAST)
    assert http_server.hits["/f.bin"] == 1 and rec.path.read_bytes() == BODY


def test_5xx_then_success_is_retried(http_server, tmp_path):
    http_server.routes["/f.bin"] = [Reply(500, b"oops"), Reply(503, b"busy"), Reply(200, BODY)]
    rec = fetch_file(http_server.url("/f.bin"), tmp_path, retries=3, **FAST)
    assert http_server.hits["/f.bin"] == 3
    assert rec.path.read_bytes() == BODY


def test_429_is_retried(http_server, tmp_path):
    http_server.routes["/f.bin"] = [Reply(429, b"slow down"), Reply(200, BODY)]
    fetch_file(http_server.url("/f.bin"), tmp_path, retries=2, **FAST)
    assert http_server.hits["/f.bin"] == 2


@pytest.mark.parametrize(("status", "phrase"), [(404, "Not Found"), (403, "Forbidden"), (410, "Gone")])
def test_4xx_fails_at_once_with_one_line(http_server, tmp_path, status, phrase):
    http_server.routes["/missing.gz"] = Reply(status, b"no")
    url = http_server.url("/missing.gz")
    with pytest.raises(DownloadError) as err:
        fetch_file(url, tmp_path, retries=4, **FAST)
    assert str(err.value) == f"cannot download {url}: HTTP {status} {phrase}"
    assert http_server.hits["/missing.gz"] == 1
    assert not (tmp_path / "missing.gz").exists()


def test_persistent_5xx_names_url_and_last_reason(http_server, tmp_path):
    http_server.routes["/f.bin"] = Reply(502, b"bad gateway")
    url = http_server.url("/f.bin")
    with pytest.raises(DownloadError) as err:
        fetch_file(url, tmp_path, retries=2, **FAST)
    assert str(err.value) == f"cannot download {url} after 3 attempts: HTTP 502 Bad Gateway"
    assert "\n" not in str(err.value)
    assert http_server.hits["/f.bin"] == 3


def test_timeout_is_retried_then_reported(http_server, tmp_path):
    http_server.routes["/slow.bin"] = Reply(200, BODY, delay=0.6)
    url = http_server.url("/slow.bin")
    with pytest.raises(DownloadError, match=r"cannot download .*/slow\.bin after 2 attempts: timed out"):
        fetch_file(url, tmp_path, retries=1, backoff_base=0.01, progress=False, timeout=0.15)
    assert http_server.hits["/slow.bin"] == 2


def test_timeout_then_success(http_server, tmp_path):
    http_server.routes["/slow.bin"] = [Reply(200, BODY, delay=0.6), Reply(200, BODY)]
    rec = fetch_file(http_server.url("/slow.bin"), tmp_path, retries=2, backoff_base=0.01, progress=False,
                     timeout=0.15)
    assert rec.path.read_bytes() == BODY and http_server.hits["/slow.bin"] == 2


def test_connection_refused_is_retried_then_reported(tmp_path):
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/f.bin"
    with pytest.raises(DownloadError, match=re.escape(f"cannot download {url} after 2 attempts: Connect")):
        fetch_file(url, tmp_path, retries=1, **FAST)


def test_redirects_are_followed(http_server, tmp_path):
    http_server.routes["/old/f.bin"] = Reply(302, b"", {"Location": "/new/f.bin"})
    http_server.routes["/new/f.bin"] = range_route(BODY)
    rec = fetch_file(http_server.url("/old/f.bin"), tmp_path, **FAST)
    assert rec.path.read_bytes() == BODY and rec.path.name == "f.bin"


def test_file_url_and_plain_path_give_same_record(tmp_path):
    src = tmp_path / "src dir" / "meta_Baby.json.gz"
    src.parent.mkdir()
    src.write_bytes(BODY)
    by_path = fetch_file(str(src), tmp_path / "a", **FAST)
    by_url = fetch_file(src.as_uri(), tmp_path / "b", **FAST)
    assert (by_path.size, by_path.sha256) == (by_url.size, by_url.sha256) == (len(BODY), sha256_file(src))
    assert by_path.path.name == by_url.path.name == "meta_Baby.json.gz"
    assert by_url.path.read_bytes() == BODY
    assert (tmp_path / "b" / "meta_Baby.json.gz.sha256.json").exists()


def test_local_copy_is_reused_until_source_changes(tmp_path):
    src = tmp_path / "r.json"
    src.write_bytes(b"one\n")
    first = fetch_file(str(src), tmp_path / "out", **FAST)
    mtime = first.path.stat().st_mtime_ns
    assert fetch_file(str(src), tmp_path / "out", **FAST) == first
    assert first.path.stat().st_mtime_ns == mtime  # not copied again
    src.write_bytes(b"two, longer\n")
    second = fetch_file(str(src), tmp_path / "out", **FAST)
    assert second.path.read_bytes() == b"two, longer\n" and second.sha256 != first.sha256


def test_missing_local_file_and_unknown_scheme_are_one_line_errors(tmp_path):
    with pytest.raises(DownloadError, match=r"^cannot read .*nope\.json: no such file$"):
        fetch_file(str(tmp_path / "nope.json"), tmp_path / "out", **FAST)
    with pytest.raises(DownloadError, match=r"unsupported URL scheme 'ftp'"):
        fetch_file("ftp://example.org/x.gz", tmp_path / "out", **FAST)


def test_hostile_url_yields_safe_name_inside_dest(http_server, tmp_path):
    dest = tmp_path / "dest"
    http_server.routes["/etc/passwd?a=b"] = Reply(200, b"root:x:0:0")
    hostile = http_server.base_url + "/../../etc/passwd?a=b"
    rec = fetch_file(hostile, dest, **FAST)
    assert rec.path.parent == dest
    assert rec.path.name == "passwd"
    assert rec.path.resolve().is_relative_to(dest.resolve())
    assert {p.name for p in dest.iterdir()} <= {"passwd", "passwd.sha256.json", "passwd.lock"}
    assert [p.name for p in tmp_path.iterdir()] == ["dest"]  # nothing written outside dest_dir


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("http://x/../../etc/passwd?a=b", "passwd"),
        ("http://x/a/%2e%2e%2f%2e%2e%2fetc%2fshadow", "shadow"),
        ("http://x/dir/..", None),
        ("http://x/", None),
        ("http://x/.bashrc", "bashrc"),
        ("http://x/we ird;name$(rm).json.gz", "we_ird_name__rm_.json.gz"),
        ("http://x/a.part", "a.part_"),
        ("/tmp/some/reviews_Baby_5.json.gz", "reviews_Baby_5.json.gz"),
        ("C:\\data\\meta_Baby.json.gz", "meta_Baby.json.gz"),
    ],
)
def test_safe_name(source, expected):
    name = safe_name(source)
    assert re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", name), name
    if expected is None:
        assert name.startswith("download-")
    else:
        assert name == expected


def test_safe_name_caps_length_and_keeps_names_unique():
    a = safe_name("http://x/" + "a" * 500 + "1.json")
    b = safe_name("http://x/" + "a" * 500 + "2.json")
    assert len(a) <= 120 and len(b) <= 120 and a != b
    assert a.endswith(".json")


def test_caller_client_is_used_and_left_open(http_server, tmp_path):
    import httpx

    http_server.routes["/f.bin"] = range_route(BODY)
    with httpx.Client(headers={"User-Agent": "sand-test"}) as client:
        rec = fetch_file(http_server.url("/f.bin"), tmp_path, client=client, **FAST)
        assert not client.is_closed
    assert rec.path.read_bytes() == BODY
    assert http_server.requests[0].headers.get("User-Agent") == "sand-test"


def test_concurrent_fetches_of_one_file_download_once(http_server, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    http_server.routes["/f.bin"] = Reply(200, BODY, delay=0.2)
    url = http_server.url("/f.bin")
    with ThreadPoolExecutor(3) as pool:
        records = list(pool.map(lambda _: fetch_file(url, tmp_path, **FAST), range(3)))
    assert records[0] == records[1] == records[2]
    assert http_server.hits["/f.bin"] == 1
    assert records[0].path.read_bytes() == BODY


def test_progress_bar_reports_bytes(http_server, tmp_path, capsys):
    http_server.routes["/f.bin"] = range_route(BODY)
    fetch_file(http_server.url("/f.bin"), tmp_path, backoff_base=0.01, progress=True)
    assert "f.bin" in capsys.readouterr().err


def test_file_url_forms_name_one_local_file(tmp_path):
    from urllib.parse import quote

    from sand.pipeline.base.errors import ConfigError

    src = tmp_path / "my dumps" / "r.json"
    src.parent.mkdir()
    src.write_bytes(BODY)
    for url in (src.as_uri(), "file://localhost" + quote(str(src))):
        assert "%20" in url
        assert fetch_file(url, tmp_path / "out", **FAST).path.read_bytes() == BODY
    with pytest.raises(ConfigError, match=r"names the host 'fileserver'"):
        fetch_file(f"file://fileserver{quote(str(src))}", tmp_path / "out2", **FAST)
