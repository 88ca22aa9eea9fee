"""DreamBooth's loss with prior preservation: known numbers, and the class term's gradient."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from magic3d.dreambooth.losses import dreambooth_loss


def test_known_numbers() -> None:
    prediction = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]]])  # mse 1
    class_prediction = torch.zeros(2, 1, 1, 2)
    class_target = torch.tensor([[[[2.0, 0.0]]], [[[0.0, 2.0]]]])  # mse (4 + 4) / 4 = 2
    loss = dreambooth_loss(prediction, target, class_prediction, class_target, prior_loss_weight=0.5)
    assert (float(loss.instance), float(loss.prior), float(loss.total)) == (1.0, 2.0, 2.0)
    alone = dreambooth_loss(prediction, target)
    assert alone.prior is None and float(alone.total) == 1.0
    assert dreambooth_loss(prediction, target, class_prediction, class_target, 0.0).prior is None
    with pytest.raises(ValueError, match="needs class_target"):
        dreambooth_loss(prediction, target, class_prediction, None)


def test_the_prior_term_pulls_the_class_prediction_towards_the_frozen_samples() -> None:
    class_prediction = torch.zeros(1, 1, 1, 3, requires_grad=True)
    class_target = torch.tensor([[[[3.0, -3.0, 0.0]]]])
    loss = dreambooth_loss(torch.zeros(1, 1, 1, 3), torch.zeros(1, 1, 1, 3), class_prediction, class_target, 2.0)
    loss.total.backward()
    # d/dp [2 * mean((p - y)^2)] = 2 * 2 (p - y) / 3
    assert torch.allclose(class_prediction.grad, 4.0 * (class_prediction - class_target).detach() / 3.0)


def test_prior_preservation_reaches_the_adapters_in_the_stage(tuned_latent) -> None:
    """With the weight at 0 the class images' term is absent and its gradient with it; at 1 the
    adapters' gradient changes (each step trains on subject and class images together)."""
    model, _ = tuned_latent
    grads = {}
    for weight in (0.0, 1.0):
        model.prior_loss_weight = weight
        model.zero_grad()
        loss = model.step_loss(1, step=7)
        assert (loss.prior is None) == (weight == 0.0)
        loss.total.backward()
        grads[weight] = torch.cat([p.grad.flatten() for p in model.adapters.values() if p.grad is not None])
    model.prior_loss_weight = 1.0
    model.zero_grad()
    assert grads[0.0].shape == grads[1.0].shape and not torch.allclose(grads[0.0], grads[1.0])
    assert float(grads[1.0].norm()) > 0
