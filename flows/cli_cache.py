"""``sand cache``: how big the data root's per-item caches are, and pruning them. Why: the caches (downloaded images,
text and image feature vectors) are shared by every dataset and snapshot of a data root and only grow. Every cache is
content-addressed, so a pruned file is fetched or recomputed when a run asks for it again."""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from sand.pipeline.base.config import load_config
from sand.pipeline.base.errors import ConfigError
from sand.pipeline.features.vector_cache import prune as prune_cache
from sand.pipeline.features.vector_cache import usage

cache_app = typer.Typer(help="Size report and pruning of the data root's per-item caches.", no_args_is_help=True)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")


def parse_duration(text: str) -> float:
    """Seconds in ``30d``, ``12h``, ``90m``, ``2w`` or ``45s``; a one-line error otherwise."""
    match = _DURATION.match(text or "")
    if not match:
        raise ConfigError(f"--older-than {text!r}: expected a number and a unit (s, m, h, d, w), e.g. 30d")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _cache_root(data_root: Path | None, config: Path | None) -> Path:
    overrides = {"data_root": str(data_root)} if data_root is not None else {}
    return Path(load_config(config, overrides).data_root) / "cache"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _age(mtime: float | None) -> str:
    if mtime is None:
        return "-"
    days = (time.time() - mtime) / 86400
    return f"{days:.1f} d" if days >= 1 else f"{days * 24:.1f} h"


DataRoot = Annotated[Path | None, typer.Option(help="data root whose caches to use (default: ./data or the config's)")]
Config = Annotated[Path | None, typer.Option(help="YAML config file naming the data root")]


@cache_app.command("info")
def info(data_root: DataRoot = None, config: Config = None,
         as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False) -> None:
    """Files, size and age of each cache (images, text, image_features) and of each encoder in it."""
    root = _cache_root(data_root, config)
    rows = usage(root)
    if as_json:
        typer.echo(json.dumps({"cache_root": str(root), "caches": [asdict(r) for r in rows]}))
        return
    typer.echo(f"caches under {root}:")
    if not rows:
        typer.echo("  (empty)")
    for r in rows:
        indent = "    " if "/" in r.name else "  "
        keys = ("backbone", "image_size", "engine", "precision", "device")
        what = "  " + " ".join(f"{k}={r.identity[k]}" for k in keys if k in r.identity) if r.identity else ""
        typer.echo(f"{indent}{r.name:<40} {r.files:>8} files {_size(r.bytes):>11}  newest {_age(r.newest):>8}  "
                   f"oldest {_age(r.oldest):>8}{what}")


@cache_app.command("prune")
def prune(
    older_than: Annotated[str, typer.Option("--older-than", help="delete files not written or used for this "
                                            "long: 30d, 12h, 90m, 2w")],
    only: Annotated[list[str], typer.Option("--only", help="prune only this cache: images | text | "
                                            "image_features (repeatable; default: all)")] = [],  # noqa: B006
    dry_run: Annotated[bool, typer.Option("--dry-run", help="report what would be deleted, delete nothing")] = False,
    data_root: DataRoot = None, config: Config = None,
) -> None:
    """Delete cache files older than a duration; a later run refetches or recomputes what it needs."""
    seconds = parse_duration(older_than)  # errors: one line and exit 2, from the entry point
    root = _cache_root(data_root, config)
    known = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    unknown = [name for name in only if name not in known]
    if unknown:
        raise ConfigError(f"--only {unknown[0]!r}: no such cache under {root} (there: {', '.join(known) or 'none'})")
    n, size = prune_cache(root, seconds, only or None, dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    typer.echo(f"{verb} {n} files ({_size(size)}) older than {older_than} under {root}")
