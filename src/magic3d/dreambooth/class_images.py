"""Class images for DreamBooth's prior-preservation loss: made once by the frozen prior.

They are written to the stage folder (``class_images/``: PNGs and a manifest of how they were
made), so a resumed stage reads them back instead of sampling again, and a user can look at
what the prior thinks "a duck" is. A manifest that does not match the current settings (another
prompt, count, seed, sampler or prior) means the images are made afresh; the old folder is
moved aside, never deleted. Under DDP rank 0 makes them and the other ranks read its files.

With several class prompts ("a red duck", "a green duck", ...) image i shows prompt
i % len(prompts) (round-robin), and the manifest records each image's prompt index
(``prompt_index``), which a resumed stage reads back with the images.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from magic3d.distributed import rank_zero_first
from magic3d.dreambooth.prior import PersonalisedPrior
from magic3d.dreambooth.sampling import quantise, sample_images

MANIFEST = "manifest.json"
PROMPT_INDEX = "prompt_index"  # manifest key: each image's class prompt (only with several prompts)


@dataclass
class ClassImages:
    images: Float[Tensor, "N S S 3"]  # 8-bit quantised, channel-last in [0, 1]
    prompt_index: Int[Tensor, "N"]  # which class prompt (row of the embeddings) each image shows


def round_robin(n: int, n_prompts: int) -> Int[Tensor, "N"]:
    """Image i shows prompt i % n_prompts: the prompts share the images evenly, in order."""
    return torch.arange(n) % n_prompts


def _recorded_index(manifest: dict[str, Any], n: int, n_prompts: int) -> Int[Tensor, "N"] | None:
    if n_prompts == 1:
        return torch.zeros(n, dtype=torch.long)
    index = manifest.get(PROMPT_INDEX)
    if (not isinstance(index, list) or len(index) != n
            or not all(isinstance(i, int) and 0 <= i < n_prompts for i in index)):
        return None
    return torch.tensor(index, dtype=torch.long)


def _read(folder: Path, settings: dict[str, Any], n_prompts: int) -> ClassImages | None:
    import imageio.v3 as iio

    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None
    try:
        recorded = json.loads(manifest.read_text())
        if not isinstance(recorded, dict) or {k: v for k, v in recorded.items() if k != PROMPT_INDEX} != settings:
            return None
        index = _recorded_index(recorded, settings["n"], n_prompts)
        if index is None:
            return None
        files = [folder / f"{i:04d}.png" for i in range(settings["n"])]
        images = [torch.from_numpy(iio.imread(f).astype(np.float32) / 255.0)[..., :3] for f in files]
    except (OSError, ValueError, json.JSONDecodeError):
        return None
    return ClassImages(torch.stack(images), index)


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
    cond: Float[Tensor, "P L D"],
    uncond: Float[Tensor, "L D"],
    n: int,
    steps: int,
    guidance_scale: float,
    seed: int,
    settings: dict[str, Any],
    folder: Path | None = None,
    batch_size: int = 16,
) -> ClassImages:
    """``n`` samples of the P class prompts (embeddings ``cond``, round-robin over the images) by
    the prior as it is now (the stage calls this before adding adapters), read from ``folder``
    when they were made before with the same ``settings``, else made and written there. 8-bit
    quantised either way."""
    n_prompts = int(cond.shape[0])
    settings = {**settings, "n": n, "steps": steps, "guidance_scale": guidance_scale, "seed": seed,
                "batch_size": batch_size}
    with rank_zero_first():
        if folder is not None:
            found = _read(folder, settings, n_prompts)
            if found is not None:
                return found
        index = round_robin(n, n_prompts)
        per_image = cond[index.to(cond.device)]  # each image sampled under its own prompt's embedding
        batches = []
        for k, start in enumerate(tqdm(range(0, n, batch_size), desc="class images", unit="batch", leave=False)):
            batches.append(sample_images(prior, per_image[start:start + batch_size], uncond, steps, guidance_scale,
                                         seed=seed + k).cpu())
        images = quantise(torch.cat(batches))
        if folder is not None and not _is_other_rank():
            # One prompt (today's class_prompt): the manifest keeps its keys, so old folders still match.
            recorded = settings if n_prompts == 1 else {**settings, PROMPT_INDEX: index.tolist()}
            _write(folder, images, recorded)
        return ClassImages(images, index)


def _is_other_rank() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_rank() != 0
