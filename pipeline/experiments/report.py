"""The paper-layout report: Tables 2-5 and Figures 3-6 from the runs in the artifact store.

Why the store, not a results file: each ``evaluate`` manifest leads to the ``train`` artifact and data it used, so the
report never shows a number nobody computed (a table no run fills is skipped with a note). A cell shows the TEST metrics
of the run with the best VALIDATION ``select_metric`` (the paper's protocol); ``runs.csv`` lists every run."""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sand.models import registry
from sand.pipeline.base.config import TrainConfig, build_config
from sand.pipeline.base.errors import SandError, StageError
from sand.pipeline.base.store import Artifact, ArtifactStore
from sand.pipeline.experiments import figures
from sand.pipeline.training.checkpoints import load_weights
from sand.pipeline.training.model_io import build_model_for

log = logging.getLogger(__name__)

#: (metric key, column label) of the paper's tables
METRICS = (("recall@10", "R@10"), ("recall@20", "R@20"), ("ndcg@10", "N@10"), ("ndcg@20", "N@20"))
PAPER_DATASETS = ("baby", "sports", "clothing")
VARIANT_LABELS = {"no-align": "w/o Alignment", "no-distance": "w/o Distancing", "no-align-no-distance": "w/o All"}
#: Table 4's variants (the registry's) -> (alignment, distancing) terms, as the paper names them.
TERM_LABELS = {"solosim": "SoloSim", "infonce": "InfoNCE", "club": "MI (CLUB)", "l2": "negative l2"}
VARIANT_PARTS = {v: tuple(TERM_LABELS[t] for t in registry.VARIANT_TERMS[v]) for v in registry.table4_variants()}
ABLATIONS = registry.ablations()
SENSITIVITY_PARAMS = ("train.alpha", "train.beta", "train.tau")
#: The paper's values of SAND's loss weights and temperature (docs/model.md), marked in the sensitivity figure.
REFERENCE = {"train.alpha": 0.012, "train.beta": 0.006, "train.tau": 0.2}
RunKey = tuple[str, str, str | None]  # (dataset, model id, variant); see StoredRun.model_id
_fmt4 = "{:.4f}".format
_fmt_pct = "{:+.2f}%".format
_SELECTION_NOTE = ("Test metrics; where several runs exist for one model on one dataset, the run with the best "
                   "validation {} is shown.")

#: A caption note per plug-in fusion (``registry.FUSIONS``, the first the faithful default).
FUSION_NOTES = {
    "auxiliary": "Plug-in fusion: auxiliary (the faithful plug-in): the SAND terms act on each backbone's projected "
    "modal features as they are. VBPR scores those features; FREEDOM does not: they enter only its auxiliary modal "
    "BPR term (weight reg_weight), so FREEDOM+SAND's scores can move only through that term, and with reg_weight = 0 "
    "(the authors' FREEDOM+SAND setting) they are bit-identical to FREEDOM's whatever alpha and beta.",
    "scoring": "Plug-in fusion: scoring: FREEDOM+SAND adds the projected image and text features (generic and unique "
    "parts) to the item ID embeddings before FREEDOM's propagations, so the SAND-processed representation reaches the "
    "scores. VBPR+SAND is the same model in both fusions (VBPR scores its projected features anyway). The gain over "
    "FREEDOM mixes the fusion itself with the SAND terms; FREEDOM+SAND in this fusion with --variant "
    "no-align-no-distance isolates the fusion.",
}


@dataclass(frozen=True)
class StoredRun:
    """One evaluated run and the artifacts behind it."""

    dataset: str
    model: str
    variant: str | None
    valid: dict[str, float]
    test: dict[str, float]
    evaluate: Artifact
    train: Artifact | None
    fusion: str | None = None  # ``train.plugin_fusion`` of a plug-in whose fusion changes the model, else None

    @property
    def model_id(self) -> str:
        """The model, with a non-default fusion appended (``freedom-sand@scoring``): selected separately."""
        return self.model if self.fusion in (None, registry.FUSIONS[0]) else f"{self.model}@{self.fusion}"

    @property
    def key(self) -> RunKey:
        return (self.dataset, self.model_id, self.variant)

    @property
    def label(self) -> str:
        return run_label(self.model_id, self.variant)

    @property
    def result(self) -> dict[str, Any]:
        return (self.train.manifest.get("result") or {}) if self.train else {}


