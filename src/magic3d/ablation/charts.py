"""Bar charts of an ablation: one per metric (``charts/<metric>.png``), a bar per variant at its
mean with the bootstrap interval as error bar, the baseline hatched, ``n`` above each bar."""

from __future__ import annotations

from pathlib import Path

from magic3d.ablation.table import TITLES, AblationTable

UNIT_INTERVAL = {"r_precision", "colour_accuracy", "shape_accuracy", "view_accuracy", "janus_rate",
                 "silhouette_iou", "gt_r_precision"}  # rates and IoU: a fixed [0, 1] axis compares charts


def save_charts(table: AblationTable, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for quantity in table.present:
        rows = [r for r in table.final if r.means.get(quantity) is not None]
        if not rows:
            continue  # a stage-only metric
        if quantity == "gpu_minutes" and all(r.means[quantity].high == 0 for r in rows):
            continue  # every run on the CPU: nothing to compare
        means = [r.means[quantity].mean for r in rows]
        # A percentile interval may sit to one side of a skewed sample's mean: error bars are >= 0.
        below = [max(0.0, r.means[quantity].mean - r.means[quantity].low) for r in rows]
        above = [max(0.0, r.means[quantity].high - r.means[quantity].mean) for r in rows]
        fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(rows) + 1.5), 3.6))
        bars = ax.bar(range(len(rows)), means, yerr=[below, above], capsize=4,
                      color=["#bbbbbb" if r.variant == table.baseline else "#4c72b0" for r in rows])
        for bar, r in zip(bars, rows):
            if r.variant == table.baseline:
                bar.set_hatch("//")
            ax.annotate(f"n={r.means[quantity].n}", (bar.get_x() + bar.get_width() / 2, r.means[quantity].high),
                        xytext=(0, 3), textcoords="offset points", ha="center", fontsize=7)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([f"{r.variant}\n(baseline)" if r.variant == table.baseline else r.variant for r in rows],
                           rotation=20, ha="right", fontsize=8)
        ax.set_title(f"{TITLES[quantity]} — {table.name}", fontsize=10)
        ax.set_ylabel(f"mean, {table.confidence:.0%} CI")
        if quantity in UNIT_INTERVAL:
            ax.set_ylim(0.0, 1.1)
        else:
            ax.set_ylim(bottom=0.0)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = folder / f"{quantity}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
