"""Benchmark: warm start of a retrained challenger (``retrain.warm_start``) against a cold start.

Why: a scheduled retrain on a grown snapshot mostly sees users and items the champion
already knows; initialising their rows from the champion should reach the champion's
quality sooner. This generates the bundled sample, takes its first ``--share`` of users
as snapshot 1 and every user as snapshot 2 (more reviews, new users), trains the
champion on snapshot 1 (``sand retrain``'s steps, in-process), then the challenger on
snapshot 2 twice, cold and warm, with the same settings. For each it prints the epochs
and the training wall time until the validation Recall@20 first reached the champion's
own best validation Recall@20 (``-``: never, within ``--epochs``), and its best.
Prints a table; not run by CI.

Why ``--split chronological`` by default: an old user keeps their reviews in snapshot 2,
so their validation items (their latest) are the same ones the champion did not train
on. Under the random ``mmrec`` split each snapshot draws a user's validation items
anew, so many of them were training items of the champion: a warm start inherits
them and its validation Recall@20 is inflated (the promotion's comparison leaves such
pairs out; the per-epoch validation of the trainer does not).

    .venv/bin/python benchmarks/bench_warm_start.py --users 1000 --items 500 --epochs 40 --model bpr
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def reach(epochs_csv: Path, target: float) -> tuple[str, str, float, int]:
    """(epochs to reach ``target``, seconds to reach it, best valid R@20, epochs run) from a train log."""
    import pandas as pd

    log = pd.read_csv(epochs_csv)
    hit = log.index[log["valid_recall@20"] >= target]
    seconds = log["seconds"].cumsum()
    if len(hit):
        first = hit[0]
        return str(int(log.loc[first, "epoch"])), f"{seconds[first]:.1f}", float(log["valid_recall@20"].max()), len(log)
    return "-", "-", float(log["valid_recall@20"].max()), len(log)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--share", type=float, default=0.7, help="users in snapshot 1")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--model", default="bpr")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="chronological", help="interactions.split (see the module doc)")
    args = parser.parse_args(argv)

    from sand.pipeline.acquire.bundled_sample import generate_sample, write_user_share
    from sand.pipeline.base.config import load_config
    from sand.pipeline.runner import run_pipeline
    from sand.pipeline.serving.retrain import retrain_once
    from sand.pipeline.stages import Context

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        generate_sample(tmp_path / "generated", seed=args.seed, n_users=args.users, n_items=args.items)
        raw = tmp_path / "raw"
        write_user_share(tmp_path / "generated", raw, args.share)
        cfg = load_config(None, {"data_root": str(tmp_path / "data"), "acquire.dataset": str(raw),
                                 "acquire.format": "amazon2014", "train.model": args.model,
                                 "train.epochs": args.epochs, "seed": args.seed},
                          ["train.patience=1000", f"interactions.split={args.split}"])

        def run(c):
            return run_pipeline(Context.create(c, progress=False), until="evaluate").artifacts()

        champion = retrain_once(cfg, run)
        store = Context.create(cfg).store
        champion_train = store.lookup("train", champion.challenger)
        target = float(champion_train.manifest["result"]["best_valid"]["recall@20"])
        write_user_share(tmp_path / "generated", raw, 1.0)
        rows = []
        for name, update in (("cold", {}), ("warm", {"warm_start_from": champion.challenger})):
            c = cfg.model_copy(update={"retrain": cfg.retrain.model_copy(update=update)})
            trained = run_pipeline(Context.create(c, progress=False), until="train").artifact("train")
            rows.append((name, *reach(trained.file("epochs.csv"), target)))

    print(f"\nchampion ({args.model}, snapshot 1: {args.share:.0%} of {args.users} users): valid R@20 {target:.4f}")
    print(f"{'start':6} {'epochs to reach':>16} {'seconds to reach':>17} {'best valid R@20':>16} {'epochs run':>11}")
    for name, epochs, seconds, best, run_epochs in rows:
        print(f"{name:6} {epochs:>16} {seconds:>17} {best:>16.4f} {run_epochs:>11}")


if __name__ == "__main__":
    main()
