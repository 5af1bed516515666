"""``sand models``: the model registry of a data root (list, show, promote). Why a sub-app of its own: the registry is
read and changed by hand (a rollback after a bad retrain is ``sand models promote OLDKEY``), apart from any pipeline
run, so these commands need only the data root; no Prefect, and torch only to republish."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from sand.pipeline.base.errors import ConfigError
from sand.pipeline.serving.publish import top_k_table, write_table
from sand.pipeline.serving.registry import ModelRegistry
from sand.pipeline.serving.runs import run_embeddings

models_app = typer.Typer(help="The model registry: retrained models, the champion in use, promotions.",
                         no_args_is_help=True)

DataRoot = Annotated[Path | None, typer.Option(
    help="data root holding the registry (default: $SAND_DATA_ROOT or ./data)")]
AsJson = Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")]
Key = Annotated[str, typer.Argument(help="model key (a unique prefix will do)")]


def _root(data_root: Path | None) -> Path:
    return (data_root or Path(os.environ.get("SAND_DATA_ROOT", "data"))).expanduser().resolve()


def _metric(metrics: dict, split: str = "valid", name: str = "recall@20") -> str:
    value = metrics.get(split, {}).get(name)
    return f"{value:.4f}" if isinstance(value, int | float) else "-"


@models_app.command("list")
def list_models(data_root: DataRoot = None, as_json: AsJson = False) -> None:
    """Every registered model, oldest first; the champion of each dataset and model is marked."""
    registry = ModelRegistry(_root(data_root))
    champions = set(registry.champions().values())
    rows = [{"key": m.key, "dataset": m.dataset, "model": m.model, "snapshot": m.snapshot,
             "created_at": m.created_at, "champion": m.key in champions, "valid_recall@20": _metric(m.metrics)}
            for m in registry.models()]
    if as_json:
        typer.echo(json.dumps({"registry": str(registry.path), "models": rows}))
        return
    if not rows:
        typer.echo(f"no registered model in {registry.path} (run `sand retrain` first)")
        return
    typer.echo(f"{'':2}{'key':17}{'dataset':14}{'model':10}{'snapshot':17}{'valid R@20':11}created")
    for r in rows:
        typer.echo(f"{'*' if r['champion'] else ' ':2}{r['key']:17}{r['dataset']:14}{r['model']:10}"
                   f"{r['snapshot']:17}{r['valid_recall@20']:11}{r['created_at']}")


@models_app.command("show")
def show_model(key: Key, data_root: DataRoot = None) -> None:
    """One model as JSON: snapshot, artifacts, config, metrics, champion or not, the decisions about it."""
    registry = ModelRegistry(_root(data_root))
    entry = registry.get(key)
    out = {**entry.to_dict(), "champion": registry.champions().get((entry.dataset, entry.model)) == entry.key,
           "decisions": [d.to_dict() for d in registry.decisions(entry.key)]}
    typer.echo(json.dumps(out, indent=2))


@models_app.command("promote")
def promote_model(key: Key, data_root: DataRoot = None,
                  k: Annotated[int | None, typer.Option("-k", "--k", help="recommendations per user to publish "
                                                        "(default: the model's retrain.top_k)")] = None,
                  as_json: AsJson = False) -> None:
    """Make a registered model the champion of its dataset and model (e.g. roll back), then republish."""
    from sand.pipeline.serving.retrain import promote_by_hand  # lazy: httpx, via change detection
    root = _root(data_root)
    entry = ModelRegistry(root).get(key)
    top_k = k if k is not None else int(entry.config.get("retrain", {}).get("top_k", 20))
    decision, manifest = promote_by_hand(root, entry.key, top_k)
    if as_json:
        typer.echo(json.dumps({"decision": decision.to_dict(), "published": manifest}))
        return
    typer.echo(f"{entry.key} is now the {entry.model} champion on {entry.dataset} (was {decision.champion}); "
               f"published top-{top_k} for {manifest['users']} users")


def write_all_recommendations(artifacts: dict, cfg, k: int, out: Path | None) -> dict:
    """``sand recommend --all --out FILE``: every user's top-``k`` of a run, in the published columns."""
    if out is None:
        raise ConfigError("sand recommend --all needs --out FILE (a Parquet file to write)")
    data, user_emb, item_emb = run_embeddings(cfg.resolved().train, artifacts)
    table = top_k_table(artifacts["interactions"], data, user_emb, item_emb, k)
    write_table(table, Path(out))
    return {"out": str(out), "rows": len(table), "users": int(table["user_id"].nunique()), "k": k,
            "model_key": artifacts["train"].key}
