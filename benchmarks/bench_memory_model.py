"""Benchmark: the train stage's memory estimate against the measured peak, per model, and time per batch.

Why: the train stage refuses a model its estimate says cannot fit
(``pipeline/training/memory_estimate.py``) and records the estimate next to the measured
peak; this checks the two on synthetic inputs of the bundled sample's size and of Amazon
Baby's (19,445 users, 7,050 items, ~120k training edges, 4,096-d image and 384-d text
features, kNN graphs with k = 10), each model in a fresh subprocess: build, a few training
steps as the trainer runs them (CLUB fit, loss, backward, fused Adam) and one block of the
per-epoch evaluation. "peak MB" is the process's high-water mark (the trainer's
``peak_memory_mb``), "est MB" the estimate plus the resident memory before the inputs
existed; "+MB" columns are the same without that base. Not run by CI.

    .venv/bin/python benchmarks/bench_memory_model.py --sizes sample baby --models sand bpr
    .venv/bin/python benchmarks/bench_memory_model.py --sizes sample --models bpr --embedding-dim 4096
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EMB, K = 64, 10


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


#: Named sizes: (users, items, train edges, image width, text width). ``sample``: the bundled
#: sample after its 5-core (resnet18 image features); ``baby``: Amazon 2014 Baby as MMRec ships it.
PRESETS = {"sample": (1000, 499, 8900, 512, 384), "baby": (19_445, 7_050, 120_000, 4096, 384)}


def _synthetic_inputs(n_users: int, n_items: int, n_edges: int, dims: dict[str, int]):
    """Train edges (every user at least one) and Gaussian features with their kNN graphs (k = 10)."""
    import numpy as np
    import torch

    from sand.models.graph import scipy_to_torch_sparse
    from sand.pipeline.features.knn import knn_graph

    rng = np.random.default_rng(0)
    users = np.concatenate([np.arange(n_users), rng.integers(0, n_users, max(n_edges - n_users, 0))])
    edges = np.unique(np.stack([users, rng.integers(0, n_items, len(users))], axis=1), axis=0)
    feats, graphs = {}, {}
    for m, d in dims.items():
        x = rng.standard_normal((n_items, d), dtype=np.float32)
        feats[m] = torch.from_numpy(x)
        graphs[m] = scipy_to_torch_sparse(knn_graph(x, K))
    return edges, feats, graphs


def _worker(model_name: str, size: str, batches: int, batch: int, dim: int) -> None:
    """Build ``model_name`` at ``size``, train ``batches`` batches, score one block of users; print JSON.

    ``peak_mb`` is the process's high-water mark over the whole step (the trainer's
    ``peak_memory_mb``); ``estimate_mb`` is what the train stage predicts before building,
    from the counts and the config alone, added to the process's resident memory before the
    inputs existed (as the stage adds it to its own).
    """
    import numpy as np
    import scipy.sparse as sp
    import torch

    from sand.models.registry import build_model, required_modalities
    from sand.pipeline.training.memory_estimate import estimate_training_memory

    torch.manual_seed(0)
    n_users, n_items, n_edges, d_image, d_text = PRESETS[size]
    dims = {"image": d_image, "text": d_text} if required_modalities(model_name) else {}
    warm = torch.nn.Linear(8, 8)  # torch's one-off allocations (thread pools, kernels) before the baseline
    torch.optim.Adam(warm.parameters()).step(warm(torch.ones(2, 8)).sum().backward())
    base = _rss_mb()
    edges, feats, graphs = _synthetic_inputs(n_users, n_items, n_edges, dims)
    estimate = estimate_training_memory(model_name, n_users=n_users, n_items=n_items, n_train_edges=len(edges),
                                        feature_dims=dims, batch_size=batch, hyperparameters={"embedding_dim": dim})
    with open("/proc/self/clear_refs", "w") as fh:  # the kNN build's temporaries are no training memory
        fh.write("5")
    model = build_model(model_name, n_users=n_users, n_items=n_items, train_edges=torch.from_numpy(edges),
                        features=feats, item_graphs=graphs, embedding_dim=dim)
    csr = sp.csr_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n_users, n_items))
    times = time_batches(model, edges, csr, n_items, batches, batch)
    model.eval()
    with torch.no_grad():  # one block of the full-ranking evaluation the trainer runs every epoch
        user_emb, item_emb = model.embeddings()
        torch.topk(user_emb[:4096] @ item_emb.T, 50, dim=1)
    print(json.dumps({"peak_mb": _rss_mb(), "base_mb": base, "estimate_mb": base + estimate.total / 2**20,
                      "model_estimate_mb": estimate.total / 2**20, "s_per_batch": float(np.median(times[1:] or times)),
                      "edges": int(len(edges))}))


def main() -> None:
    from sand.models.registry import model_names

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    ap.add_argument("--models", nargs="+", default=list(model_names()))
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--embedding-dim", type=int, default=EMB)
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args.worker[0], args.worker[1], args.batches, args.batch_size, args.embedding_dim)
        return
    print(f"{'model':>12} {'size':>6} {'users':>6} {'items':>6} {'edges':>7} {'base MB':>8} {'est MB':>8} "
          f"{'peak MB':>8} {'est/peak':>8} {'est +MB':>8} {'peak +MB':>8} {'ratio +':>7} {'s/batch':>8}")
    for model in args.models:
        for size in args.sizes:
            n_users, n_items = PRESETS[size][:2]
            out = subprocess.run([sys.executable, __file__, "--worker", model, size,
                                  "--batches", str(args.batches), "--batch-size", str(args.batch_size),
                                  "--embedding-dim", str(args.embedding_dim)],
                                 check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            grown = r["peak_mb"] - r["base_mb"]
            print(f"{model:>12} {size:>6} {n_users:>6} {n_items:>6} {r['edges']:>7} {r['base_mb']:>8.0f} "
                  f"{r['estimate_mb']:>8.0f} {r['peak_mb']:>8.0f} {r['estimate_mb'] / r['peak_mb']:>8.2f} "
                  f"{r['model_estimate_mb']:>8.0f} {grown:>8.0f} {r['model_estimate_mb'] / grown:>7.2f} "
                  f"{r['s_per_batch']:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
