"""Speed of SAND training on Baby-sized random inputs: fast (folded linear maps) vs naive.

Inputs (seeded, generated here): 19,445 users, 7,050 items, 160,792 distinct random
interactions (75% train), 4096-d image and 384-d text random features, item-item
kNN graphs (k = 10, item itself included, values 1/k) built blockwise with
``torch.topk`` (this script does not use ``pipeline/knn.py`` on purpose: it measures
the model only).

An epoch = batches of 2048 (user, positive, uniform negative not in the user's
training items) over the training edges, Adam lr 1e-4 (``fused=True``, as the CLUB
optimisers), CLUB steps included for MI variants. Each configuration runs in its own
subprocess so ``ru_maxrss`` is its own
peak. Seconds per epoch = median seconds per batch over ``--batches`` timed batches
(after one warm-up batch) times the number of batches in an epoch, unless
``--full-epoch`` runs whole epochs. A check subprocess builds fast and naive models
with the same parameters and compares every loss term on the same batch (1e-4).

The speed-up comes from an interleaved subprocess: fast and naive models in one
process, timed batch by batch in alternation (fast, naive, fast, naive, ...) on the
same batches. On a shared, noisy machine a slow spell then hits both modes instead
of whichever happened to run during it. Alternation is not free for the fast model
(the naive one evicts its caches and allocations between its batches), so this ratio
is a conservative one. Separate runs (one subprocess per mode, ``--rounds R`` times in
alternation, median of the R) give the peak RSS and the usual seconds per epoch.

Usage: ``python benchmarks/bench_sand_speed.py [--batches 5] [--rounds 1] [--variants a b] [--full-epoch]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sand.models.sand import SAND  # noqa: E402

N_USERS, N_ITEMS, N_INTER = 19_445, 7_050, 160_792
D_IMAGE, D_TEXT, KNN_K, BATCH = 4096, 384, 10, 2048


def make_edges(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train (E, 2), all (N_INTER, 2)): distinct random (user, item) pairs, 75% train."""
    rng = np.random.default_rng(seed)
    keys = np.unique(rng.integers(0, N_USERS * N_ITEMS, size=int(N_INTER * 1.2)))
    keys = rng.permutation(keys)[:N_INTER]
    edges = np.stack([keys // N_ITEMS, keys % N_ITEMS], 1).astype(np.int64)
    n_train = int(0.75 * N_INTER)
    return edges[:n_train], edges


def knn_graph(x: torch.Tensor, k: int = KNN_K, block: int = 1024) -> torch.Tensor:
    """Top-k cosine kNN graph (self included), binary, symmetric-normalised (every value 1/k)."""
    xn = torch.nn.functional.normalize(x, dim=1)
    n = x.shape[0]
    cols = []
    for start in range(0, n, block):
        sim = xn[start : start + block] @ xn.T
        rows = torch.arange(start, min(start + block, n))
        sim[torch.arange(len(rows)), rows] = math.inf  # the item itself is always kept
        cols.append(sim.topk(k, dim=1).indices)
    col = torch.cat(cols).reshape(-1)
    row = torch.arange(n).repeat_interleave(k)
    return torch.sparse_coo_tensor(
        torch.stack([row, col]), torch.full((n * k,), 1.0 / k), (n, n), check_invariants=True
    ).coalesce()


def make_inputs(seed: int) -> dict:
    train, _ = make_edges(seed)
    g = torch.Generator().manual_seed(seed)
    features = {"image": torch.rand(N_ITEMS, D_IMAGE, generator=g), "text": torch.randn(N_ITEMS, D_TEXT, generator=g)}
    graphs = {m: knn_graph(f) for m, f in features.items()}
    return {"train": train, "features": features, "graphs": graphs}


def batches(train: np.ndarray, seed: int):
    """Shuffled (user, pos, neg) batches; negatives uniform among the user's non-training items."""
    rng = np.random.default_rng(seed)
    known = np.sort(train[:, 0] * N_ITEMS + train[:, 1])
    order = rng.permutation(len(train))
    for start in range(0, len(order), BATCH):
        b = train[order[start : start + BATCH]]
        neg = rng.integers(0, N_ITEMS, size=len(b))
        while True:
            keys = b[:, 0] * N_ITEMS + neg
            pos_in = np.searchsorted(known, keys)
            bad = known[np.minimum(pos_in, len(known) - 1)] == keys
            if not bad.any():
                break
            neg[bad] = rng.integers(0, N_ITEMS, size=int(bad.sum()))
        yield (torch.from_numpy(b[:, 0]), torch.from_numpy(b[:, 1]), torch.from_numpy(neg))


def build(inputs: dict, variant: str, fast: bool, seed: int = 0) -> SAND:
    torch.manual_seed(seed)
    return SAND(
        N_USERS,
        N_ITEMS,
        torch.from_numpy(inputs["train"]),
        inputs["features"],
        inputs["graphs"],
        variant=variant,
        fast=fast,
    )


def train_step(model: SAND, opt: torch.optim.Optimizer, batch) -> dict[str, float]:
    model.auxiliary_step(*batch)
    opt.zero_grad(set_to_none=True)
    terms = model.loss_terms(*batch)
    total = sum(terms.values())
    total.backward()
    opt.step()
    return {k: float(v) for k, v in terms.items()}


def run_one(variant: str, fast: bool, n_batches: int, full_epoch: bool, seed: int) -> dict:
    inputs = make_inputs(seed)
    model = build(inputs, variant, fast)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    n_epoch_batches = math.ceil(len(inputs["train"]) / BATCH)
    it = batches(inputs["train"], seed)
    train_step(model, opt, next(it))  # warm-up (allocator, thread pool)
    times, cpu, last = [], [], {}
    if full_epoch:
        t0, c0 = time.perf_counter(), time.process_time()
        for batch in batches(inputs["train"], seed + 1):
            last = train_step(model, opt, batch)
        epoch_s, epoch_cpu_s = time.perf_counter() - t0, time.process_time() - c0
        how = "1 full epoch"
    else:
        for _ in range(n_batches):
            batch = next(it)
            t0, c0 = time.perf_counter(), time.process_time()
            last = train_step(model, opt, batch)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        epoch_s = statistics.median(times) * n_epoch_batches
        epoch_cpu_s = statistics.median(cpu) * n_epoch_batches
        how = f"median of {n_batches} batches x {n_epoch_batches}"
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    finite = all(math.isfinite(v) for v in last.values())
    return {
        "variant": variant,
        "fast": fast,
        "epoch_s": epoch_s,
        "epoch_cpu_s": epoch_cpu_s,
        "how": how,
        "rss_gb": rss_gb,
        "threads": torch.get_num_threads(),
        "finite": finite,
        "batch_s": times,
    }


def run_check(variant: str, seed: int) -> dict:
    """Fast and naive models with the same parameters: every loss term on one batch, and grads.

    MI variants: both first fit their CLUB estimators on that batch (``club_steps`` steps:
    closed form + flat Adam vs autograd + ``torch.optim.Adam``), which are compared; then
    the fast model's parameters are copied, so the loss terms are compared on equal weights
    (with a fitted estimator the MI bound is not clamped at 0).
    """
    inputs = make_inputs(seed)
    fast, naive = build(inputs, variant, True), build(inputs, variant, False)
    naive.load_state_dict(fast.state_dict())
    batch = next(batches(inputs["train"], seed))
    fit = {name: model.auxiliary_step(*batch) for name, model in (("fast", fast), ("naive", naive))}
    club_ll_diff = max((abs(fit["fast"][k] - fit["naive"][k]) for k in fit["fast"]), default=0.0)
    club_param_diff = max(
        (
            float((p - q).abs().max())
            for p, q in zip(fast.separation.club.parameters(), naive.separation.club.parameters(), strict=True)
        ),
        default=0.0,
    )
    naive.load_state_dict(fast.state_dict())
    out = {}
    for name, model in (("fast", fast), ("naive", naive)):
        torch.manual_seed(1)
        terms = model.loss_terms(*batch)
        sum(terms.values()).backward()
        grad = model.transforms["image"].weight.grad
        out[name] = ({k: float(v) for k, v in terms.items()}, grad)
    diffs = {k: abs(out["fast"][0][k] - out["naive"][0][k]) for k in out["fast"][0]}
    g_f, g_n = out["fast"][1], out["naive"][1]
    grad_rel = float((g_f - g_n).norm() / g_n.norm().clamp_min(1e-30))
    return {
        "variant": variant,
        "terms": out["fast"][0],
        "max_abs_diff": max(diffs.values()),
        "diffs": diffs,
        "grad_rel_diff_L_image": grad_rel,
        "club_fit": fit["fast"],
        "club_ll_diff": club_ll_diff,
        "club_param_diff": club_param_diff,
    }


def median_run(runs: list[dict]) -> dict:
    """One row from repeated separate runs of a configuration: median times, largest peak."""
    out = dict(runs[0])
    if len(runs) > 1:
        out["epoch_s"] = statistics.median(r["epoch_s"] for r in runs)
        out["epoch_cpu_s"] = statistics.median(r["epoch_cpu_s"] for r in runs)
        out["rss_gb"] = max(r["rss_gb"] for r in runs)
        out["finite"] = all(r["finite"] for r in runs)
        out["how"] = f"median of {len(runs)} runs, each {runs[0]['how']}"
    return out


def run_pair(variant: str, n_batches: int, seed: int) -> dict:
    """Fast and naive models in one process, timed on alternating batches (the same batches)."""
    inputs = make_inputs(seed)
    models = {"fast": build(inputs, variant, True), "naive": build(inputs, variant, False)}
    opts = {mode: torch.optim.Adam(m.parameters(), lr=1e-4, fused=True) for mode, m in models.items()}
    n_epoch_batches = math.ceil(len(inputs["train"]) / BATCH)
    it = batches(inputs["train"], seed)
    warm = next(it)
    for mode, model in models.items():
        model.train()
        train_step(model, opts[mode], warm)
    times: dict[str, list[float]] = {"fast": [], "naive": []}
    cpu: dict[str, list[float]] = {"fast": [], "naive": []}
    for _ in range(n_batches):
        batch = next(it)
        for mode, model in models.items():
            t0, c0 = time.perf_counter(), time.process_time()
            train_step(model, opts[mode], batch)
            times[mode].append(time.perf_counter() - t0)
            cpu[mode].append(time.process_time() - c0)
    return {
        mode: {
            "epoch_s": statistics.median(times[mode]) * n_epoch_batches,
            "epoch_cpu_s": statistics.median(cpu[mode]) * n_epoch_batches,
            "batch_s": times[mode],
        }
        for mode in models
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=5, help="timed batches per configuration")
    ap.add_argument("--rounds", type=int, default=1, help="separate fast/naive runs per variant, alternating")
    ap.add_argument("--variants", nargs="+", default=["a", "b"])
    ap.add_argument("--full-epoch", action="store_true", help="time whole epochs of the fast models")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:  # child process: one configuration, JSON on the last line
        kind, variant, mode = args.one.split(":")
        if kind == "check":
            res = run_check(variant, args.seed)
        elif kind == "pair":
            res = run_pair(variant, args.batches, args.seed)
        else:
            res = run_one(variant, mode == "fast", args.batches, args.full_epoch and mode == "fast", args.seed)
        print(json.dumps(res))
        return

    def child(spec: str) -> dict:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            spec,
            "--batches",
            str(args.batches),
            "--seed",
            str(args.seed),
            "--threads",
            str(args.threads),
        ]
        if args.full_epoch:
            cmd.append("--full-epoch")
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    # Without this, OpenMP worker threads spin while waiting; on a shared, oversubscribed
    # machine the small ops of the CLUB fit then run 10-20x slower (measured here).
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    print(f"OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}; load average {os.getloadavg()[0]:.1f} at start")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{N_USERS} users, {N_ITEMS} items, {N_INTER} interactions (75% train), batch {BATCH}"
    )
    rows = []
    for v in args.variants:
        check = child(f"check:{v}:-")
        print(
            f"SAND_{v} fast vs naive, same parameters, same batch: max |loss diff| = "
            f"{check['max_abs_diff']:.2e} (terms {check['terms']}); "
            f"rel. grad diff of L_image = {check['grad_rel_diff_L_image']:.2e}"
        )
        if check["club_fit"]:
            print(
                f"SAND_{v} CLUB fit ({check['club_fit']}), fast vs naive: max |log-likelihood diff| = "
                f"{check['club_ll_diff']:.2e}, max |estimator parameter diff| = {check['club_param_diff']:.2e}"
            )
        pair = child(f"pair:{v}:-")
        runs: dict[str, list[dict]] = {"fast": [], "naive": []}
        for _ in range(max(1, args.rounds)):
            for mode in ("fast", "naive"):
                runs[mode].append(child(f"run:{v}:{mode}"))
        rows.append((v, pair, {mode: median_run(r) for mode, r in runs.items()}))
    print()
    print(
        "| model | mode | s/epoch (separate runs) | CPU s/epoch | peak RSS (GB) | finite | speed-up | "
        "s/epoch (interleaved) | speed-up (interleaved) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for v, pair, separate in rows:
        for mode in ("fast", "naive"):
            p, r = pair[mode], separate[mode]
            print(
                f"| SAND_{v} | {mode} | {r['epoch_s']:.1f} | {r['epoch_cpu_s']:.1f} | {r['rss_gb']:.2f} | "
                f"{r['finite']} | {separate['naive']['epoch_s'] / r['epoch_s']:.1f}x | {p['epoch_s']:.1f} | "
                f"{pair['naive']['epoch_s'] / p['epoch_s']:.1f}x |"
            )
    how = rows[0][2]["fast"]["how"] if rows else ""
    per_epoch = math.ceil(int(0.75 * N_INTER) / BATCH)
    print(
        f"\nInterleaved: median of {args.batches} alternating batches per mode x {per_epoch} batches per epoch; "
        f"separate runs: {how}."
    )


if __name__ == "__main__":
    main()
