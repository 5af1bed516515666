"""SAND and the baselines trained to their early stop on a dataset of a real category's size.

Why: the paper's claim is that SAND, trained as the paper trains it (lr 1e-4, up to 1,000
epochs, early stop on valid Recall@20 with patience 20), beats the multimodal baselines.
Only a run to convergence on Baby-size data shows whether this implementation reproduces
that ordering, and what a full run costs on a CPU. Everything trains **through the
product** (``sand grid``), so the numbers are what a user gets.

Data: the real MMRec Baby graph and split (``--inter PATH/baby.inter``: 19,445 users, 7,050
items, 160,792 interactions) with generated features, since no real Baby features may be
redistributed here. Two feature sets, written as MMRec folders (``prepare``):

- ``informative``: built from the SVD of the FULL user x item matrix (train + valid + test),
  so, like real content features, they carry information about the held-out interactions
  (what an item looks like and says predicts who buys it). Rank 32 + 2 x 16: the first 32
  components are the *modal-generic* factor both modalities see, the next 16 go to the image
  only and the 16 after them to the text only (the *modal-unique* parts SAND separates).
  Each modality = its 48 factors (unit variance each) times a seeded Gaussian projection to
  4,096-d (image) or 384-d (text), plus seeded Gaussian noise of standard deviation 1 per
  dimension (``bench_scopes.collaborative_features``).
- ``control``: the same recipe on the TRAIN split only: features that know nothing the
  interaction graph does not already say. A multimodal model has no content advantage here.

``run`` then trains, one ``sand grid`` per line of :data:`PLAN` (each grid resumable: finished
runs come from the artifact store, an interrupted run resumes from its last epoch), and
``table`` writes the per-model table (epochs to the stop, best epoch, wall time, s/epoch,
peak RSS at epoch 10 and at the end, valid/test R@20 and N@20) and the valid-R@20 curves.

Usage (hours on a 2-core CPU; not run by CI; results in docs/convergence.md):
    python benchmarks/bench_convergence.py prepare --inter PATH/baby.inter --root ROOT
    python benchmarks/bench_convergence.py run --root ROOT [--only paper-informative] [--sand PATH/sand]
    python benchmarks/bench_convergence.py table --root ROOT [--png docs/convergence.png]
    python benchmarks/bench_convergence.py export --root ROOT --out docs/convergence-runs/CPU.json
    python benchmarks/bench_convergence.py table --runs docs/convergence-runs/*.json

``export`` keeps each run's summary and curve (a few KB) beside the docs, so that a table can be
rebuilt after the artifact store (GBs, outside the repository) is gone; ``table --runs`` reads
those files, each with the CPU it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_baby_baselines import load_inter  # noqa: E402
from bench_scopes import collaborative_features  # noqa: E402

#: feature set -> the splits its SVD reads
FEATURE_SETS: dict[str, tuple[str, ...]] = {
    "informative": ("train", "valid", "test"),
    "control": ("train",),
}
DIMS = {"image": 4096, "text": 384}
DATASET_NAME = "baby"  # the folder's name: the early-stop patience follows the dataset name (Baby: 20)

_FAST = ["--set", "train.profile=fast"]
#: grid name -> (feature set, sand grid arguments). Order: what answers the issue soonest first.
PLAN: dict[str, tuple[str, list[str]]] = {
    "paper-informative": ("informative", ["--preset", "table2", "--axis", "train.seed=0"]),
    "paper-informative-plugin": ("informative", ["--axis", "train.model=freedom-sand",
                                                 "--axis", "train.plugin_fusion=scoring"]),
    "paper-informative-seed1": ("informative", ["--axis", "train.model=freedom,sand", "--axis", "train.seed=1"]),
    "fast-informative": ("informative", ["--preset", "table2", "--axis", "train.seed=0", *_FAST]),
    "fast-informative-plugin": ("informative", ["--axis", "train.model=freedom-sand",
                                                "--axis", "train.plugin_fusion=scoring", *_FAST]),
    "fast-informative-seed1": ("informative", ["--axis", "train.model=freedom,sand", "--axis", "train.seed=1",
                                               *_FAST]),
    "fast-control": ("control", ["--axis", "train.model=freedom,sand", *_FAST]),
}
#: table columns: (heading, row key, format)
COLUMNS = [
    ("features", "features", "{}"), ("profile", "profile", "{}"), ("model", "label", "{}"), ("seed", "seed", "{}"),
    ("state", "state", "{}"), ("epochs", "epochs", "{}"), ("best epoch", "best_epoch", "{}"),
    ("wall h", "wall_h", "{:.2f}"), ("s/epoch", "s_epoch", "{:.1f}"), ("h at median", "h_median", "{:.2f}"),
    ("RSS@10 GB", "rss10", "{:.2f}"),
    ("RSS end GB", "rss_end", "{:.2f}"), ("valid R@20", "valid_recall@20", "{:.4f}"),
    ("valid N@20", "valid_ndcg@20", "{:.4f}"), ("test R@20", "test_recall@20", "{:.4f}"),
    ("test N@20", "test_ndcg@20", "{:.4f}"),
]


def dataset_folder(root: Path, features: str) -> Path:
    return root / features / DATASET_NAME


def prepare(inter: Path, root: Path, seed: int, dims: dict[str, int] = DIMS, **ranks: int) -> None:
    """Write one MMRec folder per feature set under ``root`` (skipped when already there).

    ``dims`` and ``ranks`` (shared_rank, unique_rank) default to the documented recipe.
    """
    data = load_inter(inter)
    for name, splits in FEATURE_SETS.items():
        folder = dataset_folder(root, name)
        if (folder / "text_feat.npy").is_file():
            print(f"{folder}: already prepared")
            continue
        t0 = time.perf_counter()
        feats = collaborative_features(data, seed, dims, splits=splits, **ranks)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        shutil.copy(inter, tmp / f"{DATASET_NAME}.inter")
        for modality, arr in feats.items():
            np.save(tmp / f"{modality}_feat.npy", arr)
        tmp.rename(folder)  # a folder that exists is complete
        print(f"{folder}: {data.n_items} items, features from the SVD of {'+'.join(splits)} "
              f"in {time.perf_counter() - t0:.0f} s")


def run(root: Path, sand: str, only: list[str] | None, extra: list[str]) -> None:
    """Run the plan's grids in order, each logged to ``root/logs/<grid>.log``."""
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for grid, (features, args) in PLAN.items():
        if only and grid not in only:
            continue
        cmd = [sand, "grid", *args, "--name", grid, "--dataset", str(dataset_folder(root, features)),
               "--data-root", str(root / "store"), "--device", "cpu", *extra]
        print(f"{time.strftime('%H:%M:%S')} {grid}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        with open(logs / f"{grid}.log", "a") as log:
            status = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
        print(f"{time.strftime('%H:%M:%S')} {grid}: exit {status} after {time.perf_counter() - t0:.0f} s; "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)


def _feature_set(store: Path, interactions_key: str) -> str:
    """Which prepared folder a run's interactions came from (read from the acquire manifest)."""
    inter = json.loads((store / "artifacts" / "interactions" / interactions_key / "manifest.json").read_text())
    acquire = (store / "artifacts" / "acquire" / inter["inputs"]["raw"]["key"] / "manifest.json").read_text()
    return next((name for name in FEATURE_SETS if f"/{name}/{DATASET_NAME}" in acquire), "?")


def _label(params: dict) -> str:
    """The model as the tables name it; a run trained before a fix to its model says which revision it ran."""
    from sand.models.registry import has_variants, label, spec, trained_revision

    name = label(params["model"])
    variant = params.get("variant") or "a"
    if has_variants(params["model"]) and params["model"] == "sand":
        name += f"_{variant}"
    if params["model"] == "freedom-sand":
        name += f" ({params.get('plugin_fusion', 'auxiliary')}{'' if variant == 'a' else ', ' + variant})"
    revision = trained_revision(params)
    if revision != spec(params["model"]).revision:
        name += f" [revision {revision}]"
    return name


def _setting(params: dict) -> str:
    """The run's profile, plus its explicit batch, lr and ``train.extra`` where it set them (the experiments).

    Why both: an explicit setting wins over the profile, so a fast run with its own lr is not the
    fast profile and must not pair with the paper run as if it were."""
    from sand.models.registry import DEFAULT_BATCH_SIZE, profile_training

    profile = params.get("profile") or "default"
    implied = {"batch_size": DEFAULT_BATCH_SIZE, "lr": None, "eval_every": 1} | profile_training(
        params["model"], profile)
    explicit = [f"{name} {params.get(key)}" for key, name in (
        ("batch_size", "batch"), ("lr", "lr"), ("eval_every", "eval every"), ("patience", "patience"))
        if params.get(key) is not None and params.get(key) != implied.get(key)]
    explicit += [f"{key}={value}" for key, value in sorted((params.get("extra") or {}).items())]
    return ", ".join(([] if profile == "default" else [profile]) + explicit) if explicit else profile


def run_rows(root: Path) -> list[dict]:
    """One row per training run in the store: finished (artifacts/) and in progress (work/)."""
    import pandas as pd

    store = root / "store"
    rows = []
    for state, pattern in (("stopped", "artifacts/train/*/manifest.json"), ("running", "work/train/*/run.json")):
        for path in sorted(store.glob(pattern)):
            info = json.loads(path.read_text())
            history = path.parent / "epochs.csv"
            if not history.is_file():
                continue
            epochs = pd.read_csv(history)
            inputs = info["inputs"]
            inter_key = inputs["interactions"]["key"] if isinstance(inputs["interactions"], dict) else inputs[
                "interactions"]
            params = info["params"]
            best = epochs.loc[epochs["valid_recall@20"].round(4).idxmax()]  # first best, as MMRec's rule keeps
            rss = epochs["peak_memory_mb"] / 1024
            rows.append({
                "features": _feature_set(store, inter_key), "profile": _setting(params),
                "model": params["model"], "label": _label(params), "seed": params["seed"], "state": state,
                "epochs": len(epochs), "best_epoch": int(best["epoch"]),
                "wall_h": float((epochs["seconds"] + epochs["eval_seconds"]).sum()) / 3600,
                "s_epoch": float((epochs["seconds"] + epochs["eval_seconds"]).median()),
                # epochs x median epoch: the time to the stop without the epochs a pause or a
                # neighbour's burst stretched (the wall sum keeps them)
                "h_median": len(epochs) * float((epochs["seconds"] + epochs["eval_seconds"]).median()) / 3600,
                "rss10": float(rss.iloc[min(9, len(rss) - 1)]), "rss_end": float(rss.iloc[-1]),
                "curve": epochs[["epoch", "valid_recall@20"]].to_numpy(),
                **{c: float(best[c]) for c in ("valid_recall@20", "valid_ndcg@20", "test_recall@20",
                                               "test_ndcg@20")},
            })
    order = {"informative": 0, "control": 1}
    rows.sort(key=lambda r: (order.get(r["features"], 2), r["profile"] != "default", r["label"], r["seed"]))
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(h for h, _, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt.format(r[key]) for _, key, fmt in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def comparison(rows: list[dict]) -> str:
    """Paper protocol against the fast profile, per model and seed both finished: quality and time to the stop."""
    # times compare only on one CPU: a run pairs with the paper run of its own machine
    paper = {(r.get("cpu"), r["features"], r["label"], r["seed"]): r for r in rows if r["profile"] == "default"}
    lines = ["| features | model | seed | valid R@20 paper / fast (change) | epochs to stop paper / fast | "
             "time to stop h paper / fast (epochs x median epoch) | speed-up |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        p = paper.get((r.get("cpu"), r["features"], r["label"], r["seed"]))
        if r["profile"] != "fast" or p is None or "running" in (p["state"], r["state"]):
            continue
        change = (r["valid_recall@20"] - p["valid_recall@20"]) / p["valid_recall@20"]
        lines.append(f"| {r['features']} | {r['label']} | {r['seed']} | {p['valid_recall@20']:.4f} / "
                     f"{r['valid_recall@20']:.4f} ({change:+.1%}) | {p['epochs']} / {r['epochs']} | "
                     f"{p['h_median']:.2f} / {r['h_median']:.2f} | "
                     f"{p['h_median'] / r['h_median']:.1f}x |")
    return "\n".join(lines)


def plot_curves(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(15, 6), sharey=True)
    # one colour per model (across both panels), one line style per setting: paper, fast, anything else
    labels = sorted({r["label"] for r in rows})
    colour = {label: plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")(i) for i, label in enumerate(labels)}
    for ax, features in zip(axes, FEATURE_SETS, strict=True):
        for r in (r for r in rows if r["features"] == features):
            style = {"default": "-", "fast": "--"}.get(r["profile"], ":")
            ax.plot(r["curve"][:, 0], r["curve"][:, 1], style, color=colour[r["label"]], linewidth=1.2,
                    label=f"{r['label']} s{r['seed']} {'paper' if r['profile'] == 'default' else r['profile']}")
        ax.set_title(f"{features} features (MMRec Baby graph)")
        ax.set_xlabel("epoch")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=6.5, loc="lower right", ncol=2 if len(ax.lines) > 8 else 1)
    axes[0].set_ylabel("valid Recall@20")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def cpu_kind() -> str:
    """The CPU model and the fast instruction sets the precision choice depends on."""
    import platform

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.processor())
    flags = "AMX-BF16" if "amx_bf16" in info else "AVX-512" if "avx512f" in info else "AVX2"
    return f"{model}, {os.cpu_count()} cores, {flags}"


def export(root: Path, out: Path) -> None:
    """Write the store's run summaries and curves to ``out`` (JSON), tagged with this CPU."""
    rows = [{**r, "curve": r["curve"].tolist()} for r in run_rows(root)]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu_kind(), "rows": rows}, indent=1) + "\n")
    print(f"{out}: {len(rows)} runs")


