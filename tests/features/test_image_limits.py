"""Pixel bombs and the decode budget.

What users rely on: a small file claiming a huge picture (a 190 KB PNG of
7000 x 7000 RGBA pixels decodes to over a gigabyte) is a counted skip decided from
its header, with memory untouched, and several large images are never decoded
at once in one process.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest

from sand.pipeline.features.image_fetch import PixelBudget


def bomb_png(path: Path, side: int = 7000) -> Path:
    """A fully transparent RGBA PNG of ``side`` x ``side``, written row by row (never held in memory)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    comp = zlib.compressobj(9)
    row = b"\0" * (1 + 4 * side)
    body = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 6, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


MEASURE = """
import json, resource, sys
from pathlib import Path
from sand.pipeline.features.image_fetch import fetch_images
from sand.pipeline.acquire.url_policy import UrlPolicy
paths = sys.argv[2:]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
results = fetch_images(paths, Path(sys.argv[1]), policy=UrlPolicy.for_origin("local"), concurrency=8,
                       progress=False)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"reasons": [r.reason for r in results], "growth_mb": (after - before) / 1024}))
"""


@pytest.mark.timeout(300)
def test_pixel_bombs_are_skipped_from_the_header_with_bounded_memory(tmp_path):
    first = bomb_png(tmp_path / "bomb0.png")
    assert first.stat().st_size < 400_000  # tiny on disk...
    bombs = [first] + [tmp_path / f"bomb{i}.png" for i in range(1, 4)]
    for copy in bombs[1:]:
        copy.write_bytes(first.read_bytes())
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(tmp_path / "cache"), *map(str, bombs)],
        check=True, capture_output=True, text=True, timeout=240,
    ).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert report["reasons"] == ["too-many-pixels"] * 4
    # ...and 4 decodes would cost over 4 GB (1.16 GB each); the skip costs next to nothing.
    assert report["growth_mb"] < 100, report


def test_the_encoder_refuses_a_bomb_that_replaced_a_checked_file(tmp_path):
    from sand.pipeline.base.errors import DataError
    from sand.pipeline.features.image_encoder import ImageFileDataset

    dataset = ImageFileDataset([bomb_png(tmp_path / "b.png", side=3000)], 32, max_pixels=1_000_000)
    with pytest.raises(DataError, match=r"b\.png.*over the limit"):
        dataset[0]


def _peak_in_flight(budget: PixelBudget, sizes: list[int]) -> tuple[int, list[int]]:
    """Run one "decode" per size on its own thread; the most pixels decoding together, and who overlapped."""
    active, peak, alone, lock = [0], [0], [], threading.Lock()

    def decode(pixels: int) -> None:
        with budget.reserve(pixels):
            with lock:
                active[0] += pixels
                peak[0] = max(peak[0], active[0])
            time.sleep(0.05)
            with lock:
                if active[0] == pixels:
                    alone.append(pixels)
                active[0] -= pixels

    threads = [threading.Thread(target=decode, args=(n,)) for n in sizes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    return peak[0], alone


def test_decode_budget_keeps_large_decodes_apart():
    peak, _ = _peak_in_flight(PixelBudget(1000), [600, 600, 600, 300, 100])
    assert peak <= 1000
    # An image over the whole budget still gets decoded, but alone.
    peak, alone = _peak_in_flight(PixelBudget(1000), [600, 300, 5000, 100])
    assert 5000 in alone and peak == 5000


@pytest.mark.parametrize("keep", [0.97, 0.5, 0.1])
def test_a_truncated_jpeg_is_undecodable_although_validation_decodes_it_scaled_down(keep):
    """Validation decodes JPEGs at their smallest DCT scale; a cut file must still be refused."""
    import io

    import numpy as np
    from PIL import Image

    from sand.pipeline.features.image_fetch import validate_image_bytes

    buf = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    assert validate_image_bytes(data) == (None, (400, 300))
    assert validate_image_bytes(data[: int(len(data) * keep)]) == ("undecodable", None)
