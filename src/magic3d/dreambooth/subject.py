"""The subject images of a personalisation: found, checked, and brought to the prior's frame.

A subject folder holds PNG or JPEG photos of one object, any size. Each image is centre-cropped
to a square, resized (antialiased) to the prior's resolution and, where it has an alpha channel,
composited over the prior's background colour: the priors learnt objects on plain backdrops,
and a transparent cut-out otherwise becomes black (PIL drops alpha to RGB that way).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from magic3d.config import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MIN_SUBJECT_IMAGES = 2  # one image cannot tell the subject from its one view and lighting


@dataclass
class SubjectImages:
    """The subject's images at the prior's resolution, channel-last in [0, 1]."""

    paths: list[Path]
    images: Float[Tensor, "N S S 3"]

    def __len__(self) -> int:
        return len(self.paths)


def find_subject_images(folder: str | Path) -> list[Path]:
    """The readable PNG/JPEG files of a subject folder, sorted; a one-line error names the fix
    for a missing or empty folder, an unreadable image, or fewer than two images."""
    from PIL import Image, UnidentifiedImageError

    if folder is None or not str(folder).strip():
        raise ConfigError("No subject images given: pass subject=FOLDER, a folder of 2 or more PNG/JPEG photos "
                          "of the object.")
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ConfigError(f"subject={folder} is not a folder: pass subject=FOLDER, a folder of 2 or more PNG/JPEG "
                          "photos of the object.")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"subject={folder} holds no PNG or JPEG images: put 2 or more photos of the object "
                          f"({', '.join(IMAGE_SUFFIXES)}) in it.")
    for file in files:
        try:
            with Image.open(file) as image:
                image.load()  # verify() misses truncated files; a full decode does not
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise ConfigError(f"subject image {file} cannot be read ({type(err).__name__}): replace it with a "
                              "valid PNG or JPEG, or remove it from the folder.") from None
    if len(files) < MIN_SUBJECT_IMAGES:
        raise ConfigError(f"subject={folder} has {len(files)} image; personalisation needs at least "
                          f"{MIN_SUBJECT_IMAGES} (3-5 views of the object work best): add more photos.")
    return files


def prepare_image(file: Path, size: int, background: tuple[float, float, float]) -> Float[Tensor, "S S 3"]:
    """One photo: alpha over ``background``, centre-cropped square, resized to ``size``."""
    from PIL import Image

    with Image.open(file) as image:
        image = image.convert("RGBA")
        backdrop = Image.new("RGBA", image.size, tuple(int(round(255 * c)) for c in background) + (255,))
        rgb = Image.alpha_composite(backdrop, image).convert("RGB")
    side = min(rgb.size)
    left, top = (rgb.width - side) // 2, (rgb.height - side) // 2
    square = rgb.crop((left, top, left + side, top + side))
    if side != size:
        square = square.resize((size, size), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(square, dtype=np.float32) / 255.0)


def load_subject_images(folder: str | Path, size: int, background: tuple[float, float, float]) -> SubjectImages:
    """Every image of the subject folder at ``size`` x ``size`` (see the module doc)."""
    if size < 1:
        raise ValueError(f"size={size} must be >= 1")
    files = find_subject_images(folder)
    return SubjectImages(files, torch.stack([prepare_image(f, size, background) for f in files]))