def _single_model(table: str) -> str:
    """The one model ``table`` shows (SAND for Table 4 and Figures 3, 5, 6), from the registry."""
    (model,) = registry.models_in(table)
    return model


def run_label(model: str, variant: str | None) -> str:
    """Display name as in the paper (SAND_a, SAND w/o Alignment, FREEDOM+SAND (scoring)); "a" is named for SAND only."""
    model, _, fusion = model.partition("@")
    if fusion:
        return f"{run_label(model, variant)} ({fusion})"
    base = registry.label(model)
    if variant is None:
        return base
    if variant in VARIANT_LABELS:
        return f"{base} {VARIANT_LABELS[variant]}"
    return base if variant == "a" and model not in registry.models_in("table4") else f"{base}_{variant}"


def _rank(order: Sequence[Any], value: Any) -> int:
    return order.index(value) if value in order else len(order)


def _model_order(model: str, variant: str | None) -> tuple[int, int, str]:
    """Paper order (the registry's): baselines, then SAND_a-d, then the ablations; plug-ins last."""
    models, variants = list(registry.model_names()), [*VARIANT_PARTS, *VARIANT_LABELS]
    return (_rank(models, model.partition("@")[0]), _rank(variants, variant), f"{model}/{variant}")


def _dataset_order(name: str) -> tuple[int, str]:
    return (_rank(PAPER_DATASETS, name), name)


def _floats(d: dict[str, Any] | None) -> dict[str, float]:
    return {str(k): float(v) for k, v in (d or {}).items() if v is not None}


def collect_runs(store: ArtifactStore) -> list[StoredRun]:
    """Every evaluated run with its train artifact, named by its interactions manifest (key-suffixed if ambiguous)."""
    names: dict[str, str] = {}  # interactions key -> dataset name
    raw: list[tuple[Artifact, str]] = []
    for art in store.list("evaluate"):
        inter_key = (art.manifest.get("inputs", {}).get("interactions") or {}).get("key")
        if inter_key is None:
            log.warning("report: ignoring %s: its manifest names no interactions input", art.path)
            continue
        if inter_key not in names:
            inter = store.lookup("interactions", inter_key)
            names[inter_key] = str((inter.manifest.get("name") if inter else None) or f"dataset-{inter_key[:6]}")
        raw.append((art, inter_key))
    per_name = Counter(names.values())
    names = {key: name if per_name[name] == 1 else f"{name}-{key[:6]}" for key, name in names.items()}
    runs: list[StoredRun] = []
    outdated = 0
    for art, inter_key in raw:
        train_key = (art.manifest.get("inputs", {}).get("train") or {}).get("key")
        train = store.lookup("train", train_key) if train_key else None
        model = str(art.manifest.get("model") or (train.manifest.get("result", {}).get("model") if train else "?"))
        if _outdated(model, train):
            outdated += 1
            continue
        variant = art.manifest.get("variant") if registry.has_variants(model) else None
        metrics = art.manifest.get("metrics") or {}
        runs.append(StoredRun(names[inter_key], model, variant, _floats(metrics.get("valid")),
                              _floats(metrics.get("test")), art, train, _fusion(model, train)))
    if outdated:
        log.info("report: skipped %d run(s) trained before a fix to their model (an older model revision)", outdated)
    return runs


def _outdated(model: str, train: Artifact | None) -> bool:
    """Whether the run was trained by an older revision of its model: never quoted beside the fixed model's runs."""
    return (train is not None and model in registry.MODELS
            and registry.trained_revision(train.manifest.get("params") or {}) != registry.spec(model).revision)


