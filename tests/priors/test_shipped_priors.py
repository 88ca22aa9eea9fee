"""The priors shipped in the repository load offline through the real loading code."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from magic3d.data.cameras import orbit_cameras
from magic3d.eval.classifier import ToyWorldClassifier
from magic3d.eval.metrics import parse_prompt, r_precision
from magic3d.guidance.latent_sds import LatentSDS
from magic3d.guidance.pixel_sds import PixelSDS
from magic3d.toyworld.dataset import ground_truth_views

PRIORS = Path(__file__).resolve().parents[2] / "priors"


def test_pixel_prior_gives_finite_sds_gradients_offline(tmp_path: Path) -> None:
    guidance = PixelSDS(str(PRIORS / "pixel"), cache_dir=str(tmp_path))
    guidance.setup("a red cube", "cpu")
    cameras = orbit_cameras(n_views=2, elevation_deg=15.0, distance=2.0, fovy_deg=50.0, height=32, width=32)
    rgb = torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    out = guidance.step(rgb, cameras, progress=0.5)
    out.loss.backward()
    assert torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0
    assert not out.skipped
    assert guidance.state_dict() == {} or all(not k.startswith("unet") for k in guidance.state_dict())
    total_mb = sum(p.stat().st_size for p in (PRIORS / "pixel").rglob("*.safetensors")) / 1e6
    assert total_mb <= 14.0, "the pixel prior's share of the 24 MB repository budget"


def test_latent_prior_gives_finite_sds_gradients_through_its_vae_offline(tmp_path: Path) -> None:
    guidance = LatentSDS(str(PRIORS / "latent"), cache_dir=str(tmp_path))
    guidance.setup("a red cube", "cpu")
    cameras = orbit_cameras(n_views=1, elevation_deg=15.0, distance=2.0, fovy_deg=40.0, height=64, width=64)
    rgb = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    out = guidance.step(rgb, cameras, progress=0.5)  # resized to the prior's 256 px, encoded with grad
    out.loss.backward()
    assert torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0
    assert not out.skipped
    sizes = {kind: sum(p.stat().st_size for p in (PRIORS / kind).rglob("*.safetensors")) / 1e6
             for kind in ("pixel", "latent")}
    assert sizes["latent"] <= 10.0 and sum(sizes.values()) <= 24.0, f"repository budget for priors: {sizes}"


@pytest.mark.parametrize(("prompt", "other_shape"), [("a red cube", "sphere"), ("an orange duck", "car"),
                                                    ("a blue house", "cone")])
def test_evaluator_recognises_ground_truth(prompt: str, other_shape: str) -> None:
    classifier = ToyWorldClassifier.load(PRIORS / "evaluator")
    parsed = parse_prompt(prompt)
    cameras = orbit_cameras(n_views=8, elevation_deg=20.0, distance=2.0, fovy_deg=50.0, height=64, width=64)
    views = ground_truth_views(parsed.shape, parsed.colour, cameras)
    prediction = classifier.predict(views.rgb)
    # Held-out caption accuracy was 99.7 % at elevation <= 60 deg (classifier.json); allow one
    # miss in 8 views so a borderline view cannot make this flaky.
    assert r_precision(prediction, parsed.shape_id, parsed.colour_id) >= 7 / 8
    # And not lenient: another shape in the prompt's colour is not the prompt (same one-miss
    # allowance). A metric that counted colour-only matches would score these views 1.
    impostor = classifier.predict(ground_truth_views(other_shape, parsed.colour, cameras).rgb)
    assert r_precision(impostor, parsed.shape_id, parsed.colour_id) <= 1 / 8
