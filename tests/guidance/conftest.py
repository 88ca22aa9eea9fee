"""Fixtures for guidance tests: offline hub, isolated caches, a tiny IF-style pipeline."""

from __future__ import annotations

import os

# Must precede any diffusers/transformers import: huggingface_hub reads these at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pixel_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight tiny IF stage-I pipeline folder, built once per test session."""
    from magic3d.guidance.builders import build_pixel_pipeline

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
