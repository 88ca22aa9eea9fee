"""Pictures of renders: preview sheets, PNG files and turntable videos."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from magic3d.types import RenderOutput


def preview_grid(render: RenderOutput) -> Float[Tensor, "H Wk 3"]:
    """rgb | normal | opacity side by side for every camera, cameras stacked vertically."""
    rows = []
    for i in range(render.rgb.shape[0]):
        panels = [render.rgb[i]]
        if render.normal is not None:
            normal = (0.5 * render.normal[i] + 0.5) * render.opacity[i]
            panels.append(normal)
        panels.append(render.opacity[i].expand(-1, -1, 3))
        rows.append(torch.cat(panels, dim=1))
    return torch.cat(rows, dim=0).detach().float().clamp(0, 1)


def to_uint8(image: Float[Tensor, "H W 3"]) -> np.ndarray:
    return (image.detach().float().clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def save_png(image: Float[Tensor, "H W 3"], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, to_uint8(image))


def write_video(frames: list[Float[Tensor, "H W 3"]], path: Path, fps: int = 30) -> None:
    """H.264 mp4 through imageio-ffmpeg (a pip wheel with its own ffmpeg binary); where that
    wheel is missing, OpenCV's MPEG-4 writer if OpenCV is installed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [to_uint8(frame) for frame in frames]
    try:
        import imageio.v2 as iio2
        import imageio_ffmpeg  # noqa: F401  - fail fast here rather than inside the writer

        # macro_block_size=1 keeps odd sizes as they are instead of silently resizing.
        with iio2.get_writer(path, fps=fps, codec="libx264", quality=8, macro_block_size=1,
                             ffmpeg_log_level="error") as writer:
            for image in images:
                writer.append_data(image)
    except ImportError:
        try:
            import cv2
        except ImportError:
            raise RuntimeError("Writing mp4 needs imageio-ffmpeg (pip install imageio-ffmpeg)") from None
        height, width = images[0].shape[:2]
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
        for image in images:
            writer.write(image[..., ::-1].copy())
        writer.release()
