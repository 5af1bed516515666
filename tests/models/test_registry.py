"""The model registry is the one list of models: config, CLI help, report and grid presets follow it,
and a model without variants records ``variant: null`` everywhere."""

from __future__ import annotations

import importlib
import inspect
import json
import subprocess
import sys

import pandas as pd
import pytest
import typer.main

from sand.models import registry
from sand.pipeline.base.config import PipelineConfig, build_config, load_config
from sand.pipeline.base.errors import ConfigError

DUMMY = "dummy-mf"


@pytest.fixture
def dummy_model(monkeypatch):
    """A registered model that exists nowhere else: only its registry entry is added."""
    entry = registry.ModelSpec("Dummy-MF", "sand.models.bpr:MFBPR", (), 5e-3, tables=("table2",))
    monkeypatch.setitem(registry.MODELS, DUMMY, entry)
    return DUMMY


def _option_help(app: typer.Typer, command: str, option: str) -> str:
    group = typer.main.get_command(app)
    param = next(p for p in group.commands[command].params if p.name == option)
    return param.help or ""


# ----------------------------------------------------------------------------- derived from the entry
def test_registered_model_is_accepted_by_config_and_listed_in_errors_and_schema(dummy_model):
    cfg = build_config({"train": {"model": dummy_model}})
    assert cfg.train.model == dummy_model and registry.default_lr(dummy_model) == 5e-3
    with pytest.raises(ConfigError) as err:
        build_config({"train": {"model": "nope"}})
    message = str(err.value)
    assert "\n" not in message and "train.model='nope'" in message and dummy_model in message
    schema = PipelineConfig.model_json_schema()["$defs"]["TrainConfig"]["properties"]["model"]
    assert schema["enum"] == list(registry.MODELS) and dummy_model in schema["enum"]


def test_registered_model_appears_in_cli_help(monkeypatch):
    from sand.flows import cli

    assert DUMMY not in _option_help(cli.app, "run", "model")
    try:
        with monkeypatch.context() as patch:
            patch.setitem(registry.MODELS, DUMMY, registry.ModelSpec("Dummy-MF", "sand.models.bpr:MFBPR", (), 1e-3))
            importlib.reload(cli)  # the help text is built when the CLI module is imported
            assert _option_help(cli.app, "run", "model").split(" | ") == list(registry.MODELS)
            assert DUMMY in _option_help(cli.app, "stage", "model")
    finally:
        importlib.reload(cli)
    assert DUMMY not in _option_help(cli.app, "run", "model")


def test_registered_model_appears_in_report_labels_and_tables(dummy_model, tmp_path):
    from support import fake_interactions, fake_run

    from sand.pipeline.base.store import ArtifactStore
    from sand.pipeline.experiments.report import run_label, write_report

    assert run_label(dummy_model, None) == "Dummy-MF"
    store = ArtifactStore(tmp_path / "data")
    inter = fake_interactions(store, "baby")
    fake_run(store, inter, "bpr", variant=None, valid=0.05, test=0.055)
    fake_run(store, inter, dummy_model, variant=None, valid=0.06, test=0.065)
    out = tmp_path / "report"
    written = write_report(tmp_path / "data", out, tsne_items=20)
    table2 = pd.read_csv(out / "table2_main.csv")
    assert list(table2["Model"]) == ["MF-BPR", "Dummy-MF"]  # registry order, the registry's label
    assert table2.set_index("Model").loc["Dummy-MF", "baby R@20"] == pytest.approx(0.065)
    assert "table2" in written


def test_grid_presets_follow_the_registry(dummy_model):
    from sand.pipeline.experiments.grid import preset

    assert preset("table2")["train.model"] == ["bpr", "lightgcn", "vbpr", "freedom", "sand", dummy_model]
    assert preset("all-models")["train.model"] == [
        "bpr", "lightgcn", "vbpr", "freedom", "sand", "vbpr-sand", "freedom-sand", dummy_model]
    # Table 3: each backbone immediately followed by its plug-in
    assert preset("table3")["train.model"] == ["vbpr", "vbpr-sand", "freedom", "freedom-sand"]


def test_unknown_report_table_in_an_entry_is_refused():
    with pytest.raises(ValueError, match="unknown report table 'table9'"):
        registry.ModelSpec("X", "sand.models.bpr:MFBPR", (), 1e-3, tables=("table9",))


# ----------------------------------------------------------------------------- entries match the classes
@pytest.mark.parametrize("name", list(registry.MODELS))
def test_entry_matches_its_class(name):
    """``has_variants`` is what the class takes; modalities are what it requires; targets resolve."""
    cls = registry.model_class(name)
    takes_variant = "variant" in inspect.signature(cls.__init__).parameters
    assert registry.MODELS[name].has_variants == takes_variant
    assert tuple(getattr(cls, "required_modalities", ())) == registry.required_modalities(name)


def test_registry_and_config_import_without_torch():
    code = (
        "import sys, sand.models.registry, sand.pipeline.base.config, sand.pipeline.base.formats;"
        "heavy = [m for m in ('torch', 'pandas', 'numpy') if m in sys.modules]; print(heavy); assert not heavy"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# ----------------------------------------------------------------------------- variant: null without variants
def test_recorded_variant():
    assert registry.recorded_variant("sand", "c") == "c"
    assert registry.recorded_variant("vbpr-sand", "a") == "a"
    assert registry.recorded_variant("bpr", "a") is None
    assert registry.recorded_variant("lightgcn", "no-align") is None
    assert registry.recorded_variant("removed-model", "a") is None


def test_model_without_variants_records_null_variant_everywhere(tmp_path):
    """bpr with train.variant=c set: the train result, the evaluate manifest, the --json summary and
    the report's runs.csv all say variant null (it used to be recorded as the configured variant)."""
    from sand.pipeline.experiments.report import write_report
    from sand.pipeline.runner import run_pipeline
    from sand.pipeline.stages import Context

    folder = tmp_path / "ids"  # an MMRec folder of interactions only: ID-only models train on it
    folder.mkdir()
    split = [0] * 6 + [1, 2]  # 6 train, 1 valid, 1 test per user
    rows = [f"{u}\t{(3 * u + k) % 25}\t{split[k]}" for u in range(30) for k in range(8)]
    (folder / "ids.inter").write_text("userID\titemID\tx_label\n" + "\n".join(rows) + "\n")
    root = tmp_path / "data"
    cfg = load_config(None, {"data_root": str(root), "acquire.dataset": str(folder)},
                      ["train.model=bpr", "train.variant=c", "train.epochs=2"])
    result = run_pipeline(Context.create(cfg, progress=False), until="evaluate")

    assert result.artifact("train").manifest["result"]["variant"] is None
    assert json.loads(result.artifact("train").file("result.json").read_text())["variant"] is None
    assert result.artifact("evaluate").manifest["variant"] is None
    summary = json.loads(json.dumps(result.summary()))  # what --json prints
    assert summary["train"]["model"] == "bpr" and summary["train"]["variant"] is None
    write_report(root, tmp_path / "report", tsne_items=20)
    runs = pd.read_csv(tmp_path / "report" / "runs.csv")
    assert list(runs["model"]) == ["bpr"] and runs["variant"].isna().all()
    assert list(runs["label"]) == ["MF-BPR"]
