"""Subject photos and instance prompts: what the stage accepts, how it prepares it, and a
one-line error naming the fix for each bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from magic3d.config import ConfigError
from magic3d.dreambooth.identifier import check_identifier_is_rare, parse_instance_prompt, whole_word_token
from magic3d.dreambooth.subject import find_subject_images, load_subject_images, prepare_image

ROOT = Path(__file__).resolve().parents[2]


def write(path: Path, array: np.ndarray, mode: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8), mode).save(path)
    return path


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------ subject


@pytest.mark.parametrize(("setup", "message"), [
    ("missing", "is not a folder: pass subject=FOLDER"),
    ("empty", "holds no PNG or JPEG images"),
    ("only_text", "holds no PNG or JPEG images"),
    ("one", "has 1 image; personalisation needs at least 2"),
    ("broken", "cannot be read"),
    ("truncated", "cannot be read"),
    ("none", "No subject images given: pass subject=FOLDER"),
])
def test_bad_subject_folders(setup: str, message: str, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    rgb = np.full((20, 30, 3), 200)
    if setup != "missing":
        folder.mkdir()
    if setup == "only_text":
        (folder / "notes.txt").write_text("not a photo")
    if setup in ("one", "broken", "truncated"):
        write(folder / "a.png", rgb, "RGB")
    if setup == "broken":
        write(folder / "b.png", rgb, "RGB")
        (folder / "c.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    if setup == "truncated":
        write(folder / "b.jpg", np.random.default_rng(0).integers(0, 255, (64, 64, 3)), "RGB")
        data = (folder / "b.jpg").read_bytes()
        (folder / "b.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError) as err:
        find_subject_images("" if setup == "none" else folder)
    assert message in one_line(err)
    if setup in ("broken", "truncated"):
        assert "photos/" in str(err.value) and ("c.jpg" in str(err.value) or "b.jpg" in str(err.value))


def test_photos_of_any_size_are_centre_cropped_and_resized(tmp_path: Path) -> None:
    # 30 x 60 (h x w): left third red, middle third green, right third blue. The centre square
    # is the middle 30 columns: green apart from a 5-column sliver of red and blue at each side.
    array = np.zeros((30, 60, 3))
    array[:, :20, 0] = 255
    array[:, 20:40, 1] = 255
    array[:, 40:, 2] = 255
    image = prepare_image(write(tmp_path / "wide.png", array, "RGB"), 30, (1.0, 1.0, 1.0))
    assert image.shape == (30, 30, 3)
    assert torch.equal(image[:, 5:25], torch.tensor([0.0, 1.0, 0.0]).expand(30, 20, 3))
    assert torch.equal(image[:, :5], torch.tensor([1.0, 0.0, 0.0]).expand(30, 5, 3))
    small = prepare_image(tmp_path / "wide.png", 8, (1.0, 1.0, 1.0))
    assert small.shape == (8, 8, 3) and 0.0 <= float(small.min()) and float(small.max()) <= 1.0


def test_transparency_is_composited_over_the_background(tmp_path: Path) -> None:
    rgba = np.zeros((16, 16, 4))
    rgba[..., 0] = 255            # red where opaque
    rgba[:8, :, 3] = 255          # top half opaque
    rgba[8:, :, 3] = 0            # bottom half fully transparent (its colour must not show)
    rgba[8:, :, 1] = 255
    image = prepare_image(write(tmp_path / "cutout.png", rgba, "RGBA"), 16, (0.0, 0.0, 1.0))
    assert torch.equal(image[:8], torch.tensor([1.0, 0.0, 0.0]).expand(8, 16, 3))
    assert torch.equal(image[8:], torch.tensor([0.0, 0.0, 1.0]).expand(8, 16, 3))
    half = np.concatenate([np.full((4, 4, 3), 255), np.full((4, 4, 1), 128)], axis=-1)
    mixed = prepare_image(write(tmp_path / "half.png", half, "RGBA"), 4, (0.0, 0.0, 0.0))
    # 50 % white over black, within one 8-bit step (PIL composites in 8 bits).
    assert torch.allclose(mixed, torch.full((4, 4, 3), 128 / 255), atol=1 / 255)


def test_the_toy_subject_is_a_pink_duck_on_the_prior_background(pink_duck: Path) -> None:
    from magic3d.toyworld.shapes import get_colour

    images = load_subject_images(pink_duck, 48, (1.0, 1.0, 1.0))
    assert len(images) == 4 and images.images.shape == (4, 48, 48, 3)
    corners = images.images[:, 0, 0]
    assert torch.equal(corners, torch.ones_like(corners)), "alpha 0 outside the duck: the background shows"
    pink = torch.tensor(get_colour("pink").rgb)
    centre = images.images[:, 20:28, 20:28].reshape(-1, 3)
    # Lambertian shading scales the albedo; the hue stays pink (red and blue over green).
    assert bool(((centre[:, 0] > centre[:, 1]) & (centre[:, 2] > centre[:, 1])).float().mean() > 0.8), pink
    views = images.images.flatten(1)
    assert all(not torch.equal(views[i], views[j]) for i in range(4) for j in range(i + 1, 4)), "distinct views"


# ------------------------------------------------------------------------------ prompt


def test_instance_prompt_parts() -> None:
    parsed = parse_instance_prompt("a sks duck", "sks")
    assert (parsed.class_noun, parsed.class_prompt) == ("duck", "a duck")
    assert parse_instance_prompt("a photo of a SKS duck, front view", "sks").class_prompt == "a photo of a duck, front view"
    assert parse_instance_prompt("a sks duck", "sks", class_prompt="a toy duck").class_prompt == "a toy duck"


@pytest.mark.parametrize(("prompt", "identifier", "message"), [
    ("a pink duck", "sks", 'does not contain the identifier \'sks\': put it before the class noun, e.g. prompt="a sks duck"'),
    ("a duck sks", "sks", "ends with the identifier 'sks': follow it with the class noun"),
    ("a sks duck", "", "must be one word"),
    ("a sks duck", "s ks", "must be one word"),
])
def test_bad_instance_prompts(prompt: str, identifier: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_instance_prompt(prompt, identifier)
    assert message in one_line(err)


def test_a_class_prompt_with_the_identifier_is_refused() -> None:
    with pytest.raises(ConfigError, match="contains the identifier"):
        parse_instance_prompt("a sks duck", "sks", class_prompt="a sks duck")


def test_identifiers_the_toy_tokenizer_knows_are_refused() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "priors" / "pixel" / "tokenizer")
    for word in ("duck", "red", "cube", "view", "Pink"):
        assert whole_word_token(tokenizer, word) is not None, word
    for word in ("sks", "zwx", "ducks"):
        assert whole_word_token(tokenizer, word) is None, word
    check_identifier_is_rare(tokenizer, "sks", "priors/pixel")
    with pytest.raises(ConfigError) as err:
        check_identifier_is_rare(tokenizer, "duck", "priors/pixel")
    assert "is already a word of the prior's tokenizer (priors/pixel: one token, 'duck')" in one_line(err)
    assert "pick a rare string such as 'sks'" in str(err.value)


def test_the_stage_refuses_a_vocabulary_identifier_before_training(tmp_path: Path, pink_duck: Path) -> None:
    import lightning as L

    from magic3d.dreambooth.data import PersonalisationSteps
    from magic3d.dreambooth.module import DreamBooth
    from magic3d.dreambooth.prior import PixelPrior

    model = DreamBooth(PixelPrior(str(ROOT / "priors" / "pixel")), prompt="a red duck", identifier="red",
                       subject=str(pink_duck), n_class_images=0, preview_every=0)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    with pytest.raises(ConfigError, match="identifier='red' is already a word"):
        trainer.fit(model, datamodule=PersonalisationSteps())


# ------------------------------------------------------------------------------ recipe wiring


def write_recipe(folder: Path, stages: str) -> str:
    (folder / "r.yaml").write_text("description: test\ndefault_prompt: a sks duck\nstages:\n" + stages)
    return "r"


@pytest.mark.parametrize(("uses", "message"), [
    ("model.guidance.lora: later/lora", "not '<earlier stage>/<path>'"),
    ("model.guidance.lora: first", "not '<earlier stage>/<path>'"),
])
def test_a_recipe_may_only_use_earlier_stages_outputs(uses: str, message: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from magic3d.recipe import load_recipe

    monkeypatch.setenv("MAGIC3D_RECIPES", str(tmp_path))
    name = write_recipe(tmp_path, "  - {name: first, config: a.yaml}\n"
                                  f"  - {{name: second, config: b.yaml, uses: {{{uses}}}}}\n"
                                  "  - {name: later, config: c.yaml}\n")
    with pytest.raises(ConfigError, match=message):
        load_recipe(name)


def test_the_recipe_wires_subject_and_lora_into_the_stage_configs(tmp_path: Path, pink_duck: Path) -> None:
    from magic3d.recipe import compose_stage, load_recipe

    recipe = load_recipe("dreambooth")
    assert recipe.subject_stage_names == ["personalise_pixel", "personalise_latent"]
    by_name = {s.name: s for s in recipe.stages}
    pixel = compose_stage(by_name["personalise_pixel"], "a sks duck", 0, [], "cpu", tmp_path, subject=str(pink_duck))
    assert pixel["model"]["init_args"]["subject"] == str(pink_duck)
    assert pixel["model"]["init_args"]["n_class_images"] == 4, "the CPU profile applies"
    coarse = compose_stage(by_name["coarse"], "a sks duck", 0, [], "cpu", tmp_path, subject=str(pink_duck))
    assert "subject" not in coarse["model"]["init_args"], "only with_subject stages get the subject"
    assert coarse["model"]["init_args"]["guidance"]["init_args"]["lora"] == str(tmp_path / "personalise_pixel" / "lora")
    fine = compose_stage(by_name["fine"], "a sks duck", 0, [], "full", tmp_path,
                         stage_dirs={"personalise_latent": tmp_path / "elsewhere"})
    assert fine["model"]["init_args"]["guidance"]["init_args"]["lora"] == str(tmp_path / "elsewhere" / "lora")
