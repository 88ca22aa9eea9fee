"""Fixtures and helpers of the personalisation tests (imported by name: a second conftest.py
would shadow tests/conftest.py for the modules that import `run_cli` from it)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest

from magic3d.dreambooth.data import PersonalisationSteps
from magic3d.dreambooth.module import DreamBooth
from magic3d.dreambooth.prior import LatentPrior, PixelPrior

FAST = dict(n_class_images=2, class_sample_steps=2, preview_every=0, n_preview=1, preview_steps=2)


@pytest.fixture(scope="session")
def pink_duck(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four 48 px renders of the held-out pink duck (RGBA), as a user's subject folder."""
    from magic3d.toyworld.subject import render_subject_photos

    folder = tmp_path_factory.mktemp("subject") / "pink_duck"
    render_subject_photos(folder, n_views=4, size=48)
    return folder


def personalise(prior, subject: Path, steps: int, root: Path | None = None, **kwargs) -> DreamBooth:
    """A DreamBooth module fitted for ``steps`` steps on CPU (no runner, no checkpoints)."""
    model = DreamBooth(prior, prompt="a sks duck", subject=str(subject), **{**FAST, "lr": 1e-2, **kwargs})
    model.output_dir = root
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        num_sanity_val_steps=0, enable_model_summary=False, default_root_dir=root)
    trainer.fit(model, datamodule=PersonalisationSteps(batch_size=1, steps_per_epoch=steps))
    return model


@pytest.fixture(scope="module")
def tuned_pixel(tmp_path_factory: pytest.TempPathFactory, tiny_pixel_pipeline: Path, pink_duck: Path):
    """The tiny IF prior personalised for 3 steps (UNet and text encoder); its adapters saved."""
    root = tmp_path_factory.mktemp("tuned_pixel")
    model = personalise(PixelPrior(str(tiny_pixel_pipeline)), pink_duck, 3, root, train_text_encoder=True)
    model.finish_stage(None, 1, 1)
    return model, root / "lora"


@pytest.fixture(scope="module")
def tuned_latent(tmp_path_factory: pytest.TempPathFactory, tiny_latent_pipeline: Path, pink_duck: Path):
    """The tiny SD prior personalised for 3 steps in latent space (UNet only); its adapters saved."""
    root = tmp_path_factory.mktemp("tuned_latent")
    model = personalise(LatentPrior(str(tiny_latent_pipeline)), pink_duck, 3, root)
    model.finish_stage(None, 1, 1)
    return model, root / "lora"
