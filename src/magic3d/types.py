"""Dataclasses that cross module boundaries: cameras, renders, guidance results.

Axis glossary for jaxtyping annotations (shared across the package):
B cameras, H W pixels, R rays, S samples, P points, V vertices, F faces, T tets, C channels.

Conventions: world is right-handed with +z up, objects centred at the origin. Cameras follow
OpenGL (camera looks down its local -z, +y is up in the camera frame). Azimuth 0 puts the
camera on the +x axis looking at the origin ("front"); azimuth grows counter-clockwise seen
from +z. Angles are radians in code, degrees in configs. Images are channel-last in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
from jaxtyping import Float, Int
from torch import Tensor


@dataclass
class CameraBatch:
    """A batch of pinhole cameras plus the point light used to shade each view."""

    c2w: Float[Tensor, "B 4 4"]  # camera-to-world, OpenGL axes
    fovy: Float[Tensor, "B"]  # vertical field of view, radians
    elevation: Float[Tensor, "B"]  # radians, 0 = horizon, +pi/2 = straight above
    azimuth: Float[Tensor, "B"]  # radians in (-pi, pi], 0 = front (+x)
    distance: Float[Tensor, "B"]  # camera distance to the origin
    light_position: Float[Tensor, "B 3"]  # world-space point light
    height: int
    width: int

    @property
    def batch_size(self) -> int:
        return self.c2w.shape[0]

    @property
    def device(self) -> torch.device:
        return self.c2w.device

    @property
    def position(self) -> Float[Tensor, "B 3"]:
        return self.c2w[:, :3, 3]

    def to(self, device: torch.device | str) -> "CameraBatch":
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return replace(self, **moved)

    def __getitem__(self, index: slice | Tensor) -> "CameraBatch":
        sliced = {
            f.name: getattr(self, f.name)[index]
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return replace(self, **sliced)

    def with_resolution(self, height: int, width: int) -> "CameraBatch":
        return replace(self, height=height, width=width)


@dataclass
class Shading:
    """How a scene shades its surface for one batch.

    mode: "albedo" (colour only), "lambertian" (colour x (ambient + diffuse)),
    "textureless" (white x (ambient + diffuse)). ``ambient`` is per camera; the diffuse
    weight is ``1 - ambient`` (Magic3D-style soft shading).
    """

    mode: str
    ambient: Float[Tensor, "B"]


@dataclass
class RenderOutput:
    """What a scene renders for a batch of cameras. Channel-last, values in [0, 1]."""

    rgb: Float[Tensor, "B H W 3"]  # composited over the background
    opacity: Float[Tensor, "B H W 1"]
    depth: Float[Tensor, "B H W 1"]
    normal: Float[Tensor, "B H W 3"] | None = None  # world-space, unit where opacity > 0
    albedo: Float[Tensor, "B H W 3"] | None = None  # unshaded colour, no background
    background: Float[Tensor, "B H W 3"] | None = None
    # The scene's own regulariser terms (scalars), by the names its ``regulariser_names()``
    # declares (e.g. the NeRF's "orientation" and "sparsity", the mesh's "normal_consistency"
    # and "laplacian"); the stage weights them. A mapping because the names are the scene's.
    regularisers: dict[str, Float[Tensor, ""]] = field(default_factory=dict)
    samples_per_ray: float | None = None  # mean marched samples, for logging


@dataclass
class GuidanceOutput:
    """Result of one score-distillation step."""

    loss: Float[Tensor, ""]  # surrogate loss: its gradient w.r.t. the image is the SDS gradient
    grad_norm: Float[Tensor, ""]  # norm of the SDS gradient (after clipping), detached
    timesteps: Int[Tensor, "B"]
    skipped: bool = False  # True when a non-finite gradient was replaced by zero
