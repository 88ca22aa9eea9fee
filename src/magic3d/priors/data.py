"""Training images of a prior: rendered in bulk on the training device and held there as uint8.

Sphere tracing is the slow part of on-the-fly rendering, so all images are rendered at the
start. If rendering would take longer than ``max_render_minutes``, the rendered prefix is kept
(the toy-world sampler makes any prefix cover every view) and its size is recorded so a
resumed run re-renders exactly the same images. Held-out pairs (``magic3d.priors.heldout``)
are redrawn before rendering, so no image of them is ever made.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int, UInt8
from torch import Tensor

from magic3d.priors.configs import PriorConfig
from magic3d.priors.heldout import held_out_mask, redraw_held_out_colours
from magic3d.priors.logs import Log, print_line


@dataclass
class ToyImages:
    """Rendered training images and labels, on the training device."""

    images: UInt8[Tensor, "N H W 3"]
    shape_id: Int[Tensor, "N"]
    colour_id: Int[Tensor, "N"]
    view_id: Int[Tensor, "N"]
    render_seconds: float

    def __len__(self) -> int:
        return self.shape_id.shape[0]

    def sample(self, batch_size: int) -> tuple[Float[Tensor, "B 3 H W"], Int[Tensor, "B"]]:
        """A random batch in [-1, 1], channel-first, and its indices (drawn on the data's device,
        from that device's global generator: no host round trip, and capturable by compile)."""
        index = torch.randint(len(self), (batch_size,), device=self.images.device)
        return to_model_range(self.images[index]), index


def to_model_range(images: UInt8[Tensor, "B H W 3"]) -> Float[Tensor, "B 3 H W"]:
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def training_params(spec, n_images: int, seed: int):
    """The toy-world sampler's draw for ``seed`` with every held-out pair's colour redrawn."""
    from magic3d.toyworld.dataset import sample_params

    params = sample_params(spec, n_images, seed)
    generator = torch.Generator().manual_seed(seed + 7919)  # its own stream: the draw above is unchanged
    colour_id = redraw_held_out_colours(params.shape_id, params.colour_id, generator)
    return dataclasses.replace(params, colour_id=colour_id)


def render_toy_images(
    config: PriorConfig,
    n_images: int,
    seed: int,
    device: torch.device,
    max_seconds: float | None,
    log: Log = print_line,
) -> ToyImages:
    """Render up to ``n_images`` toy-world images (a prefix if ``max_seconds`` runs out)."""
    from magic3d.toyworld.dataset import ToyWorldBatch, ToyWorldSpec, render_params

    spec = ToyWorldSpec(image_size=config.image_size, supersample=config.supersample, view_captions=False)
    params = training_params(spec, n_images, seed)
    parts: list[ToyWorldBatch] = []
    start = time.perf_counter()
    done = 0
    # Bounded by rays, not images: the renderer allocates per-ray buffers for a whole call.
    chunk = max(1, config.render_chunk_rays // (config.image_size * config.supersample) ** 2)
    for first in range(0, n_images, chunk):
        parts.append(render_params(spec, params[first : first + chunk], device, chunk))
        done += len(parts[-1])
        elapsed = time.perf_counter() - start
        if max_seconds is not None and elapsed > max_seconds and done < n_images:
            log(f"[data] render time cap reached ({elapsed:.0f} s): keeping the first {done} of {n_images} images")
            break
    batch = ToyWorldBatch.concat(parts)
    seconds = time.perf_counter() - start
    if bool(held_out_mask(batch.shape_id, batch.colour_id).any()):  # the renderer relabelled something
        raise RuntimeError("a held-out colour-shape pair reached the training images")
    log(
        f"[data] rendered {done} images at {config.image_size}px (supersample {config.supersample}) "
        f"in {seconds:.1f} s ({done / max(seconds, 1e-9):.0f} images/s) on {device.type}"
    )
    return ToyImages(
        images=batch.images.to(device),
        shape_id=batch.shape_id.to(device),
        colour_id=batch.colour_id.to(device),
        view_id=batch.view_id.to(device),
        render_seconds=seconds,
    )
