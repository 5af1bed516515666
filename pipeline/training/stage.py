"""The ``train`` and ``evaluate`` stages: fit the configured model, then score it on full rankings. Training's work
directory is keyed by every parameter and input, so a rerun of the same settings resumes from the last checkpoint.
Importing this module loads no torch."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from sand.models import registry
from sand.pipeline.base.devices import resolve_device
from sand.pipeline.base.hardware import resolve_precision
from sand.pipeline.base.store import Artifact, StageOutcome, write_json_atomic
from sand.pipeline.stage_context import PERFORMANCE_FIELDS, StageContext, jsonable, key_params
from sand.pipeline.training.evaluation import evaluate_split, recommendations_table
from sand.pipeline.training.memory_estimate import check_training_memory
from sand.pipeline.training.model_io import build_model_for, effective_model_kwargs, trained_embeddings
from sand.pipeline.training.trainer import LAST_NAME, describe_changes, train_model
from sand.pipeline.training.warm_start import warm_start

log = logging.getLogger(__name__)

#: What a training work directory was started with (params and input keys), for restart messages.
RUN_FILE = "run.json"


def _model_inputs(inter: Artifact, feature_arts: dict[str, Artifact]) -> dict[str, Artifact]:
    return {"interactions": inter, **feature_arts}


def train_key_params(tcfg: Any) -> dict[str, Any]:
    """Train parameters that reach the model (fields it ignores do not change the artifact key). The precision enters as
    resolved here (``auto`` is bf16 on one machine, fp32 on another; bf16 changes results), only when not fp32 (older
    artifacts keep their keys) and only for models that read features. A model's ``revision`` enters from 1 on, so a fix
    to one model retrains that model alone."""
    tcfg = tcfg.with_profile()
    accepted = registry.accepted_hyperparameters(tcfg.model)
    ignored = {n for n in tcfg.NAMED_HYPERPARAMETERS if n not in accepted}
    if not registry.has_variants(tcfg.model):
        ignored.add("variant")
    if not any(has(tcfg.model, tcfg.profile) for has in (registry.profile_hyperparameters, registry.profile_training)):
        ignored.add("profile")
    # memory_budget_gb only refuses a run before it starts: it never changes what a run computes.
    params = key_params(tcfg, PERFORMANCE_FIELDS | ignored | {"precision", "memory_budget_gb"})
    precision = resolved_train_precision(tcfg)
    if precision != "fp32" and registry.required_modalities(tcfg.model):
        params["precision"] = precision
    params.update(registry.revision_params(tcfg.model))
    return params


def resolved_train_precision(tcfg: Any) -> str:
    return resolve_precision(tcfg.precision, resolve_device(tcfg.device))


def _interrupted_sibling(work: Path, params: dict[str, Any], input_keys: dict[str, str]) -> tuple[Path, str] | None:
    """The latest interrupted run of the same model under other parameters or inputs: never continued (its checkpoints
    would mix two settings), it only lets the log and the manifest say that training restarted, and what changed."""
    candidates: list[tuple[float, Path, dict[str, Any]]] = []
    for other in work.parent.iterdir():
        last = other / LAST_NAME
        if other == work or not last.is_file():
            continue
        try:
            run = json.loads((other / RUN_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if run.get("params", {}).get("model") == params.get("model"):
            candidates.append((last.stat().st_mtime, other, run))
    if not candidates:
        return None
    _, other, run = max(candidates, key=lambda c: c[0])
    return other, describe_changes({"params": run.get("params"), "inputs": run.get("inputs")},
                                   {"params": params, "inputs": input_keys})


def run_train(ctx: StageContext, inter: Artifact, feature_arts: dict[str, Artifact]) -> StageOutcome:
    tcfg = ctx.cfg.train.with_profile()
    ks = tuple(sorted(set(ctx.cfg.evaluate.ks) | {10, 20}))
    # The train summary reports metrics at these ks, so they are part of what the artifact holds.
    params = {**train_key_params(tcfg), "eval_ks": list(ks)}
    warm_from = ctx.cfg.retrain.warm_start_from  # set by `sand retrain` with retrain.warm_start: the champion
    if warm_from is not None:  # part of the key only when set: default keys unchanged
        params["warm_start_from"] = warm_from
    inputs = _model_inputs(inter, feature_arts)
    input_keys = {k: a.key for k, a in inputs.items()}
    work_key = ctx.work_key("train", params, inputs)

    def build(out: Path) -> dict[str, Any]:
        memory = check_training_memory(tcfg, inter, feature_arts)  # refuses, in one line, what cannot fit
        model, data = build_model_for(tcfg, inter, feature_arts)
        if warm_from is not None:
            log.info("train: warm start from %s (%s)", warm_from, warm_start(model, inter, ctx.store, warm_from))
        # Keyed by every parameter and input: the same settings resume, other settings start at epoch 1 elsewhere.
        work = ctx.store.work_dir("train", work_key)
        fresh = not (work / LAST_NAME).is_file()
        write_json_atomic(work / RUN_FILE, {"params": params, "inputs": input_keys})
        sibling = _interrupted_sibling(work, params, input_keys) if fresh else None
        if sibling is not None:
            log.info("train: starting at epoch 1, parameters changed since the interrupted run in %s: %s "
                     "(its checkpoints are kept; rerun with its settings to resume it)", *sibling)
        lr = tcfg.lr if tcfg.lr is not None else registry.default_lr(tcfg.model)
        result = train_model(
            model, data, out_dir=work, epochs=tcfg.epochs, batch_size=tcfg.batch_size, lr=lr,
            weight_decay=tcfg.weight_decay, patience=tcfg.resolved_patience(ctx.cfg.acquire.dataset),
            early_stop=tcfg.early_stop, eval_every=tcfg.eval_every, seed=tcfg.seed, device=tcfg.device, ks=ks,
            progress=ctx.progress, resume=True, signature={"params": params, "inputs": input_keys},
            restart_on_change=True, precision=resolved_train_precision(tcfg))
        restarted = result.restarted or (f"parameters changed: {sibling[1]}" if sibling else None)
        for name in ("best.pt", "epochs.csv"):
            shutil.copy2(work / name, out / name)
        summary = {
            "model": tcfg.model, "variant": registry.recorded_variant(tcfg.model, tcfg.variant), "lr": lr,
            "batch_size": tcfg.batch_size, "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
            "stopped_early": result.stopped_early, "best_valid": jsonable(result.best_valid),
            "test_at_best": jsonable(result.test_at_best), "seconds_per_epoch": result.seconds_per_epoch,
            "peak_memory_mb": result.peak_memory_mb, "memory_estimate": memory,
            "model_kwargs": jsonable(effective_model_kwargs(tcfg)[1]),
            "plugin_fusion": getattr(model, "plugin_fusion", None), "profile": tcfg.profile,
            "resumed_from_epoch": result.resumed_from_epoch, "restarted": restarted, "precision": result.precision,
        }
        (out / "result.json").write_text(json.dumps(summary, indent=2))
        shutil.rmtree(work, ignore_errors=True)
        return {"result": summary}

    return ctx.run("train", params, inputs, build)


def run_evaluate(ctx: StageContext, inter: Artifact, trained: Artifact, feature_arts: dict[str, Artifact]
                 ) -> StageOutcome:
    ecfg = ctx.cfg.evaluate

    def build(out: Path) -> dict[str, Any]:
        data, user_emb, item_emb = trained_embeddings(ctx.cfg.train, inter, trained, feature_arts)
        metrics = {
            split: evaluate_split(user_emb, item_emb, data, split, ks=tuple(ecfg.ks), batch_users=ecfg.batch_users)
            for split in ("valid", "test")
        }
        recs = recommendations_table(user_emb, item_emb, data, ecfg.top_k)
        recs.to_parquet(out / "recommendations.parquet", index=False)
        (out / "metrics.json").write_text(json.dumps(jsonable(metrics), indent=2))
        model, variant = ctx.cfg.train.model, registry.recorded_variant(ctx.cfg.train.model, ctx.cfg.train.variant)
        return {"metrics": jsonable(metrics), "model": model, "variant": variant}

    return ctx.run("evaluate", key_params(ecfg), {"train": trained, **_model_inputs(inter, feature_arts)}, build)
