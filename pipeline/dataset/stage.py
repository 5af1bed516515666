"""The ``interactions`` stage: raw files to the k-core filtered, split interactions and item table.

Why one stage for reading, filtering and splitting: the split is defined on the filtered graph, and its artifact
(interactions, items, id maps) is what every later stage and every export reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from sand.pipeline.base.store import Artifact, StageOutcome
from sand.pipeline.dataset.columnar import interactions_from_dumps
from sand.pipeline.dataset.interactions import InteractionsResult, interactions_from_mmrec
from sand.pipeline.dataset.mmrec import read_mmrec_folder
from sand.pipeline.stage_context import StageContext, jsonable, key_params


def run_interactions(ctx: StageContext, raw: Artifact) -> StageOutcome:
    icfg = ctx.cfg.interactions
    fmt = raw.manifest["format"]
    params = key_params(icfg) if fmt != "mmrec" else {"kept": "given split and ids"}

    def build(out: Path) -> dict[str, Any]:
        skips: dict[str, Any] = {}
        if fmt == "mmrec":
            result = interactions_from_mmrec(read_mmrec_folder(raw.path))
        else:
            result = _interactions_from_dumps(raw, fmt, icfg, skips, ctx.progress)
        result.interactions.to_parquet(out / "interactions.parquet", index=False)
        result.items.to_parquet(out / "items.parquet", index=False)
        result.user_map.to_parquet(out / "user_map.parquet", index=False)
        result.item_map.to_parquet(out / "item_map.parquet", index=False)
        return {"stats": jsonable(result.stats), "skipped": skips, "name": raw.manifest.get("name")}

    return ctx.run("interactions", params, {"raw": raw}, build)


def _interactions_from_dumps(
    raw: Artifact, fmt: str, icfg: Any, skips: dict[str, Any], progress: bool
) -> InteractionsResult:
    """Raw dumps -> InteractionsResult in bounded memory (see :mod:`pipeline.dataset.columnar`)."""
    files = raw.manifest["files"]
    with tqdm(desc="reading reviews", unit=" lines", unit_scale=True, disable=not progress) as bar:
        result, reports = interactions_from_dumps(
            raw.file(files["reviews"]), raw.file(files["meta"]) if "meta" in files else None, fmt, k_core=icfg.k_core,
            split_rule=icfg.split, seed=icfg.seed, max_bad_lines=icfg.max_bad_lines, max_line_bytes=icfg.max_line_bytes,
            progress=bar.update,
        )
    # A reader's SkipReport for the manifest (the reader has already logged it).
    skips.update({role: jsonable(report.to_dict()) if report is not None else {} for role, report in reports.items()})
    return result
