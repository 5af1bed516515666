"""The ``interactions`` stage: raw files to the k-core filtered, split interactions and item table. One stage reads,
filters and splits because the split is defined on the filtered graph; its artifact (interactions, items, id maps) is
what every later stage and every export reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from sand.pipeline.base.store import Artifact, StageOutcome
from sand.pipeline.dataset.columnar import interactions_from_dumps
from sand.pipeline.dataset.interactions import interactions_from_mmrec
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
        else:  # bounded memory: see sand.pipeline.dataset.columnar
            files = raw.manifest["files"]
            with tqdm(desc="reading reviews", unit=" lines", unit_scale=True, disable=not ctx.progress) as bar:
                result, reports = interactions_from_dumps(
                    raw.file(files["reviews"]), raw.file(files["meta"]) if "meta" in files else None, fmt,
                    k_core=icfg.k_core, split_rule=icfg.split, seed=icfg.seed, max_bad_lines=icfg.max_bad_lines,
                    max_line_bytes=icfg.max_line_bytes, progress=bar.update,
                )
            # The readers' skip reports, for the manifest (the readers have already logged them).
            skips = {role: jsonable(report.to_dict()) for role, report in reports.items()}
        for table in ("interactions", "items", "user_map", "item_map"):
            getattr(result, table).to_parquet(out / f"{table}.parquet", index=False)
        return {"stats": jsonable(result.stats), "skipped": skips, "name": raw.manifest.get("name")}

    return ctx.run("interactions", params, {"raw": raw}, build)
