"""Turntable video of a trained scene: one orbit of fixed cameras, rgb | normal | opacity."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from magic3d.data.cameras import orbit_cameras
from magic3d.types import Shading
from magic3d.visuals import preview_grid, write_video


@torch.no_grad()
def render_orbit_frames(scene, cameras, chunk: int = 4, ambient: float = 0.3) -> list[torch.Tensor]:
    frames = []
    was_training = scene.training
    scene.eval()
    try:
        for start in tqdm(range(0, cameras.batch_size, chunk), desc="turntable", leave=False):
            batch = cameras[start:start + chunk]
            shading = Shading(mode="lambertian", ambient=torch.full((batch.batch_size,), ambient, device=batch.device))
            render = scene.render(batch, shading)
            for i in range(batch.batch_size):
                frames.append(preview_grid(render.__class__(**{
                    k: (v[i:i + 1] if isinstance(v, torch.Tensor) and v.dim() > 0 else v)
                    for k, v in render.__dict__.items()
                })).cpu())
    finally:
        scene.train(was_training)
    return frames


def render_turntable(model, datamodule, path: Path, fps: int = 30, n_views: int = 60) -> Path:
    cameras = orbit_cameras(
        n_views=n_views,
        elevation_deg=datamodule.eval_elevation_deg,
        distance=datamodule.eval_distance,
        fovy_deg=datamodule.eval_fovy_deg,
        height=datamodule.eval_height or datamodule.height,
        width=datamodule.eval_width or datamodule.width,
    ).to(model.device)
    write_video(render_orbit_frames(model.scene, cameras), path, fps=fps)
    return path
