"""MF-BPR and LightGCN on the real Amazon-2014 Baby graph with the MMRec protocol.

Why: these two baselines use no features, so trained on the released MMRec split
they are directly comparable with the published numbers (SAND paper Table 2:
MF-BPR R@20 0.0575, LightGCN 0.0754) and with MMRec run on these machines
(MMRec's own code on these machines: 0.0594 / 0.0745). A match validates the models, the BPR sampler,
the trainer (early stopping on valid R@20, patience 20, test at the best valid
epoch) and the evaluator (full ranking, training items masked) end to end.

Usage (minutes per run on a 2-core machine; not run by CI):
    .venv/bin/python benchmarks/bench_baby_baselines.py --inter PATH/baby.inter \
        --runs mf:reg=0.1 lightgcn:layers=1,reg=0.01
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sand.models.bpr import MFBPR  # noqa: E402
from sand.models.lightgcn import LightGCN  # noqa: E402
from sand.pipeline.dataset.split_data import SplitData  # noqa: E402
from sand.pipeline.training.trainer import train_model  # noqa: E402

PUBLISHED_R20 = {"mf": 0.0575, "lightgcn": 0.0754}
MMREC_HERE_R20 = {"mf": 0.0594, "lightgcn": 0.0745}


def load_inter(path: Path) -> SplitData:
    """An MMRec ``.inter`` file (``userID itemID x_label``) as SplitData."""
    df = pd.read_csv(path, sep="\t", usecols=["userID", "itemID", "x_label"])
    df = df.rename(columns={"userID": "user", "itemID": "item", "x_label": "split"})
    return SplitData.from_frame(df)


def parse_run(spec: str) -> tuple[str, dict[str, float]]:
    """``model:key=value,key=value`` -> (model, hyper-parameters)."""
    name, _, rest = spec.partition(":")
    if name not in ("mf", "lightgcn"):
        raise SystemExit(f"--runs: unknown model {name!r} in {spec!r} (mf or lightgcn)")
    hp: dict[str, float] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        hp[key] = float(value)
    return name, hp


def build(name: str, hp: dict[str, float], data: SplitData) -> torch.nn.Module:
    edges = torch.from_numpy(np.asarray(data.train, dtype=np.int64))
    if name == "mf":
        return MFBPR(data.n_users, data.n_items, edges, {}, {}, reg_weight=hp.get("reg", 0.1))
    return LightGCN(
        data.n_users,
        data.n_items,
        edges,
        {},
        {},
        n_layers=int(hp.get("layers", 2)),
        reg_weight=hp.get("reg", 1e-2),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inter", type=Path, required=True,
                    help="the real Baby graph as an MMRec .inter file (userID itemID x_label), e.g. MMRec's baby.inter")
    ap.add_argument("--runs", nargs="+", default=["mf:reg=0.1", "lightgcn:layers=1,reg=0.01"])
    ap.add_argument("--epochs", type=int, default=1000)
    ap.add_argument("--patience", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=999)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--out", type=Path, default=None, help="run folders + results.json (default: a temp dir)")
    args = ap.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_baby_baselines_"))
    out.mkdir(parents=True, exist_ok=True)
    data = load_inter(args.inter)
    print(
        f"Baby: {data.n_users} users, {data.n_items} items, train/valid/test "
        f"{len(data.train)}/{len(data.valid)}/{len(data.test)}; torch threads {torch.get_num_threads()}",
        flush=True,
    )
    results = []
    for spec in args.runs:
        name, hp = parse_run(spec)
        torch.manual_seed(args.seed)  # parameter initialisation
        model = build(name, hp, data)
        run_dir = out / spec.replace(":", "_").replace(",", "_").replace("=", "")
        t0 = time.perf_counter()
        res = train_model(
            model,
            data,
            out_dir=run_dir,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            patience=args.patience,
            seed=args.seed,
            device="cpu",
            progress=False,
            resume=False,
        )
        evals = [h["eval_seconds"] for h in res.history if "eval_seconds" in h]
        row = {
            "run": spec,
            "best_epoch": res.best_epoch,
            "epochs_run": res.epochs_run,
            "train_s_per_epoch": res.seconds_per_epoch,
            "eval_s": float(np.median(evals)) if evals else float("nan"),
            "wall_s": time.perf_counter() - t0,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            **{f"valid_{k}": v for k, v in res.best_valid.items()},
            **{f"test_{k}": v for k, v in res.test_at_best.items()},
            "published_test_recall@20": PUBLISHED_R20[name],
            "mmrec_here_test_recall@20": MMREC_HERE_R20[name],
        }
        results.append(row)
        print(json.dumps(row), flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))

    cols = ["recall@10", "recall@20", "ndcg@10", "ndcg@20"]
    print(
        "\n| run | best ep | epochs | train s/ep | eval s | peak RSS MB | "
        + " | ".join(f"valid {c}" for c in cols)
        + " | "
        + " | ".join(f"test {c}" for c in cols)
        + " | published R@20 | MMRec here R@20 |"
    )
    print("|" + "---|" * (6 + 2 * len(cols) + 2))
    for r in results:
        metrics = [f"{r[f'valid_{c}']:.4f}" for c in cols] + [f"{r[f'test_{c}']:.4f}" for c in cols]
        print(
            f"| {r['run']} | {r['best_epoch']} | {r['epochs_run']} | {r['train_s_per_epoch']:.2f} | "
            f"{r['eval_s']:.2f} | {r['peak_rss_mb']:.0f} | "
            + " | ".join(metrics)
            + f" | {r['published_test_recall@20']} | {r['mmrec_here_test_recall@20']} |"
        )
    print(f"\nrun folders and results.json: {out}")


if __name__ == "__main__":
    main()
