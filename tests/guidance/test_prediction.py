"""Conversions between a UNet's output, epsilon and its training target (guidance.prediction)."""

from __future__ import annotations

import pytest
import torch

from magic3d.guidance.prediction import PREDICTION_TYPES, check_prediction_type, eps_from_prediction, prediction_target


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_a_perfect_prediction_gives_back_the_noise(prediction_type: str) -> None:
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    ab = torch.tensor([0.9999, 0.9, 0.5, 0.1, 1e-3])
    a, s = ab.sqrt().view(-1, 1, 1, 1), (1 - ab).sqrt().view(-1, 1, 1, 1)
    x_t = a * x0 + s * noise
    target = prediction_target(x0, noise, ab, prediction_type)
    # float32 with ab down to 1e-3: x0 -> eps divides by sqrt(1 - ab) >= 0.01, ~1e-5 of |x|
    torch.testing.assert_close(eps_from_prediction(target, x_t, ab, prediction_type), noise, rtol=1e-4, atol=1e-4)


def test_v_target_is_the_published_formula() -> None:
    x0, noise = torch.full((1, 1, 1, 1), 2.0), torch.full((1, 1, 1, 1), -1.0)
    ab = torch.tensor([0.64])  # sqrt 0.8, sqrt(1 - ab) 0.6
    # v = sqrt(ab) eps - sqrt(1 - ab) x0 = 0.8 * -1 - 0.6 * 2 (Salimans & Ho 2022, eq. in §4)
    assert prediction_target(x0, noise, ab, "v_prediction").item() == pytest.approx(-2.0)
    assert prediction_target(x0, noise, ab, "epsilon") is noise


def test_unknown_prediction_type_is_named() -> None:
    x = torch.zeros(1, 1, 1, 1)
    with pytest.raises(ValueError, match="'flow' is unknown"):
        prediction_target(x, x, torch.tensor([0.5]), "flow")
    with pytest.raises(ValueError, match="the scheduler: prediction_type='flow'"):
        check_prediction_type("flow", "the scheduler")
