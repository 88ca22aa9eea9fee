"""DreamBooth's objective (Ruiz et al. 2023, eq. 2): the denoising loss on the subject's images
plus, weighted by lambda, the same loss on class images the frozen prior made ("prior
preservation"), which keeps the class from collapsing onto the subject and the rest of the
prior from drifting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor


@dataclass
class DreamBoothLoss:
    total: Float[Tensor, ""]
    instance: Float[Tensor, ""]  # mean squared error on the subject's images
    prior: Float[Tensor, ""] | None  # the same on the class images; None without prior preservation


def dreambooth_loss(
    prediction: Float[Tensor, "B C h w"],
    target: Float[Tensor, "B C h w"],
    class_prediction: Float[Tensor, "K C h w"] | None = None,
    class_target: Float[Tensor, "K C h w"] | None = None,
    prior_loss_weight: float = 1.0,
) -> DreamBoothLoss:
    """``mse(subject) + prior_loss_weight * mse(class)``, each a mean over its elements."""
    instance = F.mse_loss(prediction.float(), target.float())
    if class_prediction is None or prior_loss_weight == 0.0:
        return DreamBoothLoss(total=instance, instance=instance, prior=None)
    if class_target is None:
        raise ValueError("class_prediction needs class_target")
    prior = F.mse_loss(class_prediction.float(), class_target.float())
    return DreamBoothLoss(total=instance + prior_loss_weight * prior, instance=instance, prior=prior)
