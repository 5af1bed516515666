"""The real-size benchmark's generator: deterministic, and every planted dirty case is present."""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_realsize  # noqa: E402


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generator_is_deterministic_and_plants_the_dirt(tmp_path):
    base = "http://127.0.0.1:8000"
    first = bench_realsize.generate(tmp_path / "a", base, seed=3, scale=0.005)
    second = bench_realsize.generate(tmp_path / "b", base, seed=3, scale=0.005)
    assert _tree(tmp_path / "a" / "www") == _tree(tmp_path / "b" / "www")
    assert first.counts == second.counts and first.counts["items"] == 60
    reviews = gzip.decompress(first.reviews.read_bytes()).splitlines()
    meta = gzip.decompress(first.meta.read_bytes()).splitlines()
    assert sum(len(line) > bench_realsize.LINE_LIMIT for line in reviews) == 1
    assert sum(len(line) > bench_realsize.LINE_LIMIT for line in meta) == 1
    assert any(b'"overall": 6.0' in line for line in reviews)
    assert any(b"javascript:" in line for line in meta) and any(b"file:///etc/passwd" in line for line in meta)
