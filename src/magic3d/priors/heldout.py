"""The colour-shape pairs that no prior ever trains on: the one list, and the masks that apply it.

A pink duck, an orange chair, a cyan torus and a brown cone are removed from every prior's
training data (images and captions, and from the tokenizer's training corpus), while each
word still occurs in other captions. Prompting a prior with them measures compositional
generalisation (it knows "pink" and "duck", never together), and later personalisation (a
DreamBooth stage may teach one of them from a few images). The evaluator still knows these
pairs: it is trained on the whole toy world, so it can score samples of them.

Pairs are (shape, colour) in the argument order of ``magic3d.toyworld.shapes.caption``.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from magic3d.toyworld.shapes import COLOUR_NAMES, SHAPE_NAMES, caption

HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("duck", "pink"),
    ("chair", "orange"),
    ("torus", "cyan"),
    ("cone", "brown"),
)


def _check_names() -> None:
    for shape, colour in HELD_OUT_PAIRS:
        if shape not in SHAPE_NAMES or colour not in COLOUR_NAMES:
            raise ValueError(
                f"held-out pair ({shape!r}, {colour!r}) is not in the toy world "
                f"(shapes {SHAPE_NAMES}, colours {COLOUR_NAMES}): fix magic3d/priors/heldout.py."
            )


_check_names()  # a renamed shape or colour must fail loudly, not silently hold nothing out

HELD_OUT_IDS: tuple[tuple[int, int], ...] = tuple(
    (SHAPE_NAMES.index(shape), COLOUR_NAMES.index(colour)) for shape, colour in HELD_OUT_PAIRS
)


def held_out_captions() -> list[str]:
    """The bare captions of the held-out pairs ("a pink duck", ...)."""
    return [caption(shape, colour) for shape, colour in HELD_OUT_PAIRS]


def is_held_out_pair(shape: str, colour: str) -> bool:
    return (shape, colour) in HELD_OUT_PAIRS


def held_out_mask(shape_id: Int[Tensor, "N"], colour_id: Int[Tensor, "N"]) -> Bool[Tensor, "N"]:
    """True where (shape_id, colour_id) (indices into SHAPE_NAMES / COLOUR_NAMES) is held out.

    The evaluator's hook: it can split any labelled set of samples into trained and held-out
    captions with this mask.
    """
    mask = torch.zeros(shape_id.shape, dtype=torch.bool, device=shape_id.device)
    for s, c in HELD_OUT_IDS:
        mask |= (shape_id == s) & (colour_id == c)
    return mask


def allowed_colours(shape_id: int) -> list[int]:
    """Colour ids a shape may be drawn with in training data (all but its held-out ones)."""
    banned = {c for s, c in HELD_OUT_IDS if s == shape_id}
    return [c for c in range(len(COLOUR_NAMES)) if c not in banned]


def redraw_held_out_colours(
    shape_id: Int[Tensor, "N"], colour_id: Int[Tensor, "N"], generator: torch.Generator
) -> Int[Tensor, "N"]:
    """``colour_id`` with every held-out draw replaced by a uniform draw from the shape's allowed
    colours (CPU, deterministic for a seeded ``generator``).

    Redrawing the colour rather than dropping the image keeps every shape equally frequent and
    the image count exact; a shape with a held-out colour gets its other colours 1/9 more often.
    """
    colour_id = colour_id.clone()
    for s, _ in HELD_OUT_IDS:
        if not bool((shape_id == s).any()):
            continue
        rows = torch.nonzero(held_out_mask(shape_id, colour_id) & (shape_id == s)).squeeze(1)
        choices = torch.tensor(allowed_colours(s))
        colour_id[rows] = choices[torch.randint(len(choices), (len(rows),), generator=generator)]
    return colour_id
