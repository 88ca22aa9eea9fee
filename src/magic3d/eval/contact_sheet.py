"""The contact sheet of a run: the ground truth, then each stage's renders with the
classifier's caption beneath each, the same view in every column."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from magic3d.eval.scene import StageResult


def _row_summary(result: StageResult) -> str:
    m = result.metrics
    parts = [f"{label} {m[key]:.2f}" for key, label in (("r_precision", "R-prec"), ("silhouette_iou", "IoU"),
                                                        ("chamfer", "Chamfer")) if m.get(key) is not None]
    return f" ({', '.join(parts)})" if parts else ""


def save_contact_sheet(results: list[StageResult], path: Path) -> Path:
    """One column per view: the ground truth of each prompt once, then each stage's renders
    with the predicted caption beneath (green = the prompt's), so stages of a run line up
    view by view (fine under coarse)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: list[tuple[str, StageResult, Tensor, bool]] = []
    gt_shown: set[str] = set()
    for r in results:
        if r.ground_truth is not None and r.prompt not in gt_shown:
            gt_shown.add(r.prompt)
            rows.append((f"ground truth: {r.prompt}", r, r.ground_truth, False))
        if r.renders is not None:
            rows.append((f"{r.stage}: {r.prompt}{_row_summary(r)}", r, r.renders, True))
    n_cols = max((row[2].shape[0] for row in rows), default=1)
    n_rows = max(len(rows), 1)
    # Large enough to see a 512² render's detail (up to 256 px a view at 110 dpi), small at 64-128 px.
    size = max((row[2].shape[1] for row in rows), default=64)
    cell = max(1.3, min(size, 256) / 110)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(cell * n_cols, (cell + 0.35) * n_rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (title, result, images, predicted) in enumerate(rows):
        axes[i, 0].set_title(title, loc="left", fontsize=8)
        for j in range(images.shape[0]):
            ax = axes[i, j]
            ax.imshow(images[j].clamp(0, 1).numpy())
            if predicted:
                view = result.views[j]
                colour = "black" if view.caption_hit is None else ("green" if view.caption_hit else "red")
                label = f"{view.predicted_caption.split(' ', 1)[1]}\n{view.predicted_view} (az {view.azimuth_deg:.0f}°)"
                ax.text(0.5, -0.04, label, transform=ax.transAxes, ha="center", va="top", fontsize=5.5, color=colour)
            else:
                ax.text(0.5, -0.04, f"az {result.views[j].azimuth_deg:.0f}°", transform=ax.transAxes,
                        ha="center", va="top", fontsize=5.5)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
