"""Several class prompts for prior preservation ("a red {class}", "a green {class}", ...): their
expansion, one-line errors, the round-robin class images and their prompt index (made once, read
back on resume), and the loss pairing each class image with its own prompt's embedding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from magic3d.config import ConfigError
from magic3d.dreambooth.class_images import round_robin
from magic3d.dreambooth.identifier import parse_instance_prompt
from magic3d.dreambooth.prior import PixelPrior

from conftest import personalise

THREE = ["a red {class}", "a green {class}", "a blue {class}"]
EXPANDED = ("a red duck", "a green duck", "a blue duck")


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------ prompts


def test_class_prompts_are_expanded_with_the_class_noun() -> None:
    assert parse_instance_prompt("a sks duck", "sks", class_prompts=THREE).class_prompts == EXPANDED
    dog = parse_instance_prompt("a photo of a sks dog", "sks", class_prompts=["an orange {class}", "a {class}, {class}"])
    assert dog.preserved_prompts == ("an orange dog", "a dog, dog")
    single = parse_instance_prompt("a sks duck", "sks")
    assert single.class_prompts is None and single.preserved_prompts == ("a duck",), "None: today's class_prompt"


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(class_prompt="a toy duck", class_prompts=THREE), "Both class_prompt='a toy duck' and class_prompts are set"),
    (dict(class_prompts=["a red {class}", "a sks {class}"]), "class_prompts[1]='a sks {class}' contains the identifier"),
    (dict(class_prompts=[]), "class_prompts=[] must be a non-empty list"),
    (dict(class_prompts="a red {class}"), "must be a non-empty list"),
    (dict(class_prompts=["a red {class}", " "]), "class_prompts[1]=' ' is empty"),
    (dict(class_prompts=["a {colour} {class}"]), "unknown placeholder or stray brace '{colour}': the only one is {class}"),
    (dict(class_prompts=["a red {class"]), "unknown placeholder or stray brace '{'"),
])
def test_bad_class_prompts_stop_before_the_prior_loads(kwargs: dict, message: str, pink_duck: Path,
                                                       tmp_path: Path) -> None:
    from magic3d.dreambooth.module import DreamBooth

    # A prior folder that does not exist: the error must come before anything loads it.
    with pytest.raises(ConfigError) as err:
        DreamBooth(PixelPrior(str(tmp_path / "no_prior")), prompt="a sks duck", subject=str(pink_duck), **kwargs)
    assert message in one_line(err)


def test_images_are_shared_round_robin() -> None:
    assert round_robin(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert round_robin(3, 1).tolist() == [0, 0, 0]
    assert torch.bincount(round_robin(200, 10)).tolist() == [20] * 10, "the recipe's 200 images: 20 per colour"


def test_fewer_images_than_prompts_warns(pink_duck: Path, tmp_path: Path) -> None:
    from magic3d.dreambooth.module import DreamBooth

    with pytest.warns(UserWarning, match="n_class_images=2 is fewer than the 3 class_prompts: the last 1 get no"):
        DreamBooth(PixelPrior(str(tmp_path / "no_prior")), prompt="a sks duck", subject=str(pink_duck),
                   class_prompts=THREE, n_class_images=2)


# ------------------------------------------------------------------------------ the stage


@pytest.fixture(scope="module")
def several(tmp_path_factory: pytest.TempPathFactory, tiny_pixel_pipeline: Path, pink_duck: Path):
    """One step with three class prompts over four class images, the text encoder tuned too (so
    the loss re-encodes the class prompts); the sampler's conditions recorded."""
    import magic3d.dreambooth.class_images as class_images

    calls = []
    sample = class_images.sample_images

    def recording(prior, cond, *args, **kwargs):
        calls.append(cond.detach().clone())
        return sample(prior, cond, *args, **kwargs)

    root = tmp_path_factory.mktemp("several")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(class_images, "sample_images", recording)
        model = personalise(PixelPrior(str(tiny_pixel_pipeline)), pink_duck, 1, root, class_prompts=THREE,
                            n_class_images=4, train_text_encoder=True)
    return model, root, torch.cat(calls)


def test_each_class_image_is_sampled_under_its_own_prompt(several) -> None:
    model, root, sampled_with = several
    assert model.class_prompt_index.tolist() == [0, 1, 2, 0]
    class_rows = model._embeddings["class"]
    assert class_rows.shape[0] == 3
    assert torch.equal(sampled_with, class_rows[torch.tensor([0, 1, 2, 0])])
    assert not torch.equal(class_rows[0], class_rows[1]), "distinct prompts, distinct embeddings"
    manifest = json.loads((root / "class_images" / "manifest.json").read_text())
    assert manifest["prompts"] == list(EXPANDED) and "prompt" not in manifest
    assert manifest["prompt_index"] == [0, 1, 2, 0]


