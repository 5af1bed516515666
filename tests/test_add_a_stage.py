"""Adding a stage touches the files docs/architecture.md's table names, and nothing else.

The table says: a run function in a module of its own, and one row in ``pipeline/stages.py``.
This test does exactly that, in a fresh interpreter: it writes a toy run function into a
module outside the package, loads a copy of ``pipeline/stages.py`` with one row appended as
``sand.pipeline.stages``, and checks that what the docs say follows from the row does: the
CLI's stage checks know the name, the in-process runner builds the stage's inputs and its
artifact (cached on the second call), and Prefect has a ``sand-toy`` flow for it.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TOY_MODULE = '''
"""A toy stage: counts the review lines of the acquired dataset."""

import gzip
import json
from pathlib import Path

from sand.pipeline.base.store import Artifact, StageOutcome
from sand.pipeline.stage_context import StageContext


def run_toy(ctx: StageContext, raw: Artifact) -> StageOutcome:
    def build(out: Path) -> dict:
        reviews = raw.path / raw.manifest["files"]["reviews"]
        opener = gzip.open if reviews.suffix == ".gz" else open
        with opener(reviews, "rb") as fh:
            lines = sum(1 for _ in fh)
        (out / "count.json").write_text(json.dumps({"review_lines": lines}))
        return {"review_lines": lines}

    return ctx.run("toy", {"what": "review lines"}, {"raw": raw}, build)
'''

TOY_ROW = 'Stage("toy", "toy_stage:run_toy", "1", "acquire", inputs={"raw": "acquire"})'

CHECK = '''
import importlib.util, json, sys
from pathlib import Path

import sand.pipeline

here, data_root = Path(sys.argv[1]), sys.argv[2]
sys.path.insert(0, str(here))
spec = importlib.util.spec_from_file_location("sand.pipeline.stages", here / "stages.py")
stages = importlib.util.module_from_spec(spec)
sys.modules["sand.pipeline.stages"] = stages
spec.loader.exec_module(stages)
sand.pipeline.stages = stages

import contextlib, io

from sand.flows import cli
from sand.pipeline.base.config import load_config
from sand.pipeline.runner import resolve_upstream, run_stage, upstream_stages

stages.check_stage_names(["toy"])  # --until toy, --refresh toy, sand stage toy
sys.argv = ["sand", "stage", "no-such-stage", "--data-root", data_root]
stderr = io.StringIO()
with contextlib.redirect_stderr(stderr):
    try:
        cli.main()
    except SystemExit as done:
        cli_exit = done.code
cfg = load_config(None, {"data_root": data_root}, ["acquire.sample_users=40", "acquire.sample_items=30"])
ctx = stages.Context.create(cfg, progress=False)
outcome = run_stage(ctx, "toy", resolve_upstream(ctx, "toy"))
again = run_stage(ctx, "toy", resolve_upstream(ctx, "toy"))

from sand.flows.pipeline_flows import STAGE_FLOWS

print(json.dumps({
    "upstream": upstream_stages(cfg, "toy"),
    "cli_exit": cli_exit,
    "cli_error": stderr.getvalue(),
    "artifact": str(outcome.artifact.path),
    "manifest_lines": outcome.artifact.manifest["review_lines"],
    "cached_again": again.cached,
    "same_key": again.artifact.key == outcome.artifact.key,
    "flow": STAGE_FLOWS["toy"].name,
}))
'''


def with_row(stages_source: str, row: str) -> str:
    """``pipeline/stages.py`` with ``row`` appended to ``STAGE_TABLE`` (found with ``ast``, not by layout)."""
    tree = ast.parse(stages_source)
    table = next(
        node.value for node in tree.body
        if isinstance(node, ast.Assign | ast.AnnAssign)
        and any(isinstance(t, ast.Name) and t.id == "STAGE_TABLE"
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target]))
    )
    assert isinstance(table, ast.Tuple), "STAGE_TABLE is no longer a tuple literal: update this test"
    lines = stages_source.splitlines(keepends=True)
    offset = sum(len(line) for line in lines[: table.end_lineno - 1]) + table.end_col_offset - 1
    assert stages_source[offset] == ")"
    return stages_source[:offset] + f"    {row},\n" + stages_source[offset:]


def test_with_row_appends_to_the_table():
    source = 'X = 1\nSTAGE_TABLE: tuple = (\n    Stage("a"),\n)\nY = 2\n'
    expected = 'X = 1\nSTAGE_TABLE: tuple = (\n    Stage("a"),\n    Stage("b"),\n)\nY = 2\n'
    assert with_row(source, 'Stage("b")') == expected


@pytest.mark.slow
def test_a_toy_stage_needs_only_its_run_function_and_one_row(tmp_path):
    (tmp_path / "toy_stage.py").write_text(textwrap.dedent(TOY_MODULE))
    (tmp_path / "stages.py").write_text(with_row((ROOT / "pipeline" / "stages.py").read_text(), TOY_ROW))
    data_root = tmp_path / "data"
    out = subprocess.run([sys.executable, "-c", CHECK, str(tmp_path), str(data_root)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])

    assert found["upstream"] == ["acquire"]  # the row's inputs decide what is built first
    # The CLI's check (the one --until, --refresh and `sand stage` pass through) lists it among the stages.
    assert found["cli_exit"] == 2, found["cli_error"]
    listed = re.search(r"choose one of ([\w, ]+)", found["cli_error"]).group(1).strip().split(", ")
    assert listed[-2:] == ["report", "toy"]
    artifact = Path(found["artifact"])
    assert artifact.is_relative_to(data_root / "artifacts" / "toy")
    count = json.loads((artifact / "count.json").read_text())["review_lines"]
    assert count > 0 and count == found["manifest_lines"]
    assert found["cached_again"] and found["same_key"]  # the store caches it like any stage
    assert found["flow"] == "sand-toy"
