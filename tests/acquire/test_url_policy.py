"""Image URLs are data: what they may point at follows where the metadata came from.

What users rely on: downloaded metadata cannot make the pipeline read this
machine's files or call hosts on its network (directly, by a name resolving there,
or through a redirect), and the report does not reveal which local paths exist;
metadata the user gave locally keeps working with local files and private mirrors;
FIFOs and devices never hang or flood the run.
"""

from __future__ import annotations

import io
import os

import pytest
from conftest import LoopbackServer, Reply
from PIL import Image

from sand.pipeline.acquire.url_policy import UrlPolicy, is_public_address
from sand.pipeline.features.image_fetch import fetch_images

FAST = dict(timeout=2.0, retries=0, backoff_base=0.01, progress=False)
NETWORK = UrlPolicy.for_origin("network")
LOCAL = UrlPolicy.for_origin("local")


def png(size=(48, 40)) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", size, (30, 60, 90))
    img.putpixel((0, 0), (0, 0, 0))
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def local_things(tmp_path):
    """An image file, a path that does not exist, a FIFO and /dev/zero."""
    image = tmp_path / "real.png"
    image.write_bytes(png())
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    return {"image": image, "absent": tmp_path / "absent.png", "fifo": fifo, "zero": "/dev/zero"}


@pytest.mark.timeout(60)
def test_network_metadata_cannot_name_local_files_and_existence_does_not_leak(local_things, tmp_path):
    image, absent = local_things["image"], local_things["absent"]
    urls = [image.as_uri(), str(image), absent.as_uri(), str(absent), local_things["fifo"].as_uri(),
            local_things["zero"], "file:///etc/passwd"]
    results = fetch_images(urls, tmp_path / "cache", policy=NETWORK, **FAST)
    assert [r.reason for r in results] == ["refused"] * len(urls)
    assert not any(r.ok for r in results)


@pytest.mark.timeout(60)
def test_local_metadata_reads_regular_files_only_and_never_hangs(local_things, tmp_path):
    things = local_things
    urls = [things["image"].as_uri(), things["absent"].as_uri(), str(things["fifo"]), things["zero"], str(tmp_path)]
    results = fetch_images(urls, tmp_path / "cache", policy=LOCAL, max_bytes=4096, **FAST)
    assert [r.reason for r in results] == [None, "file-not-found", "not-a-file", "not-a-file", "not-a-file"]


def test_local_file_over_max_bytes_is_too_large_without_reading_it_all(tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(png((600, 600)) + b"\0" * 20_000)
    assert fetch_images([str(big)], tmp_path / "c", policy=LOCAL, max_bytes=10_000, **FAST)[0].reason == "too-large"


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "10.1.2.3", "192.168.0.10", "169.254.169.254",
                                  "[::1]", "0.0.0.0", "224.0.0.1", "[::ffff:127.0.0.1]"])
def test_network_metadata_cannot_reach_private_hosts(host, tmp_path):
    res = fetch_images([f"http://{host}:9/img.jpg"], tmp_path, policy=NETWORK, **FAST)[0]
    assert res.reason == "refused"


def test_public_addresses_are_the_only_ones_allowed():
    assert is_public_address("8.8.8.8") and is_public_address("2001:4860:4860::8888")
    for addr in ("127.0.0.1", "10.0.0.1", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "::1",
                 "fe80::1", "fc00::1", "224.0.0.1", "0.0.0.0", "::ffff:10.0.0.1", "not-an-ip"):
        assert not is_public_address(addr), addr


def test_loopback_server_refused_for_network_metadata_allowed_for_local(http_server, tmp_path):
    http_server.routes["/a.png"] = Reply(200, png())
    url = http_server.url("/a.png")
    assert fetch_images([url], tmp_path, policy=NETWORK, **FAST)[0].reason == "refused"
    assert http_server.hits == {}  # refused before any request
    assert fetch_images([url], tmp_path, policy=LOCAL, **FAST)[0].ok


def _allow(server: LoopbackServer) -> UrlPolicy:
    """Network metadata with the test server treated as a trusted mirror (``image_features.allow_hosts``)."""
    host, port = server.base_url.removeprefix("http://").split(":")
    return UrlPolicy.for_origin("network", [f"{host}:{port}"])


def test_redirect_from_an_allowed_host_to_loopback_is_refused(http_server, tmp_path):
    inner = LoopbackServer().start()  # "internal" service on another port
    try:
        inner.routes["/secret.png"] = Reply(200, png())
        http_server.routes["/ok.png"] = Reply(200, png())
        port = http_server.base_url.rsplit(":", 1)[1]
        http_server.routes["/to-inner"] = Reply(302, b"", {"Location": inner.url("/secret.png")})
        http_server.routes["/to-localhost"] = Reply(302, b"", {"Location": f"http://localhost:{port}/ok.png"})
        http_server.routes["/to-file"] = Reply(302, b"", {"Location": "file:///etc/passwd"})
        http_server.routes["/hop"] = Reply(302, b"", {"Location": "/ok.png"})
        urls = [http_server.url(p) for p in ("/ok.png", "/to-inner", "/to-localhost", "/to-file", "/hop")]
        results = fetch_images(urls, tmp_path, policy=_allow(http_server), **FAST)
        assert [r.reason for r in results] == [None, "refused", "refused", "refused", None]
        assert inner.hits == {}  # the internal service never saw a request
        # The same redirect from local metadata (the user's own mirror setup) is followed.
        assert fetch_images([urls[1]], tmp_path / "local", policy=LOCAL, **FAST)[0].ok
        assert inner.hits == {"/secret.png": 1}
    finally:
        inner.stop()


def test_endless_redirects_stop(http_server, tmp_path):
    http_server.routes["/loop"] = Reply(302, b"", {"Location": "/loop"})
    res = fetch_images([http_server.url("/loop")], tmp_path, policy=LOCAL, **FAST)[0]
    assert res.reason == "too-many-redirects"


def test_cache_filled_under_local_trust_is_not_reused_for_network_metadata(http_server, tmp_path):
    inner = LoopbackServer().start()
    try:
        inner.routes["/secret.png"] = Reply(200, png())
        http_server.routes["/r"] = Reply(302, b"", {"Location": inner.url("/secret.png")})
        url = http_server.url("/r")
        assert fetch_images([url], tmp_path, policy=LOCAL, **FAST)[0].ok
        again = fetch_images([url], tmp_path, policy=_allow(http_server), **FAST)[0]
        assert again.reason == "refused" and not again.from_cache
    finally:
        inner.stop()
