"""Per-pixel rays of a camera batch (pixel centres, OpenGL camera axes)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from magic3d.types import CameraBatch


@dataclass
class Rays:
    origins: Float[Tensor, "B H W 3"]
    directions: Float[Tensor, "B H W 3"]  # unit length, world space


def camera_rays(cameras: CameraBatch) -> Rays:
    """World-space rays through every pixel centre; row 0 is the top of the image."""
    h, w = cameras.height, cameras.width
    device, dtype = cameras.c2w.device, cameras.c2w.dtype
    focal = 0.5 * h / torch.tan(0.5 * cameras.fovy)  # (B,) in pixels, square pixels
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device, dtype=dtype) + 0.5,
        torch.arange(w, device=device, dtype=dtype) + 0.5,
        indexing="ij",
    )
    x_cam = (xs - 0.5 * w)[None] / focal[:, None, None]
    y_cam = -(ys - 0.5 * h)[None] / focal[:, None, None]
    dirs_cam = torch.stack([x_cam, y_cam, -torch.ones_like(x_cam)], dim=-1)  # (B,H,W,3)
    rot = cameras.c2w[:, :3, :3]
    dirs = torch.einsum("bij,bhwj->bhwi", rot, dirs_cam)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    origins = cameras.c2w[:, None, None, :3, 3].expand_as(dirs)
    return Rays(origins=origins, directions=dirs)
