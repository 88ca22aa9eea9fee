"""Evaluator robustness: each degradation does what it says, and the report is written."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from magic3d.eval.robustness import (
    DEGRADATIONS,
    evaluate_robustness,
    backdrop_colour,
    speckle,
    translucent,
    write_robustness_report,
)


def scene(b: int = 2, size: int = 16):
    """A red square on a grey backdrop."""
    mask = torch.zeros(b, 1, size, size)
    mask[:, :, 4:12, 4:12] = 1.0
    background = torch.full((b, 3, size, size), 0.5)
    red = torch.tensor([0.9, 0.1, 0.1])[None, :, None, None]
    return background + mask * (red - background), mask


def test_background_is_recovered_and_translucency_is_exact() -> None:
    images, mask = scene()
    background = backdrop_colour(images, mask)
    torch.testing.assert_close(background, torch.full_like(images, 0.5))
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(translucent(images, mask, background, g, alpha=1.0), images)
    half = translucent(images, mask, background, g, alpha=0.5)
    torch.testing.assert_close(half[0, :, 8, 8], torch.tensor([0.7, 0.3, 0.3]))  # halfway to grey
    torch.testing.assert_close(half[0, :, 0, 0], torch.tensor([0.5, 0.5, 0.5]))  # backdrop untouched


def test_degradations_are_seeded_and_change_the_image() -> None:
    images, mask = scene()
    background = backdrop_colour(images, mask)
    for name, degrade in DEGRADATIONS.items():
        a = degrade(images, mask, background, torch.Generator().manual_seed(3))
        b = degrade(images, mask, background, torch.Generator().manual_seed(3))
        assert torch.equal(a, b), name
        assert a.shape == images.shape, name
        assert torch.equal(a, images) == (name == "clean"), name
    hit = speckle(images, mask, background, torch.Generator().manual_seed(0), fraction=0.25)
    changed = (hit != images).any(dim=1).float().mean()
    assert 0.15 < float(changed) < 0.35  # 25 % of 512 pixels, binomial spread
    none = speckle(images, mask, background, torch.Generator().manual_seed(0), fraction=0.0)
    assert torch.equal(none, images)


def test_robustness_report_on_the_smoke_classifier(smoke_classifier: Path, tmp_path: Path) -> None:
    result = evaluate_robustness(n_images=24, classifier=smoke_classifier, device="cpu", image_size=32)
    assert list(result.accuracy) == list(DEGRADATIONS)
    for acc in result.accuracy.values():
        assert all(0.0 <= v <= 1.0 for v in acc.values())
    json_path, md_path = write_robustness_report(result, tmp_path)
    assert json.loads(json_path.read_text())["n_images"] == result.n_images
    assert "| translucent (alpha 0.6) |" in md_path.read_text()
