"""The scene protocol every 3D representation implements, plus shading shared by all scenes.

A scene is an ``nn.Module`` that renders a batch of cameras into a :class:`RenderOutput`.
The training stage only ever calls the three methods below, so a new representation is one
subclass; ablations swap it by ``class_path`` in YAML.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from magic3d.types import CameraBatch, RenderOutput, Shading

SHADING_MODES = ("albedo", "lambertian", "textureless")


class Scene(nn.Module):
    """Base class of all scenes (NeRF, DMTet, ...)."""

    def render(self, cameras: CameraBatch, shading: Shading) -> RenderOutput:
        raise NotImplementedError(f"{type(self).__name__} must implement render()")

    def update_step(self, step: int) -> None:
        """Per-iteration housekeeping before the render (occupancy updates etc.)."""

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by named part ("encoding", "network", "background", ...).

        The stage maps a learning rate to each name. Every trainable parameter must appear
        in exactly one group; parts without parameters are left out. The default puts
        everything under "network".
        """
        params = [p for p in self.parameters() if p.requires_grad]
        return {"network": params} if params else {}


def shade(
    albedo: Float[Tensor, "B ... 3"],
    normal: Float[Tensor, "B ... 3"],
    light_dir: Float[Tensor, "B ... 3"],
    shading: Shading,
) -> Float[Tensor, "B ... 3"]:
    """Soft diffuse shading: colour * (ambient + (1 - ambient) * max(0, n.l)).

    ``albedo`` is straight (not premultiplied by opacity). ``normal`` and ``light_dir``
    (surface towards light) need not be unit length: they are normalised here, and a zero
    normal (empty pixel) gets ambient light only. The leading axis of the inputs must match
    ``shading.ambient`` (one value per camera; per-sample callers can pass a Shading whose
    ``ambient`` is gathered per sample). "textureless" shades a white surface.
    """
    if shading.mode not in SHADING_MODES:
        raise ValueError(f"unknown shading mode {shading.mode!r}; use one of {SHADING_MODES}")
    if shading.mode == "albedo":
        return albedo
    ambient = shading.ambient.to(albedo.dtype).reshape((-1,) + (1,) * (albedo.dim() - 1))
    n_dot_l = (F.normalize(normal, dim=-1) * F.normalize(light_dir, dim=-1)).sum(-1, keepdim=True)
    light = ambient + (1.0 - ambient) * n_dot_l.clamp_min(0.0)
    colour = torch.ones_like(albedo) if shading.mode == "textureless" else albedo
    return colour * light
