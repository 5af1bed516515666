"""The report's PNG figures: training curves, sensitivity (Figure 4), ablation (Figure 3) and Figures 5-6.

Why matplotlib's ``Figure`` API, not ``pyplot``: no global state or backend switch, so a notebook, a Prefect worker
thread or a test renders the same Agg PNGs without touching the user's interactive backend. Figures 5-6 show SAND's
generic and unique parts, split as ``model.separation.split`` does, by t-SNE and Gaussian KDEs ("uniformity")."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from threadpoolctl import threadpool_limits

from sand.pipeline.base.errors import StageError
from sand.pipeline.base.files import atomic_path

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 120
METRIC_LABELS = {"recall@10": "Recall@10", "recall@20": "Recall@20", "ndcg@10": "NDCG@10", "ndcg@20": "NDCG@20"}
PARAM_LABELS = {"train.alpha": "alpha (alignment weight)", "train.beta": "beta (distancing weight)",
                "train.tau": "tau (temperature)"}
REPRESENTATIONS = (("image", "generic"), ("text", "generic"), ("image", "unique"), ("text", "unique"))


def _figure(nrows: int, ncols: int, width: float, height: float) -> tuple[Figure, np.ndarray]:
    from matplotlib.figure import Figure  # lazy: only the figures need matplotlib
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False))


def _save(fig: Figure, path: Path, title: str) -> Path:
    fig.suptitle(title)
    with atomic_path(path, suffix=path.suffix) as tmp:  # the suffix tells matplotlib the format
        fig.savefig(tmp, dpi=DPI)
    return path


def plot_training_curves(curves: Mapping[str, pd.DataFrame], path: Path, *, title: str,
                         metric: str = "recall@20") -> Path:
    """Validation ``metric`` (left; epochs without an evaluation skipped) and mean training loss (right) per epoch."""
    from matplotlib.ticker import MaxNLocator  # lazy: only the figures need matplotlib
    fig, axes = _figure(1, 2, 12, 4.5)
    ax_m, ax_l = axes[0]
    column = f"valid_{metric}"
    for label, frame in curves.items():
        if column in frame:
            evaluated = frame[["epoch", column]].dropna()
            ax_m.plot(evaluated["epoch"], evaluated[column], marker="." if len(evaluated) < 30 else None, label=label)
        if "loss" in frame:
            ax_l.plot(frame["epoch"], frame["loss"], label=label)
    ylabel = METRIC_LABELS.get(metric, metric)
    ax_m.set(title=f"Validation {ylabel}", xlabel="epoch", ylabel=ylabel)
    ax_l.set(title="Training loss (mean over batches)", xlabel="epoch", ylabel="loss")
    for ax in (ax_m, ax_l):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    return _save(fig, path, title)


def plot_sensitivity(series: Mapping[str, Mapping[str, pd.DataFrame]], path: Path, *,
                     metrics: Sequence[str] = ("recall@20", "ndcg@20"),
                     reference: Mapping[str, float] | None = None) -> Path:
    """Per (hyper-parameter, metric) a panel: test (solid) and validation (dashed) vs value, ``reference`` dotted.
    ``series``: dotted parameter -> dataset -> frame of ``value``, ``valid_*``, ``test_*``, sorted."""
    params = list(series)
    fig, axes = _figure(len(params), len(metrics), 5.5 * len(metrics), 3.8 * len(params))
    for r, param in enumerate(params):
        for c, metric in enumerate(metrics):
            ax: Axes = axes[r, c]
            for k, (dataset, frame) in enumerate(series[param].items()):
                for split, style, alpha in (("test", "-o", None), ("valid", "--x", 0.7)):
                    if f"{split}_{metric}" in frame:
                        ax.plot(frame["value"], frame[f"{split}_{metric}"], style, color=f"C{k}", alpha=alpha,
                                label=f"{dataset} {split}")
            values = np.concatenate([f["value"].to_numpy(float) for f in series[param].values()])
            if len(values) and values.min() > 0 and values.max() / values.min() >= 20:
                ax.set_xscale("log")
            if reference and param in reference:
                ax.axvline(reference[param], color="grey", linestyle=":", label="paper's value")
            label = METRIC_LABELS.get(metric, metric)
            ax.set(title=f"{label} vs {param.split('.')[-1]}", xlabel=PARAM_LABELS.get(param, param), ylabel=label)
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
    return _save(fig, path, "Hyper-parameter sensitivity (Figure 4)")


def plot_ablation(results: Mapping[str, Mapping[str, Mapping[str, float]]], path: Path, *,
                  metrics: Sequence[str] = ("recall@20", "ndcg@20")) -> Path:
    """Per dataset one panel per metric, one bar per variant (test values); ``results``: dataset -> label -> metrics."""
    datasets = list(results)
    fig, axes = _figure(len(datasets), len(metrics), 5.0 * len(metrics), 3.8 * len(datasets))
    for r, dataset in enumerate(datasets):
        labels = list(results[dataset])
        for c, metric in enumerate(metrics):
            ax: Axes = axes[r, c]
            values = [results[dataset][label].get(metric, math.nan) for label in labels]
            bars = ax.bar(range(len(labels)), values, color=[f"C{i}" for i in range(len(labels))])
            ax.bar_label(bars, fmt="%.4f", fontsize="x-small")
            ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize="small")
            finite = [v for v in values if math.isfinite(v)]
            if finite:  # zoom in like the paper: differences are a few percent
                lo, hi = min(finite), max(finite)
                pad = max((hi - lo) * 0.5, hi * 0.02, 1e-6)
                ax.set_ylim(max(0.0, lo - pad), hi + pad)
            label = METRIC_LABELS.get(metric, metric)
            ax.set(title=f"{dataset}: test {label}", ylabel=label)
            ax.grid(axis="y", alpha=0.3)
    return _save(fig, path, "Ablation of alignment and distancing (Figure 3)")


def modal_parts(model: Any) -> dict[str, tuple[Any, Any]]:
    """modality -> (generic, unique) blocks over ALL items: the model's own ``modal_parts()`` (the plug-ins'), else
    SAND's ``Z_m`` split by ``model.separation.split``, as its losses see it."""
    if hasattr(model, "modal_parts"):
        return dict(model.modal_parts())
    if hasattr(model, "modal_inputs") and hasattr(model, "separation"):
        z = model.modal_inputs()
        return {m: tuple(model.separation.split(m, z[m])) for m in z}
    raise StageError(f"model {type(model).__name__} has no generic/unique split (a SAND model is needed)")


