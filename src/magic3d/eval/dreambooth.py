"""Evaluate a personalised prior against the toy world's ground truth (issue 12's experiment).

The subject is a held-out pair (the pink duck: never in any prior's training data), so the
evaluator can tell whether samples of "a sks duck" show it. Three measurements per prior:

- **subject**: samples of the instance prompt (with the view suffixes cycling) classified as the
  subject's shape and colour, against the untuned prior's samples of the subject's caption
  ("a pink duck"): what personalisation adds over compositional prompting;
- **language drift**: caption accuracy on the subject's class in other colours ("a red duck")
  and on other shapes in the subject's colour ("a pink cube"), before and after tuning;
- the adapters' size and training time (from the LoRA card).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from magic3d.data.cameras import VIEW_NAMES, view_suffix
from magic3d.devices import resolve_device
from magic3d.eval.classifier import DEFAULT_FOLDER, ToyWorldClassifier, classifier_info, load_classifier
from magic3d.eval.prior import PriorPipeline, grade_samples, load_prior_pipeline, prior_captions
from magic3d.guidance.lora import LoraCard
from magic3d.toyworld.shapes import COLOUR_NAMES, SHAPE_NAMES, caption


@dataclass
class PromptAccuracy:
    prompt: str
    n_images: int
    shape_accuracy: float
    colour_accuracy: float
    caption_accuracy: float  # both right


@dataclass
class DriftAccuracy:
    """Caption accuracy on captions the tuning should leave alone, before and after it."""

    captions: list[str]
    before: float
    after: float

    @property
    def change(self) -> float:
        return self.after - self.before


@dataclass
class PersonalisationEval:
    pipeline: str
    lora: str
    subject_shape: str
    subject_colour: str
    tuned: PromptAccuracy  # "a sks duck" on the tuned prior
    untuned: PromptAccuracy  # "a pink duck" on the untuned prior
    drift: dict[str, DriftAccuracy] = field(default_factory=dict)  # "same class", "same colour"
    lora_mb: float | None = None
    train_seconds: float | None = None
    train_steps: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for name, drift in self.drift.items():
            data["drift"][name]["change"] = drift.change
        return data


def _prompt_accuracy(pipe: PriorPipeline, model: ToyWorldClassifier, prompt: str, shape: str, colour: str, n: int,
                     steps: int, guidance_scale: float, batch_size: int, seed: int) -> PromptAccuracy:
    captions = [prompt + view_suffix(k % len(VIEW_NAMES)) for k in range(n)]
    labels = [(SHAPE_NAMES.index(shape), COLOUR_NAMES.index(colour), k % len(VIEW_NAMES)) for k in range(n)]
    graded = grade_samples(pipe, model, captions, labels, steps, guidance_scale, batch_size, seed)
    return PromptAccuracy(prompt, n, float(graded.shape_ok.float().mean()), float(graded.colour_ok.float().mean()),
                          float((graded.shape_ok & graded.colour_ok).float().mean()))


def _caption_accuracy(pipe: PriorPipeline, model: ToyWorldClassifier, shapes: tuple[str, ...],
                      colours: tuple[str, ...], n: int, steps: int, guidance_scale: float, batch_size: int,
                      seed: int) -> float:
    captions, labels = prior_captions(shapes, colours, n)
    graded = grade_samples(pipe, model, captions, labels, steps, guidance_scale, batch_size, seed)
    return float((graded.shape_ok & graded.colour_ok).float().mean())


@torch.no_grad()
def evaluate_personalisation(
    pipeline_folder: str | Path,
    lora: str | Path,
    prompt: str | None = None,
    shape: str = "duck",
    colour: str = "pink",
    n_images: int = 32,
    n_per_drift_caption: int = 4,
    drift_shapes: tuple[str, ...] = (),
    drift_colours: tuple[str, ...] = (),
    steps: int = 50,
    guidance_scale: float = 5.0,
    classifier: str | Path | ToyWorldClassifier = DEFAULT_FOLDER,
    batch_size: int = 256,
    device: str | torch.device = "auto",
    seed: int = 0,
) -> PersonalisationEval:
    """Grade a personalised prior (see the module doc). ``prompt`` defaults to the LoRA card's
    instance prompt; drift uses every other colour of ``shape`` and every other shape in
    ``colour`` unless ``drift_colours`` / ``drift_shapes`` narrow them."""
    started = time.time()
    folder, lora = Path(pipeline_folder), Path(lora)
    card = LoraCard.load(lora)
    prompt = prompt or card.instance_prompt
    dev = resolve_device(device)
    model = load_classifier(classifier, dev)
    colours = tuple(drift_colours) or tuple(c for c in COLOUR_NAMES if c != colour)
    shapes = tuple(drift_shapes) or tuple(s for s in SHAPE_NAMES if s != shape)
    sampling = dict(steps=steps, guidance_scale=guidance_scale, batch_size=batch_size, seed=seed)

    base = load_prior_pipeline(folder, dev)
    untuned = _prompt_accuracy(base, model, caption(shape, colour), shape, colour, n_images, **sampling)
    before = {"same class": _caption_accuracy(base, model, (shape,), colours, n_per_drift_caption, **sampling),
              "same colour": _caption_accuracy(base, model, shapes, (colour,), n_per_drift_caption, **sampling)}
    del base
    tuned_pipe = load_prior_pipeline(folder, dev, lora=lora)
    tuned = _prompt_accuracy(tuned_pipe, model, prompt, shape, colour, n_images, **sampling)
    after = {"same class": _caption_accuracy(tuned_pipe, model, (shape,), colours, n_per_drift_caption, **sampling),
             "same colour": _caption_accuracy(tuned_pipe, model, shapes, (colour,), n_per_drift_caption, **sampling)}
    drift = {"same class": DriftAccuracy([caption(shape, c) for c in colours], before["same class"], after["same class"]),
             "same colour": DriftAccuracy([caption(s, colour) for s in shapes], before["same colour"],
                                          after["same colour"])}
    return PersonalisationEval(
        pipeline=str(folder), lora=str(lora), subject_shape=shape, subject_colour=colour, tuned=tuned,
        untuned=untuned, drift=drift, lora_mb=card.size_mb, train_seconds=card.seconds, train_steps=card.steps,
        settings={"n_images": n_images, "n_per_drift_caption": n_per_drift_caption, "steps": steps,
                  "guidance_scale": guidance_scale, "seed": seed, "sampler": "DDIM",
                  "classifier": classifier_info(classifier)},
        seconds=round(time.time() - started, 1),
    )


def personalisation_markdown(results: list[PersonalisationEval]) -> str:
    """One table row per personalised prior."""
    lines = ["| prior | tuned prompt: pink duck | untuned 'a pink duck' | drift same class (before -> after) | "
             "drift same colour (before -> after) | LoRA MB | steps | train s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        same_class, same_colour = r.drift["same class"], r.drift["same colour"]
        lines.append(
            f"| {Path(r.pipeline).name} | {r.tuned.caption_accuracy:.3f} ({r.tuned.prompt!r}) | "
            f"{r.untuned.caption_accuracy:.3f} | {same_class.before:.3f} -> {same_class.after:.3f} "
            f"({same_class.change:+.3f}) | {same_colour.before:.3f} -> {same_colour.after:.3f} "
            f"({same_colour.change:+.3f}) | {r.lora_mb} | {r.train_steps} | {r.train_seconds} |")
    return "\n".join(lines) + "\n"