def _fusion(model: str, train: Artifact | None) -> str | None:
    """The plug-in fusion of a run, where it changes the model (the train key holds it only then)."""
    fusion = (train.manifest.get("params") or {}).get("plugin_fusion") if train else None
    if fusion is None and model == "freedom-sand":  # trained before the setting existed: the faithful plug-in
        fusion = registry.FUSIONS[0]
    return str(fusion) if fusion is not None else None


def select_runs(runs: Iterable[StoredRun], metric: str = "recall@20") -> dict[RunKey, StoredRun]:
    """Per (dataset, model, variant) the run with the best VALIDATION ``metric``; ties go to the first artifact key."""
    best: dict[RunKey, StoredRun] = {}
    for run in sorted(runs, key=lambda r: r.evaluate.key):
        if run.key not in best or run.valid.get(metric, -math.inf) > best[run.key].valid.get(metric, -math.inf):
            best[run.key] = run
    return best


@dataclass
class Table:
    """A table in the paper's layout: label columns (text) then value columns (numbers)."""

    name: str
    title: str
    frame: pd.DataFrame
    bold: set[tuple[int, str]] = field(default_factory=set)
    formats: dict[str, Callable[[float], str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        cols = list(self.frame.columns)
        lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        for i, row in enumerate(self.frame.itertuples(index=False)):
            cells = []
            for col, value in zip(cols, row, strict=True):
                if isinstance(value, str):
                    text = value
                elif value is None or (isinstance(value, float) and math.isnan(value)):
                    text = "–"
                else:
                    text = self.formats.get(col, _fmt4)(float(value))
                cells.append(f"**{text}**" if (i, col) in self.bold else text)
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def write(self, out_dir: Path) -> list[Path]:
        md, csv = out_dir / f"{self.name}.md", out_dir / f"{self.name}.csv"
        md.write_text(f"## {self.title}\n\n{self.markdown()}\n" + "".join(f"\n{n}\n" for n in self.notes))
        self.frame.to_csv(csv, index=False)
        return [md, csv]


def _bold_max(frame: pd.DataFrame, columns: Iterable[str]) -> set[tuple[int, str]]:
    out: set[tuple[int, str]] = set()
    for col in columns:
        values = pd.to_numeric(frame[col], errors="coerce")
        if values.notna().sum() >= 2:
            top = values.max()
            out |= {(i, col) for i, v in enumerate(values) if v == top}
    return out


def _metric_table(name: str, title: str, selected: dict[RunKey, StoredRun], datasets: Sequence[str],
                  rows: list[tuple[dict[str, str], str, str | None]], notes: list[str]) -> Table:
    """Label columns, then each dataset's test METRICS of the (model, variant) of each row; best per column in bold."""
    cols = [(d, m, f"{d} {short}") for d in datasets for m, short in METRICS]  # (dataset, metric, column)
    records = [
        {**labels, **{col: run.test.get(m, math.nan) if (run := selected.get((d, model, variant))) else math.nan
                      for d, m, col in cols}}
        for labels, model, variant in rows
    ]
    frame = pd.DataFrame(records, columns=[*rows[0][0], *(c for _, _, c in cols)])
    return Table(name, title, frame, _bold_max(frame, [c for _, _, c in cols]), notes=notes)


def table_main(selected: dict[RunKey, StoredRun], datasets: Sequence[str], metric: str) -> Table | None:
    """Table 2: models x (dataset, R@10 R@20 N@10 N@20), best per column in bold."""
    variants = {m: "a" if registry.has_variants(m) else None for m in registry.models_in("table2")}
    rows = [({"Model": registry.label(m)}, m, v) for m, v in variants.items()
            if any((d, m, v) in selected for d in datasets)]
    if not rows:
        return None
    return _metric_table("table2_main", "Table 2: overall performance (test)", selected, datasets, rows,
                         [_SELECTION_NOTE.format(metric) + " SAND is variant a (SoloSim + MI)."])


def _plugin_run(selected: dict[RunKey, StoredRun], dataset: str, backbone: str, fusion: str) -> StoredRun | None:
    """The +SAND run of ``backbone`` in ``fusion`` (a plug-in whose fusion is moot serves both)."""
    model = registry.plugins()[backbone]
    if fusion != registry.FUSIONS[0] and (run := selected.get((dataset, f"{model}@{fusion}", "a"))) is not None:
        return run
    run = selected.get((dataset, model, "a"))
    return run if run is not None and run.fusion in (None, fusion) else None


def table_generalisation(selected: dict[RunKey, StoredRun], datasets: Sequence[str], metric: str,
                         fusion: str = registry.FUSIONS[0]) -> Table | None:
    """Table 3: backbone vs backbone+SAND per (dataset, metric) and the gain, in one plug-in fusion."""
    backbones = registry.plugins()  # backbone -> its plug-in
    candidates = ((d, b) for d in datasets for b in backbones if (d, b, None) in selected)
    plugged = {(d, b): run for d, b in candidates if (run := _plugin_run(selected, d, b, fusion)) is not None}
    if not plugged or (fusion != registry.FUSIONS[0] and not any(r.fusion == fusion for r in plugged.values())):
        return None
    pairs = {b: ds for b in backbones if (ds := [d for d in datasets if (d, b) in plugged])}
    used = [d for d in datasets if any(d in ds for ds in pairs.values())]
    rows, bold = [], set()
    for d in used:
        for m, short in METRICS:
            row: dict[str, Any] = {"Dataset": d, "Metric": short}
            for b in pairs:
                plug = plugged.get((d, b))  # where there is one, the backbone's run is selected too
                bv = selected[(d, b, None)].test.get(m, math.nan) if plug else math.nan
                pv = plug.test.get(m, math.nan) if plug else math.nan
                name, plug_name = registry.label(b), registry.label(backbones[b])
                row[name], row[plug_name] = bv, pv
                row[f"{name} Improv."] = (pv - bv) / bv * 100.0 if bv > 0 else math.nan
                if math.isfinite(bv) and math.isfinite(pv):  # the better of the pair (both on a tie)
                    bold |= {(len(rows), c) for c, v in ((name, bv), (plug_name, pv)) if v == max(bv, pv)}
            rows.append(row)
    formats = {f"{registry.label(b)} Improv.": _fmt_pct for b in pairs}
    chosen = "; ".join(f"{run.label} on {d}: profile {run.result.get('profile') or 'default'}"
                       for (d, _), run in sorted(plugged.items()))
    suffix = "" if fusion == registry.FUSIONS[0] else f"_{fusion}"
    title = f"Table 3: SAND plugged into other backbones (test), plug-in fusion: {fusion}"
    improv = " Improv. = relative change of +SAND over the backbone, in percent; +SAND is variant a."
    notes = [_SELECTION_NOTE.format(metric) + improv, FUSION_NOTES[fusion], f"Selected +SAND runs: {chosen}."]
    return Table(f"table3_generalisation{suffix}", title, pd.DataFrame(rows), bold, formats, notes=notes)


def table_variants(selected: dict[RunKey, StoredRun], datasets: Sequence[str], metric: str) -> Table | None:
    """Table 4: SAND_a-d (alignment x distancing) x (dataset, metrics), on the datasets with two of a-d to compare."""
    sand = _single_model("table4")
    datasets = [d for d in datasets if sum((d, sand, v) in selected for v in VARIANT_PARTS) >= 2]
    if not datasets:
        return None
    rows = [({"Variant": run_label(sand, v), "Alignment": VARIANT_PARTS[v][0], "Distancing": VARIANT_PARTS[v][1]},
             sand, v) for v in VARIANT_PARTS if any((d, sand, v) in selected for d in datasets)]
    return _metric_table("table4_variants", "Table 4: SAND variants (test)", selected, datasets, rows,
                         [_SELECTION_NOTE.format(metric)])


def table_efficiency(selected: dict[RunKey, StoredRun], datasets: Sequence[str]) -> Table | None:
    """Table 5: seconds per training epoch and peak memory, per model/variant and dataset."""
    labels: dict[str, tuple[str, str | None]] = {}
    for (_, model, variant), run in sorted(selected.items(), key=lambda kv: _model_order(kv[0][1], kv[0][2])):
        if run.result.get("seconds_per_epoch") is not None:
            labels.setdefault(run.label, (model, variant))
    if not labels:
        return None
    rows = []
    for label, (model, variant) in labels.items():
        row: dict[str, Any] = {"Model": label}
        for d in datasets:
            res = selected[(d, model, variant)].result if (d, model, variant) in selected else {}
            for col, key in ((f"{d} s/epoch", "seconds_per_epoch"), (f"{d} peak MB", "peak_memory_mb")):
                row[col] = float(res[key]) if res.get(key) is not None else math.nan
        rows.append(row)
    frame = pd.DataFrame(rows)
    formats = {c: "{:.2f}".format if c.endswith("s/epoch") else "{:.0f}".format for c in frame.columns[1:]}
    return Table("table5_efficiency", "Table 5: training cost", frame, formats=formats, notes=[
        "Median seconds per training epoch (evaluation excluded) and peak memory of the validation-selected run, as "
        "the trainer recorded them: on CUDA the peak allocated GPU memory, on CPU the peak resident memory during the "
        "run's training epochs (on Linux the high-water mark is reset at each epoch, so runs of one grid do not "
        "inherit each other's peaks). Numbers from different machines are not comparable."
    ])


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "dataset"


def _curves(selected: dict[RunKey, StoredRun], datasets: Sequence[str], out_dir: Path, metric: str,
            notes: list[str]) -> list[Path]:
    paths = []
    for d in datasets:
        curves = {run.label: pd.read_csv(run.train.file("epochs.csv"))
                  for (ds, _, _), run in sorted(selected.items(), key=lambda kv: (kv[0][1], str(kv[0][2])))
                  if ds == d and run.train is not None and run.train.file("epochs.csv").is_file()}
        if not curves:
            notes.append(f"Training curves for {d}: no train artifact with epochs.csv.")
            continue
        path = out_dir / f"curves_{_safe_name(d)}.png"
        paths.append(figures.plot_training_curves(curves, path, title=f"Training curves: {d}", metric=metric))
    return paths


def load_grid_tables(data_root: Path) -> list[tuple[str, dict[str, Any], pd.DataFrame]]:
    """(grid name, selected.json, runs.csv) of every grid written by :mod:`sand.pipeline.experiments.grid`."""
    out = []
    base = Path(data_root) / "grids"
    for d in sorted(base.iterdir()) if base.is_dir() else []:
        sel, runs = d / "selected.json", d / "runs.csv"
        if not (sel.is_file() and runs.is_file()):
            continue
        try:
            out.append((d.name, json.loads(sel.read_text()), pd.read_csv(runs)))
        except (OSError, json.JSONDecodeError, pd.errors.ParserError) as err:
            log.warning("report: ignoring grid %s: %s", d, err)
    return out


def sensitivity_series(data_root: Path, datasets: Sequence[str]) -> dict[str, dict[str, pd.DataFrame]]:
    """param -> dataset -> frame(value, valid_*, test_*) from grids varying exactly one of alpha/beta/tau."""
    series: dict[str, dict[str, list[pd.DataFrame]]] = {}
    for _, meta, runs in load_grid_tables(data_root):
        varying = [k for k, v in (meta.get("axes") or {}).items() if len({json.dumps(x) for x in v}) > 1]
        if len(varying) != 1 or (param := varying[0]) not in SENSITIVITY_PARAMS or param not in runs:
            continue
        ok = runs[runs["status"] == "ok"] if "status" in runs else runs
        for d in datasets:
            part = ok[ok["dataset"].astype(str) == d] if "dataset" in ok else ok.iloc[0:0]
            if part.empty:
                continue
            keep = ["value"] + [c for c in part.columns if c.startswith(("valid_", "test_"))]
            series.setdefault(param, {}).setdefault(d, []).append(part.rename(columns={param: "value"})[keep])
    merged: dict[str, dict[str, pd.DataFrame]] = {}
    for param in SENSITIVITY_PARAMS:
        for d, frames in series.get(param, {}).items():
            frame = pd.concat(frames).drop_duplicates("value", keep="last").sort_values("value")
            if len(frame) >= 2:
                merged.setdefault(param, {})[d] = frame.reset_index(drop=True)
    return merged


def _tsne_figures(store: ArtifactStore, run: StoredRun, out_dir: Path, n_items: int, seed: int) -> list[Path]:
    """Figures 5-6 for one trained SAND run (rebuilt from its artifacts, best.pt loaded weights-only)."""
    train = run.train
    if train is None or not train.file("best.pt").is_file():
        raise StageError(f"run {run.evaluate.path}: no train artifact with best.pt")
    arts: dict[str, Artifact] = {}
    for name, info in train.manifest.get("inputs", {}).items():
        art = store.lookup(name, info["key"])
        if art is None:
            raise StageError(f"train artifact {train.path}: input {name} ({info['key']}) is not in the store")
        arts[name] = art
    if "interactions" not in arts:
        raise StageError(f"train artifact {train.path}: manifest names no interactions input")
    # The key also holds what the run reported (eval_ks): only config fields rebuild the model.
    params = {k: v for k, v in (train.manifest.get("params") or {}).items() if k in TrainConfig.model_fields}
    params["device"] = "cpu"
    tcfg = build_config({"data_root": str(store.data_root), "train": params}).train
    model, data = build_model_for(tcfg, arts.pop("interactions"), arts)
    load_weights(model, train.file("best.pt"), "cpu")
    items = np.sort(np.random.default_rng(seed).choice(data.n_items, size=min(n_items, data.n_items), replace=False))
    points = {key: figures.tsne_2d(x, seed) for key, x in figures.modal_representations(model, items).items()}
    stem = _safe_name(run.dataset)
    what = f"{run.label} on {run.dataset}, {len(items)} random items (seed {seed})"
    fig5 = f"Figure 5: t-SNE of modal-generic / modal-unique representations, {what}"
    fig6 = f"Figure 6: density of centred, L2-normalised t-SNE points and their angles, {what}"
    return [figures.plot_tsne_density(points, out_dir / f"fig5_tsne_{stem}.png", title=fig5),
            figures.plot_circle_density(points, out_dir / f"fig6_circle_{stem}.png", title=fig6)]


def _runs_frame(runs: Sequence[StoredRun], selected: dict[RunKey, StoredRun]) -> pd.DataFrame:
    chosen = {r.evaluate.key for r in selected.values()}
    rows = []
    for r in sorted(runs, key=lambda r: (_dataset_order(r.dataset), r.model, str(r.variant), r.evaluate.key)):
        res, params = r.result, (r.train.manifest.get("params") if r.train else None) or {}
        rows.append({"dataset": r.dataset, "model": r.model, "variant": r.variant, "fusion": r.fusion, "label": r.label,
                     "selected": r.evaluate.key in chosen, **{f"valid_{k}": v for k, v in r.valid.items()},
                     **{f"test_{k}": v for k, v in r.test.items()}, "best_epoch": res.get("best_epoch"),
                     "seconds_per_epoch": res.get("seconds_per_epoch"), "peak_memory_mb": res.get("peak_memory_mb"),
                     "evaluate_key": r.evaluate.key, "train_key": r.train.key if r.train else None,
                     "params": json.dumps(params, sort_keys=True)})
    return pd.DataFrame(rows)


def write_report(data_root: Path, out_dir: Path, *, datasets: Sequence[str] | None = None, tsne_items: int = 500,
                 seed: int = 0, select_metric: str = "recall@20") -> dict[str, list[Path]]:
    """Tables 2-5 (Markdown + CSV), figures and ``report.md`` in ``out_dir``: name -> files; skips are noted."""
    data_root, out_dir = Path(data_root), Path(out_dir)
    store = ArtifactStore(data_root)
    runs, chosen = _report_runs(store, datasets)
    selected = select_runs(runs, select_metric)
    out_dir.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    # runs.csv: every run, the selected ones marked, so any table cell can be traced to its run
    _runs_frame(runs, selected).to_csv(out_dir / "runs.csv", index=False)
    tables = paper_tables(selected, chosen, select_metric)
    written: dict[str, list[Path]] = {"runs": [out_dir / "runs.csv"], **_write_tables(tables, out_dir, notes)}
    plots = {
        "curves": _curves(selected, chosen, out_dir, select_metric, notes),
        "sensitivity": _sensitivity_figure(data_root, chosen, out_dir, notes),
        "ablation": _ablation_figure(selected, chosen, out_dir, notes),
        "tsne": _tsne_section(store, selected, chosen, out_dir, tsne_items, seed, notes),
    }
    written.update({name: paths for name, paths in plots.items() if paths})
    for note in notes:
        log.info("report: %s", note)
    index = out_dir / "report.md"
    index.write_text(_index_markdown(data_root, chosen, runs, selected, tables, written, notes, select_metric))
    written["index"] = [index]
    return written


def _report_runs(store: ArtifactStore, datasets: Sequence[str] | None) -> tuple[list[StoredRun], list[str]]:
    """(runs on the reported datasets, those in paper order); none is an error, not an empty-looking result."""
    runs = collect_runs(store)
    if not runs:
        raise StageError(f"report: no evaluated runs in {store.root / 'evaluate'} (run the pipeline first)")
    found = sorted({r.dataset for r in runs}, key=_dataset_order)
    if missing := [d for d in datasets or () if d not in found]:
        raise StageError(f"report: no evaluated runs for dataset {missing[0]!r} in {store.data_root} "
                         f"(found: {', '.join(found)})")
    chosen = list(dict.fromkeys(datasets)) if datasets else found
    return [r for r in runs if r.dataset in chosen], chosen


def _table_skip_reasons() -> dict[str, str]:
    """Why each table may be missing, as ``report.md`` lists it (a skipped table is never padded)."""
    table2 = [run_label(m, "a" if registry.has_variants(m) else None) for m in registry.models_in("table2")]
    backbones = "/".join(registry.label(b) for b in registry.plugins())
    return {
        "table2": f"no runs of {', '.join(table2[:-1])} or {table2[-1]}",
        "table3": f"no dataset with both a backbone ({backbones}) and its +SAND run",
        **{_table3_name(f): f"no plug-in run in the {f} fusion (train.plugin_fusion={f}) next to its backbone"
           for f in registry.FUSIONS[1:]},
        "table4": "no dataset with at least two of the SAND variants a-d",
        "table5": "no train artifact with timing results",
    }


def _table3_name(fusion: str) -> str:
    return "table3" if fusion == registry.FUSIONS[0] else f"table3-{fusion}"


def paper_tables(selected: dict[RunKey, StoredRun], datasets: Sequence[str], metric: str) -> dict[str, Table | None]:
    """Tables 2-5 (None where no run fills one) in ``report.md``'s order, for both the index and the writer."""
    return {
        "table2": table_main(selected, datasets, metric),
        **{_table3_name(f): table_generalisation(selected, datasets, metric, f) for f in registry.FUSIONS},
        "table4": table_variants(selected, datasets, metric),
        "table5": table_efficiency(selected, datasets),
    }


def _write_tables(tables: dict[str, Table | None], out_dir: Path, notes: list[str]) -> dict[str, list[Path]]:
    why = _table_skip_reasons()
    notes += [f"{name.capitalize()} skipped: {why[name]}." for name, table in tables.items() if table is None]
    return {name: table.write(out_dir) for name, table in tables.items() if table is not None}


def _sensitivity_figure(data_root: Path, datasets: Sequence[str], out_dir: Path, notes: list[str]) -> list[Path]:
    """Figure 4 from the one-parameter grids (the grids' runs.csv, not the store: it needs the swept value)."""
    series = sensitivity_series(data_root, datasets)
    if not series:
        notes.append("Sensitivity figure skipped: no grid over exactly one of train.alpha/beta/tau with at "
                     "least two successful runs (run the sensitivity-* grid presets).")
        return []
    return [figures.plot_sensitivity(series, out_dir / "sensitivity.png", reference=REFERENCE)]


def _ablation_figure(selected: dict[RunKey, StoredRun], datasets: Sequence[str], out_dir: Path,
                     notes: list[str]) -> list[Path]:
    """Figure 3: SAND_a next to its ablations, per dataset with at least one ablation to compare."""
    sand = _single_model("figure3")
    ablation: dict[str, dict[str, dict[str, float]]] = {}
    for d in datasets:
        bars = {run_label(sand, v) if v != "a" else registry.label(sand): selected[(d, sand, v)].test
                for v in ABLATIONS if (d, sand, v) in selected}
        if len(bars) >= 2:
            ablation[d] = bars
    if not ablation:
        notes.append("Ablation figure skipped: no dataset with SAND_a and at least one ablation run.")
        return []
    return [figures.plot_ablation(ablation, out_dir / "ablation.png")]


def _tsne_section(store: ArtifactStore, selected: dict[RunKey, StoredRun], datasets: Sequence[str], out_dir: Path,
                  n_items: int, seed: int, notes: list[str]) -> list[Path]:
    """Figures 5-6 per dataset; a dataset whose run cannot be rebuilt is a note, not a failed report."""
    sand = _single_model("figures5-6")
    variants = ("a", "b", "c", "d", "no-distance", "no-align", "no-align-no-distance")  # a, else in paper order
    paths: list[Path] = []
    for d in datasets:
        run = next((selected[(d, sand, v)] for v in variants if (d, sand, v) in selected), None)
        if run is None:
            notes.append(f"Figures 5-6 for {d} skipped: no trained SAND run.")
            continue
        try:
            paths += _tsne_figures(store, run, out_dir, n_items, seed)
        except SandError as err:
            notes.append(f"Figures 5-6 for {d} skipped: {err}")
    return paths


def _rel(path: Path, base: Path) -> str:
    return str(path.relative_to(base) if path.is_relative_to(base) else path)


def _index_markdown(data_root: Path, datasets: Sequence[str], runs: Sequence[StoredRun],
                    selected: dict[RunKey, StoredRun], tables: dict[str, Table | None], written: dict[str, list[Path]],
                    notes: Sequence[str], metric: str) -> str:
    out_dir = written["runs"][0].parent
    lines = ["# SAND report", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} from `{data_root}`: "
             f"{len(runs)} evaluated runs on {', '.join(datasets)}; "
             f"{len(selected)} selected by validation {metric}. All runs: [runs.csv](runs.csv).", ""]
    for name, table in tables.items():
        if table is None or name not in written:
            continue
        md, csv = written[name]
        lines += [f"## {table.title}", "", table.markdown(), ""]
        lines += [*table.notes, "", f"Files: [{md.name}]({_rel(md, out_dir)}), [{csv.name}]({_rel(csv, out_dir)})", ""]
    captions = {
        "curves": "Training curves: validation metric and mean training loss per epoch of each selected run.",
        "sensitivity": "Figure 4: test (solid) and validation (dashed) metrics as one hyper-parameter varies; dotted "
        "line: the paper's value.",
        "ablation": "Figure 3: test metrics of SAND and its ablations.",
        "tsne": "Figures 5-6: t-SNE of the modal-generic and modal-unique representations (Fig. 5, coloured by "
        "Gaussian KDE density) and the density of the centred, L2-normalised points on the unit circle with their "
        "angle distribution (Fig. 6).",
    }
    for name, caption in captions.items():
        if name not in written:
            continue
        lines += [f"## {caption.split(':')[0]}", "", caption, ""]
        lines += [f"![{p.stem}]({_rel(p, out_dir)})" for p in written[name]] + [""]
    if notes:
        lines += ["## Not shown", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)
