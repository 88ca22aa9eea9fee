"""Evaluate a prior (pixel or latent): sample it on toy captions (DDIM, classifier-free
guidance) and classify the samples against the captions they were asked for.

The only module of the evaluator that uses the prior-training package (its sampler,
``magic3d.priors.sampling.ddim_sample``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from magic3d.data.cameras import VIEW_NAMES, view_suffix
from magic3d.devices import resolve_device
from magic3d.eval.classifier import (
    DEFAULT_FOLDER,
    Prediction,
    ToyWorldClassifier,
    class_index,
    classifier_info,
    load_classifier,
)
from magic3d.toyworld.shapes import COLOUR_NAMES, SHAPE_NAMES, caption, get_shape


@dataclass
class SampleAccuracy:
    """How often a set of samples shows what its captions asked for."""

    n_images: int
    shape_accuracy: float | None
    colour_accuracy: float | None
    caption_accuracy: float | None  # both right
    view_accuracy_asymmetric: float | None  # asymmetric shapes only


@dataclass
class PriorEval:
    """Accuracies over the trained captions; the held-out pairs (never in any prior's training
    data, ``magic3d.priors.heldout``) are reported apart in ``held_out``."""

    pipeline: str
    n_images: int
    shape_accuracy: float
    colour_accuracy: float
    caption_accuracy: float  # both right
    view_accuracy_asymmetric: float | None  # requested view = predicted, asymmetric shapes only
    per_shape_accuracy: dict[str, float]
    per_colour_accuracy: dict[str, float]
    settings: dict[str, Any]
    seconds: float
    held_out: SampleAccuracy | None = None  # None when no held-out pair was sampled
    held_out_captions: list[str] = field(default_factory=list)
    samples: Float[Tensor, "N H W 3"] | None = None  # in [0, 1], for the sample sheet

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("samples")
        return data


@dataclass
class PriorPipeline:
    """The parts of an embedded prior folder that sampling needs (fp32, on one device)."""

    unet: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict[str, Any]
    vae: Any = None  # latent priors only
    scaling_factor: float = 1.0


def load_prior_pipeline(folder: Path, device: torch.device, lora: str | Path | None = None,
                        lora_scale: float = 1.0) -> PriorPipeline:
    """A pixel (IF layout) or latent (Stable Diffusion layout: with vae/) prior folder, fp32;
    with ``lora``, a personalisation stage's adapters loaded as the guidance loads them (checked
    against the folder first)."""
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer

    missing = [p for p in ("unet", "text_encoder", "tokenizer", "scheduler") if not (folder / p).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{folder} is not a prior pipeline folder: no {', '.join(m + '/' for m in missing)} "
            "(expected unet/, text_encoder/, tokenizer/, scheduler/ [, vae/] as written by python -m magic3d.priors)"
        )
    index_file = folder / "model_index.json"
    encoder_class = "T5EncoderModel"
    if index_file.is_file():
        encoder_class = json.loads(index_file.read_text()).get("text_encoder", [None, encoder_class])[1]
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32).to(device).eval()
    text_encoder = getattr(transformers, encoder_class).from_pretrained(folder / "text_encoder", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    vae, scaling = None, 1.0
    if (folder / "vae").is_dir():
        vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32).to(device).eval()
        scaling = float(vae.config.scaling_factor)
    text_encoder = text_encoder.to(device).eval()
    if lora is not None:
        from magic3d.guidance.latent_sds import LatentSDS
        from magic3d.guidance.lora import read_lora
        from magic3d.guidance.pixel_sds import PixelSDS

        adapter = read_lora(lora)
        adapter.check_base(str(folder), (LatentSDS if vae is not None else PixelSDS).LAYOUT.name)
        adapter.apply(unet, "unet", lora_scale)
        adapter.apply(text_encoder, "text_encoder", lora_scale)
        unet, text_encoder = unet.to(device), text_encoder.to(device)
    return PriorPipeline(unet, text_encoder, tokenizer, json.loads(scheduler_file.read_text()), vae, scaling)


def prior_captions(
    shapes: tuple[str, ...], colours: tuple[str, ...], n_per_caption: int
) -> tuple[list[str], list[tuple[int, int, int]]]:
    """Every shape x colour, ``n_per_caption`` samples each with the view suffix cycling
    front, side, back, overhead; returns the captions and (shape id, colour id, view id)."""
    captions, labels = [], []
    for shape in shapes:
        for colour in colours:
            for k in range(n_per_caption):
                view = k % len(VIEW_NAMES)
                captions.append(caption(shape, colour, view_suffix(view)))
                labels.append((SHAPE_NAMES.index(shape), COLOUR_NAMES.index(colour), view))
    return captions, labels


@dataclass
class GradedSamples:
    """Samples of captions and, per sample, whether the evaluator saw what was asked."""

    samples: Float[Tensor, "N H W 3"]
    shape_ok: Tensor
    colour_ok: Tensor
    view_ok: Tensor


@torch.no_grad()
def grade_samples(pipe: PriorPipeline, model: ToyWorldClassifier, captions: list[str],
                  labels: list[tuple[int, int, int]], steps: int, guidance_scale: float, batch_size: int,
                  seed: int) -> GradedSamples:
    """DDIM samples of ``captions`` (CFG against ""), classified against their (shape id, colour
    id, view id) ``labels``."""
    from magic3d.priors.sampling import ddim_sample

    images = []
    for k, start in enumerate(tqdm(range(0, len(captions), batch_size), desc="prior samples", unit="batch")):
        batch = ddim_sample(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler_config,
                            captions[start : start + batch_size], steps, guidance_scale, seed=seed + k,
                            vae=pipe.vae, scaling_factor=pipe.scaling_factor)
        images.append(batch.float() / 255.0)
    samples = torch.cat(images)
    prediction: Prediction = model.predict(samples)
    label = torch.tensor(labels)
    shape_idx = torch.tensor([class_index(model.shape_names, SHAPE_NAMES[s], "shape") for s in label[:, 0].tolist()])
    colour_idx = torch.tensor([class_index(model.colour_names, COLOUR_NAMES[c], "colour") for c in label[:, 1].tolist()])
    return GradedSamples(samples, prediction.shape_logits.argmax(-1) == shape_idx,
                         prediction.colour_logits.argmax(-1) == colour_idx,
                         prediction.view_logits.argmax(-1) == label[:, 2])


@torch.no_grad()
def evaluate_prior(
    pipeline_folder: str | Path,
    n_per_caption: int = 8,
    steps: int = 50,
    guidance_scale: float = 5.0,
    classifier: str | Path | ToyWorldClassifier = DEFAULT_FOLDER,
    shapes: tuple[str, ...] = (),
    colours: tuple[str, ...] = (),
    batch_size: int = 256,
    device: str | torch.device = "auto",
    seed: int = 0,
) -> PriorEval:
    """Sample the prior (DDIM, CFG against "") on toy captions and classify the samples.

    Works for pixel and latent priors (latents decoded by the prior's VAE). Empty ``shapes`` /
    ``colours`` mean all of them. Samples of another size than the classifier's input (the
    tiny test pipeline is 32x32, the latent prior 256x256) are resized by the classifier.
    """
    # The priors' own sampler and text path; imported on use (as before the split) so that
    # importing the evaluator does not import the prior-training package.
    from magic3d.priors.heldout import HELD_OUT_PAIRS, held_out_mask

    if n_per_caption < 1:
        raise ValueError(f"n_per_caption={n_per_caption} must be >= 1")
    started = time.time()
    folder = Path(pipeline_folder)
    dev = resolve_device(device)
    model = load_classifier(classifier, dev)
    pipe = load_prior_pipeline(folder, dev)
    shapes = tuple(shapes) or SHAPE_NAMES
    colours = tuple(colours) or COLOUR_NAMES
    captions, labels = prior_captions(shapes, colours, n_per_caption)

    graded = grade_samples(pipe, model, captions, labels, steps, guidance_scale, batch_size, seed)
    label, samples = torch.tensor(labels), graded.samples
    shape_ok, colour_ok, view_ok = graded.shape_ok, graded.colour_ok, graded.view_ok
    asymmetric = torch.tensor([get_shape(SHAPE_NAMES[s]).asymmetric for s in label[:, 0].tolist()])
    held = held_out_mask(label[:, 0], label[:, 1])

    def accuracy(ok: Tensor, where: Tensor) -> float | None:
        return float(ok[where].float().mean()) if bool(where.any()) else None

    def accuracies(where: Tensor) -> SampleAccuracy:
        return SampleAccuracy(int(where.sum()), accuracy(shape_ok, where), accuracy(colour_ok, where),
                              accuracy(shape_ok & colour_ok, where), accuracy(view_ok, where & asymmetric))

    trained = accuracies(~held)
    per_shape = {s: accuracy(shape_ok, ~held & (label[:, 0] == SHAPE_NAMES.index(s))) for s in shapes}
    per_colour = {c: accuracy(colour_ok, ~held & (label[:, 1] == COLOUR_NAMES.index(c))) for c in colours}
    return PriorEval(
        pipeline=str(folder),
        n_images=trained.n_images,
        shape_accuracy=trained.shape_accuracy,
        colour_accuracy=trained.colour_accuracy,
        caption_accuracy=trained.caption_accuracy,
        view_accuracy_asymmetric=trained.view_accuracy_asymmetric,
        per_shape_accuracy={k: v for k, v in per_shape.items() if v is not None},
        per_colour_accuracy={k: v for k, v in per_colour.items() if v is not None},
        held_out=accuracies(held) if bool(held.any()) else None,
        held_out_captions=[caption(s, c) for s, c in HELD_OUT_PAIRS if s in shapes and c in colours],
        settings={"n_per_caption": n_per_caption, "steps": steps, "guidance_scale": guidance_scale,
                  "shapes": list(shapes), "colours": list(colours), "seed": seed, "sampler": "DDIM",
                  "classifier": classifier_info(classifier)},
        seconds=round(time.time() - started, 1),
        samples=samples,
    )
