"""Speed of SAND training on Baby-sized random inputs: fp32 vs bf16, fast (folded) vs naive.

Inputs (seeded, generated here): 19,445 users, 7,050 items, 160,792 distinct random
interactions (75% train), 4096-d image and 384-d text random features, item-item
kNN graphs (k = 10, item itself included, values 1/k) built blockwise with
``torch.topk`` (this script does not use ``pipeline/features/knn.py`` on purpose: it measures
the model only).

Models (``--models``): SAND_a and SAND_b (modes: naive = the literal reference in
float32, fp32 = ours, bf16 = ours with ``train.precision=bf16``), VBPR+SAND (variant a)
and FREEDOM (modes fp32, bf16). An epoch = batches of 2048 (user, positive, uniform
negative not in the user's training items) over the training edges, fused Adam
lr 1e-4, CLUB steps included for MI variants. Seconds per epoch = median seconds per
batch times the number of batches in an epoch.

The ratios come from an interleaved subprocess per model: all its modes in one process,
timed batch by batch in alternation on the same batches, so a slow spell of a shared
machine hits every mode instead of whichever ran during it (``--rounds`` such
subprocesses, ratios of the medians; each is conservative for the faster mode, whose
caches the slower one evicts). The same subprocess then profiles one batch per mode
(torch.profiler) into the per-batch breakdown: folded reads of the raw features
(forward and backward), sparse graph products, SoloSim, CLUB fit, optimiser step, and
the rest (small layers, elementwise ops, autograd). Profiling adds overhead: read the
breakdown as shares. ``--separate`` also runs every mode alone in its own subprocess
for its peak RSS. A check subprocess compares, per SAND variant, the loss terms of the
fast and naive models (1e-4) and of the bf16 and fp32 ones on the same weights.

Children run with ``OMP_WAIT_POLICY=PASSIVE`` and ``THP_MEM_ALLOC_ENABLE=1``, the
settings the ``sand`` command applies (:mod:`sand.pipeline.base.torch_env`).

Usage: ``python benchmarks/bench_sand_speed.py [--batches 5] [--rounds 1] [--models sand-a sand-b vbpr-sand freedom]``
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

from naive_sand import NaiveSAND  # noqa: E402  (benchmarks/naive_sand.py, beside this script)

from sand.models.club_fit import CLUB_FIT  # noqa: E402
from sand.models.graph import GRAPH_PRODUCTS  # noqa: E402
from sand.models.losses import SOLOSIM  # noqa: E402
from sand.models.precision import set_precision  # noqa: E402
from sand.models.registry import build_model  # noqa: E402
from sand.models.sand import SAND  # noqa: E402
from sand.models.separation import FOLDED_READS  # noqa: E402
from sand.pipeline.base.hardware import cpu_bf16_support  # noqa: E402
from sand.pipeline.base.torch_env import apply_torch_env_defaults  # noqa: E402

N_USERS, N_ITEMS, N_INTER = 19_445, 7_050, 160_792
D_IMAGE, D_TEXT, KNN_K, BATCH = 4096, 384, 10, 2048


def make_edges(seed: int, n_users: int = N_USERS, n_items: int = N_ITEMS, n_inter: int = N_INTER):
    """(train (E, 2), all (n_inter, 2)): distinct random (user, item) pairs, the first 75% train."""
    rng = np.random.default_rng(seed)
    keys = np.unique(rng.integers(0, n_users * n_items, size=int(n_inter * 1.2)))
    keys = rng.permutation(keys)[:n_inter]
    edges = np.stack([keys // n_items, keys % n_items], 1).astype(np.int64)
    n_train = int(0.75 * n_inter)
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


def make_inputs(
    seed: int,
    n_users: int = N_USERS,
    n_items: int = N_ITEMS,
    n_inter: int = N_INTER,
    d_image: int = D_IMAGE,
    d_text: int = D_TEXT,
) -> dict:
    """Baby-sized (by default) random interactions, features and kNN graphs; ``all`` holds every edge."""
    train, edges = make_edges(seed, n_users, n_items, n_inter)
    g = torch.Generator().manual_seed(seed)
    features = {"image": torch.rand(n_items, d_image, generator=g), "text": torch.randn(n_items, d_text, generator=g)}
    graphs = {m: knn_graph(f) for m, f in features.items()}
    return {"train": train, "all": edges, "features": features, "graphs": graphs}


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


#: benchmark name -> (registry model, variant); modes each model is timed in.
MODELS = {
    "sand-a": ("sand", "a"),
    "sand-b": ("sand", "b"),
    "vbpr-sand": ("vbpr-sand", "a"),
    "freedom": ("freedom", "a"),
}
SAND_MODES, OTHER_MODES = ("naive", "fp32", "bf16"), ("fp32", "bf16")
#: profiler labels (models/*.py) -> breakdown column
PHASES = {
    FOLDED_READS: "folded reads",
    GRAPH_PRODUCTS: "graph products",
    SOLOSIM: "SoloSim",
    CLUB_FIT: "CLUB fit",
    "Optimizer.step#Adam.step": "optimizer",
}


def modes(model: str) -> tuple[str, ...]:
    return SAND_MODES if MODELS[model][0] == "sand" else OTHER_MODES


def build(inputs: dict, model: str, mode: str, seed: int = 0) -> torch.nn.Module:
    """The model in ``mode`` (naive | fp32 | bf16), same initial weights for every mode."""
    name, variant = MODELS[model]
    torch.manual_seed(seed)
    kwargs = dict(
        n_users=N_USERS,
        n_items=N_ITEMS,
        train_edges=torch.from_numpy(inputs["train"]),
        features=inputs["features"],
        item_graphs=inputs["graphs"],
    )
    if name == "sand":
        m = (NaiveSAND if mode == "naive" else SAND)(**kwargs, variant=variant)
    else:
        m = build_model(name, **kwargs)
    set_precision(m, "bf16" if mode == "bf16" else "fp32")
    m.on_epoch_start(1, torch.Generator().manual_seed(seed))  # FREEDOM's pruned graph
    m.train()
    return m


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch) -> dict[str, float]:
    model.auxiliary_step(*batch)
    opt.zero_grad(set_to_none=True)
    terms = model.loss_terms(*batch)
    total = sum(terms.values())
    total.backward()
    opt.step()
    return {k: float(v.detach()) for k, v in terms.items()}


def optimiser(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)


def run_one(model_name: str, mode: str, n_batches: int, seed: int) -> dict:
    """One mode alone in this process: seconds per epoch and its peak RSS."""
    inputs = make_inputs(seed)
    model = build(inputs, model_name, mode)
    opt = optimiser(model)
    n_epoch_batches = math.ceil(len(inputs["train"]) / BATCH)
    it = batches(inputs["train"], seed)
    train_step(model, opt, next(it))  # warm-up (allocator, thread pool)
    times, cpu, last = [], [], {}
    for _ in range(n_batches):
        batch = next(it)
        t0, c0 = time.perf_counter(), time.process_time()
        last = train_step(model, opt, batch)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {
        "epoch_s": statistics.median(times) * n_epoch_batches,
        "epoch_cpu_s": statistics.median(cpu) * n_epoch_batches,
        "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "finite": all(math.isfinite(v) for v in last.values()),
    }


def run_check(variant: str, seed: int) -> dict:
    """SAND fast vs naive, and bf16 vs fp32, with the same parameters: every loss term on one batch.

    MI variants first fit their CLUB estimators on that batch (fast: closed form + flat
    Adam; naive: autograd + ``torch.optim.Adam``), which are compared; then the fast
    model's parameters are copied, so the loss terms are compared on equal weights
    (with a fitted estimator the MI bound is not clamped at 0).
    """
    inputs = make_inputs(seed)
    model = f"sand-{variant}"
    fast, naive, low = (build(inputs, model, mode) for mode in ("fp32", "naive", "bf16"))
    naive.load_state_dict(fast.state_dict())
    batch = next(batches(inputs["train"], seed))
    fit = {name: m.auxiliary_step(*batch) for name, m in (("fast", fast), ("naive", naive))}
    club_ll_diff = max((abs(fit["fast"][k] - fit["naive"][k]) for k in fit["fast"]), default=0.0)
    club_param_diff = max(
        (
            float((p - q).abs().max())
            for p, q in zip(fast.separation.club.parameters(), naive.separation.club.parameters(), strict=True)
        ),
        default=0.0,
    )
    for other in (naive, low):
        other.load_state_dict(fast.state_dict())
    out = {}
    for name, m in (("fast", fast), ("naive", naive), ("bf16", low)):
        torch.manual_seed(1)
        terms = m.loss_terms(*batch)
        sum(terms.values()).backward()
        out[name] = ({k: float(v) for k, v in terms.items()}, m.transforms["image"].weight.grad)
    ref_terms, ref_grad = out["fast"]

    def compare(name: str) -> tuple[float, float]:
        terms, grad = out[name]
        diff = max(abs(terms[k] - ref_terms[k]) / max(abs(ref_terms[k]), 1e-12) for k in ref_terms)
        return diff, float((grad - ref_grad).norm() / ref_grad.norm().clamp_min(1e-30))

    naive_abs = max(abs(out["naive"][0][k] - ref_terms[k]) for k in ref_terms)
    return {
        "variant": variant,
        "terms": ref_terms,
        "max_abs_diff": naive_abs,
        "grad_rel_diff_L_image": compare("naive")[1],
        "bf16_max_rel_term_diff": compare("bf16")[0],
        "bf16_grad_rel_diff_L_image": compare("bf16")[1],
        "club_fit": fit["fast"],
        "club_ll_diff": club_ll_diff,
        "club_param_diff": club_param_diff,
    }


def profile_batch(model: torch.nn.Module, opt: torch.optim.Optimizer, batch) -> dict[str, float]:
    """Milliseconds of one profiled batch per phase (:data:`PHASES`), the rest and the total."""
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_step(model, opt, batch)
    total = (time.perf_counter() - t0) * 1e3
    events = {e.key: e.cpu_time_total / 1e3 for e in prof.key_averages()}
    out = {column: events.get(label, 0.0) for label, column in PHASES.items()}
    out["other"] = max(0.0, total - sum(out.values()))
    out["total"] = total
    return out


def run_pair(model_name: str, n_batches: int, seed: int) -> dict:
    """Every mode of ``model_name`` in one process, timed on alternating batches; then profiled."""
    inputs = make_inputs(seed)
    models = {mode: build(inputs, model_name, mode) for mode in modes(model_name)}
    opts = {mode: optimiser(m) for mode, m in models.items()}
    n_epoch_batches = math.ceil(len(inputs["train"]) / BATCH)
    it = batches(inputs["train"], seed)
    warm = next(it)
    for mode, model in models.items():
        train_step(model, opts[mode], warm)
    times: dict[str, list[float]] = {mode: [] for mode in models}
    for _ in range(n_batches):
        batch = next(it)
        for mode, model in models.items():
            t0 = time.perf_counter()
            train_step(model, opts[mode], batch)
            times[mode].append(time.perf_counter() - t0)
    batch = next(it)
    return {
        mode: {
            "epoch_s": statistics.median(times[mode]) * n_epoch_batches,
            "batch_s": times[mode],
            "breakdown": profile_batch(models[mode], opts[mode], batch),
        }
        for mode in models
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=5, help="timed batches per mode")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved subprocesses per model (median)")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--separate", action="store_true", help="also time every mode alone (peak RSS)")
    ap.add_argument("--no-check", action="store_true", help="skip the fast/naive/bf16 equality check")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:  # child process: one configuration, JSON on the last line
        kind, model, mode = args.one.split(":")
        if kind == "check":
            res = run_check(model, args.seed)
        elif kind == "pair":
            res = run_pair(model, args.batches, args.seed)
        else:
            res = run_one(model, mode, args.batches, args.seed)
        print(json.dumps(res))
        return

    def child(spec: str) -> dict:
        cmd = [sys.executable, __file__, "--one", spec, "--batches", str(args.batches), "--seed", str(args.seed),
               "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"{spec} failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    # The settings the sand command applies: idle OpenMP threads sleep (spinning made the
    # CLUB fit's small ops 10-20x slower here) and big tensors use huge pages.
    env = dict(os.environ)
    apply_torch_env_defaults(env)
    print(f"OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}, THP_MEM_ALLOC_ENABLE={env['THP_MEM_ALLOC_ENABLE']}; "
          f"load average {os.getloadavg()[0]:.1f} at start")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, bf16 native: {cpu_bf16_support()}; "
        f"{N_USERS} users, {N_ITEMS} items, {N_INTER} interactions (75% train), batch {BATCH}"
    )
    for v in sorted({MODELS[m][1] for m in args.models if MODELS[m][0] == "sand"}) if not args.no_check else []:
        check = child(f"check:{v}:-")
        print(
            f"SAND_{v} fast vs naive, same parameters, same batch: max |loss diff| = {check['max_abs_diff']:.2e} "
            f"(terms {check['terms']}); rel. grad diff of L_image = {check['grad_rel_diff_L_image']:.2e}; "
            f"bf16 vs fp32: max rel. loss-term diff = {check['bf16_max_rel_term_diff']:.2e}, "
            f"rel. grad diff of L_image = {check['bf16_grad_rel_diff_L_image']:.2e}"
        )
        if check["club_fit"]:
            print(
                f"SAND_{v} CLUB fit ({check['club_fit']}), fast vs naive: max |log-likelihood diff| = "
                f"{check['club_ll_diff']:.2e}, max |estimator parameter diff| = {check['club_param_diff']:.2e}"
            )
    pairs = {m: [child(f"pair:{m}:-") for _ in range(max(1, args.rounds))] for m in args.models}
    per_epoch = math.ceil(int(0.75 * N_INTER) / BATCH)
    print(f"\nInterleaved (all modes of a model in one process, alternating batches): median of "
          f"{args.batches} batches x {per_epoch} batches per epoch; median over {max(1, args.rounds)} process(es).")
    print("| model | mode | s/epoch | bf16 speed-up vs fp32 | speed-up vs naive |")
    print("|---|---|---|---|---|")
    for m, runs in pairs.items():
        med = {mode: statistics.median(r[mode]["epoch_s"] for r in runs) for mode in modes(m)}
        for mode in modes(m):
            vs_fp32 = f"{med['fp32'] / med[mode]:.2f}x" if mode == "bf16" else ""
            vs_naive = f"{med['naive'] / med[mode]:.1f}x" if "naive" in med and mode != "naive" else ""
            print(f"| {m} | {mode} | {med[mode]:.1f} | {vs_fp32} | {vs_naive} |")
    print("\nPer-batch breakdown (ms, one profiled batch per mode, first process):")
    cols = [*PHASES.values(), "other", "total"]
    print("| model | mode | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for m, runs in pairs.items():
        for mode in modes(m):
            b = runs[0][mode]["breakdown"]
            print(f"| {m} | {mode} | " + " | ".join(f"{b[c]:.0f}" for c in cols) + " |")
    if args.separate:
        print("\nSeparate runs (one process per mode):")
        print("| model | mode | s/epoch | CPU s/epoch | peak RSS (GB) | finite |")
        print("|---|---|---|---|---|---|")
        for m in args.models:
            for mode in modes(m):
                r = child(f"run:{m}:{mode}")
                print(f"| {m} | {mode} | {r['epoch_s']:.1f} | {r['epoch_cpu_s']:.1f} | {r['rss_gb']:.2f} | "
                      f"{r['finite']} |")


if __name__ == "__main__":
    main()
