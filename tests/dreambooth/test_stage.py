"""The personalisation stage trains the adapters alone, writes them in diffusers' LoRA format,
and a reload reproduces the tuned model exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from magic3d.dreambooth.prior import LatentPrior, PixelPrior
from magic3d.guidance.lora import LORA_CARD, LORA_WEIGHTS, read_lora

from conftest import personalise


def unet_prediction(unet, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, channels, size, size, generator=generator)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(x, torch.tensor([50, 700]), encoder_hidden_states=context, return_dict=False)[0]


def fresh_unet(pipeline: Path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(pipeline / "unet").eval()


@pytest.mark.parametrize("kind", ["pixel", "latent"])
def test_only_the_adapters_train_and_enter_the_state_dict(kind, tuned_pixel, tuned_latent, tiny_pixel_pipeline,
                                                          tiny_latent_pipeline) -> None:
    model, _ = tuned_pixel if kind == "pixel" else tuned_latent
    pipeline = tiny_pixel_pipeline if kind == "pixel" else tiny_latent_pipeline
    state = model.state_dict()
    adapters = [k for k in state if k.startswith("adapters.")]
    assert adapters and all("lora_" in k for k in adapters)
    assert set(state) - set(adapters) == {"loss_first", "loss_ema", "loss_steps", "train_seconds"}, \
        "nothing of the frozen prior may reach a checkpoint"
    assert any(bool(p.abs().sum() > 0) for k, p in model.adapters.items() if "lora_B" in k), "B starts at 0: it trained"
    frozen = fresh_unet(pipeline).state_dict()
    for name, param in model.prior.unet.named_parameters():
        if "lora_" not in name:
            assert not param.requires_grad
            assert torch.equal(param, frozen[name.replace(".base_layer", "")]), f"frozen weight {name} changed"


def test_adapters_reload_to_the_tuned_unet_bit_for_bit(tuned_pixel, tiny_pixel_pipeline: Path) -> None:
    model, folder = tuned_pixel
    adapter = read_lora(folder)
    unet = fresh_unet(tiny_pixel_pipeline)
    base = unet_prediction(unet, 3, 32)
    assert adapter.apply(unet, "unet")
    tuned = unet_prediction(model.prior.unet, 3, 32)
    assert torch.equal(unet_prediction(unet, 3, 32), tuned), "float32 safetensors: the reload must be exact"
    assert not torch.equal(tuned, base), "the adapters changed the prediction"
    assert not any(p.requires_grad for p in unet.parameters()), "a loaded adapter is frozen"


def test_latent_adapters_reload_exactly_and_leave_the_vae_alone(tuned_latent, tiny_latent_pipeline: Path) -> None:
    model, folder = tuned_latent
    unet = fresh_unet(tiny_latent_pipeline)
    read_lora(folder).apply(unet, "unet")
    assert torch.equal(unet_prediction(unet, 4, 8), unet_prediction(model.prior.unet, 4, 8))
    assert not any("lora" in n for n, _ in model.prior.vae.named_parameters()), "training runs in latent space"


def test_the_lora_file_is_diffusers_format_and_diffusers_loads_all_of_it(tuned_pixel, tiny_pixel_pipeline) -> None:
    model, folder = tuned_pixel
    tensors = load_file(str(folder / LORA_WEIGHTS))
    assert {k.split(".", 1)[0] for k in tensors} == {"unet", "text_encoder"}
    assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in tensors)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    # diffusers' own loader (what pipeline.load_lora_weights runs for the UNet) reads every tensor.
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    state, alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(str(folder), return_lora_metadata=True)
    unet = fresh_unet(tiny_pixel_pipeline)
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(state, alphas, unet, adapter_name="x", metadata=metadata)
    assert torch.equal(unet_prediction(unet, 3, 32), unet_prediction(model.prior.unet, 3, 32))


def test_text_encoder_adapters_reload_exactly(tuned_pixel, tiny_pixel_pipeline: Path) -> None:
    from transformers import T5EncoderModel

    model, folder = tuned_pixel
    encoder = T5EncoderModel.from_pretrained(tiny_pixel_pipeline / "text_encoder").eval()
    ids = model.prior.tokenizer(["a sks duck"], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        base = encoder(ids.input_ids, attention_mask=ids.attention_mask)[0]
        assert read_lora(folder).apply(encoder, "text_encoder")
        reloaded = encoder(ids.input_ids, attention_mask=ids.attention_mask)[0]
        tuned = model.prior.encode_text(["a sks duck"])
    assert torch.equal(reloaded, tuned) and not torch.equal(reloaded, base)


def test_card_and_done_entries(tuned_pixel, tiny_pixel_pipeline: Path, pink_duck: Path) -> None:
    model, folder = tuned_pixel
    card = json.loads((folder / LORA_CARD).read_text())
    assert card["base_model"] == str(tiny_pixel_pipeline.resolve())
    assert (card["identifier"], card["class_noun"], card["class_prompt"]) == ("sks", "duck", "a duck")
    assert card["subject"] == str(pink_duck) and card["n_subject_images"] == 4
    assert card["steps"] == 3 and card["text_encoder"] is True and card["rank"] == 4
    assert set(card["losses"]) == {"instance_first", "instance_final", "prior_first", "prior_final"}
    assert card["size_mb"] == pytest.approx((folder / LORA_WEIGHTS).stat().st_size / 1e6, abs=1e-3)
    readme = (folder / "README.md").read_text()
    assert "base_model: " in readme and "a sks duck" in readme and (folder / "samples.png").is_file()


def test_class_images_are_made_once_and_read_back(tmp_path: Path, tiny_pixel_pipeline: Path, pink_duck: Path) -> None:
    first = personalise(PixelPrior(str(tiny_pixel_pipeline)), pink_duck, 1, tmp_path)
    folder = tmp_path / "class_images"
    assert sorted(p.name for p in folder.iterdir()) == ["0000.png", "0001.png", "manifest.json"]
    stamp = (folder / "0000.png").stat().st_mtime_ns
    again = personalise(PixelPrior(str(tiny_pixel_pipeline)), pink_duck, 1, tmp_path)
    assert (folder / "0000.png").stat().st_mtime_ns == stamp, "same settings: read back, not made again"
    assert torch.equal(first.class_x0, again.class_x0), "made or read back, the training data is the same"
    personalise(PixelPrior(str(tiny_pixel_pipeline)), pink_duck, 1, tmp_path, class_sample_steps=3)
    assert json.loads((folder / "manifest.json").read_text())["steps"] == 3
    assert list(tmp_path.glob("class_images.old-*")), "images made with other settings are kept aside"


def test_no_prior_preservation_trains_on_the_subject_alone(tmp_path: Path, tiny_latent_pipeline: Path,
                                                           pink_duck: Path) -> None:
    model = personalise(LatentPrior(str(tiny_latent_pipeline)), pink_duck, 1, tmp_path, n_class_images=0)
    assert model.class_x0 is None and not (tmp_path / "class_images").exists()
    assert model.step_loss(1, 0).prior is None
