"""Grids of pipeline runs (the paper's Tables 2-4, Figures 3-4): expand, validate, run, select by validation, tabulate.

Every combination is validated before the first runs, so a typo in the tenth value fails in a second, not after hours of
training; runs are cached pipeline runs, so a re-run trains only what is new. Selection is by VALIDATION, never test.
Writes ``<data_root>/grids/<name>/runs.csv`` and ``selected.json``."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sand.models import registry
from sand.pipeline.acquire.sources import amazon2014_category, resolve_source
from sand.pipeline.base.config import PipelineConfig, build_config, set_dotted
from sand.pipeline.base.errors import ConfigError, one_line
from sand.pipeline.base.files import atomic_path
from sand.pipeline.base.store import write_json_atomic

log = logging.getLogger(__name__)


def _table3_axes(**more: list[Any]) -> dict[str, list[Any]]:
    """Table 3: each backbone then its plug-in, in every fusion (the backbones and VBPR+SAND ignore it: cached runs)."""
    models = [model for pair in registry.plugins().items() for model in pair]
    return {"train.model": models, "train.plugin_fusion": list(registry.FUSIONS), **more}


#: Named grids reproducing the paper's experiments: name -> a builder of its axes. Models and variants come from the
#: registry when a preset is built, so a newly registered model joins its tables' presets.
PRESETS: dict[str, Callable[[], dict[str, list[Any]]]] = {
    "sensitivity-alpha": lambda: {"train.alpha": [0.001, 0.005, 0.012, 0.05, 0.1]},  # Figure 4: one at a time
    "sensitivity-beta": lambda: {"train.beta": [0.001, 0.003, 0.006, 0.01, 0.05]},
    "sensitivity-tau": lambda: {"train.tau": [0.05, 0.1, 0.2, 0.5, 1.0]},
    "ablations": lambda: {"train.variant": list(registry.ablations())},  # Figure 3: SAND_a and its ablations
    "variants": lambda: {"train.variant": list(registry.table4_variants())},  # Table 4: alignment x distancing
    "table2": lambda: {"train.model": list(registry.models_in("table2"))},  # Table 2: baselines vs SAND
    "table3": _table3_axes,  # Table 3: backbones with and without the SAND plug-in, the plug-in in every fusion
    "table3-authors": lambda: _table3_axes(**{"train.profile": ["authors"]}),  # Table 3, the authors' settings
    "all-models": lambda: {"train.model": list(registry.model_names())},  # Tables 2 and 3: every model
}

#: Presets of the paper's tables and figures: on Amazon 2014 they read the release's image features, the paper's inputs.
PAPER_PRESETS = ("table2", "table3", "all-models", "variants", "ablations",
                 "sensitivity-alpha", "sensitivity-beta", "sensitivity-tau")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def preset(name: str) -> dict[str, list[Any]]:
    """The axes of a named preset (built afresh), or a ConfigError listing the names."""
    if name not in PRESETS:
        raise ConfigError(f"unknown grid preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


def with_paper_inputs(cfg: PipelineConfig, preset_name: str | None) -> PipelineConfig:
    """``cfg`` with ``image_features.source=amazon2014`` for a paper preset on an Amazon 2014 dataset, unless the source
    was set explicitly (``--image-source``, ``--set``, a config file); the bundled sample keeps its CNN."""
    if preset_name not in PAPER_PRESETS or "source" in cfg.image_features.model_fields_set:
        return cfg
    acfg = cfg.acquire
    try:
        category = amazon2014_category(resolve_source(acfg.dataset, acfg.format, acfg.reviews, acfg.meta))
    except ConfigError:
        return cfg  # the runs themselves report the bad dataset, one line each
    if category is None:
        return cfg
    log.info("grid preset %s on Amazon 2014 %s: image features from the release's own file "
             "(image_features.source=amazon2014, the paper's inputs; --image-source cnn for our CNN)",
             preset_name, category)
    return cfg.model_copy(update={"image_features": cfg.image_features.model_copy(update={"source": "amazon2014"})})


def _field_exists(data: dict[str, Any], dotted: str) -> bool:
    """Whether ``dotted`` names a field of the config (``train.extra.X`` may add a key)."""
    node: Any = data
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, dict):
            return False
        if part not in node:
            # free-form mappings (train.extra) accept new keys; sections do not
            return i == len(parts) - 1 and ".".join(parts[:-1]) == "train.extra"
        node = node[part]
    return not (isinstance(node, dict) and dotted != "train.extra")


def _check_model_fields(cfg: PipelineConfig, values: Mapping[str, Any]) -> None:
    name = cfg.train.model
    spec = registry.spec(name)
    if "train.variant" in values and not registry.has_variants(name):  # only SAND and the plug-ins read it
        raise ConfigError(f"grid axis train.variant={values['train.variant']!r}: has no effect on model {name!r} "
                          f"(only {', '.join(registry.variant_models())} have variants)")
    try:
        accepted = registry.constructor_kwargs(name)
    except ImportError as err:
        raise ConfigError(f"invalid config value train.model={name!r}: model not available ({err})") from None
    for field_name, value in cfg.train.model_kwargs().items():
        kwarg = spec.renames.get(field_name, field_name)
        if kwarg not in accepted and field_name not in cfg.train.ALWAYS_SET:  # those: ignored where not taken
            where = f"train.extra.{field_name}" if field_name in cfg.train.extra else f"train.{field_name}"
            raise ConfigError(f"invalid config value {where}={value!r}: model {name!r} has no hyper-parameter "
                              f"{field_name!r}")


def expand_grid(base: PipelineConfig, axes: Mapping[str, Sequence[Any]]) -> list[tuple[dict, PipelineConfig]]:
    """Every combination of the axes' values applied to ``base`` (first axis slowest), each validated."""
    base_data = base.model_dump(mode="python")
    for dotted, values in axes.items():
        if not isinstance(dotted, str) or not _field_exists(base_data, dotted):
            raise ConfigError(f"grid axis {dotted!r}: no such config field (expected section.field)")
        if isinstance(values, str | bytes) or not isinstance(values, Sequence) or len(values) == 0:
            raise ConfigError(f"grid axis {dotted}: expected a non-empty list of values, got {values!r}")
    combos: list[tuple[dict, PipelineConfig]] = []
    for chosen in itertools.product(*(list(v) for v in axes.values())):
        values = dict(zip(axes, chosen, strict=True))
        data = base.model_dump(mode="python")
        for dotted, value in values.items():
            set_dotted(data, dotted, value)
        try:
            cfg = build_config(data)
        except ConfigError as err:
            raise ConfigError(f"grid: {err}") from None
        _check_model_fields(cfg, values)
        combos.append((values, cfg))
    return combos


