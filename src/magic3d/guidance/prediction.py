"""What a diffusion UNet predicts (diffusers' ``prediction_type``) and the conversions between
its output, epsilon and the training target.

With ``x_t = sqrt(ab) x0 + sqrt(1 - ab) eps`` (``ab`` = alpha_bar_t):

- "epsilon": the noise (DeepFloyd IF, SD 2.1-base);
- "v_prediction": ``v = sqrt(ab) eps - sqrt(1 - ab) x0`` (SD 2.1 at 768 px; Salimans & Ho
  2022). Its x0 estimate ``sqrt(ab) x_t - sqrt(1 - ab) v`` stays well conditioned at high
  noise, where an epsilon model's ``(x_t - sqrt(1 - ab) eps) / sqrt(ab)`` multiplies the
  network's error by up to ``1 / sqrt(ab)`` (34x at t = 980 on IF's cosine schedule);
- "sample": x0 itself.

SDS, DreamBooth and the prior trainer all reason in epsilon; these functions are the one place
that knows the other parameterisations.
"""

from __future__ import annotations

from typing import Literal

from jaxtyping import Float
from torch import Tensor

PredictionType = Literal["epsilon", "v_prediction", "sample"]
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample")


def check_prediction_type(prediction_type: str, where: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"{where}: prediction_type={prediction_type!r} is unknown: use one of {PREDICTION_TYPES}.")
    return prediction_type


def _per_sample(alpha_bar_t: Tensor, like: Tensor) -> Tensor:
    return alpha_bar_t.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def eps_from_prediction(
    output: Float[Tensor, "B C H W"],
    x_t: Float[Tensor, "B C H W"],
    alpha_bar_t: Float[Tensor, "B"],
    prediction_type: str,
) -> Float[Tensor, "B C H W"]:
    """The UNet's noise estimate from its raw output: v gives ``eps = sqrt(ab) v + sqrt(1-ab) x_t``;
    x0 gives ``eps = (x_t - sqrt(ab) x0) / sqrt(1-ab)``."""
    if prediction_type == "epsilon":
        return output
    ab = _per_sample(alpha_bar_t, x_t)
    if prediction_type == "v_prediction":
        return ab.sqrt() * output + (1.0 - ab).sqrt() * x_t
    if prediction_type == "sample":
        return (x_t - ab.sqrt() * output) / (1.0 - ab).sqrt()
    raise ValueError(f"prediction_type={prediction_type!r} is unknown: use one of {PREDICTION_TYPES}.")


def prediction_target(
    x0: Float[Tensor, "B C H W"],
    noise: Float[Tensor, "B C H W"],
    alpha_bar_t: Float[Tensor, "B"],
    prediction_type: str,
) -> Float[Tensor, "B C H W"]:
    """What a UNet of ``prediction_type`` is trained to output for ``x_t`` made of ``x0`` and ``noise``."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        ab = _per_sample(alpha_bar_t, x0)
        return ab.sqrt() * noise - (1.0 - ab).sqrt() * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(f"prediction_type={prediction_type!r} is unknown: use one of {PREDICTION_TYPES}.")