def load_exported(paths: list[Path]) -> tuple[list[str], list[dict]]:
    cpus, rows = [], []
    for path in paths:
        data = json.loads(path.read_text())
        cpus.append(data["cpu"])
        rows += [{**r, "cpu": data["cpu"], "curve": np.asarray(r["curve"])} for r in data["rows"]]
    return cpus, rows


def table(root: Path | None, runs: list[Path], png: Path | None) -> None:
    if runs:
        cpus, rows = load_exported(runs)
        print("CPU: " + "; ".join(cpus) + "\n")
    else:
        rows = run_rows(root)
        print(f"CPU: {cpu_kind()}; load average now {os.getloadavg()[0]:.1f}\n")
    print(markdown_table(rows))
    print("\n" + comparison(rows))
    if png is not None and rows:
        plot_curves(rows, png)
        print(f"\ncurves: {png}")


def epoch_cost(root: Path, models: list[str], batches: int, rounds: int) -> None:
    """Seconds per epoch, paper batch (2048) against the fast profile's, timed in alternation.

    Why alternate: on a shared machine a slow spell then hits both settings, so their ratio
    (the fast profile's gain per epoch, before any change in the epochs to the stop) holds
    even when the seconds do not. Each setting times ``batches`` trainer steps per round
    (``bench_memory_model.time_batches``: CLUB fit, loss, backward, fused Adam) on the
    informative folder's inputs; an epoch = median seconds per batch x batches per epoch.
    """

    import torch
    from bench_memory_model import time_batches

    from sand.models.graph import scipy_to_torch_sparse
    from sand.models.registry import DEFAULT_BATCH_SIZE, build_model, profile_training, required_modalities
    from sand.pipeline.features.knn import knn_graph

    folder = dataset_folder(root, "informative")
    data = load_inter(folder / f"{DATASET_NAME}.inter")
    feats = {m: np.load(folder / f"{m}_feat.npy") for m in DIMS}
    graphs = {m: scipy_to_torch_sparse(knn_graph(x, 10)) for m, x in feats.items()}
    print(f"torch threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f}")
    print("| model | s/epoch paper (2048) | s/epoch fast | per-epoch gain |\n|---|---|---|---|")
    for name in models:
        sizes = {"paper": DEFAULT_BATCH_SIZE, "fast": profile_training(name, "fast")["batch_size"]}
        torch.manual_seed(0)
        inputs = {"features": {m: torch.from_numpy(x) for m, x in feats.items()}, "item_graphs": graphs} \
            if required_modalities(name) else {}
        model = build_model(name, n_users=data.n_users, n_items=data.n_items,
                            train_edges=torch.from_numpy(data.train), **inputs)
        per_batch: dict[str, list[float]] = {k: [] for k in sizes}
        for r in range(rounds):
            for setting, batch in sizes.items():
                per_batch[setting] += time_batches(model, data.train, data.csr("train"), data.n_items, batches,
                                                   batch, seed=r)
        epoch = {k: statistics.median(v) * -(-len(data.train) // sizes[k]) for k, v in per_batch.items()}
        print(f"| {name} | {epoch['paper']:.1f} | {epoch['fast']:.1f} | {epoch['paper'] / epoch['fast']:.2f}x |",
              flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="write the MMRec folders with generated features")
    p.add_argument("--inter", type=Path, required=True, help="the MMRec Baby split, baby.inter")
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0, help="feature generator seed")
    r = sub.add_parser("run", help="train the plan's grids (resumable)")
    r.add_argument("--root", type=Path, required=True)
    r.add_argument("--sand", default=shutil.which("sand") or "sand", help="the sand command to run")
    r.add_argument("--only", nargs="+", choices=list(PLAN), help="these grids only")
    r.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more sand grid options")
    c = sub.add_parser("epoch-cost", help="s/epoch at the paper's batch and the fast profile's, alternating")
    c.add_argument("--root", type=Path, required=True)
    c.add_argument("--models", nargs="+", default=["bpr", "lightgcn", "vbpr", "freedom", "sand", "freedom-sand"])
    c.add_argument("--batches", type=int, default=3, help="timed batches per setting and round")
    c.add_argument("--rounds", type=int, default=3)
    t = sub.add_parser("table", help="the per-run table (finished and running) and the valid R@20 curves")
    source = t.add_mutually_exclusive_group(required=True)
    source.add_argument("--root", type=Path)
    source.add_argument("--runs", type=Path, nargs="+", help="files written by export")
    t.add_argument("--png", type=Path, default=None)
    e = sub.add_parser("export", help="the run summaries and curves to a JSON file")
    e.add_argument("--root", type=Path, required=True)
    e.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.command == "prepare":
        prepare(args.inter, args.root, args.seed)
    elif args.command == "run":
        run(args.root, args.sand, args.only, args.extra)
    elif args.command == "epoch-cost":
        epoch_cost(args.root, args.models, args.batches, args.rounds)
    elif args.command == "table":
        table(args.root, args.runs or [], args.png)
    elif args.command == "export":
        export(args.root, args.out)
    print(json.dumps({"done": args.command}))


if __name__ == "__main__":
    main()
