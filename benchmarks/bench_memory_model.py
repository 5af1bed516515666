"""Benchmark: training memory and time per batch at two catalogue sizes, against the formulas.

Why: docs/scaling.md states, per model, the memory and FLOPs of one training batch as a
function of users U, items N, training edges E and feature widths; this measures peak
RSS and seconds per batch on synthetic data (same shape as MMRec's: 4,096-d image and
384-d text features, kNN graphs with k = 10) at two sizes, each model in a fresh
subprocess, and prints the formula's prediction next to it. Not run by CI.

    .venv/bin/python benchmarks/bench_memory_model.py --sizes 2000:4000 8000:16000 --models sand bpr
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

D_IMAGE, D_TEXT, EMB, K = 4096, 384, 64, 10
EDGES_PER_USER = 8


def predicted(model: str, n_users: int, n_items: int, n_edges: int, batch: int) -> tuple[float, float]:
    """(model state + activations MB, GFLOP per batch) from the docs/scaling.md formulas (float32).

    The raw features are left out (they exist before the baseline here and are memory-mapped
    in the pipeline), except FREEDOM's trainable copy.
    """
    dims = D_IMAGE + D_TEXT
    feats = n_items * dims  # raw features, one copy (memory-mapped in the pipeline)
    if model == "sand":
        params = sum(d * d + d * 256 + (d // 2) * (64 + 32 + 32) for d in (D_IMAGE, D_TEXT)) + 2 * n_users * EMB
        acts = 2 * (n_items * 384 + 4 * (n_users + n_items) * EMB) + n_items * 2 * EMB
        flop = sum(2 * 3 * (d * d * 384 + n_items * d * 384) for d in (D_IMAGE, D_TEXT))
        flop += 2 * 3 * 2 * 2 * (2 * n_edges) * EMB  # 2 modalities x 2 GCN layers, fwd+bwd
        solo = n_items if n_items <= 20_000 else 2 * batch
        flop += 2 * 3 * solo * solo * 32
    elif model == "vbpr":
        params = (n_users + n_items) * 2 * EMB + dims * EMB
        acts = n_items * EMB
        flop = 2 * 3 * n_items * dims * EMB
    elif model == "freedom":
        params = (n_users + n_items) * EMB + dims * EMB + feats  # FREEDOM trains the raw features
        acts = 4 * (n_users + n_items) * EMB
        flop = 2 * 3 * (n_items * dims * EMB + 2 * (2 * n_edges) * EMB)
    elif model == "lightgcn":
        params, acts = (n_users + n_items) * EMB, 4 * (n_users + n_items) * EMB
        flop = 2 * 3 * 2 * (2 * n_edges) * EMB
    else:  # bpr
        params, acts, flop = (n_users + n_items) * EMB, 3 * batch * EMB, 2 * 3 * 3 * batch * EMB
    state = 4 * params + acts  # params + grad + 2 Adam moments
    return state * 4 / 2**20, flop / 1e9


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def time_batches(model, edges, train_csr, n_items: int, batches: int, batch: int, seed: int = 0) -> list[float]:
    """Seconds of each of the first ``batches`` training steps, each as the trainer runs it.

    A step: the CLUB fit (``auxiliary_step``), the loss terms, backward and a fused Adam
    step over one batch of an epoch's BPR triples (``sample_bpr_epoch``). Shared by the
    benchmarks that project an epoch from a few batches (``bench_scale.py``).
    """
    import numpy as np
    import torch

    from sand.pipeline.training.negative_sampling import sample_bpr_epoch

    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3, fused=True)
    u, p, n = (torch.from_numpy(a) for a in sample_bpr_epoch(edges, train_csr, n_items, np.random.default_rng(seed)))
    model.train()
    model.on_epoch_start(1, torch.Generator().manual_seed(seed))  # FREEDOM prunes its graph per epoch
    times = []
    for b in range(batches):
        sl = slice(b * batch, (b + 1) * batch)
        t0 = time.perf_counter()
        model.auxiliary_step(u[sl], p[sl], n[sl])
        loss = sum(model.loss_terms(u[sl], p[sl], n[sl]).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times


def _worker(model_name: str, n_items: int, n_users: int, batches: int, batch: int) -> None:
    import numpy as np
    import torch

    from sand.models.graph import scipy_to_torch_sparse
    from sand.models.registry import build_model, required_modalities
    from sand.pipeline.features.knn import knn_graph

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(n_users), EDGES_PER_USER)
    edges = np.unique(np.stack([users, rng.integers(0, n_items, len(users))], axis=1), axis=0)
    feats, graphs = {}, {}
    if required_modalities(model_name):
        for m, d in (("image", D_IMAGE), ("text", D_TEXT)):
            x = rng.standard_normal((n_items, d), dtype=np.float32)
            feats[m] = torch.from_numpy(x)
            graphs[m] = scipy_to_torch_sparse(knn_graph(x, K))
    warm = torch.nn.Linear(8, 8)  # torch's one-off allocations (thread pools, kernels) before the baseline
    torch.optim.Adam(warm.parameters()).step(warm(torch.ones(2, 8)).sum().backward())
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = _rss_mb()
    model = build_model(model_name, n_users=n_users, n_items=n_items, train_edges=torch.from_numpy(edges),
                        features=feats, item_graphs=graphs)
    import scipy.sparse as sp

    csr = sp.csr_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n_users, n_items))
    times = time_batches(model, edges, csr, n_items, batches, batch)
    print(json.dumps({"peak_mb": _rss_mb() - base, "s_per_batch": float(np.median(times[1:] or times)),
                      "edges": int(len(edges))}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["2000:4000", "8000:16000"], help="items:users")
    ap.add_argument("--models", nargs="+", default=["sand", "vbpr", "freedom", "lightgcn", "bpr"])
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args.worker[0], int(args.worker[1]), int(args.worker[2]), args.batches, args.batch_size)
        return
    print(f"{'model':>9} {'items':>7} {'users':>7} {'edges':>8} {'pred MB':>8} {'peak MB':>8} "
          f"{'pred GFLOP':>10} {'s/batch':>8}")
    for model in args.models:
        for size in args.sizes:
            n_items, n_users = (int(v) for v in size.split(":"))
            out = subprocess.run([sys.executable, __file__, "--worker", model, str(n_items), str(n_users),
                                  "--batches", str(args.batches), "--batch-size", str(args.batch_size)],
                                 check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            mb, gflop = predicted(model, n_users, n_items, r["edges"], args.batch_size)
            print(f"{model:>9} {n_items:>7} {n_users:>7} {r['edges']:>8} {mb:>8.0f} {r['peak_mb']:>8.0f} "
                  f"{gflop:>10.1f} {r['s_per_batch']:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
