"""Contact sheets of an ablation: one per prompt (``sheets/<prompt-slug>.png``), the toy world's
ground truth on top, then one row per variant, one column per seed. Each cell is the run's final
stage seen from the evaluation's front, side and back views (``ablation_views.png``, written by
:mod:`magic3d.ablation.measure`; a run without them shows its last validation sheet ``val/``),
labelled with its headline metrics, or with why it has no picture (failed, not run yet)."""

from __future__ import annotations

from pathlib import Path

from magic3d.ablation.measure import STRIP_VIEWS
from magic3d.ablation.state import AblationState, RunRecord
from magic3d.recipe import slugify

STRIP_ASPECT = STRIP_VIEWS  # a strip is STRIP_VIEWS square views wide, one high
HEADLINE = (("r_precision", "R-prec"), ("silhouette_iou", "IoU"), ("chamfer", "Chamfer"))


def run_picture(folder: Path, record: RunRecord) -> Path | None:
    """The picture of a run: its orbit strip, else the newest validation sheet of its last stage."""
    if record.views and (folder / record.views).is_file():
        return folder / record.views
    if not record.run_dir:
        return None
    run_dir = folder / record.run_dir
    stage_dirs = [run_dir / record.final_stage] if record.final_stage else sorted(
        (p.parent for p in run_dir.glob("*/config.yaml")), key=lambda p: (p / "config.yaml").stat().st_mtime)
    for stage_dir in reversed(stage_dirs):
        sheets = sorted((stage_dir / "val").glob("*.png"))
        if sheets:
            return sheets[-1]
    return None


def cell_label(record: RunRecord) -> str:
    if record.status == "done":
        metrics = record.final_metrics()
        parts = [f"{label} {metrics[key]:.2f}" for key, label in HEADLINE if metrics.get(key) is not None]
        return f"seed {record.seed}: " + (", ".join(parts) or "no toy-world metrics")
    if record.status == "failed":
        error = record.error or ""
        return f"seed {record.seed}: failed: {error[:70]}{'…' if len(error) > 70 else ''}"
    return f"seed {record.seed}: {record.status}"


def save_sheets(state: AblationState, folder: Path, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    spec = state.spec
    out.mkdir(parents=True, exist_ok=True)
    written = []
    seeds = sorted({r.seed for r in state.runs})
    for prompt in spec.prompts:
        records = {(r.variant, r.seed): r for r in state.runs if r.prompt == prompt}
        truth = next((folder / r.ground_truth for r in records.values()
                      if r.ground_truth and (folder / r.ground_truth).is_file()), None)
        rows: list[tuple[str, list[tuple[str, Path | None]]]] = []
        if truth is not None:
            rows.append(("ground truth", [("toy world, same cameras", truth)]))
        for variant in spec.variants:
            cells = []
            for seed in seeds:
                record = records.get((variant.name, seed))
                if record is not None:
                    cells.append((cell_label(record), run_picture(folder, record)))
            if cells:
                title = f"{variant.name} (baseline)" if variant.name == spec.baseline else variant.name
                rows.append((title, cells))
        n_cols = max(len(cells) for _, cells in rows)
        # Rows as tall as a strip (4 views side by side) plus its label, so no band of white
        # separates them; a margin on the left for the variant names.
        cell_w, label_w = 5.2, 1.5
        cell_h = cell_w / STRIP_ASPECT + 0.35
        width, height = label_w + cell_w * n_cols, cell_h * len(rows) + 0.4
        fig, axes = plt.subplots(len(rows), n_cols, figsize=(width, height), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for i, (title, cells) in enumerate(rows):
            for j, (label, picture) in enumerate(cells):
                ax = axes[i, j]
                if picture is not None:
                    with Image.open(picture) as image:
                        ax.imshow(image.convert("RGB"))
                else:
                    ax.text(0.5, 0.5, "no picture", ha="center", va="center", fontsize=8, color="grey",
                            transform=ax.transAxes)
                ax.set_title(label, fontsize=7, loc="left")
            axes[i, 0].text(-0.02, 0.5, title, transform=axes[i, 0].transAxes, ha="right", va="center",
                            fontsize=8, fontweight="bold")
        fig.suptitle(f"{spec.name}: {prompt} (views at azimuth 0, 90, 180, 270°)", fontsize=10)
        fig.tight_layout(rect=(label_w / width, 0, 1, 1 - 0.4 / height))
        path = out / f"{slugify(prompt)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
