"""Grading a personalised prior: the mechanics on the tiny tuned prior with an untrained
evaluator (its accuracies mean nothing here; the GPU script measures the real ones)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from magic3d.config import ConfigError
from magic3d.eval.__main__ import main as eval_main
from magic3d.eval.dreambooth import evaluate_personalisation, personalisation_markdown
from magic3d.eval.prior import load_prior_pipeline

CHEAP = dict(n_images=2, n_per_drift_caption=1, drift_shapes=("cube",), drift_colours=("red", "blue"), steps=2,
             device="cpu")


def test_report_has_subject_baseline_drift_and_lora_figures(tuned_pixel, tiny_pixel_pipeline: Path,
                                                           random_classifier: Path) -> None:
    _, lora = tuned_pixel
    result = evaluate_personalisation(tiny_pixel_pipeline, lora, classifier=random_classifier, **CHEAP)
    assert result.tuned.prompt == "a sks duck" and result.untuned.prompt == "a pink duck"
    assert result.tuned.n_images == 2
    assert result.drift["same class"].captions == ["a red duck", "a blue duck"]
    assert result.drift["same colour"].captions == ["a pink cube"]
    for value in (result.tuned.caption_accuracy, result.untuned.caption_accuracy,
                  *(d.before for d in result.drift.values()), *(d.after for d in result.drift.values())):
        assert 0.0 <= value <= 1.0
    assert result.lora_mb > 0 and result.train_steps == 3
    data = result.to_json()
    assert data["drift"]["same class"]["change"] == pytest.approx(result.drift["same class"].change)
    table = personalisation_markdown([result])
    assert "a sks duck" in table and table.count("\n") == 3


def test_cli_writes_the_json_report(tuned_pixel, tiny_pixel_pipeline: Path, random_classifier: Path,
                                    tmp_path: Path) -> None:
    _, lora = tuned_pixel
    out = tmp_path / "eval.json"
    code = eval_main(["dreambooth", str(tiny_pixel_pipeline), str(lora), "--n-images", "1", "--n-per-drift-caption",
                      "1", "--drift-shapes", "cube", "--drift-colours", "red", "--steps", "1", "--device", "cpu",
                      "--classifier", str(random_classifier), "--out", str(out)])
    assert code == 0
    assert json.loads(out.read_text())["tuned"]["prompt"] == "a sks duck"


def test_a_lora_is_checked_against_the_prior_it_is_graded_on(tuned_pixel, tiny_latent_pipeline: Path) -> None:
    _, lora = tuned_pixel
    import torch

    with pytest.raises(ConfigError, match="was trained on"):
        load_prior_pipeline(tiny_latent_pipeline, torch.device("cpu"), lora=lora)
