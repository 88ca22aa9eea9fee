"""The evaluator's cameras and renders: an orbit of views, and the object alone composited over
a neutral backdrop (the scene's learned background taken out), so only the object is judged."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from magic3d.data.cameras import orbit_cameras
from magic3d.devices import module_device
from magic3d.eval.options import EvalOptions
from magic3d.types import CameraBatch, Shading

# render_chunk counts cameras per scene.render call at this many pixels or fewer; larger
# renders get proportionally fewer cameras per call (a NeRF's memory grows with rays).
_CHUNK_REFERENCE_PIXELS = 128 * 128


@dataclass
class SceneViews:
    object_rgb: Float[Tensor, "B H W 3"]  # object over the neutral background (CPU)
    opacity: Float[Tensor, "B H W 1"]  # CPU


@torch.no_grad()
def render_object(scene: Any, cameras: CameraBatch, options: EvalOptions) -> SceneViews:
    """Render ``cameras`` and composite the object alone over ``options.background``."""
    device = module_device(scene)
    cameras = cameras.to(device)
    backdrop = torch.tensor(options.background, device=device)
    rgbs, opacities = [], []
    pixels = cameras.height * cameras.width
    per_call = max(1, options.render_chunk * _CHUNK_REFERENCE_PIXELS // max(pixels, _CHUNK_REFERENCE_PIXELS))
    for start in range(0, cameras.batch_size, per_call):
        batch = cameras[start : start + per_call]
        shading = Shading(mode="lambertian", ambient=torch.full((batch.batch_size,), options.ambient, device=device))
        out = scene.render(batch, shading)
        opacity = out.opacity.clamp(0.0, 1.0)
        # rgb = colour * opacity + (1 - opacity) * background: take the learned background out.
        foreground = out.rgb if out.background is None else out.rgb - (1.0 - opacity) * out.background
        rgbs.append((foreground + (1.0 - opacity) * backdrop).clamp(0.0, 1.0).float().cpu())
        opacities.append(opacity.float().cpu())
    return SceneViews(torch.cat(rgbs), torch.cat(opacities))


def empty_views(cameras: CameraBatch, options: EvalOptions) -> SceneViews:
    """What an empty scene shows: the neutral backdrop everywhere, zero opacity."""
    b, h, w = cameras.batch_size, cameras.height, cameras.width
    backdrop = torch.tensor(options.background, dtype=torch.float32)
    return SceneViews(backdrop.expand(b, h, w, 3).clone(), torch.zeros(b, h, w, 1))


def eval_cameras(options: EvalOptions, size: int) -> CameraBatch:
    """The options' orbit at ``size`` x ``size`` pixels (same poses at every size)."""
    return orbit_cameras(options.views, options.elevation_deg, options.distance, options.fovy_deg, size, size)
