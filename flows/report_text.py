"""Human-readable rendering of a run summary (the non-``--json`` output)."""

from __future__ import annotations

from typing import Any


def render_summary(summary: dict[str, Any]) -> str:
    lines = []
    if "dataset" in summary:
        d = summary["dataset"]
        lines.append(f"dataset: {d.get('users')} users, {d.get('items')} items, {d.get('interactions')} interactions")
    lines.append(f"{'stage':<16}{'cached':<8}{'seconds':>9}  artifact")
    for stage, info in summary.get("stages", {}).items():
        lines.append(f"{stage:<16}{str(info['cached']):<8}{info['seconds']:>9.1f}  {info['artifact']}")
    train = summary.get("train") or {}
    if train.get("model"):
        lines.append(
            f"train: {train['model']} in {train.get('precision', 'fp32')}, "
            f"{float(train.get('seconds_per_epoch') or float('nan')):.1f} s/epoch, best epoch {train.get('best_epoch')}"
        )
    if "metrics" in summary:
        for split, values in summary["metrics"].items():
            shown = "  ".join(f"{k}={float(v):.4f}" for k, v in values.items())
            lines.append(f"{split:<6} {shown}")
    if "export" in summary:
        lines.append(f"exported to {summary['export']['out']}: {', '.join(summary['export']['files'])}")
    return "\n".join(lines)
