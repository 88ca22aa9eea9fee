"""DreamBooth-tuned guidance: PixelSDS / LatentSDS with ``lora:`` load the personalisation
stage's adapters onto the frozen prior and then predict exactly what the tuned model predicts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from magic3d.config import ConfigError
from magic3d.guidance.latent_sds import LatentSDS
from magic3d.guidance.loading import cfg_unet_outputs
from magic3d.guidance.lora import LORA_CARD, LORA_WEIGHTS
from magic3d.guidance.pixel_sds import PixelSDS


def cfg_inputs(channels: int, size: int, width: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.randn(2, channels, size, size, generator=generator)
    cond = torch.randn(2, 77, width, generator=generator)
    return x_t, torch.tensor([30, 600]), cond, torch.zeros_like(cond)


def pixel_guidance(pipeline: Path, cache: Path, **kwargs) -> PixelSDS:
    guidance = PixelSDS(str(pipeline), cache_dir=str(cache), **kwargs)
    guidance.setup("a sks duck", "cpu")
    return guidance


def test_a_tuned_guidance_predicts_what_the_tuned_model_predicts(tuned_pixel, tiny_pixel_pipeline: Path,
                                                                 tmp_path: Path) -> None:
    model, folder = tuned_pixel
    base = pixel_guidance(tiny_pixel_pipeline, tmp_path)
    tuned = pixel_guidance(tiny_pixel_pipeline, tmp_path, lora=str(folder))
    inputs = cfg_inputs(3, 32, 32)
    expected = cfg_unet_outputs(model.prior.unet, *inputs)
    got = torch.cat(tuned.predict_noise(*inputs))
    assert torch.equal(got, expected), "the guidance's UNet must be the tuned one, bit for bit on CPU"
    assert not torch.equal(torch.cat(base.predict_noise(*inputs)), got)
    assert tuned.state_dict() == {} and not any(p.requires_grad for p in tuned.unet.parameters()), \
        "adapters load frozen and stay out of the guidance's checkpoints"


def test_text_encoder_adapters_change_the_embeddings_and_their_cache_key(tuned_pixel, tiny_pixel_pipeline: Path,
                                                                       tmp_path: Path) -> None:
    model, folder = tuned_pixel
    base = pixel_guidance(tiny_pixel_pipeline, tmp_path)
    tuned = pixel_guidance(tiny_pixel_pipeline, tmp_path, lora=str(folder))
    # The guidance's text path (compute_prompt_embeddings) against the stage's (encode_text).
    assert torch.equal(tuned.embeddings.base, model.prior.encode_text(["a sks duck"])[0].detach())
    assert not torch.equal(tuned.embeddings.base, base.embeddings.base)
    cache = tmp_path / "text_embeddings" if (tmp_path / "text_embeddings").is_dir() else tmp_path
    assert len(list(cache.glob("*.safetensors"))) == 2, "a text-encoder adapter is part of the cache key"
    half = pixel_guidance(tiny_pixel_pipeline, tmp_path, lora=str(folder), lora_scale=0.5)
    assert len(list(cache.glob("*.safetensors"))) == 3, "so is its scale"
    assert not torch.equal(half.embeddings.base, tuned.embeddings.base)


def test_scale_zero_is_the_untuned_prior(tuned_pixel, tiny_pixel_pipeline: Path, tmp_path: Path) -> None:
    _, folder = tuned_pixel
    base = pixel_guidance(tiny_pixel_pipeline, tmp_path)
    off = pixel_guidance(tiny_pixel_pipeline, tmp_path, lora=str(folder), lora_scale=0.0)
    inputs = cfg_inputs(3, 32, 32)
    assert torch.equal(torch.cat(off.predict_noise(*inputs)), torch.cat(base.predict_noise(*inputs)))
    assert torch.equal(off.embeddings.views, base.embeddings.views)


def test_latent_guidance_with_unet_adapters(tuned_latent, tiny_latent_pipeline: Path, tmp_path: Path) -> None:
    model, folder = tuned_latent
    base = LatentSDS(str(tiny_latent_pipeline), cache_dir=str(tmp_path))
    base.setup("a sks duck", "cpu")
    tuned = LatentSDS(str(tiny_latent_pipeline), cache_dir=str(tmp_path), lora=str(folder))
    tuned.setup("a sks duck", "cpu")
    inputs = cfg_inputs(4, 8, 32)
    assert torch.equal(torch.cat(tuned.predict_noise(*inputs)), cfg_unet_outputs(model.prior.unet, *inputs))
    assert not torch.equal(torch.cat(tuned.predict_noise(*inputs)), torch.cat(base.predict_noise(*inputs)))
    # A UNet-only adapter leaves the text path as it is: same embeddings, one cache file.
    assert torch.equal(tuned.embeddings.views, base.embeddings.views)
    assert len(list(tmp_path.rglob("*.safetensors"))) == 1
    rgb = torch.rand(1, 32, 32, 3, requires_grad=True)
    from magic3d.data.cameras import orbit_cameras

    out = tuned.step(rgb, orbit_cameras(1, 15.0, 2.0, 50.0, 32, 32), 0.5)
    out.loss.backward()
    assert torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0


def test_a_lora_of_another_prior_is_refused_naming_both(tuned_pixel, tiny_latent_pipeline: Path,
                                                        tmp_path: Path) -> None:
    from magic3d.testing.random_pipelines import build_pixel_pipeline

    _, folder = tuned_pixel
    # Same architecture, same file sizes, other weights: as a retrained toy prior would be.
    other = build_pixel_pipeline(tmp_path / "other_if", "tiny", seed=1)
    with pytest.raises(ConfigError) as err:
        pixel_guidance(other, tmp_path, lora=str(folder))
    message = str(err.value)
    assert str(other.resolve()) in message and "tiny_if" in message and "\n" not in message
    with pytest.raises(ConfigError, match=r"\(Stable Diffusion\)"):
        LatentSDS(str(tiny_latent_pipeline), cache_dir=str(tmp_path), lora=str(folder)).setup("a sks duck", "cpu")


def test_a_copied_prior_keeps_its_adapters(tuned_pixel, tiny_pixel_pipeline: Path, tmp_path: Path) -> None:
    import shutil

    _, folder = tuned_pixel
    copy = Path(shutil.copytree(tiny_pixel_pipeline, tmp_path / "copy_of_prior"))
    pixel_guidance(copy, tmp_path, lora=str(folder))  # same weights elsewhere: accepted


@pytest.mark.parametrize(("damage", "message"), [
    ("missing", "does not exist"),
    ("no_weights", f"has no {LORA_WEIGHTS}"),
    ("no_card", f"has no readable {LORA_CARD}"),
])
def test_bad_lora_folders_say_what_to_pass(damage: str, message: str, tuned_pixel, tiny_pixel_pipeline: Path,
                                           tmp_path: Path) -> None:
    import shutil

    _, folder = tuned_pixel
    target = tmp_path / "lora"
    if damage != "missing":
        shutil.copytree(folder, target)
        (target / (LORA_WEIGHTS if damage == "no_weights" else LORA_CARD)).unlink()
    with pytest.raises(ConfigError, match=message):
        pixel_guidance(tiny_pixel_pipeline, tmp_path, lora=str(target))


def test_lora_scale_must_be_finite() -> None:
    with pytest.raises(ValueError, match="lora_scale=nan"):
        PixelSDS("unused", lora="x", lora_scale=float("nan"))
