"""Quality cost of SAND's batch scopes: SoloSim and the distancing/CLUB fit over all items vs the batch's.

Why: SoloSim over all N items needs N x N logits per batch, so ``train.solosim_scope=auto``
switches to the batch's unique items above 20,000 items (and a million-item catalogue can
only run in-batch); ``train.distance_scope`` makes the same choice for the CLUB bound and
its fit (all items up to 1,000,000). This benchmark measures what the batch scopes cost in
quality on a catalogue where every scope fits, by training SAND_a through the product's
own trainer (``train_model``: early stopping on valid Recall@20, test at the best valid
epoch) in the configurations (solosim scope / distance scope):

- ``all/all``: the authors' setting, what ``auto`` does up to 20,000 items;
- ``batch/all``: what ``auto`` does between 20,000 and 1,000,000 items;
- ``batch/batch``: everything in-batch (``auto`` above 1,000,000 items).

Every configuration trains from the same seeds (same initial weights, same BPR batches),
so a per-seed difference is the scope's alone; the spread of ``all/all`` over the seeds is
the run-to-run noise the differences are judged against.

Data: an MMRec ``.inter`` file (``--inter``, e.g. the MMRec Baby split ``baby.inter``:
19,445 users, 7,050 items, its own train/valid/test split). Without ``--inter``, a random
graph of Baby's size (``bench_sand_speed.make_edges``), which has no structure: a dry run.

Features (no real ones come with an ``.inter`` file): synthetic, built from the TRAIN
interactions only (never valid/test) by :func:`collaborative_features`, so they carry
collaborative signal with the generic/unique structure SAND separates:

1. a truncated SVD of the binary train user x item matrix, rank ``shared + 2 x unique``
   (ARPACK with a seeded start vector; components by decreasing singular value, signs
   fixed so each component's largest entry is positive, each standardised to unit
   variance over the items);
2. the first ``shared`` components are the factor both modalities see; the next
   ``unique`` go to the image modality only and the ``unique`` after them to text only;
3. each modality = its factors times a seeded Gaussian random projection to its width
   (image 512-d, text 384-d by default: small enough for a CPU budget) plus seeded
   Gaussian noise (``noise`` standard deviation per dimension).

The kNN item graphs come from these features through the pipeline's own
``knn_graph`` (k = 10, item included, as ``graphs.k`` defaults). The absolute numbers are
therefore not the paper's (synthetic features on a real graph); the relative cost of the
scopes is the point.

Usage (28 minutes on Baby for the defaults on a loaded 2-core machine; not run by CI; results
in docs/model.md, "Scopes"):
    .venv/bin/python benchmarks/bench_scopes.py --inter PATH/baby.inter --seeds 3 --epochs 15 --patience 3 --lr 1e-3
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from sand.pipeline.base.torch_env import apply_torch_env_defaults

apply_torch_env_defaults()  # the sand command's torch settings, before torch is imported

import numpy as np  # noqa: E402
from scipy.sparse.linalg import svds  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_precision_quality import seed_spread  # noqa: E402

from sand.pipeline.dataset.split_data import SplitData  # noqa: E402

#: configuration name -> (solosim_scope, distance_scope); the first is the reference
CONFIGS: dict[str, tuple[str, str]] = {
    "all/all": ("all", "all"),
    "batch/all": ("batch", "all"),
    "batch/batch": ("batch", "batch"),
}
#: what train.*_scope=auto picks, per configuration (docs/model.md, "Scopes")
AUTO_RANGE = {"all/all": "<= 20,000 items", "batch/all": "20,000 - 1,000,000 items", "batch/batch": "> 1,000,000 items"}
DEFAULT_DIMS = {"image": 512, "text": 384}
METRICS = ("recall@20", "ndcg@20")


def load_data(inter: Path | None, seed: int) -> SplitData:
    """The ``.inter`` file's split, or a random graph of Baby's size (75% train, the rest halved)."""
    if inter is not None:
        from bench_baby_baselines import load_inter

        return load_inter(inter)
    from bench_sand_speed import N_ITEMS, N_USERS, make_edges
    from gpu_check import split_data

    train, edges = make_edges(seed)
    return split_data({"train": train, "all": edges}, N_USERS, N_ITEMS)


def collaborative_features(
    data: SplitData,
    seed: int,
    dims: Mapping[str, int] = DEFAULT_DIMS,
    *,
    shared_rank: int = 32,
    unique_rank: int = 16,
    noise: float = 1.0,
    splits: Sequence[str] = ("train",),
) -> dict[str, np.ndarray]:
    """Per-modality float32 (n_items x width) features from the SVD of ``splits``; see the module doc.

    ``splits`` defaults to the train split alone (features that know nothing of valid/test);
    ``("train", "valid", "test")`` makes features that carry the held-out interactions too, as real
    content features carry what users will buy (``bench_convergence.py``'s informative set).
    """
    rng = np.random.default_rng(seed)
    matrix = sum(data.csr(split) for split in splits).astype(np.float64)
    matrix.data[:] = 1.0
    rank = shared_rank + unique_rank * len(dims)
    if not 0 < rank < min(matrix.shape):
        raise ValueError(f"SVD rank {rank} must be in (0, {min(matrix.shape)}) for a {matrix.shape} matrix")
    _, s, vt = svds(matrix, k=rank, v0=rng.standard_normal(min(matrix.shape)))
    comps = vt[np.argsort(-s)]  # (rank, n_items), largest singular value first
    rows = np.arange(len(comps))
    comps *= np.sign(comps[rows, np.abs(comps).argmax(axis=1)])[:, None]
    factors = (comps / comps.std(axis=1, keepdims=True)).T  # (n_items, rank), unit variance per component
    out: dict[str, np.ndarray] = {}
    for i, (modality, width) in enumerate(dims.items()):
        own = shared_rank + i * unique_rank
        f = np.concatenate([factors[:, :shared_rank], factors[:, own : own + unique_rank]], axis=1)
        projection = rng.standard_normal((f.shape[1], width)) / np.sqrt(f.shape[1])
        out[modality] = (f @ projection + noise * rng.standard_normal((data.n_items, width))).astype(np.float32)
    return out


def item_graphs(features: Mapping[str, np.ndarray], k: int = 10) -> dict:
    """The pipeline's kNN graphs (``pipeline/features/knn.py``) as the torch tensors the models take."""
    from sand.models.graph import scipy_to_torch_sparse
    from sand.pipeline.features.knn import knn_graph

    return {m: scipy_to_torch_sparse(knn_graph(x, k)) for m, x in features.items()}


def train_one(
    data: SplitData, features: dict, graphs: dict, config: str, seed: int, args: argparse.Namespace
) -> dict[str, float]:
    """SAND_a in ``config`` from ``seed`` through ``train_model``; metrics at the best valid epoch."""
    import torch

    from sand.models.registry import build_model
    from sand.pipeline.training.trainer import train_model

    solosim, distance = CONFIGS[config]
    torch.manual_seed(seed)  # initial weights, as the train stage seeds them
    model = build_model(
        "sand", variant="a", n_users=data.n_users, n_items=data.n_items, train_edges=torch.from_numpy(data.train),
        features=features, item_graphs=graphs, solosim_scope=solosim, distance_scope=distance, lr=args.lr,
    )

    def report(epoch: int, row: dict[str, float]) -> None:
        valid = f", valid R@20 {row['valid_recall@20']:.4f}" if "valid_recall@20" in row else ""
        print(f"  {config} seed {seed} epoch {epoch}: loss {row['loss']:.4f}, {row['seconds']:.0f} s{valid}",
              flush=True)

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        res = train_model(
            model, data, out_dir=Path(out), epochs=args.epochs, lr=args.lr, patience=args.patience,
            eval_every=args.eval_every, seed=seed, device="cpu", ks=(20,), progress=False, resume=False,
            on_epoch_end=report,
        )
    row = {
        "best_epoch": res.best_epoch, "epochs_run": res.epochs_run, "s_epoch": res.seconds_per_epoch,
        "wall_s": time.perf_counter() - t0,
        **{f"valid_{k}": res.best_valid[k] for k in METRICS}, **{f"test_{k}": res.test_at_best[k] for k in METRICS},
    }
    print(f"{config} seed {seed}: {row}", flush=True)
    return row


def print_tables(runs: dict[tuple[str, int], dict[str, float]], seeds: dict[str, Sequence[int]]) -> None:
    cols = [f"{split}_{k}" for split in ("valid", "test") for k in METRICS]
    heads = [c.replace("_recall@20", " R@20").replace("_ndcg@20", " N@20") for c in cols]
    print("\n| scopes (solosim/distance) | auto uses it at | seed | " + " | ".join(heads)
          + " | best epoch | epochs run | s/epoch |")
    print("|---|---|---|" + "---|" * (len(cols) + 3))
    for (config, seed), r in runs.items():
        print(f"| {config} | {AUTO_RANGE[config]} | {seed} | " + " | ".join(f"{r[c]:.4f}" for c in cols)
              + f" | {r['best_epoch']} | {r['epochs_run']} | {r['s_epoch']:.1f} |")
    ref = next(iter(CONFIGS))
    ref_mean = {c: statistics.mean(runs[(ref, s)][c] for s in seeds[ref]) for c in cols}
    print(f"\nMeans over seeds; change = relative to {ref}'s mean; {ref}'s seed spread = (max - min) / mean.")
    print("| scopes | seeds | " + " | ".join(f"{h} (change)" for h in heads) + " | s/epoch |")
    print("|---|---|" + "---|" * (len(cols) + 1))
    for config in CONFIGS:
        cells = []
        for c in cols:
            mean, spread = seed_spread([runs[(config, s)][c] for s in seeds[config]])
            note = f"spread {spread:.1%}" if config == ref else f"{(mean - ref_mean[c]) / ref_mean[c]:+.1%}"
            cells.append(f"{mean:.4f} ({note})")
        s_epoch = statistics.mean(runs[(config, s)]["s_epoch"] for s in seeds[config])
        print(f"| {config} | {len(seeds[config])} | " + " | ".join(cells) + f" | {s_epoch:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inter", type=Path, default=None,
                    help="an MMRec .inter file (userID itemID x_label), e.g. the MMRec Baby split baby.inter "
                         "(default: a random graph of Baby's size, a dry run)")
    ap.add_argument("--seeds", type=int, default=3, help="training seeds of the reference all/all")
    ap.add_argument("--other-seeds", type=int, default=None, help="seeds of the other configurations (default --seeds)")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--patience", type=int, default=3, help="evaluations without improvement before stopping")
    ap.add_argument("--eval-every", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3,
                    help="trainer and CLUB learning rate (SAND's default is 1e-4; 1e-3 converges in the CPU budget)")
    ap.add_argument("--feature-seed", type=int, default=0)
    ap.add_argument("--image-dim", type=int, default=DEFAULT_DIMS["image"])
    ap.add_argument("--text-dim", type=int, default=DEFAULT_DIMS["text"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if next(iter(CONFIGS)) not in args.configs:
        raise SystemExit(f"--configs must include the reference {next(iter(CONFIGS))}")

    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    data = load_data(args.inter, args.feature_seed)
    dims = {"image": args.image_dim, "text": args.text_dim}
    features_np = collaborative_features(data, args.feature_seed, dims)
    graphs = item_graphs(features_np)
    features = {m: torch.from_numpy(x) for m, x in features_np.items()}
    print(f"{data.n_users} users, {data.n_items} items, train/valid/test {len(data.train)}/{len(data.valid)}/"
          f"{len(data.test)}; features {dims} and kNN graphs in {time.perf_counter() - t0:.0f} s; "
          f"torch threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f}", flush=True)
    other = args.other_seeds if args.other_seeds is not None else args.seeds
    seeds = {c: range(args.seeds if c == next(iter(CONFIGS)) else other) for c in args.configs}
    runs = {}
    for seed in range(max(len(s) for s in seeds.values())):  # seed-major: a cut-short run still pairs configs
        for config in args.configs:
            if seed in seeds[config]:
                runs[(config, seed)] = train_one(data, features, graphs, config, seed, args)
    print_tables(runs, seeds)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; lr {args.lr}, epochs <= {args.epochs}, patience "
          f"{args.patience}, eval every {args.eval_every}; load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
