"""The ``report`` stage: the paper's tables and figures over every evaluated run in the store (not one upstream chain:
a report compares runs); keyed by the set of evaluations and grid tables, so cached while that set is unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sand.pipeline.base.files import sha256_file
from sand.pipeline.base.store import StageOutcome
from sand.pipeline.experiments.report import write_report
from sand.pipeline.stage_context import StageContext, key_params


def run_report(ctx: StageContext) -> StageOutcome:
    rcfg = ctx.cfg.report
    # Grid tables feed the sensitivity figure: a changed grid must give a new report.
    grids = {p.parent.name: sha256_file(p)[:16] for p in sorted((ctx.store.data_root / "grids").glob("*/runs.csv"))}
    params = {**key_params(rcfg), "evaluations": sorted(a.key for a in ctx.store.list("evaluate")), "grids": grids}

    def build(out: Path) -> dict[str, Any]:
        files = write_report(ctx.store.data_root, out, tsne_items=rcfg.tsne_items, seed=rcfg.seed,
                             select_metric=rcfg.select_metric)
        return {"files": {name: [str(Path(p).relative_to(out)) for p in paths] for name, paths in files.items()}}

    return ctx.run("report", params, {}, build)