@dataclass
class GridRun:
    """One combination's outcome (a row of ``runs.csv``)."""

    index: int
    values: dict[str, Any]
    status: str = "ok"
    error: str | None = None
    dataset: str | None = None
    valid: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    seconds_per_epoch: float | None = None
    peak_memory_mb: float | None = None
    best_epoch: int | None = None
    keys: dict[str, str] = field(default_factory=dict)
    cached: dict[str, bool] = field(default_factory=dict)
    seconds: float = 0.0

    def row(self) -> dict[str, Any]:
        return {"run": self.index, **self.values, "status": self.status, "error": self.error, "dataset": self.dataset,
                **{f"valid_{k}": v for k, v in self.valid.items()}, **{f"test_{k}": v for k, v in self.test.items()},
                "seconds_per_epoch": self.seconds_per_epoch, "peak_memory_mb": self.peak_memory_mb,
                "best_epoch": self.best_epoch, "seconds": round(self.seconds, 3),
                **{f"{stage}_key": key for stage, key in self.keys.items()},
                "cached": all(self.cached.values()) if self.cached else None}

    def to_dict(self) -> dict[str, Any]:
        """``selected.json``'s run: every field but the cache flags and the wall time, ``index`` as ``run``."""
        return {"run": self.index, **{k: v for k, v in asdict(self).items() if k not in ("index", "cached", "seconds")}}


@dataclass
class GridResult:
    name: str
    axes: dict[str, list[Any]]
    select_metric: str
    runs: list[GridRun]
    selected: GridRun | None
    table_path: Path
    selected_path: Path

    @property
    def failed(self) -> list[GridRun]:
        return [r for r in self.runs if r.status != "ok"]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "axes": self.axes, "select_metric": self.select_metric,
                "selected_by": f"valid {self.select_metric}", "n_runs": len(self.runs), "n_failed": len(self.failed),
                "selected": self.selected.to_dict() if self.selected else None, "runs_csv": str(self.table_path)}


