"""The scene protocol every 3D representation implements, plus shading shared by all scenes.

A scene is an ``nn.Module`` that renders a batch of cameras into a :class:`RenderOutput`.
Its abilities are declared methods of :class:`Scene` (a mesh of its own, a density field,
its own regulariser terms), never probed with ``hasattr``; a new representation is one
:class:`SceneModule` subclass, swapped in by ``class_path`` in YAML.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from magic3d.ops.marching_tets import Mesh
from magic3d.types import CameraBatch, RenderOutput, Shading

SHADING_MODES = ("albedo", "lambertian", "textureless")


@dataclass(frozen=True)
class DensityField:
    """A scene seen as a density field: what conversion, mesh export and evaluation query.

    ``density(points)`` is volume density (1/length) and ``albedo(points)`` colour in [0, 1] at
    world-space points inside the box ``[-radius, radius]^3``; ``device`` is where to query.
    """

    density: Callable[[Tensor], Tensor]
    albedo: Callable[[Tensor], Tensor]
    radius: float
    device: torch.device


@runtime_checkable
class Scene(Protocol):
    """What a 3D representation must offer to be optimised by ``TextTo3D`` and read by export
    and evaluation. Configs are checked against it (jsonargparse refuses a ``class_path`` that
    does not implement it). Subclass :class:`SceneModule` for the defaults of the optional
    abilities (``extract_mesh``, ``density_field``, ``regulariser_names``).

    The members are declared without annotations on purpose: jsonargparse requires annotated
    protocol types to match an implementation's exactly, and two spellings of the same
    jaxtyping shape are not equal objects. The types are in each docstring; the
    implementations carry the annotated signatures.
    """

    def render(self, cameras, shading):
        """(CameraBatch, Shading) -> RenderOutput, channel-last in [0, 1]."""

    def update_step(self, step):
        """(int) -> None: per-iteration housekeeping before the render (occupancy updates etc.)."""

    def param_groups(self):
        """() -> dict[str, list[nn.Parameter]]: trainable parameters by named part; the stage
        maps a learning rate to each name."""

    def regulariser_names(self):
        """() -> tuple[str, ...]: names of the scalar terms put in ``RenderOutput.regularisers``."""

    def albedo(self, points):
        """(Float[Tensor, "P 3"]) -> Float[Tensor, "P 3"]: unshaded colour in [0, 1] at
        world-space points (texture baking, conversion)."""

    def extract_mesh(self):
        """() -> Mesh | None: the scene's own explicit surface (DMTet), None when it has none."""

    def density_field(self):
        """() -> DensityField | None: the scene as a density field (NeRF), None when it is not one."""


class SceneModule(nn.Module):
    """Base class of the scenes in this package: the optional abilities' defaults."""

    def render(self, cameras: CameraBatch, shading: Shading) -> RenderOutput:
        raise NotImplementedError(f"{type(self).__name__} must implement render()")

    def update_step(self, step: int) -> None:
        """Nothing to do between steps by default."""

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Every trainable parameter under "network". Every trainable parameter must appear in
        exactly one group; parts without parameters are left out."""
        params = [p for p in self.parameters() if p.requires_grad]
        return {"network": params} if params else {}

    def regulariser_names(self) -> tuple[str, ...]:
        return ()

    def albedo(self, points: Float[Tensor, "P 3"]) -> Float[Tensor, "P 3"]:
        raise NotImplementedError(f"{type(self).__name__} has no colour field to query")

    def extract_mesh(self) -> Mesh | None:
        return None

    def density_field(self) -> DensityField | None:
        return None


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
