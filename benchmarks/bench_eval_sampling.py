"""Speed of the BPR sampler and the full-ranking evaluator on the real Baby graph.

Usage: python benchmarks/bench_eval_sampling.py [path/to/baby.inter] [--repeats 3]

Prints median seconds over the repeats and peak RSS. The evaluator is cross-checked
against a plain MMRec-style ranking (mask training items with -1e10, torch.topk,
binary hits) on continuous random embeddings, where ties do not occur, so both must
agree to 1e-6. Also times a Clothing-sized catalogue (39,387 x 23,033) with random
interactions to show evaluation memory stays bounded by the user batch.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sand.pipeline.dataset.split_data import SplitData  # noqa: E402
from sand.pipeline.training.evaluation import evaluate_split  # noqa: E402
from sand.pipeline.training.negative_sampling import sample_bpr_epoch  # noqa: E402

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "amazon-baby-2014" / "baby.inter"


def plain_topk_metrics(ue, ie, data: SplitData, split: str, ks=(10, 20), batch=4096) -> dict[str, float]:
    """Straightforward MMRec-like reference (ties broken however torch.topk likes)."""
    train = data.csr("train")
    target = data.csr(split)
    users = np.flatnonzero(np.diff(target.indptr) > 0)
    kmax = max(ks)
    disc = 1 / np.log2(np.arange(2, kmax + 2))
    out = {f"recall@{k}": 0.0 for k in ks} | {f"ndcg@{k}": 0.0 for k in ks}
    for s in range(0, len(users), batch):
        bu = users[s : s + batch]
        sc = ue[bu] @ ie.T
        mask = torch.from_numpy(train[bu].toarray() > 0)
        sc[mask] = -1e10
        top = torch.topk(sc, kmax).indices.numpy()
        tgt = target[bu].toarray() > 0
        hits = np.take_along_axis(tgt, top, axis=1)
        npos = tgt.sum(1)
        for k in ks:
            out[f"recall@{k}"] += float((hits[:, :k].sum(1) / npos).sum())
            idcg = np.array([disc[: min(n, k)].sum() for n in npos])
            out[f"ndcg@{k}"] += float(((hits[:, :k] * disc[:k]).sum(1) / idcg).sum())
    return {k: v / len(users) for k, v in out.items()}


def timed(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("inter", nargs="?", type=Path, default=DEFAULT)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []

    df = pd.read_csv(args.inter, sep="\t").rename(
        columns={"userID": "user", "itemID": "item", "x_label": "split"}
    )
    data = SplitData.from_frame(df)
    csr = data.csr("train")
    t, _ = timed(
        lambda: sample_bpr_epoch(data.train, csr, data.n_items, np.random.default_rng(0)), args.repeats
    )
    rows.append(("sample_bpr_epoch, Baby train (119,674 edges)", t, rss_mb()))

    ue = torch.randn(data.n_users, 64)
    ie = torch.randn(data.n_items, 64)
    t, ours = timed(lambda: evaluate_split(ue, ie, data, "test"), args.repeats)
    rows.append(("evaluate_split test, Baby 19,445 x 7,050, d=64", t, rss_mb()))
    t, ref = timed(lambda: plain_topk_metrics(ue, ie, data, "test"), args.repeats)
    rows.append(("plain topk reference, same", t, rss_mb()))
    worst = max(abs(ours[k] - ref[k]) for k in ours)

    rng = np.random.default_rng(1)
    nu, ni = 39_387, 23_033
    u = np.repeat(np.arange(nu), 7)
    i = rng.integers(0, ni, size=len(u))
    split = np.tile([0, 0, 0, 0, 0, 1, 2], nu)
    big = SplitData.from_frame(pd.DataFrame({"user": u, "item": i, "split": split}), nu, ni)
    ue2, ie2 = torch.randn(nu, 64), torch.randn(ni, 64)
    t, _ = timed(lambda: evaluate_split(ue2, ie2, big, "test"), 1)
    rows.append(("evaluate_split test, Clothing-sized 39,387 x 23,033 (random graph)", t, rss_mb()))
    t, _ = timed(lambda: evaluate_split(ue2, ie2, big, "test", batch_users=1024), 1)
    rows.append(("  same, batch_users=1024", t, rss_mb()))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} runs")
    print(f"{'case':<70} {'seconds':>8} {'peak RSS MB (cumulative)':>25}")
    for name, secs, mem in rows:
        print(f"{name:<70} {secs:>8.3f} {mem:>25.0f}")
    print(f"max |ours - plain reference| over metrics: {worst:.2e}")
    print({k: round(v, 6) for k, v in ours.items()})


if __name__ == "__main__":
    main()
