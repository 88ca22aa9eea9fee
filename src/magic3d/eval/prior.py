"""Evaluate a prior (pixel or latent): sample it on toy captions (DDIM, classifier-free
guidance) and classify the samples against the captions they were asked for.

The only module of the evaluator that uses the prior-training package (its sampler,
``magic3d.priors.train.ddim_sample``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
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
class PriorEval:
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


def load_prior_pipeline(folder: Path, device: torch.device) -> PriorPipeline:
    """A pixel (IF layout) or latent (Stable Diffusion layout: with vae/) prior folder, fp32."""
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
    return PriorPipeline(unet, text_encoder.to(device).eval(), tokenizer, json.loads(scheduler_file.read_text()),
                         vae, scaling)


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
    from magic3d.priors.train import ddim_sample

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
    shape_ok = prediction.shape_logits.argmax(-1) == shape_idx
    colour_ok = prediction.colour_logits.argmax(-1) == colour_idx
    view_ok = prediction.view_logits.argmax(-1) == label[:, 2]
    asymmetric = torch.tensor([get_shape(SHAPE_NAMES[s]).asymmetric for s in label[:, 0].tolist()])
    return PriorEval(
        pipeline=str(folder),
        n_images=len(captions),
        shape_accuracy=float(shape_ok.float().mean()),
        colour_accuracy=float(colour_ok.float().mean()),
        caption_accuracy=float((shape_ok & colour_ok).float().mean()),
        view_accuracy_asymmetric=float(view_ok[asymmetric].float().mean()) if bool(asymmetric.any()) else None,
        per_shape_accuracy={s: float(shape_ok[label[:, 0] == SHAPE_NAMES.index(s)].float().mean()) for s in shapes},
        per_colour_accuracy={c: float(colour_ok[label[:, 1] == COLOUR_NAMES.index(c)].float().mean()) for c in colours},
        settings={"n_per_caption": n_per_caption, "steps": steps, "guidance_scale": guidance_scale,
                  "shapes": list(shapes), "colours": list(colours), "seed": seed, "sampler": "DDIM",
                  "classifier": classifier_info(classifier)},
        seconds=round(time.time() - started, 1),
        samples=samples,
    )
