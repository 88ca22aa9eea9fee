"""The evaluator classifier: augmentation, size budget, training, persistence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from magic3d.eval.classifier import ToyWorldClassifier, class_index
from magic3d.eval.train_classifier import augment, gaussian_blur
from magic3d.toyworld.shapes import COLOUR_NAMES, SHAPE_NAMES


def test_blur_with_zero_sigma_is_identity_and_augment_stays_in_range() -> None:
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(gaussian_blur(x, torch.zeros(3)), x, atol=1e-6, rtol=0)  # kernel = delta
    blurred = gaussian_blur(x, torch.full((3,), 1.5))
    assert blurred.std() < x.std()
    y = augment(x, torch.Generator().manual_seed(1))
    assert y.shape == x.shape and float(y.min()) >= 0.0 and float(y.max()) <= 1.0


def test_classifier_shapes_and_parameter_budget() -> None:
    model = ToyWorldClassifier()
    n = sum(p.numel() for p in model.parameters())
    assert 0.3e6 <= n <= 1.0e6
    pred = model.predict(torch.rand(2, 32, 32, 3))  # resized to 64 inside
    assert pred.shape_logits.shape == (2, len(SHAPE_NAMES))
    assert pred.colour_logits.shape == (2, len(COLOUR_NAMES)) and pred.view_logits.shape == (2, 4)


def test_smoke_training_saves_and_reloads(smoke_classifier: Path) -> None:
    meta = json.loads((smoke_classifier / "classifier.json").read_text())
    assert meta["shape_names"] == list(SHAPE_NAMES) and meta["input_size"] == 64
    assert set(meta["heldout_accuracy"]) == {"shape", "colour", "caption", "view_asymmetric"}
    assert all(0.0 <= v <= 1.0 for v in meta["heldout_accuracy"].values())
    a = ToyWorldClassifier.load(smoke_classifier)
    b = ToyWorldClassifier.load(smoke_classifier)
    images = torch.rand(3, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.predict(images).shape_logits, b.predict(images).shape_logits)
    with pytest.raises(FileNotFoundError, match="train-classifier"):
        ToyWorldClassifier.load(smoke_classifier.parent / "missing")


def test_class_index_names_the_retraining_command_for_an_unknown_name() -> None:
    assert class_index(SHAPE_NAMES, SHAPE_NAMES[2], "shape") == 2
    with pytest.raises(ValueError, match="train-classifier"):
        class_index(SHAPE_NAMES, "dragon", "shape")
