"""Shared fixtures: offline hub, isolated caches, a tiny IF-style pipeline, a smoke run."""

from __future__ import annotations

import os

# Must precede any diffusers/transformers import: huggingface_hub reads these at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pixel_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight tiny IF stage-I pipeline folder, built once per test session."""
    from magic3d.testing.random_pipelines import build_pixel_pipeline

    return build_pixel_pipeline(tmp_path_factory.mktemp("tiny_if"), "tiny", seed=0)


@pytest.fixture(autouse=True)
def _offline_and_isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the network or write to the user's ~/.cache."""
    monkeypatch.setenv("MAGIC3D_CACHE", str(tmp_path / "magic3d_cache"))
    try:  # huggingface_hub may have been imported before this conftest set the env var
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    except ImportError:
        pass


def run_cli(*args: str, env: dict | None = None, timeout: float = 600):
    """Run ``python -m magic3d ...`` as a user would; returns the CompletedProcess."""
    import subprocess
    import sys

    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "magic3d", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


SMOKE_OVERRIDES = (
    "trainer.max_steps=6",
    "data.steps_per_epoch=3",
    "run.checkpoint_every=3",
    "run.video_views=4",
    "model.preview_every=3",
    "trainer.log_every_n_steps=1",
)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory, tiny_pixel_pipeline: Path) -> Path:
    """One finished CPU run of the coarse recipe (tiny random prior), shared by several tests."""
    root = tmp_path_factory.mktemp("runs")
    run_dir = root / "smoke"
    cache = tmp_path_factory.mktemp("embedding_cache")
    result = run_cli("run", "coarse_only", "--prompt", "a red cube", "--run", str(run_dir),
                     f"model.guidance.pretrained={tiny_pixel_pipeline}", "run.wandb=offline",
                     *SMOKE_OVERRIDES,
                     env={"WANDB_MODE": "offline", "MAGIC3D_CACHE": str(cache), "WANDB_SILENT": "true"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="session")
def tiny_latent_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight tiny Stable-Diffusion-style pipeline folder, built once per session."""
    from magic3d.testing.random_pipelines import build_latent_pipeline

    return build_latent_pipeline(tmp_path_factory.mktemp("tiny_sd"), "tiny", seed=0)


@pytest.fixture(scope="session")
def smoke_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An evaluator classifier folder from the smoke training (a few steps on tiny data)."""
    from magic3d.eval.train_classifier import train_classifier

    out = tmp_path_factory.mktemp("evaluator") / "evaluator"
    result = train_classifier(out, minutes=1.0, smoke=True, device="cpu", log=lambda *_: None)
    assert result.steps == 4
    return out


@pytest.fixture(scope="session")
def random_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained evaluator classifier folder: for tests of the mechanics, not its accuracy."""
    import torch

    from magic3d.eval.classifier import ToyWorldClassifier

    torch.manual_seed(0)
    return ToyWorldClassifier().save(tmp_path_factory.mktemp("evaluator") / "evaluator")


# --- DreamBooth personalisation (issue 12, branch dreambooth) ---
def personalise(prior, subject: Path, steps: int, root: Path | None = None, **kwargs):
    """A DreamBooth module fitted for ``steps`` steps on CPU (no runner, no checkpoints)."""
    import lightning as L

    from magic3d.dreambooth.data import PersonalisationSteps
    from magic3d.dreambooth.module import DreamBooth

    model = DreamBooth(prior, prompt="a sks duck", subject=str(subject), **{**DREAMBOOTH_FAST, "lr": 1e-2, **kwargs})
    model.output_dir = root
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        num_sanity_val_steps=0, enable_model_summary=False, default_root_dir=root)
    trainer.fit(model, datamodule=PersonalisationSteps(batch_size=1, steps_per_epoch=steps))
    return model


DREAMBOOTH_FAST = dict(n_class_images=2, class_sample_steps=2, preview_every=0, n_preview=1, preview_steps=2)


@pytest.fixture(scope="session")
def pink_duck(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four 48 px renders of the held-out pink duck (RGBA), as a user's subject folder."""
    from magic3d.toyworld.subject import render_subject_photos

    folder = tmp_path_factory.mktemp("subject") / "pink_duck"
    render_subject_photos(folder, n_views=4, size=48)
    return folder


@pytest.fixture(scope="session")
def tuned_pixel(tmp_path_factory: pytest.TempPathFactory, tiny_pixel_pipeline: Path, pink_duck: Path):
    """The tiny IF prior personalised for 3 steps (UNet and text encoder) and its saved adapters."""
    from magic3d.dreambooth.prior import PixelPrior

    root = tmp_path_factory.mktemp("tuned_pixel")
    model = personalise(PixelPrior(str(tiny_pixel_pipeline)), pink_duck, 3, root, train_text_encoder=True)
    model.finish_stage(None, 1, 1)
    return model, root / "lora"


@pytest.fixture(scope="session")
def tuned_latent(tmp_path_factory: pytest.TempPathFactory, tiny_latent_pipeline: Path, pink_duck: Path):
    """The tiny SD prior personalised for 3 steps in latent space (UNet only) and its saved adapters."""
    from magic3d.dreambooth.prior import LatentPrior

    root = tmp_path_factory.mktemp("tuned_latent")
    model = personalise(LatentPrior(str(tiny_latent_pipeline)), pink_duck, 3, root)
    model.finish_stage(None, 1, 1)
    return model, root / "lora"
# --- end DreamBooth personalisation ---