def modal_representations(model: Any, items: np.ndarray) -> dict[tuple[str, str], np.ndarray]:
    """(modality, part) -> rows of ``items`` in eval mode; a LinearView is sliced first, so only those are computed."""
    import torch  # lazy: torch takes seconds to import
    index = torch.as_tensor(np.asarray(items, dtype=np.int64))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out: dict[tuple[str, str], np.ndarray] = {}
            for modality, blocks in modal_parts(model).items():
                for part, block in zip(("generic", "unique"), blocks, strict=True):
                    rows = block.rows(index).dense() if hasattr(block, "dense") else block[index]
                    out[(modality, part)] = rows.detach().cpu().double().numpy()
    finally:
        model.train(was_training)
    return out


def tsne_2d(x: np.ndarray, seed: int) -> np.ndarray:
    """Seeded 2-D t-SNE (Barnes-Hut, PCA init; perplexity capped for small samples)."""
    from sklearn.manifold import TSNE  # lazy: seconds to import, only for the figures
    n = x.shape[0]
    if n < 5:
        raise StageError(f"t-SNE needs at least 5 items, got {n}")
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3.0)))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, learning_rate="auto")
    # One OpenMP thread: Barnes-Hut on a few hundred points gains nothing, and spinning threads crawl on a busy machine.
    with threadpool_limits(limits=1, user_api="openmp"):
        return tsne.fit_transform(np.asarray(x, dtype=np.float64))


def _kde(points: np.ndarray):
    """scipy's Gaussian KDE, or None when the sample is degenerate (all points on a line)."""
    from scipy.stats import gaussian_kde  # lazy: seconds to import, only for the figures
    try:
        return gaussian_kde(points)
    except (np.linalg.LinAlgError, ValueError):
        return None


def _title(key: tuple[str, str]) -> str:
    return f"{key[0]} modal-{key[1]}"  # (modality, part)


