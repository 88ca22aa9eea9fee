"""Class images for DreamBooth's prior-preservation loss: made once by the frozen prior.

They are written to the stage folder (``class_images/``: PNGs and a manifest of how they were
made), so a resumed stage reads them back instead of sampling again, and a user can look at
what the prior thinks "a duck" is. A manifest that does not match the current settings (another
prompt, count, seed, sampler or prior) means the images are made afresh; the old folder is
moved aside, never deleted. Under DDP rank 0 makes them and the other ranks read its files.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from magic3d.distributed import rank_zero_first
from magic3d.dreambooth.prior import PersonalisedPrior
from magic3d.dreambooth.sampling import quantise, sample_images

MANIFEST = "manifest.json"


def _read(folder: Path, settings: dict[str, Any]) -> Float[Tensor, "N S S 3"] | None:
    import imageio.v3 as iio

    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None
    try:
        if json.loads(manifest.read_text()) != settings:
            return None
        files = [folder / f"{i:04d}.png" for i in range(settings["n"])]
        images = [torch.from_numpy(iio.imread(f).astype(np.float32) / 255.0)[..., :3] for f in files]
    except (OSError, ValueError, json.JSONDecodeError):
        return None
    return torch.stack(images)


def _write(folder: Path, images: Float[Tensor, "N S S 3"], settings: dict[str, Any]) -> None:
    """Atomically: the images go to a temporary folder that is renamed into place."""
    import imageio.v3 as iio

    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for i, image in enumerate(images):
        iio.imwrite(tmp / f"{i:04d}.png", (image.numpy() * 255.0 + 0.5).astype(np.uint8))
    (tmp / MANIFEST).write_text(json.dumps(settings, indent=2) + "\n")
    if folder.exists():  # made with other settings: kept aside, never deleted
        folder.rename(folder.with_name(f"{folder.name}.old-{time.strftime('%Y%m%d-%H%M%S')}"))
    tmp.rename(folder)


def make_class_images(
    prior: PersonalisedPrior,
    cond: Float[Tensor, "L D"],
    uncond: Float[Tensor, "L D"],
    n: int,
    steps: int,
    guidance_scale: float,
    seed: int,
    settings: dict[str, Any],
    folder: Path | None = None,
    batch_size: int = 16,
) -> Float[Tensor, "N S S 3"]:
    """``n`` samples of the class prompt (embedding ``cond``) by the prior as it is now (the
    stage calls this before adding adapters), read from ``folder`` when they were made before
    with the same ``settings``, else made and written there. 8-bit quantised either way."""
    settings = {**settings, "n": n, "steps": steps, "guidance_scale": guidance_scale, "seed": seed,
                "batch_size": batch_size}
    with rank_zero_first():
        if folder is not None:
            found = _read(folder, settings)
            if found is not None:
                return found
        batches = []
        for k, start in enumerate(tqdm(range(0, n, batch_size), desc="class images", unit="batch", leave=False)):
            count = min(batch_size, n - start)
            batches.append(sample_images(prior, cond.expand(count, *cond.shape), uncond, steps, guidance_scale,
                                         seed=seed + k).cpu())
        images = quantise(torch.cat(batches))
        if folder is not None and not _is_other_rank():
            _write(folder, images, settings)
        return images


def _is_other_rank() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_rank() != 0
