"""Render degradations as training augmentations: off means off, on changes only what it
should (the backdrop outside the object stays), strengths are drawn per image, seeded."""

from __future__ import annotations

import torch

from magic3d.eval.degradations import backdrop_colour, random_render_degradations, translucent


def gradient_scene(b: int = 4, size: int = 16):
    """A red square over a horizontal grey gradient (not a plain backdrop)."""
    mask = torch.zeros(b, 1, size, size)
    mask[:, :, 4:12, 4:12] = 1.0
    ramp = torch.linspace(0.2, 0.8, size)
    background = ramp.view(1, 1, 1, size).expand(b, 3, size, size)
    red = torch.tensor([0.9, 0.1, 0.1])[None, :, None, None]
    return background + mask * (red - background), mask


def test_translucency_leaves_uncovered_pixels_alone_on_any_backdrop() -> None:
    images, mask = gradient_scene()
    faded = translucent(images, mask, backdrop_colour(images, mask), torch.Generator(), alpha=0.5)
    outside = mask.expand_as(images) == 0
    assert torch.equal(faded[outside], images[outside])  # the gradient survives
    inside = faded[:, :, 8, 8]
    assert (inside[:, 0] < 0.9).all() and (inside[:, 1] > 0.1).all()  # the object moved towards the backdrop


def test_probability_zero_is_the_identity_and_one_changes_every_image() -> None:
    images, mask = gradient_scene()
    g = torch.Generator().manual_seed(0)
    assert random_render_degradations(images, mask, g, 0.0) is images
    out = random_render_degradations(images, mask, torch.Generator().manual_seed(0), 1.0)
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    assert all(not torch.equal(out[i], images[i]) for i in range(len(images)))


def test_strengths_are_drawn_per_image_and_seeded() -> None:
    images, mask = gradient_scene(b=8)
    images = images[:1].expand_as(images).clone()  # eight copies of one image
    a = random_render_degradations(images, mask, torch.Generator().manual_seed(5), 0.5)
    b = random_render_degradations(images, mask, torch.Generator().manual_seed(5), 0.5)
    assert torch.equal(a, b)
    distinct = {tuple(a[i].flatten()[:64].tolist()) for i in range(len(a))}
    assert len(distinct) > 1  # the copies came out differently
