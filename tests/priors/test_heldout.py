"""Held-out colour-shape pairs never reach a prior's training data (images, captions, tokenizer
corpus, contact-sheet rows), while the evaluator still asks for them."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from magic3d.priors.captions import CaptionTable  # noqa: E402
from magic3d.priors.configs import (  # noqa: E402
    caption_vocabulary_corpus,
    default_config,
    tokenizer_from_json,
    train_tokenizer_json,
)
from magic3d.priors.data import render_toy_images, training_params  # noqa: E402
from magic3d.priors.heldout import (  # noqa: E402
    HELD_OUT_PAIRS,
    held_out_captions,
    held_out_mask,
    is_held_out_pair,
    redraw_held_out_colours,
)
from magic3d.priors.sampling import sample_prompts  # noqa: E402
from magic3d.toyworld.shapes import COLOUR_NAMES, SHAPE_NAMES, caption  # noqa: E402


def test_the_four_pairs_of_issue_10_exist_in_the_toy_world() -> None:
    assert set(held_out_captions()) == {"a pink duck", "an orange chair", "a cyan torus", "a brown cone"}
    for shape, colour in HELD_OUT_PAIRS:
        assert shape in SHAPE_NAMES and colour in COLOUR_NAMES


def test_mask_agrees_with_the_pair_list_over_the_whole_grid() -> None:
    shape = torch.arange(len(SHAPE_NAMES)).repeat_interleave(len(COLOUR_NAMES))
    colour = torch.arange(len(COLOUR_NAMES)).repeat(len(SHAPE_NAMES))
    expected = [is_held_out_pair(SHAPE_NAMES[s], COLOUR_NAMES[c]) for s, c in zip(shape.tolist(), colour.tolist())]
    assert held_out_mask(shape, colour).tolist() == expected
    assert sum(expected) == len(HELD_OUT_PAIRS)


def test_training_draw_has_no_held_out_pair_and_changes_nothing_else() -> None:
    from magic3d.toyworld.dataset import ToyWorldSpec, sample_params

    spec = ToyWorldSpec(image_size=16, supersample=1, view_captions=False)
    raw = sample_params(spec, 20_000, seed=3)
    assert bool(held_out_mask(raw.shape_id, raw.colour_id).any())  # the plain sampler does draw them
    params = training_params(spec, 20_000, seed=3)
    assert not bool(held_out_mask(params.shape_id, params.colour_id).any())
    torch.testing.assert_close(params.shape_id, raw.shape_id)  # shape frequencies untouched
    kept = ~held_out_mask(raw.shape_id, raw.colour_id)
    torch.testing.assert_close(params.colour_id[kept], raw.colour_id[kept])  # only held-out draws move
    again = training_params(spec, 20_000, seed=3)
    torch.testing.assert_close(again.colour_id, params.colour_id)  # deterministic: resume re-renders the same set
    # Every shape still gets every colour it may have (9 or 10 of them).
    for s in range(len(SHAPE_NAMES)):
        colours = set(params.colour_id[params.shape_id == s].tolist())
        allowed = {c for c in range(len(COLOUR_NAMES)) if not is_held_out_pair(SHAPE_NAMES[s], COLOUR_NAMES[c])}
        assert colours == allowed


def test_rendered_training_images_and_their_captions_exclude_held_out_pairs() -> None:
    config = default_config("pixel", smoke=True)
    data = render_toy_images(config, 256, seed=0, device=torch.device("cpu"), max_seconds=None, log=lambda _: None)
    assert len(data) == 256 and not bool(held_out_mask(data.shape_id, data.colour_id).any())
    table = CaptionTable(tokenizer_from_json(train_tokenizer_json()))
    n = 4000
    index = torch.randint(len(data), (n,), generator=torch.Generator().manual_seed(0))
    rows = table.sample_rows(data.shape_id[index], data.colour_id[index], data.view_id[index], 0.75, 0.1)
    texts = {table.texts[r] for r in rows.tolist()}
    banned = set(held_out_captions())
    assert not any(t.split(",")[0] in banned for t in texts)
    shape, colour = table.pair_of_row(rows[rows != table.empty_row])
    assert not bool(held_out_mask(shape, colour).any())


def test_redraw_touches_only_held_out_rows() -> None:
    shape = torch.tensor([SHAPE_NAMES.index("duck"), SHAPE_NAMES.index("duck"), SHAPE_NAMES.index("cube")])
    colour = torch.tensor([COLOUR_NAMES.index("pink"), COLOUR_NAMES.index("red"), COLOUR_NAMES.index("pink")])
    out = redraw_held_out_colours(shape, colour, torch.Generator().manual_seed(0))
    assert out[0] != COLOUR_NAMES.index("pink") and out[1:].tolist() == colour[1:].tolist()


def test_tokenizer_corpus_lacks_held_out_captions_but_still_spells_them_one_token_per_word() -> None:
    corpus = set(caption_vocabulary_corpus())
    for text in held_out_captions():
        assert text not in corpus and not any(c.startswith(text + ",") for c in corpus)
    tokenizer = tokenizer_from_json(train_tokenizer_json())
    for text in held_out_captions():
        # One token per word, one for the comma, one eos: as "a red cube, back view" (7).
        assert len(tokenizer(text + ", back view").input_ids) == len((text + " back view").split()) + 2


def test_contact_sheet_rows_keep_trained_and_held_out_apart() -> None:
    views = (0, 1, 2, 3)
    prompts = sample_prompts(20, views, held_out_rows=len(HELD_OUT_PAIRS))
    bare = prompts[:: len(views) + 1]
    assert bare[20:] == held_out_captions()
    assert not set(bare[:20]) & set(held_out_captions())  # 20 rows cycle every colour: the skip is exercised


def test_evaluator_still_samples_held_out_pairs() -> None:
    from magic3d.eval.prior import prior_captions

    captions, _ = prior_captions(SHAPE_NAMES, COLOUR_NAMES, 1)
    bare = {c.split(",")[0] for c in captions}
    assert set(held_out_captions()) <= bare
    assert caption("duck", "pink") in bare