def _floats(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    return {str(k): float(v) for k, v in (metrics or {}).items()}


def _dataset_name(summary: Mapping[str, Any], cfg: PipelineConfig) -> str:
    """The interactions manifest's dataset name when the summary points at it, else the config's."""
    if path := summary.get("stages", {}).get("interactions", {}).get("artifact"):
        with contextlib.suppress(OSError, json.JSONDecodeError):
            if name := json.loads((Path(path) / "manifest.json").read_text()).get("name"):
                return str(name)
    return cfg.acquire.dataset


def _record(run: GridRun, summary: Mapping[str, Any], cfg: PipelineConfig, metric: str) -> None:
    metrics = summary.get("metrics") or {}
    run.valid, run.test = _floats(metrics.get("valid")), _floats(metrics.get("test"))
    if metric not in run.valid:
        raise ConfigError(f"grid: run has no validation metric {metric!r} (has {', '.join(run.valid) or 'none'})")
    train = summary.get("train") or {}
    for attr, cast in (("seconds_per_epoch", float), ("peak_memory_mb", float), ("best_epoch", int)):
        setattr(run, attr, None if train.get(attr) is None else cast(train[attr]))
    for stage, info in (summary.get("stages") or {}).items():
        if info.get("artifact"):
            run.keys[stage] = Path(info["artifact"]).name
        if "cached" in info:
            run.cached[stage] = bool(info["cached"])
    run.dataset = _dataset_name(summary, cfg)


def _check_metric(metric: str, cfg: PipelineConfig) -> None:
    ks = sorted(set(cfg.evaluate.ks))
    if (match := re.fullmatch(r"(recall|ndcg)@(\d+)", metric)) is None or int(match.group(2)) not in ks:
        raise ConfigError(f"grid: select_metric={metric!r} is not evaluated: choose recall@K or ndcg@K with K in {ks}")


def select_best(runs: Sequence[GridRun], metric: str) -> GridRun | None:
    """The ok run with the highest VALIDATION ``metric``; ties go to the earlier run (``max`` keeps the first)."""
    ok = [r for r in runs if r.status == "ok" and r.valid.get(metric) is not None and math.isfinite(r.valid[metric])]
    return max(ok, key=lambda r: r.valid[metric], default=None)


def write_grid_tables(result: GridResult) -> None:
    import pandas as pd  # lazy: about a second to import, and the CLI lists the presets in its help
    result.table_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(result.table_path) as tmp:
        pd.DataFrame([r.row() for r in result.runs]).to_csv(tmp, index=False)
    write_json_atomic(result.selected_path, result.to_dict())


def run_grid(base: PipelineConfig, axes: Mapping[str, Sequence[Any]], *, name: str,
             run_one: Callable[[PipelineConfig], dict[str, Any]], select_metric: str = "recall@20") -> GridResult:
    """Run every combination, select by validation ``select_metric``. ``run_one(cfg)`` runs one (in process or as nested
    Prefect flows) and returns a dict like :meth:`pipeline.runner.PipelineResult.summary`; a run that raises is recorded
    as failed. Tables are rewritten per run, so a killed grid leaves what it did."""
    if not _NAME.match(name):
        raise ConfigError(f"grid name {name!r}: use letters, digits, '.', '_' or '-' (a directory name)")
    combos = expand_grid(base, axes)  # validates everything before the first run
    for _, cfg in combos:
        _check_metric(select_metric, cfg)
    out = Path(base.data_root) / "grids" / name
    result = GridResult(name=name, axes={k: list(v) for k, v in axes.items()}, select_metric=select_metric, runs=[],
                        selected=None, table_path=out / "runs.csv", selected_path=out / "selected.json")
    log.info("grid %s: %d runs over %s", name, len(combos), ", ".join(axes) or "(no axes)")
    for i, (values, cfg) in enumerate(combos, start=1):
        shown = ", ".join(f"{k}={v}" for k, v in values.items())
        log.info("grid %s: run %d/%d (%s)", name, i, len(combos), shown)
        run = GridRun(index=i, values=dict(values), dataset=cfg.acquire.dataset)
        start = time.perf_counter()
        try:
            _record(run, run_one(cfg), cfg, select_metric)
        except Exception as err:  # a failed run is a result too; the grid goes on
            run.status, run.error = "failed", one_line(err, with_type=True)
            log.error("grid %s: run %d/%d (%s) failed: %s", name, i, len(combos), shown, run.error)
        else:
            log.info("grid %s: run %d/%d valid %s=%.6f test %s=%.6f", name, i, len(combos), select_metric,
                     run.valid[select_metric], select_metric, run.test.get(select_metric, float("nan")))
        run.seconds = time.perf_counter() - start
        result.runs.append(run)
        result.selected = select_best(result.runs, select_metric)
        write_grid_tables(result)
    if (sel := result.selected) is None:
        log.error("grid %s: no run succeeded; see %s", name, result.table_path)
    else:
        shown = ", ".join(f"{k}={v}" for k, v in sel.values.items())
        log.info("grid %s: selected run %d (%s) by valid %s=%.6f; test %s", name, sel.index, shown, select_metric,
                 sel.valid[select_metric], {k: round(v, 6) for k, v in sel.test.items()})
    return result
