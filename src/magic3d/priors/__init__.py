"""Small diffusion priors trained from scratch on the toy world and shipped with the
repository: ``python -m magic3d.priors train --kind pixel|latent --out priors/<kind>``.

The exported folders are ordinary diffusers pipelines (IF stage-I layout for ``pixel``,
Stable Diffusion layout for ``latent``) that the guidance modules load like real models.
"""

from magic3d.priors.configs import (
    PRIOR_KINDS,
    PriorConfig,
    TextEncoderConfig,
    default_config,
)
from magic3d.priors.heldout import HELD_OUT_PAIRS
from magic3d.priors.train import TrainResult, default_state_path, train_prior

__all__ = [
    "HELD_OUT_PAIRS",
    "PRIOR_KINDS",
    "PriorConfig",
    "TextEncoderConfig",
    "TrainResult",
    "default_config",
    "default_state_path",
    "train_prior",
]
