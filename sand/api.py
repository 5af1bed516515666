"""The pipeline from Python: ``from sand import run; result = run(dataset="sample")``. Why the in-process runner, not
the Prefect flow: a notebook wants metrics and artifact paths back as Python objects, errors raised as the project's
exceptions (not printed and turned into an exit status), and no API server started behind its back. The stages and
artifact store are ``sand run``'s, so both share every artifact."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sand.pipeline.base.config import CLI_FIELDS, field_overrides, load_config
from sand.pipeline.runner import run_pipeline
from sand.pipeline.stages import Context, check_stage_names


@dataclass(frozen=True)
class RunResult:
    """What :func:`run` returns: the ``sand run --json`` summary and where the artifacts are."""

    summary: dict[str, Any]
    data_root: Path
    artifacts: dict[str, Path]

    @property
    def metrics(self) -> dict[str, dict[str, float]]:
        """``{"valid": {"recall@10": ..., "ndcg@20": ...}, "test": {...}}``, as in ``--json``."""
        return self.summary.get("metrics", {})

    @property
    def cached(self) -> dict[str, bool]:
        """Per stage: served from the artifact store (True) or computed by this call."""
        return {stage: info["cached"] for stage, info in self.summary["stages"].items()}

    @property
    def checkpoint(self) -> Path | None:
        """The trained model's best state dict (``torch.load(..., weights_only=True)``)."""
        return self.artifacts["train"] / "best.pt" if "train" in self.artifacts else None

    @property
    def features(self) -> dict[str, Path]:
        """Feature arrays and item graphs by name (``text_feat``, ``image_graph``, ...): the stages' numpy files."""
        return {path.stem: path for folder in self.artifacts.values() for path in sorted(folder.glob("*.np[yz]"))}

    @property
    def report(self) -> Path | None:
        """The folder with ``report.md``, the paper-layout tables and the figures."""
        return self.artifacts.get("report")

    def __repr__(self) -> str:
        test = self.metrics.get("test", {})
        shown = ", ".join(f"{k}={test[k]:.4f}" for k in ("recall@10", "recall@20", "ndcg@10", "ndcg@20") if k in test)
        stages = ", ".join(f"{s}{' (cached)' if c else ''}" for s, c in self.cached.items())
        return f"RunResult(test: {shown or 'not evaluated'}; stages: {stages}; data_root={self.data_root})"


def run(*, until: str | None = None, config: str | Path | None = None, overrides: Mapping[str, Any] | None = None,
        refresh: str | Sequence[str] = (), progress: bool = True, **options: Any) -> RunResult:
    """Run (or reuse from the artifact store) every stage up to ``until``; like ``sand run``.

    ``options`` are ``sand run``'s config-field options by name (:data:`~sand.pipeline.base.config.CLI_FIELDS`:
    ``dataset``, ``model``, ``epochs``, ``variant``, ``data_root``, ``seed``, ``device``, ``precision``, ...; ``None``
    keeps the config's default: the bundled sample, ``./data`` or ``SAND_DATA_ROOT``); ``config`` is a YAML file;
    ``overrides`` sets any other field by dotted key, ``{"train.lr": 1e-3}``, applied last as ``--set``; ``refresh``
    names stages rebuilt even if cached. Bad values raise :class:`~sand.pipeline.base.errors.ConfigError`, bad data
    :class:`~sand.pipeline.base.errors.DataError`."""
    unknown = sorted(set(options) - set(CLI_FIELDS))
    if unknown:
        raise TypeError(f"run() got unexpected keyword arguments {unknown}: set other fields with "
                        f"overrides={{'section.field': value}}")
    refresh = (refresh,) if isinstance(refresh, str) else tuple(refresh)
    check_stage_names([until, *refresh])
    cfg = load_config(Path(config) if config is not None else None, {**field_overrides(options), **(overrides or {})})
    ctx = Context.create(cfg, refresh=refresh, progress=progress)
    ctx.store.check_writable()  # one clear error for a root that can neither be written nor serve a run
    result = run_pipeline(ctx, until=until)
    artifacts = {stage: outcome.artifact.path for stage, outcome in result.outcomes.items()}
    return RunResult(summary=result.summary(), data_root=Path(ctx.cfg.data_root), artifacts=artifacts)