@pytest.mark.parametrize("text_path", ["re-encoded", "cached"])
def test_the_loss_pairs_each_class_image_with_its_prompts_embedding(text_path: str, several,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A spy on the UNet's inputs: class image k (made constant k so the target's x0 names it)
    must be conditioned on prompt class_prompt_index[k]: re-encoded by the tuned text encoder, or
    (a UNet-only stage) the embeddings computed once in setup."""
    model, _, _ = several
    if text_path == "cached":
        monkeypatch.setattr(model, "text_encoder_lora", None)
    images = torch.arange(len(model.class_x0), dtype=torch.float32).reshape(-1, 1, 1, 1).expand_as(model.class_x0)
    monkeypatch.setattr(model, "class_x0", images.clone())
    seen = {}
    prior = model.prior
    unet_output, training_target = prior.unet_output, prior.training_target
    monkeypatch.setattr(prior, "unet_output", lambda x_t, t, context: (seen.update(context=context.detach()),
                                                                        unet_output(x_t, t, context))[1])
    monkeypatch.setattr(prior, "training_target", lambda x0, noise, t: (seen.update(x0=x0),
                                                                         training_target(x0, noise, t))[1])
    batch = 8
    model.step_loss(batch, step=11)
    image_of = seen["x0"][batch:].flatten(1)[:, 0].round().long()
    prompt_of = model.class_prompt_index[image_of]
    assert len(set(prompt_of.tolist())) > 1, "the draw must hold class images of several prompts to tell anything"
    context = seen["context"][batch:]
    if text_path == "cached":
        each = model._embeddings["class"]
        assert torch.equal(context, each[prompt_of])
        return
    with torch.no_grad():
        each = model.prior.encode_text(list(EXPANDED))
    # Encoded in a batch of the used prompts vs of all three: float32 sums in another order.
    assert torch.allclose(context, each[prompt_of], atol=1e-5)
    assert float((each[0] - each[1]).abs().max()) > 1e-2, "the prompts' embeddings differ far beyond that tolerance"
    subject_context = seen["context"][:batch]
    with torch.no_grad():
        instance = model.prior.encode_text(["a sks duck"])[0]
    assert torch.allclose(subject_context, instance.expand_as(subject_context), atol=1e-5), "batch layout as before"


def test_a_resumed_stage_reads_images_and_prompt_index_back_without_sampling(
        several, tiny_pixel_pipeline: Path, pink_duck: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import magic3d.dreambooth.class_images as class_images

    model, root, _ = several
    manifest_path = root / "class_images" / "manifest.json"
    before = manifest_path.read_text()
    # A recorded assignment other than round-robin: what is read back is the record, not a recomputation.
    edited = {**json.loads(before), "prompt_index": [2, 2, 1, 0]}
    manifest_path.write_text(json.dumps(edited))

    def refuse(*args, **kwargs):
        raise AssertionError("a resumed stage must read its class images back, not sample them")

    monkeypatch.setattr(class_images, "sample_images", refuse)
    try:
        again = personalise(PixelPrior(str(tiny_pixel_pipeline)), pink_duck, 1, root, class_prompts=THREE,
                            n_class_images=4, train_text_encoder=True)
    finally:
        manifest_path.write_text(before)
    assert again.class_prompt_index.tolist() == [2, 2, 1, 0]
    assert torch.equal(again.class_x0, model.class_x0)


def test_another_list_makes_the_images_afresh_and_keeps_the_old_aside(
        tmp_path: Path, tiny_pixel_pipeline: Path, pink_duck: Path) -> None:
    first = personalise(PixelPrior(str(tiny_pixel_pipeline)), pink_duck, 1, tmp_path, class_prompts=THREE[:2])
    folder = tmp_path / "class_images"
    assert json.loads((folder / "manifest.json").read_text())["prompts"] == ["a red duck", "a green duck"]
    second = personalise(PixelPrior(str(tiny_pixel_pipeline)), pink_duck, 1, tmp_path, class_prompts=THREE[1:])
    assert json.loads((folder / "manifest.json").read_text())["prompts"] == ["a green duck", "a blue duck"]
    kept = list(tmp_path.glob("class_images.old-*"))
    assert len(kept) == 1 and json.loads((kept[0] / "manifest.json").read_text())["prompts"][0] == "a red duck"
    # Image 1 was "a green duck" before and image 0 is now, from other noise: the data changed.
    assert not torch.equal(first.class_x0, second.class_x0)


def test_card_and_done_list_the_class_prompts(several) -> None:
    model, root, _ = several
    done = model.finish_stage(None, 1, 1)
    assert done["class_prompts"] == list(EXPANDED) and done["class_prompt"] == ""
    card = json.loads((root / "lora" / "magic3d_lora.json").read_text())
    assert card["class_prompts"] == list(EXPANDED) and card["class_prompt"] == ""
    assert "| class prompts (prior preservation) | a red duck; a green duck; a blue duck |" in \
        (root / "lora" / "README.md").read_text()


# ------------------------------------------------------------------------------ recipes


@pytest.mark.parametrize("stage", ["personalise_pixel", "personalise_latent"])
def test_the_recipes_preserve_one_class_prompt_per_toy_world_colour(stage: str, tmp_path: Path,
                                                                    pink_duck: Path) -> None:
    from magic3d.recipe import compose_stage, load_recipe
    from magic3d.toyworld.shapes import COLOUR_NAMES, caption

    by_name = {s.name: s for s in load_recipe("dreambooth").stages}
    config = compose_stage(by_name[stage], "a sks duck", 0, [], "full", tmp_path, subject=str(pink_duck))
    init = config["model"]["init_args"]
    assert init["class_prompts"] == [caption("{class}", colour) for colour in COLOUR_NAMES]
    assert init["n_class_images"] == 200 and "class_prompt" not in init
    expanded = parse_instance_prompt("a sks duck", "sks", class_prompts=init["class_prompts"]).class_prompts
    assert expanded == tuple(caption("duck", colour) for colour in COLOUR_NAMES), "the toy prior's own captions"
