"""GPU check: SAND_a and SAND_b on Baby-sized generated inputs, fp32 and bf16, on CUDA, in < 5 minutes.

What it runs (nothing is installed; only this project and its dependencies):
- a one-batch check that the CUDA model computes what the CPU model computes (every
  loss term of SAND_a and SAND_b, fp32, same weights, same batch);
- for SAND_a and SAND_b, in fp32 and in bf16: 3 training epochs through the product's
  own trainer (``sand.pipeline.training.trainer.train_model``: model placement, CSR graph products,
  the CLUB fit, fused Adam, SoloSim, all on the device) and one full evaluation
  (valid Recall/NDCG@10/20 with the evaluator's top-k on the device) after epoch 3;
- a table of seconds per epoch, evaluation seconds and peak GPU memory next to the
  paper's Table 5 (SAND_b 3.75 s/epoch and 2.54 GB, SAND_a 16.04 s/epoch and 3.42 GB,
  on the authors' GPU).

It fails loudly (exit status 2, one line on stderr) when CUDA is absent, and exits 1
when any check fails (non-finite loss, CUDA/CPU mismatch, bf16 run far from fp32).

``--device cpu --small`` is a dry mode for machines without a GPU: the same code path on
small inputs, so the script's own logic is tested (tests/benchmarks/test_gpu_check.py).

Usage: ``python benchmarks/gpu_check.py`` (on a CUDA machine); ``--epochs``, ``--variants``.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sand_speed import batches, make_inputs  # noqa: E402

from sand.models.registry import build_model  # noqa: E402
from sand.pipeline.dataset.split_data import SplitData  # noqa: E402
from sand.pipeline.training.trainer import train_model  # noqa: E402

#: Table 5 of the paper (Baby, the authors' GPU): variant -> (s/epoch, GB).
PAPER_TABLE5 = {"a": (16.04, 3.42), "b": (3.75, 2.54)}
#: Dry-mode sizes: users, items, interactions, image width, text width.
SMALL = (300, 200, 3_000, 128, 32)


def split_data(inputs: dict, n_users: int, n_items: int) -> SplitData:
    """75% train (the generator's first edges), the rest halved into valid and test."""
    train, edges = inputs["train"], inputs["all"]
    rest = edges[len(train) :]
    return SplitData(n_users, n_items, train, rest[: len(rest) // 2], rest[len(rest) // 2 :])


def build(inputs: dict, variant: str, n_users: int, n_items: int):
    torch.manual_seed(0)
    return build_model(
        "sand", variant=variant, n_users=n_users, n_items=n_items, train_edges=torch.from_numpy(inputs["train"]),
        features=inputs["features"], item_graphs=inputs["graphs"],
    )


def device_matches_cpu(inputs: dict, variant: str, device: torch.device, n_users: int, n_items: int) -> float:
    """Largest relative difference of SAND's loss terms on ``device`` vs the CPU, same weights and batch."""
    batch = next(batches(inputs["train"], 0))
    terms = {}
    for dev in (torch.device("cpu"), device):
        model = build(inputs, variant, n_users, n_items).to(dev)
        model.train()
        torch.manual_seed(1)
        with torch.no_grad():
            out = model.loss_terms(*(t.to(dev) for t in batch))
        terms[dev.type] = {k: float(v) for k, v in out.items()}
    cpu, other = terms["cpu"], terms[device.type]
    return max(abs(other[k] - cpu[k]) / max(abs(cpu[k]), 1e-12) for k in cpu)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) | cuda:N | cpu (dry mode)")
    ap.add_argument("--small", action="store_true", help="small generated inputs (dry mode)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=["a", "b"], choices=["a", "b"])
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"error: CUDA is not available (torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
              "this check needs a CUDA GPU (or --device cpu --small for a dry run)", file=sys.stderr)
        return 2
    started = time.perf_counter()
    sizes = SMALL if args.small else None
    n_users, n_items = (sizes[0], sizes[1]) if sizes else (19_445, 7_050)
    inputs = make_inputs(0, *sizes) if sizes else make_inputs(0)
    data = split_data(inputs, n_users, n_items)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry mode)"
    print(f"device {device} ({name}); torch {torch.__version__}; {n_users} users, {n_items} items, "
          f"{len(data.train)} train edges; {args.epochs} epochs per run")
    failures: list[str] = []
    if device.type != "cpu":
        for v in args.variants:
            diff = device_matches_cpu(inputs, v, device, n_users, n_items)
            print(f"SAND_{v}: {device.type} vs CPU loss terms (fp32, same weights and batch): max rel. diff {diff:.1e}")
            if not diff < 1e-3:
                failures.append(f"SAND_{v} {device.type}/CPU loss terms differ by {diff:.1e}")
    rows = []
    for v in args.variants:
        for precision in ("fp32", "bf16"):
            model = build(inputs, v, n_users, n_items)
            with tempfile.TemporaryDirectory() as out:
                res = train_model(
                    model, data, out_dir=Path(out), epochs=args.epochs, batch_size=2048, lr=1e-4,
                    eval_every=args.epochs, device=device, precision=precision, progress=False, ks=(10, 20),
                )
            last = res.history[-1]
            rows.append((v, precision, res, float(last["eval_seconds"])))
            if res.precision != precision or not all(math.isfinite(h["loss"]) for h in res.history):
                losses = [h["loss"] for h in res.history]
                failures.append(f"SAND_{v} {precision}: ran in {res.precision}, losses {losses}")
    print()
    print("| model | precision | s/epoch | paper s/epoch | eval s (1 full evaluation) | peak memory (MB) | paper GB | "
          "loss epoch 1 -> last | valid R@20 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for v, precision, res, eval_s in rows:
        paper_s, paper_gb = PAPER_TABLE5[v]
        first, final = res.history[0]["loss"], res.history[-1]["loss"]
        print(f"| SAND_{v} | {precision} | {res.seconds_per_epoch:.2f} | {paper_s} | {eval_s:.2f} | "
              f"{res.peak_memory_mb:.0f} | {paper_gb} | {first:.4f} -> {final:.4f} | "
              f"{res.best_valid.get('recall@20', float('nan')):.4f} |")
    by = {(v, p): res for v, p, res, _ in rows}
    for v in args.variants:
        a, b = by[(v, "fp32")].history[-1]["loss"], by[(v, "bf16")].history[-1]["loss"]
        if not abs(a - b) <= 0.02 * abs(a) + 1e-3:
            failures.append(f"SAND_{v}: bf16 loss {b:.4f} vs fp32 {a:.4f} after {args.epochs} epochs")
        print(f"SAND_{v}: bf16 speed-up {by[(v, 'fp32')].seconds_per_epoch / by[(v, 'bf16')].seconds_per_epoch:.2f}x")
    print(f"peak memory is {'torch.cuda.max_memory_allocated' if device.type == 'cuda' else 'the process peak RSS'}; "
          f"total {time.perf_counter() - started:.0f} s")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