def plot_tsne_density(points: Mapping[tuple[str, str], np.ndarray], path: Path, *, title: str) -> Path:
    """Figure 5: t-SNE points of each representation set, coloured by their Gaussian KDE density."""
    keys = [k for k in REPRESENTATIONS if k in points]
    fig, axes = _figure(1, len(keys), 4.2 * len(keys), 4.4)
    for ax, key in zip(axes[0], keys, strict=True):
        pts = points[key]
        kde = _kde(pts.T)
        density = kde(pts.T) if kde is not None else np.ones(len(pts))
        order = np.argsort(density)
        sc = ax.scatter(pts[order, 0], pts[order, 1], c=density[order], s=8, cmap="viridis")
        if kde is not None:
            lo, hi = pts.min(0), pts.max(0)
            gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 80), np.linspace(lo[1], hi[1], 80))
            gz = kde(np.vstack([gx.ravel(), gy.ravel()])).reshape(gx.shape)
            ax.contour(gx, gy, gz, levels=6, colors="k", linewidths=0.5, alpha=0.6)
        fig.colorbar(sc, ax=ax, shrink=0.8, label="KDE density")
        ax.set(title=_title(key), xlabel="t-SNE 1", ylabel="t-SNE 2")
        ax.set_aspect("equal", adjustable="datalim")
    return _save(fig, path, title)


def circle_points(points: np.ndarray) -> np.ndarray:
    """Rows L2-normalised onto the unit circle (a zero row stays at the origin)."""
    norms = np.linalg.norm(points, axis=1, keepdims=True)
    return np.divide(points, norms, out=np.zeros_like(points, dtype=float), where=norms > 0)


def angle_density(angles: np.ndarray, grid: np.ndarray) -> np.ndarray | None:
    """Wrapped Gaussian KDE of angles: kernels repeated at +-2 pi (periodic), Scott's bandwidth on the angles."""
    kde = _kde(np.asarray(angles, dtype=float)[None, :])
    return None if kde is None else sum(kde(grid[None, :] + shift) for shift in (-2 * np.pi, 0.0, 2 * np.pi))


def plot_circle_density(points: Mapping[tuple[str, str], np.ndarray], path: Path, *, title: str) -> Path:
    """Figure 6: KDE of the centred, L2-normalised t-SNE points on the unit circle and of their angles."""
    keys = [k for k in REPRESENTATIONS if k in points]
    fig, axes = _figure(2, len(keys), 4.0 * len(keys), 7.6)
    theta = np.linspace(-np.pi, np.pi, 361)
    for c, key in enumerate(keys):
        # centred first: t-SNE output has an arbitrary offset, and the angles are meant around the cloud's centre
        unit = circle_points(points[key] - points[key].mean(axis=0))
        ax: Axes = axes[0, c]
        kde = _kde(unit.T)
        if kde is not None:
            g = np.linspace(-1.25, 1.25, 120)
            gx, gy = np.meshgrid(g, g)
            gz = kde(np.vstack([gx.ravel(), gy.ravel()])).reshape(gx.shape)
            mesh = ax.pcolormesh(gx, gy, gz, cmap="GnBu", shading="auto")
            fig.colorbar(mesh, ax=ax, shrink=0.8, label="KDE density")
        ax.plot(np.cos(theta), np.sin(theta), color="grey", linewidth=0.6)
        ax.scatter(unit[:, 0], unit[:, 1], s=3, color="k", alpha=0.4)
        ax.set(title=_title(key), xlabel="x", ylabel="y", xlim=(-1.25, 1.25), ylim=(-1.25, 1.25))
        ax.set_aspect("equal")
        ax_a: Axes = axes[1, c]
        angles = np.arctan2(unit[:, 1], unit[:, 0])
        ax_a.hist(angles, bins=36, range=(-np.pi, np.pi), density=True, color="C0", alpha=0.35, label="histogram")
        dens = angle_density(angles, theta)
        if dens is not None:
            ax_a.plot(theta, dens, color="C0", label="KDE")
        ax_a.axhline(1 / (2 * np.pi), color="grey", linestyle=":", label="uniform")
        ax_a.set(title=f"{_title(key)}: angles", xlabel="angle arctan2(y, x) (rad)", ylabel="density",
                 xlim=(-np.pi, np.pi))
        ax_a.legend(fontsize="x-small")
    return _save(fig, path, title)
