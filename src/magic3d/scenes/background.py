"""Backgrounds: a colour per view direction, composited behind the scene."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn


class EnvironmentMapBackground(nn.Module):
    """A small MLP from view direction to colour (Magic3D §4.2's environment map).

    Frequency-encoded direction -> one hidden layer -> sigmoid RGB. Kept deliberately small
    (and trained with a larger learning rate by the stage) so it fits the backdrop, not the
    object.

    ``random_aug_prob``: in training mode, each camera's whole background is replaced by a
    random solid colour with this probability (threestudio's ``random_aug``). The object then
    has to be opaque on its own -- a translucent object letting a learned background paint it
    would look wrong against an arbitrary colour. 0.5 keeps half of the views for learning
    the environment map itself; 0 disables it. ``forward`` expects the camera axis first.
    """

    def __init__(self, n_frequencies: int = 4, hidden_dim: int = 32, random_aug_prob: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= random_aug_prob <= 1.0:
            raise ValueError(f"random_aug_prob must be in [0, 1], got {random_aug_prob}")
        self.n_frequencies = n_frequencies
        self.random_aug_prob = random_aug_prob
        self.register_buffer(
            "frequencies", torch.pi * 2.0 ** torch.arange(n_frequencies, dtype=torch.float32), persistent=False
        )
        in_dim = 3 + 6 * n_frequencies
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 3))

    def encode(self, dirs: Float[Tensor, "... 3"]) -> Float[Tensor, "... E"]:
        angles = (dirs[..., None, :] * self.frequencies[:, None]).flatten(-2)
        return torch.cat([dirs, torch.sin(angles), torch.cos(angles)], dim=-1)

    def forward(
        self, dirs: Float[Tensor, "B ... 3"], generator: torch.Generator | None = None
    ) -> Float[Tensor, "B ... 3"]:
        rgb = torch.sigmoid(self.mlp(self.encode(dirs)))
        if self.training and self.random_aug_prob > 0:
            batch = dirs.shape[0]
            view = (batch,) + (1,) * (dirs.dim() - 2) + (3,)
            solid = torch.rand(batch, 3, generator=generator, device=dirs.device, dtype=rgb.dtype)
            replace = torch.rand(batch, generator=generator, device=dirs.device) < self.random_aug_prob
            rgb = torch.where(replace.view(view[:-1] + (1,)), solid.view(view), rgb)
        return rgb


class SolidBackground(nn.Module):
    """One fixed colour for every direction; no parameters (tests, validation renders)."""

    def __init__(self, color: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> None:
        super().__init__()
        # Not persistent: the colour comes from the config, never from an old checkpoint.
        self.register_buffer("color", torch.tensor(color, dtype=torch.float32), persistent=False)

    def forward(self, dirs: Float[Tensor, "... 3"]) -> Float[Tensor, "... 3"]:
        return self.color.to(dirs.dtype).expand(dirs.shape)
