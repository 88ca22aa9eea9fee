"""Token ids of every caption a prior can train on, tokenized once, and the caption draw.

Captions carry a view suffix (", front view" from ``magic3d.data.cameras.view_suffix``, the
guidance's own suffixes) with ``view_suffix_prob`` and are bare otherwise, because the guidance
uses the bare prompt when view-dependent prompting is off. Classifier-free guidance: the
caption is replaced by "" with ``cond_drop_prob``, encoded by the same encoder, which is exactly
the guidance's negative prompt "" (prompts are padded to 77 tokens with an attention mask, as
``magic3d.guidance.prompts.encode_texts`` does).

Rows are drawn from the labels of training images, so a held-out pair
(``magic3d.priors.heldout``), absent from the images, is never drawn; the table still holds its
rows so that row numbers are a plain function of (shape, colour, view).
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from magic3d.data.cameras import VIEW_NAMES, view_suffix
from magic3d.priors.configs import TEXT_MAX_LENGTH
from magic3d.toyworld.shapes import COLOUR_NAMES, SHAPE_NAMES, caption

NO_SUFFIX = len(VIEW_NAMES)  # caption slot for the bare prompt


class CaptionTable:
    """Row ``(shape * n_colours + colour) * 5 + slot`` holds ``caption(shape, colour)`` plus the
    suffix of view ``slot`` (``NO_SUFFIX`` = bare); the last row is "" (the CFG null caption)."""

    def __init__(self, tokenizer: Any, device: torch.device | str = "cpu") -> None:
        slots = len(VIEW_NAMES) + 1
        texts = [
            caption(shape, colour, view_suffix(slot) if slot < NO_SUFFIX else "")
            for shape in SHAPE_NAMES
            for colour in COLOUR_NAMES
            for slot in range(slots)
        ]
        texts.append("")
        # Same call as magic3d.guidance.prompts.encode_texts: train and guidance inputs match.
        tokens = tokenizer(
            texts,
            padding="max_length",
            max_length=TEXT_MAX_LENGTH,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        self.texts = texts
        self.slots = slots
        self.empty_row = len(texts) - 1
        self.input_ids = tokens.input_ids.to(device)
        self.attention_mask = tokens.attention_mask.to(device)

    def rows(self, shape_id: Int[Tensor, "B"], colour_id: Int[Tensor, "B"], slot: Int[Tensor, "B"]) -> Int[Tensor, "B"]:
        return (shape_id * len(COLOUR_NAMES) + colour_id) * self.slots + slot

    def pair_of_row(self, rows: Int[Tensor, "B"]) -> tuple[Int[Tensor, "B"], Int[Tensor, "B"]]:
        """(shape id, colour id) of caption rows (the null row maps past the last shape)."""
        pair = rows // self.slots
        return pair // len(COLOUR_NAMES), pair % len(COLOUR_NAMES)

    def sample_rows(
        self,
        shape_id: Int[Tensor, "B"],
        colour_id: Int[Tensor, "B"],
        view_id: Int[Tensor, "B"],
        view_suffix_prob: float,
        cond_drop_prob: float,
    ) -> Int[Tensor, "B"]:
        """Caption rows for a batch: view suffix with ``view_suffix_prob``, "" with ``cond_drop_prob``."""
        u = torch.rand(shape_id.shape[0], 2, device=shape_id.device)
        slot = torch.where(u[:, 0] < view_suffix_prob, view_id, torch.full_like(view_id, NO_SUFFIX))
        rows = self.rows(shape_id, colour_id, slot)
        return torch.where(u[:, 1] < cond_drop_prob, torch.full_like(rows, self.empty_row), rows)

    def encode(self, text_encoder: nn.Module, rows: Int[Tensor, "B"]) -> Float[Tensor, "B L D"]:
        """Differentiable text embeddings of caption rows (last hidden state, all 77 tokens)."""
        return text_encoder(self.input_ids[rows], attention_mask=self.attention_mask[rows])[0]
