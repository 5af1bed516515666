"""Quality of bf16 training: SAND_a fp32 vs bf16 from the same seeds, loss curves and Recall@20.

Two parts (either can be skipped):
- ``--sample-seeds N``: the bundled sample through the real stages (features and graphs
  once), then SAND_a trained for ``--sample-epochs`` epochs per seed in fp32 and in bf16;
  valid/test Recall@20 after exactly that many epochs (one evaluation, at the end) and
  the per-epoch loss curves side by side. Run-to-run noise = the spread of fp32 over
  the seeds; the target is bf16 within 2% relative of fp32, or within that noise.
- ``--baby-epochs E``: Baby-sized generated inputs (benchmarks/bench_sand_speed.py; random
  features, so Recall is near chance: this part shows that the loss curves coincide and
  the product's own ``seconds_per_epoch`` ratio, not a quality level), one seed.

Usage: ``python benchmarks/bench_precision_quality.py [--sample-seeds 3] [--sample-epochs 20] [--baby-epochs 2]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from sand.pipeline.base.torch_env import apply_torch_env_defaults

apply_torch_env_defaults()  # the sand command's torch settings, before torch is imported

import pandas as pd  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sand.pipeline.base.config import load_config  # noqa: E402
from sand.pipeline.runner import run_pipeline  # noqa: E402
from sand.pipeline.stages import Context  # noqa: E402

PRECISIONS = ("fp32", "bf16")


def seed_spread(values: list[float]) -> tuple[float, float]:
    """(mean, (max - min) / mean): the run-to-run noise over seeds that a difference is judged against."""
    mean = statistics.mean(values)
    return mean, (max(values) - min(values)) / mean


def sample_run(root: Path, seed: int, precision: str, epochs: int) -> dict:
    settings = [
        "train.model=sand", "train.variant=a", f"train.epochs={epochs}", f"train.eval_every={epochs}",
        "train.patience=1000", f"train.seed={seed}", f"train.precision={precision}", "train.device=cpu",
        "image_features.num_workers=0",
    ]
    cfg = load_config(None, {"data_root": str(root)}, settings)
    result = run_pipeline(Context.create(cfg, progress=False), until="train")
    art = result.artifact("train")
    res = art.manifest["result"]
    history = pd.read_csv(art.file("epochs.csv"))
    return {"valid": res["best_valid"]["recall@20"], "test": res["test_at_best"]["recall@20"],
            "loss": history["loss"].tolist(), "s_epoch": res["seconds_per_epoch"], "precision": res["precision"]}


def sample_part(root: Path, seeds: int, epochs: int) -> None:
    runs = {(s, p): sample_run(root, s, p, epochs) for s in range(seeds) for p in PRECISIONS}
    print(f"\n## Sample: SAND_a, {epochs} epochs, valid/test Recall@20 after epoch {epochs}")
    print("| seed | fp32 valid | bf16 valid | rel. diff | fp32 test | bf16 test | rel. diff | "
          "fp32 s/epoch | bf16 s/epoch |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s in range(seeds):
        a, b = runs[(s, "fp32")], runs[(s, "bf16")]
        assert b["precision"] == "bf16"
        print(f"| {s} | {a['valid']:.4f} | {b['valid']:.4f} | {(b['valid'] - a['valid']) / a['valid']:+.1%} | "
              f"{a['test']:.4f} | {b['test']:.4f} | {(b['test'] - a['test']) / a['test']:+.1%} | "
              f"{a['s_epoch']:.2f} | {b['s_epoch']:.2f} |")
    for split in ("valid", "test"):
        f = [runs[(s, "fp32")][split] for s in range(seeds)]
        b = [runs[(s, "bf16")][split] for s in range(seeds)]
        (mean_f, spread), mean_b = seed_spread(f), statistics.mean(b)
        print(f"{split}: fp32 mean {mean_f:.4f} (seed spread {spread:.1%} of the mean), "
              f"bf16 mean {mean_b:.4f} ({(mean_b - mean_f) / mean_f:+.1%})")
    print("\nPer-epoch training loss, seed 0 (fp32 | bf16):")
    print("| epoch | fp32 | bf16 | rel. diff |")
    print("|---|---|---|---|")
    for e, (a, b) in enumerate(zip(runs[(0, "fp32")]["loss"], runs[(0, "bf16")]["loss"], strict=True), start=1):
        print(f"| {e} | {a:.5f} | {b:.5f} | {(b - a) / a:+.2%} |")


def baby_part(epochs: int) -> None:
    from bench_sand_speed import N_ITEMS, N_USERS, make_inputs
    from gpu_check import build, split_data

    from sand.pipeline.training.trainer import train_model

    inputs = make_inputs(0)
    data = split_data(inputs, N_USERS, N_ITEMS)
    results = {}
    for precision in PRECISIONS:
        model = build(inputs, "a", N_USERS, N_ITEMS)
        with tempfile.TemporaryDirectory() as out:
            results[precision] = train_model(
                model, data, out_dir=Path(out), epochs=epochs, eval_every=epochs, lr=1e-4, device="cpu",
                precision=precision, progress=True, ks=(10, 20),
            )
        del model
    a, b = results["fp32"], results["bf16"]
    print(f"\n## Baby-sized generated inputs: SAND_a, {epochs} epochs, seed 0 (train_model, the product's trainer)")
    print("| epoch | fp32 loss | bf16 loss | fp32 s | bf16 s |")
    print("|---|---|---|---|---|")
    for ha, hb in zip(a.history, b.history, strict=True):
        print(f"| {int(ha['epoch'])} | {ha['loss']:.5f} | {hb['loss']:.5f} | "
              f"{ha['seconds']:.1f} | {hb['seconds']:.1f} |")
    print(f"seconds_per_epoch (product): fp32 {a.seconds_per_epoch:.1f}, bf16 {b.seconds_per_epoch:.1f} "
          f"-> {a.seconds_per_epoch / b.seconds_per_epoch:.2f}x; valid R@20 fp32 {a.best_valid['recall@20']:.4f}, "
          f"bf16 {b.best_valid['recall@20']:.4f}; test R@20 fp32 {a.test_at_best['recall@20']:.4f}, "
          f"bf16 {b.test_at_best['recall@20']:.4f} (random features: chance level)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sample-seeds", type=int, default=3)
    ap.add_argument("--sample-epochs", type=int, default=20)
    ap.add_argument("--baby-epochs", type=int, default=2)
    ap.add_argument("--data-root", type=Path, default=None, help="sample artifacts (default: a temporary folder)")
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} at start")
    if args.sample_seeds > 0:
        if args.data_root is not None:
            sample_part(args.data_root, args.sample_seeds, args.sample_epochs)
        else:
            with tempfile.TemporaryDirectory() as root:
                sample_part(Path(root), args.sample_seeds, args.sample_epochs)
    if args.baby_epochs > 0:
        baby_part(args.baby_epochs)


if __name__ == "__main__":
    main()
