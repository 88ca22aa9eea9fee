"""A personalisation subject from the toy world: photos of one object from several views.

The DreamBooth experiment's ground truth: the held-out pink duck (never in any prior's
training data) rendered as a user's photos would be, RGBA PNGs with the object's coverage as
alpha, so the personalisation stage composites them over its prior's background colour.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from magic3d.data.cameras import orbit_cameras
from magic3d.toyworld.dataset import ground_truth_views
from magic3d.types import Shading


def render_subject_photos(
    folder: str | Path,
    shape: str = "duck",
    colour: str = "pink",
    n_views: int = 5,
    size: int = 64,
    elevation_deg: float = 15.0,
    ambient: float = 0.5,
) -> list[Path]:
    """``n_views`` lit renders of ``colour`` ``shape`` evenly around it (the first from the front),
    written as ``view_00.png`` ... (RGBA, straight alpha); returns the files."""
    if n_views < 1 or size < 1:
        raise ValueError(f"n_views={n_views} and size={size} must be >= 1")
    cameras = orbit_cameras(n_views, elevation_deg, 2.0, 50.0, size, size)
    shading = Shading(mode="lambertian", ambient=torch.full((n_views,), float(ambient)))
    render = ground_truth_views(shape, colour, cameras, shading=shading, background=(0.0, 0.0, 0.0))
    alpha = render.mask.clamp(0.0, 1.0)
    # Over black the render is colour x coverage; dividing by the coverage gives straight alpha.
    rgb = torch.where(alpha > 0, render.rgb / alpha.clamp_min(1e-6), torch.zeros_like(render.rgb)).clamp(0.0, 1.0)
    rgba = (torch.cat([rgb, alpha], dim=-1).numpy() * 255.0 + 0.5).astype(np.uint8)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    import imageio.v3 as iio

    files = []
    for i, image in enumerate(rgba):
        path = folder / f"view_{i:02d}.png"
        iio.imwrite(path, image)
        files.append(path)
    return files
