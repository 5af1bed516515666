"""Image fetching, validation and caching against a loopback HTTP server."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from conftest import Reply
from PIL import Image

from sand.pipeline.acquire.url_policy import UrlPolicy
from sand.pipeline.features.image_fetch import (
    ImageResult,
    cache_paths,
    fetch_images,
    load_rgb,
    validate_image_bytes,
)

#: Metadata the user gave locally: the loopback test server and local files are allowed.
LOCAL = UrlPolicy.for_origin("local")
FAST = dict(timeout=2.0, retries=2, backoff_base=0.01, progress=False, policy=LOCAL)


def encode(img: Image.Image, fmt: str, **save_kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **save_kwargs)
    return buf.getvalue()


def jpeg(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 40, 10)) -> bytes:
    img = Image.new("RGB", size, color)
    img.putpixel((0, 0), (0, 0, 0))
    return encode(img, "JPEG")


def fetch_one(server, path: str, reply: Reply | list[Reply], cache: Path, **kwargs: object) -> ImageResult:
    server.routes[path] = reply
    opts = {**FAST, **kwargs}
    return fetch_images([server.url(path)], cache, **opts)[0]


def test_jpeg_200_is_usable_and_cached_as_original_bytes(http_server, tmp_path):
    body = jpeg()
    res = fetch_one(http_server, "/a.jpg", Reply(200, body, {"Content-Type": "image/jpeg"}), tmp_path)
    assert res.ok and res.reason is None
    assert res.path == cache_paths(tmp_path, res.url)[0]
    assert res.path.read_bytes() == body
    assert load_rgb(res.path).size == (64, 48)


def test_cache_file_names_never_come_from_url_text(http_server, tmp_path):
    path = "/img%2F..%2F..%2Fetc%2Fpasswd.jpg?name=..%2Fx"
    res = fetch_one(http_server, path, Reply(200, jpeg()), tmp_path)
    assert res.ok
    rel = res.path.relative_to(tmp_path)
    assert len(rel.parts) == 2 and len(rel.parts[0]) == 2
    assert rel.name.endswith(".img") and all(c in "0123456789abcdef" for c in rel.stem)


def test_404_is_hit_once_without_retry(http_server, tmp_path):
    res = fetch_one(http_server, "/gone.jpg", Reply(404, b"no"), tmp_path)
    assert res.reason == "http-404" and res.path is None
    assert http_server.hits["/gone.jpg"] == 1


def test_500_then_200_is_retried_and_usable(http_server, tmp_path):
    res = fetch_one(http_server, "/flaky.jpg", [Reply(500, b"oops"), Reply(200, jpeg())], tmp_path)
    assert res.ok
    assert http_server.hits["/flaky.jpg"] == 2


def test_persistent_500_is_transient_and_not_cached(http_server, tmp_path):
    res = fetch_one(http_server, "/down.jpg", Reply(503, b"busy"), tmp_path, retries=1)
    assert res.reason == "http-503"
    assert http_server.hits["/down.jpg"] == 2
    fetch_images([http_server.url("/down.jpg")], tmp_path, **{**FAST, "retries": 0})
    assert http_server.hits["/down.jpg"] == 3  # a later run tries again


def test_hanging_server_times_out_and_is_retried(http_server, tmp_path):
    res = fetch_one(http_server, "/slow.jpg", Reply(200, jpeg(), delay=1.0), tmp_path, timeout=0.2, retries=1)
    assert res.reason == "timeout"
    assert http_server.hits["/slow.jpg"] == 2
    assert not cache_paths(tmp_path, res.url)[1].exists()


def test_truncated_body_is_reported_and_retried(http_server, tmp_path):
    res = fetch_one(http_server, "/cut.jpg", Reply(200, jpeg(), truncate_to=50), tmp_path, retries=1)
    assert res.reason == "truncated"
    assert http_server.hits["/cut.jpg"] == 2


def test_html_page_with_status_200_is_not_an_image(http_server, tmp_path):
    html = b"<!DOCTYPE html><html><body>Robot check</body></html>"
    res = fetch_one(http_server, "/captcha", Reply(200, html, {"Content-Type": "text/html"}), tmp_path)
    assert res.reason == "not-an-image"


def test_amazon_no_img_placeholder_url_is_not_fetched(http_server, tmp_path):
    path = "/images/G/01/x-site/icons/no-img-sm._CB192198896_.gif"
    gif = encode(Image.new("P", (60, 40)), "GIF")
    res = fetch_one(http_server, path, Reply(200, gif), tmp_path)
    assert res.reason == "placeholder"
    assert http_server.hits.get(path, 0) == 0


def test_blank_gif_is_a_placeholder(http_server, tmp_path):
    gif = encode(Image.new("P", (80, 80), 3), "GIF")
    res = fetch_one(http_server, "/blank.gif", Reply(200, gif), tmp_path)
    assert res.reason == "placeholder"


def test_corrupt_jpeg_is_undecodable(http_server, tmp_path):
    body = bytearray(jpeg((128, 128)))
    body = bytes(body[:200]) + b"\x00" * 50  # header intact, entropy data gone
    res = fetch_one(http_server, "/corrupt.jpg", Reply(200, body), tmp_path)
    assert res.reason == "undecodable"


def test_one_pixel_image_is_too_small(http_server, tmp_path):
    res = fetch_one(http_server, "/pixel.png", Reply(200, encode(Image.new("RGB", (1, 1)), "PNG")), tmp_path)
    assert res.reason == "too-small"


def test_cmyk_jpeg_is_usable_and_loads_as_rgb(http_server, tmp_path):
    body = encode(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG")
    res = fetch_one(http_server, "/cmyk.jpg", Reply(200, body), tmp_path)
    assert res.ok
    img = load_rgb(res.path)
    assert img.mode == "RGB" and img.size == (40, 40)
    r, g, b = img.getpixel((20, 20))
    assert r > 200 and g < 60 and b < 60


@pytest.mark.parametrize("mode", ["RGBA", "P", "LA", "L"])
def test_alpha_palette_and_grey_pngs_load_as_rgb(http_server, tmp_path, mode):
    img = Image.new("RGBA", (40, 40), (0, 0, 255, 255))
    img.paste((0, 0, 0, 0), (0, 0, 20, 40))  # left half transparent
    if mode == "P":
        img = img.convert("P")
        img.info["transparency"] = img.getpixel((0, 0))
        body = encode(img, "PNG", transparency=img.info["transparency"])
    else:
        body = encode(img.convert(mode), "PNG")
    res = fetch_one(http_server, f"/{mode}.png", Reply(200, body), tmp_path)
    assert res.ok
    out = load_rgb(res.path)
    assert out.mode == "RGB"
    if mode in ("RGBA", "P", "LA"):
        assert out.getpixel((5, 5)) == (255, 255, 255)  # transparent becomes white, not black


def test_exif_rotated_jpeg_is_transposed(http_server, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    body = encode(Image.new("RGB", (80, 40), (10, 10, 10)), "JPEG", exif=exif.tobytes())
    res = fetch_one(http_server, "/rot.jpg", Reply(200, body), tmp_path)
    assert res.ok
    assert load_rgb(res.path).size == (40, 80)


def test_body_over_max_bytes_is_too_large(http_server, tmp_path):
    body = jpeg((256, 256))
    res = fetch_one(http_server, "/big.jpg", Reply(200, body), tmp_path, max_bytes=len(body) - 1)
    assert res.reason == "too-large"
    assert http_server.hits["/big.jpg"] == 1


def test_decompression_bomb_is_too_large():
    body = encode(Image.new("1", (3000, 3000)), "PNG")  # tiny file, many pixels
    assert len(body) < 10_000
    assert validate_image_bytes(body, max_pixels=1_000_000)[0] == "too-many-pixels"


def test_empty_url_is_reported_without_a_request(http_server, tmp_path):
    results = fetch_images(["", "   ", None], tmp_path, **FAST)
    assert [r.reason for r in results] == ["empty-url"] * 3
    assert http_server.requests == []


def test_file_url_and_plain_path_are_validated_in_place(tmp_path):
    img_path = tmp_path / "local dir" / "item 1.png"
    img_path.parent.mkdir()
    Image.new("RGB", (50, 60), (1, 2, 3)).save(img_path)
    url = img_path.as_uri()
    assert "%20" in url
    by_url, by_path, gone = fetch_images(
        [url, str(img_path), (tmp_path / "nope.png").as_uri()], tmp_path / "cache", **FAST
    )
    assert by_url.ok and by_url.path == img_path
    assert by_path.ok and by_path.path == img_path
    assert gone.reason == "file-not-found"
    assert not (tmp_path / "cache").exists()  # local files are not copied


def test_same_url_fetched_once_across_two_runs(http_server, tmp_path):
    http_server.routes["/once.jpg"] = Reply(200, jpeg())
    http_server.routes["/missing.jpg"] = Reply(404)
    http_server.routes["/page"] = Reply(200, b"<html></html>")
    urls = [http_server.url(p) for p in ("/once.jpg", "/missing.jpg", "/page", "/once.jpg")]
    first = fetch_images(urls, tmp_path, **FAST)
    assert dict(http_server.hits) == {"/once.jpg": 1, "/missing.jpg": 1, "/page": 1}
    second = fetch_images(urls, tmp_path, **FAST)
    assert dict(http_server.hits) == {"/once.jpg": 1, "/missing.jpg": 1, "/page": 1}  # 0 new hits
    assert [r.reason for r in second] == [r.reason for r in first] == [None, "http-404", "not-an-image", None]
    assert all(r.from_cache for r in second)
    assert second[0].path == first[0].path


def test_cached_too_small_is_rejudged_when_min_side_is_lowered(http_server, tmp_path):
    http_server.routes["/small.png"] = Reply(200, encode(Image.new("RGB", (20, 20), (9, 9, 9)), "PNG"))
    url = http_server.url("/small.png")
    assert fetch_images([url], tmp_path, **FAST)[0].reason == "too-small"
    assert fetch_images([url], tmp_path, **FAST)[0].reason == "too-small"
    assert http_server.hits["/small.png"] == 1
    assert fetch_images([url], tmp_path, min_side=16, **FAST)[0].ok
    assert http_server.hits["/small.png"] == 2


def test_sidecar_records_the_outcome(http_server, tmp_path):
    res = fetch_one(http_server, "/gone.png", Reply(410), tmp_path)
    meta = json.loads(cache_paths(tmp_path, res.url)[1].read_text())
    assert meta["url"] == res.url and meta["reason"] == "http-410"
    assert not cache_paths(tmp_path, res.url)[0].exists()


def test_a_bad_image_never_stops_the_run(http_server, tmp_path):
    routes = {
        "/ok1.jpg": Reply(200, jpeg()),
        "/html": Reply(200, b"<html>"),
        "/404": Reply(404),
        "/corrupt.jpg": Reply(200, jpeg()[:120]),
        "/ok2.png": Reply(200, encode(Image.new("RGB", (33, 90), (5, 6, 7)), "PNG")),
        "/tiny.gif": Reply(200, encode(Image.new("P", (2, 2)), "GIF")),
        "/gz.jpg": Reply(200, b"not gzip at all", {"Content-Encoding": "gzip"}),
    }
    http_server.routes.update(routes)
    urls = [http_server.url(p) for p in routes] + ["", "ftp://example.com/x.jpg"]
    results = fetch_images(urls, tmp_path, concurrency=3, **FAST)
    assert [r.url for r in results] == urls
    assert [r.reason for r in results] == [
        None,
        "not-an-image",
        "http-404",
        "undecodable",
        None,
        "too-small",
        "bad-encoding",
        "empty-url",
        "unsupported-scheme",
    ]


def test_fetch_works_inside_a_running_event_loop(http_server, tmp_path):
    import asyncio

    http_server.routes["/x.jpg"] = Reply(200, jpeg())

    async def main() -> list[ImageResult]:
        return fetch_images([http_server.url("/x.jpg")], tmp_path, **FAST)

    assert asyncio.run(main())[0].ok


def test_redirect_is_followed(http_server, tmp_path):
    http_server.routes["/final.jpg"] = Reply(200, jpeg())
    res = fetch_one(http_server, "/moved", Reply(301, b"", {"Location": http_server.url("/final.jpg")}), tmp_path)
    assert res.ok
    assert http_server.hits == {"/moved": 1, "/final.jpg": 1}


def test_file_urls_are_decoded_once_and_remote_file_hosts_refused(tmp_path):
    from urllib.parse import quote

    img_path = tmp_path / "a%41 b.png"  # decoding twice would look for "aA b.png"
    Image.new("RGB", (50, 60), (1, 2, 3)).save(img_path)
    url = img_path.as_uri()
    assert "%2541" in url
    by_url, by_localhost, remote = fetch_images(
        [url, "file://localhost" + quote(str(img_path)), "file://fileserver" + quote(str(img_path))],
        tmp_path / "cache", **FAST,
    )
    assert by_url.ok and by_url.path == img_path
    assert by_localhost.ok and by_localhost.path == img_path
    assert not remote.ok and remote.reason == "unsupported-scheme"
