"""Does the evaluator measure the object, or how crisp its render is?

Text-to-3D renders differ from the toy world's ground truth in ways a caption does not name:
a NeRF is blurred and translucent at its border, carries floaters and colour noise, and its
silhouette is soft. If the classifier's accuracy on ground-truth renders fell under such
degradations, part of any R-precision change between two runs would be the render's softness,
not the object. This module applies each degradation (fixed, seeded) to ground-truth renders
on plain backgrounds and reports the classifier's accuracies per degradation
(``python -m magic3d.eval robustness``).

Each degradation works on channel-first images in [0, 1] with their coverage mask and plain
background colour, so translucency is exact (the object blended over its own backdrop).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from magic3d.eval.classifier import DEFAULT_FOLDER, ToyWorldClassifier, load_classifier
from magic3d.eval.train_classifier import gaussian_blur, held_out_accuracy
from magic3d.toyworld.dataset import ToyWorldBatch, ToyWorldSpec, render_dataset

Images = Float[Tensor, "B 3 H W"]
Masks = Float[Tensor, "B 1 H W"]
Degradation = Callable[[Images, Masks, Images, torch.Generator], Images]


def blur(x: Images, mask: Masks, background: Images, g: torch.Generator, sigma: float = 1.5) -> Images:
    """A render at lower effective resolution (a coarse NeRF at 64², upsampled renders)."""
    return gaussian_blur(x, torch.full((x.shape[0],), sigma, device=x.device))


def translucent(x: Images, mask: Masks, background: Images, g: torch.Generator, alpha: float = 0.6) -> Images:
    """The object at opacity ``alpha`` over its background: a NeRF that never became opaque."""
    return background + alpha * mask * (x - background)


def soft_silhouette(x: Images, mask: Masks, background: Images, g: torch.Generator, sigma: float = 2.0) -> Images:
    """A fuzzy border: coverage blurred, the object's colour kept inside."""
    soft = gaussian_blur(mask, torch.full((mask.shape[0],), sigma, device=mask.device)).clamp(0.0, 1.0)
    return background + soft * (x - background)


def speckle(x: Images, mask: Masks, background: Images, g: torch.Generator, fraction: float = 0.03) -> Images:
    """Floaters: a share of pixels replaced by random colours."""
    b, _, h, w = x.shape
    hit = torch.rand(b, 1, h, w, generator=g, device=x.device) < fraction
    colours = torch.rand(b, 3, h, w, generator=g, device=x.device)
    return torch.where(hit, colours, x)


def nerf_noise(x: Images, mask: Masks, background: Images, g: torch.Generator, strength: float = 0.15) -> Images:
    """Low-frequency colour noise on the object (an under-trained hash grid): an 8x8 field of
    per-channel gains in 1 ± ``strength``, upsampled smoothly, plus fine noise of std 0.02."""
    b, _, h, w = x.shape
    coarse = torch.rand(b, 3, 8, 8, generator=g, device=x.device) * 2.0 - 1.0
    gains = 1.0 + strength * F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
    fine = 0.02 * torch.randn(x.shape, generator=g, device=x.device)
    return x + mask * (x * (gains - 1.0) + fine)


def combined(x: Images, mask: Masks, background: Images, g: torch.Generator) -> Images:
    """Everything at once, milder each: what a typical coarse render looks like."""
    x = nerf_noise(x, mask, background, g, strength=0.1)
    x = soft_silhouette(x, mask, background, g, sigma=1.0)
    x = translucent(x, mask, background, g, alpha=0.8)
    x = speckle(x, mask, background, g, fraction=0.01)
    return blur(x, mask, background, g, sigma=1.0)


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


def plain_background(images: Images, masks: Masks) -> Images:
    """Each image's backdrop colour, from its uncovered pixels (plain backgrounds only)."""
    empty = (masks < 0.5).float()
    colour = (images * empty).sum(dim=(2, 3)) / empty.sum(dim=(2, 3)).clamp_min(1.0)
    return colour[:, :, None, None].expand_as(images)


def degrade_batch(data: ToyWorldBatch, degradation: Degradation, seed: int = 0) -> ToyWorldBatch:
    """The same images with ``degradation`` applied (seeded: the same every call)."""
    x = data.images.float().div(255.0).permute(0, 3, 1, 2)
    mask = data.masks.float().div(255.0).permute(0, 3, 1, 2)
    background = plain_background(x, mask)
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
