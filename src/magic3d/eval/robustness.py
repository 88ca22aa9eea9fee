"""Does the evaluator measure the object, or how crisp its render is?

Text-to-3D renders differ from the toy world's ground truth in ways a caption does not name:
a NeRF is blurred and translucent at its border, carries floaters and colour noise, and its
silhouette is soft. If the classifier's accuracy on ground-truth renders fell under such
degradations, part of any R-precision change between two runs would be the render's softness,
not the object. This module applies each degradation (fixed, seeded) to ground-truth renders
on plain backgrounds and reports the classifier's accuracies per degradation
(``python -m magic3d.eval robustness``).

The degradations themselves live in ``magic3d.eval.degradations`` (the evaluator's training
applies them as augmentations too).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from magic3d.eval.classifier import DEFAULT_FOLDER, ToyWorldClassifier, load_classifier
from magic3d.eval.degradations import (
    Images,
    Masks,
    backdrop_colour,
    blur,
    combined,
    nerf_noise,
    soft_silhouette,
    speckle,
    translucent,
)
from magic3d.eval.train_classifier import held_out_accuracy
from magic3d.toyworld.dataset import ToyWorldBatch, ToyWorldSpec, render_dataset

Degradation = Callable[[Images, Masks, Images, torch.Generator], Images]


DEGRADATIONS: dict[str, Degradation] = {
    "clean": lambda x, mask, background, g: x,
    "blur (sigma 1.5 px)": blur,
    "translucent (alpha 0.6)": translucent,
    "soft silhouette (sigma 2 px)": soft_silhouette,
    "speckle (3 % of pixels)": speckle,
    "NeRF-like colour noise": nerf_noise,
    "combined": combined,
}


@dataclass
class RobustnessResult:
    n_images: int
    image_size: int
    accuracy: dict[str, dict[str, float]]  # degradation -> shape / colour / caption / view_asymmetric
    classifier: str

    def markdown(self) -> str:
        rows = ["| degradation | shape | colour | caption | view (asymmetric) |", "|---|---|---|---|---|"]
        for name, acc in self.accuracy.items():
            rows.append(f"| {name} | {acc['shape']:.3f} | {acc['colour']:.3f} | {acc['caption']:.3f} "
                        f"| {acc['view_asymmetric']:.3f} |")
        return "\n".join(rows)


def degrade_batch(data: ToyWorldBatch, degradation: Degradation, seed: int = 0) -> ToyWorldBatch:
    """The same images with ``degradation`` applied (seeded: the same every call)."""
    x = data.images.float().div(255.0).permute(0, 3, 1, 2)
    mask = data.masks.float().div(255.0).permute(0, 3, 1, 2)
    background = backdrop_colour(x, mask)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    out = degradation(x, mask, background, generator).clamp(0.0, 1.0)
    images = (out.permute(0, 2, 3, 1) * 255.0).round().to(torch.uint8)
    return replace(data, images=images)


def evaluate_robustness(
    n_images: int = 2000,
    classifier: str | Path | ToyWorldClassifier = DEFAULT_FOLDER,
    device: str | torch.device = "auto",
    seed: int = 1234,
    image_size: int = 64,
) -> RobustnessResult:
    """The classifier's accuracies on ``n_images`` ground-truth renders (plain backgrounds,
    orbit-like elevations) under each of :data:`DEGRADATIONS`."""
    from magic3d.devices import resolve_device

    dev = resolve_device(device)
    model = load_classifier(classifier, dev)
    # Plain backdrops so that translucency is exact; elevations up to 60 deg, where the
    # evaluation's orbit lies (overhead discs are ambiguous between round shapes).
    spec = ToyWorldSpec(image_size=image_size, background_modes=("white", "black", "grey", "solid"),
                        background_weights=(0.3, 0.2, 0.2, 0.3), view_captions=False)
    data = render_dataset(spec, n_images, seed=seed, device=dev)
    accuracy = {name: held_out_accuracy(model, degrade_batch(data, fn, seed), max_elevation_deg=60.0)
                for name, fn in DEGRADATIONS.items()}
    name = classifier if not isinstance(classifier, ToyWorldClassifier) else "<in memory>"
    return RobustnessResult(len(data), image_size, accuracy, str(name))


def write_robustness_report(result: RobustnessResult, out: str | Path) -> tuple[Path, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "robustness.json"
    json_path.write_text(json.dumps(asdict(result), indent=2) + "\n")
    md_path = out / "robustness.md"
    md_path.write_text(
        f"# Evaluator robustness\n\nClassifier `{result.classifier}` on {result.n_images} ground-truth renders "
        f"({result.image_size} px, plain backgrounds, elevation <= 60 deg), each degraded as a text-to-3D render "
        "is (magic3d.eval.robustness). A drop from `clean` is accuracy that a run's R-precision would lose to "
        f"the render's softness, not its object.\n\n{result.markdown()}\n")
    return json_path, md_path
