"""A small CNN that names what a toy-world image shows: shape, colour and viewpoint.

It is the evaluator's "CLIP": text-to-3D renders are scored by how confidently it reads the
prompt's shape and colour out of them (R-precision), and whether a back view looks like a
front view (Janus). Trained on toy-world renders by ``magic3d.eval.train_classifier``.

Architecture: four blocks of two 3x3 convolutions (BatchNorm, ReLU) with 2x max-pooling,
widths 32-64-128-192 (~0.8 M parameters), global average pooling, three linear heads. Input
64x64 RGB in [0, 1]; other sizes are resized with antialiasing by :meth:`predict`.

Saved as ``<folder>/classifier.safetensors`` (weights) + ``<folder>/classifier.json`` (format
version, vocabularies, input size, widths, held-out accuracies), so a folder describes itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from magic3d.data.cameras import VIEW_NAMES
from magic3d.toyworld.shapes import COLOUR_NAMES, SHAPE_NAMES

FORMAT_VERSION = 1
DEFAULT_FOLDER = "priors/evaluator"
WEIGHTS_FILE = "classifier.safetensors"
META_FILE = "classifier.json"
INPUT_SIZE = 64


@dataclass
class Prediction:
    """Unnormalised scores per head (B rows); names follow the classifier's vocabularies."""

    shape_logits: Float[Tensor, "B S"]
    colour_logits: Float[Tensor, "B C"]
    view_logits: Float[Tensor, "B 4"]

    def __getitem__(self, index: slice | Tensor) -> "Prediction":
        return Prediction(self.shape_logits[index], self.colour_logits[index], self.view_logits[index])

    @staticmethod
    def concat(parts: list["Prediction"]) -> "Prediction":
        return Prediction(
            torch.cat([p.shape_logits for p in parts]),
            torch.cat([p.colour_logits for p in parts]),
            torch.cat([p.view_logits for p in parts]),
        )


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class ToyWorldClassifier(nn.Module):
    """Shape / colour / view classifier for toy-world images (see the module docstring)."""

    def __init__(
        self,
        shape_names: tuple[str, ...] = SHAPE_NAMES,
        colour_names: tuple[str, ...] = COLOUR_NAMES,
        view_names: tuple[str, ...] = VIEW_NAMES,
        widths: tuple[int, ...] = (32, 64, 128, 192),
        input_size: int = INPUT_SIZE,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if not widths:
            raise ValueError("widths must name at least one block width, e.g. (32, 64, 128, 192)")
        self.shape_names = tuple(shape_names)
        self.colour_names = tuple(colour_names)
        self.view_names = tuple(view_names)
        self.widths = tuple(int(w) for w in widths)
        self.input_size = int(input_size)
        self.dropout = float(dropout)
        blocks, c_in = [], 3
        for width in self.widths:
            blocks.append(_block(c_in, width))
            c_in = width
        self.features = nn.Sequential(*blocks)
        self.drop = nn.Dropout(dropout)
        self.shape_head = nn.Linear(c_in, len(self.shape_names))
        self.colour_head = nn.Linear(c_in, len(self.colour_names))
        self.view_head = nn.Linear(c_in, len(self.view_names))
        # Fixed input normalisation (toy images are roughly centred at 0.5).
        self.register_buffer("mean", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.25, 0.25, 0.25]).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.shape_head.weight.device

    def forward(self, x: Float[Tensor, "B 3 H W"]) -> Prediction:
        """Logits for channel-first images in [0, 1] already at ``input_size``."""
        h = self.features((x - self.mean) / self.std)
        h = self.drop(h.mean(dim=(2, 3)))
        return Prediction(self.shape_head(h), self.colour_head(h), self.view_head(h))

    def prepare(self, images: Float[Tensor, "B H W 3"]) -> Float[Tensor, "B 3 S S"]:
        """Channel-last [0, 1] images -> channel-first at ``input_size`` on this model's device."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be (B, H, W, 3) channel-last, got {tuple(images.shape)}")
        x = images.to(self.device, torch.float32).permute(0, 3, 1, 2)
        if x.shape[-2:] != (self.input_size, self.input_size):
            # antialias: SDS renders at 128 or more would otherwise alias into the classifier.
            x = F.interpolate(x, size=(self.input_size,) * 2, mode="bilinear", align_corners=False, antialias=True)
        return x.clamp(0.0, 1.0).contiguous()

    @torch.no_grad()
    def predict(self, images: Float[Tensor, "B H W 3"], batch_size: int = 1024) -> Prediction:
        """Logits for channel-last images in [0, 1] of any size (eval mode, no gradients, CPU out)."""
        was_training = self.training
        self.eval()
        try:
            parts = [
                self(self.prepare(images[i : i + batch_size])) for i in range(0, images.shape[0], batch_size)
            ]
        finally:
            self.train(was_training)
        pred = Prediction.concat(parts)
        return Prediction(pred.shape_logits.float().cpu(), pred.colour_logits.float().cpu(), pred.view_logits.float().cpu())

    # ------------------------------------------------------------------ persistence

    def config(self) -> dict[str, Any]:
        return {
            "shape_names": list(self.shape_names),
            "colour_names": list(self.colour_names),
            "view_names": list(self.view_names),
            "widths": list(self.widths),
            "input_size": self.input_size,
            "dropout": self.dropout,
        }

    def save(self, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write weights and metadata (``extra``: accuracies, training summary) to ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": f"magic3d-evaluator-v{FORMAT_VERSION}"})
        meta = {"format_version": FORMAT_VERSION, **self.config(), **(extra or {})}
        (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path = DEFAULT_FOLDER, device: str | torch.device = "cpu") -> "ToyWorldClassifier":
        folder = Path(folder)
        meta_file, weights = folder / META_FILE, folder / WEIGHTS_FILE
        if not meta_file.is_file() or not weights.is_file():
            raise FileNotFoundError(
                f"No evaluator classifier in '{folder}' (needs {META_FILE} and {WEIGHTS_FILE}). "
                f"Train one: python -m magic3d.eval train-classifier --out {folder}"
            )
        meta = read_metadata(folder)
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"Classifier in '{folder}' has format version {meta.get('format_version')}, this code reads "
                f"{FORMAT_VERSION}: retrain it with python -m magic3d.eval train-classifier --out {folder}"
            )
        model = cls(
            shape_names=tuple(meta["shape_names"]),
            colour_names=tuple(meta["colour_names"]),
            view_names=tuple(meta["view_names"]),
            widths=tuple(meta["widths"]),
            input_size=int(meta["input_size"]),
            dropout=float(meta.get("dropout", 0.0)),
        )
        model.load_state_dict(load_file(str(weights)))
        return model.to(device).eval()


def read_metadata(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / META_FILE).read_text())


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_classifier(classifier: str | Path | ToyWorldClassifier, device: torch.device) -> ToyWorldClassifier:
    """A classifier object (moved to ``device``) or a saved folder, ready for ``predict``."""
    if isinstance(classifier, ToyWorldClassifier):
        return classifier.to(device).eval()
    return ToyWorldClassifier.load(classifier, device)


def classifier_info(classifier: str | Path | ToyWorldClassifier) -> dict[str, Any]:
    """What a report records about its classifier: the folder and its held-out accuracies."""
    if isinstance(classifier, ToyWorldClassifier):
        return {"folder": None}
    meta = read_metadata(classifier)
    return {"folder": str(classifier), "heldout_accuracy": meta.get("heldout_accuracy")}


def class_index(names: tuple[str, ...], name: str, what: str) -> int:
    """Index of ``name`` in one of the classifier's vocabularies; an error that says how to
    retrain it when the toy world has grown past the saved classifier."""
    if name not in names:
        raise ValueError(
            f"the evaluator classifier does not know the {what} {name!r} (it knows {names}); "
            "retrain it: python -m magic3d.eval train-classifier"
        )
    return names.index(name)
