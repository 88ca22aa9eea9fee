"""Reports of a prior evaluation: prior_eval.json / .md, a sheet of samples, and the model
card's Quality section."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from magic3d.data.cameras import VIEW_NAMES
from magic3d.eval.markdown import format_value
from magic3d.eval.prior import PriorEval


def accuracy_table(data: dict[str, Any]) -> list[str]:
    """Trained captions and, apart, the held-out pairs (never in the prior's training data)."""
    rows = ["| captions | samples | shape acc | colour acc | caption acc | view acc (asymmetric) |",
            "|---|---|---|---|---|---|"]

    def row(name: str, d: dict[str, Any]) -> str:
        return (f"| {name} | {d['n_images']} | {format_value(d['shape_accuracy'])} | {format_value(d['colour_accuracy'])} "
                f"| {format_value(d['caption_accuracy'])} | {format_value(d['view_accuracy_asymmetric'])} |")

    rows.append(row("trained", data))
    if data.get("held_out"):
        rows.append(row("held out (" + ", ".join(data.get("held_out_captions", [])) + ")", data["held_out"]))
    return rows


def prior_quality_markdown(result: PriorEval | dict[str, Any], report: Path | str | None = None) -> str:
    """The model card's Quality section from a prior evaluation (object or its JSON)."""
    data = result.to_json() if isinstance(result, PriorEval) else result
    s = data["settings"]
    held = s.get("classifier", {}).get("heldout_accuracy", {})
    ceiling = f" (the evaluator's own held-out accuracy: shape {held['shape']:.3f}, colour {held['colour']:.3f})" if held else ""
    worst = sorted(data["per_shape_accuracy"].items(), key=lambda kv: kv[1])[:3]
    lines = [
        f"Toy-world evaluator on {data['n_images']} DDIM samples ({s['steps']} steps, guidance "
        f"{s['guidance_scale']:g}, {s['n_per_caption']} per caption over every shape and colour, view "
        f"suffixes cycling {', '.join(VIEW_NAMES)}){ceiling}. Targets (issue 10): shape and colour "
        "accuracy >= 0.95, view >= 0.85 on asymmetric objects (held-out pairs reported apart).",
        "",
        *accuracy_table(data),
        "",
        "Per colour: " + ", ".join(f"{k} {v:.2f}" for k, v in data["per_colour_accuracy"].items()) + ".",
        "Hardest shapes: " + ", ".join(f"{k} {v:.2f}" for k, v in worst) + ".",
    ]
    if report is not None:
        lines += ["", f"Report: `{report}` (reproduce with `python -m magic3d.eval prior <this folder>`)."]
    return "\n".join(lines)


def write_prior_report(result: PriorEval, out: str | Path, max_images: int = 64) -> tuple[Path, Path, Path]:
    """prior_eval.json, prior_eval.md and a sheet of the first ``max_images`` samples in ``out``."""
    from magic3d.visuals import save_png

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "prior_eval.json"
    json_path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    md_path = out / "prior_eval.md"
    s = result.settings
    md_path.write_text(
        f"# Prior evaluation of `{result.pipeline}`\n\n"
        f"{result.n_images} DDIM samples ({s['steps']} steps, guidance {s['guidance_scale']:g}, "
        f"{s['n_per_caption']} per caption, view suffixes cycling {', '.join(VIEW_NAMES)}).\n\n"
        + "\n".join(accuracy_table(result.to_json())) + "\n"
    )
    sheet_path = out / "prior_samples.png"
    if result.samples is not None and result.samples.shape[0] > 0:
        images = result.samples[:max_images]
        n, h, w, _ = images.shape
        cols = min(n, 16)
        rows = math.ceil(n / cols)
        grid = torch.ones(rows * h, cols * w, 3)
        for i in range(n):
            r, c = divmod(i, cols)
            grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = images[i]
        save_png(grid, sheet_path)
    return json_path, md_path, sheet_path
