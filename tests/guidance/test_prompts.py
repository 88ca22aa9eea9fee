"""Prompt embeddings: view-suffix selection, the disk cache and text-encoder release."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from magic3d.guidance.frozen import FrozenPipeline
from magic3d.guidance.pixel_sds import TEXT_MAX_LENGTH, PixelSDS
from magic3d.guidance.prompts import (
    PromptTooLong,
    fit_prompt,
    VIEW_SUFFIXES,
    PromptEmbeddings,
    cache_key,
    default_cache_dir,
    encode_texts,
    text_encoder_fingerprint,
)


def test_view_suffixes_follow_the_convention() -> None:
    assert VIEW_SUFFIXES == (", front view", ", side view", ", back view", ", overhead view")


def test_embeddings_for_picks_the_suffix_of_each_view() -> None:
    views = torch.arange(4.0).view(4, 1, 1).expand(4, 3, 2)
    emb = PromptEmbeddings(base=torch.full((3, 2), 9.0), views=views, uncond=torch.full((3, 2), -1.0))
    cond, uncond = emb.embeddings_for(torch.tensor([2, 0, 3, 1, 1]))
    assert cond.shape == uncond.shape == (5, 3, 2)
    assert cond[:, 0, 0].tolist() == [2.0, 0.0, 3.0, 1.0, 1.0]
    assert (uncond == -1.0).all()
    plain, _ = emb.embeddings_for(torch.tensor([2, 0]), view_dependent=False)
    assert (plain == 9.0).all()


def test_cache_key_depends_on_every_input() -> None:
    base = dict(model_id="m", encoder_fingerprint="f", prompt="a cat", negative_prompt="", max_length=77)
    key = cache_key(**base)
    assert key == cache_key(**base)  # deterministic across calls (no salted hash())
    for change in (
        {"prompt": "a dog"},
        {"negative_prompt": "blurry"},
        {"model_id": "other"},
        {"encoder_fingerprint": "g"},
        {"max_length": 64},
        {"suffixes": (", front view",)},
    ):
        assert cache_key(**{**base, **change}) != key, change


def test_fingerprint_ignores_volatile_config_keys() -> None:
    config = {"d_model": 32, "num_layers": 1}
    noisy = {**config, "_name_or_path": "/somewhere", "transformers_version": "9.9"}
    assert text_encoder_fingerprint(config) == text_encoder_fingerprint(noisy)
    assert text_encoder_fingerprint(config) != text_encoder_fingerprint({**config, "d_model": 64})


def test_default_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MAGIC3D_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "text_embeddings"
    monkeypatch.delenv("MAGIC3D_CACHE")
    assert default_cache_dir() == Path("~/.cache/magic3d/text_embeddings").expanduser()


class EncoderSpy:
    """Wraps FrozenPipeline._load_text_encoder: counts loads, keeps weak references to encoders."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self.encoders: list[weakref.ref] = []
        original = FrozenPipeline._load_text_encoder

        def spy(pipeline, device, dtype):
            self.calls += 1
            tokenizer, encoder = original(pipeline, device, dtype)
            self.encoders.append(weakref.ref(encoder))
            return tokenizer, encoder

        monkeypatch.setattr(FrozenPipeline, "_load_text_encoder", spy)


def test_second_setup_reads_cache_without_text_encoder(
    tiny_pixel_pipeline: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = EncoderSpy(monkeypatch)
    first = PixelSDS(str(tiny_pixel_pipeline), cache_dir=str(tmp_path))
    first.setup("a red cube", "cpu")
    assert spy.calls == 1
    gc.collect()
    assert spy.encoders[0]() is None  # the text encoder was released after encoding

    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1
    with safe_open(str(files[0]), "pt") as f:
        assert f.metadata()["prompt"] == "a red cube"
        assert f.get_tensor("views").shape == (4, TEXT_MAX_LENGTH, 32)

    second = PixelSDS(str(tiny_pixel_pipeline), cache_dir=str(tmp_path))
    second.setup("a red cube", "cpu")
    assert spy.calls == 1  # served from disk
    for name in ("base", "views", "uncond"):
        assert torch.equal(getattr(first.embeddings, name), getattr(second.embeddings, name))

    second.setup("a red cube", "cpu")  # Lightning may call setup again: nothing reloads
    assert spy.calls == 1
    second.setup("a blue torus", "cpu")  # a new prompt on a set-up guidance: new embeddings
    assert spy.calls == 2 and not torch.equal(second.embeddings.views, first.embeddings.views)
    PixelSDS(str(tiny_pixel_pipeline), cache_dir=str(tmp_path), negative_prompt="blurry").setup(
        "a red cube", "cpu"
    )
    assert spy.calls == 3 and len(list(tmp_path.glob("*.safetensors"))) == 3


def test_cache_defaults_to_magic3d_cache_env(
    tiny_pixel_pipeline: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAGIC3D_CACHE", str(tmp_path / "env_cache"))
    PixelSDS(str(tiny_pixel_pipeline)).setup("a red cube", "cpu")
    assert len(list((tmp_path / "env_cache" / "text_embeddings").glob("*.safetensors"))) == 1


def test_cached_embeddings_are_the_suffixed_prompts(tiny_pixel_pipeline: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer, T5EncoderModel

    guidance = PixelSDS(str(tiny_pixel_pipeline), cache_dir=str(tmp_path), negative_prompt="ugly")
    guidance.setup("a red cube", "cpu")
    tokenizer = AutoTokenizer.from_pretrained(tiny_pixel_pipeline, subfolder="tokenizer")
    encoder = T5EncoderModel.from_pretrained(tiny_pixel_pipeline, subfolder="text_encoder")
    texts = ["a red cube", *(f"a red cube{s}" for s in VIEW_SUFFIXES), "ugly"]
    expected = encode_texts(tokenizer, encoder, texts, TEXT_MAX_LENGTH)
    emb = guidance.embeddings
    # Same weights, same float32 ops (batched vs batched): identical up to BLAS reordering.
    torch.testing.assert_close(emb.base, expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(emb.views, expected[1:5], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(emb.uncond, expected[5], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(emb.views[0], emb.views[2])  # front and back prompts differ


def test_clip_prompts_are_masked_only_when_the_config_asks_as_diffusers_does() -> None:
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from magic3d.testing.random_pipelines import build_tokenizer
    from magic3d.guidance.prompts import encode_texts, uses_attention_mask

    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 vocab_size=512, max_position_embeddings=TEXT_MAX_LENGTH)
    clip = CLIPTextModel(CLIPTextConfig(**small)).eval()
    masked_clip = CLIPTextModel(CLIPTextConfig(**small, use_attention_mask=True)).eval()
    t5 = T5EncoderModel(T5Config(vocab_size=512, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2))
    assert not uses_attention_mask(clip)  # Stable Diffusion 2.1's CLIP: no mask
    assert uses_attention_mask(masked_clip) and uses_attention_mask(t5)  # IF's T5: masked
    tokenizer = build_tokenizer()
    tokens = tokenizer(["a red cube"], padding="max_length", max_length=TEXT_MAX_LENGTH, truncation=True,
                       return_tensors="pt")
    with torch.no_grad():
        unmasked = clip(tokens.input_ids)[0]
        masked = clip(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
    got = encode_texts(tokenizer, clip, ["a red cube"], TEXT_MAX_LENGTH)
    torch.testing.assert_close(got, unmasked)  # the same computation on the same device
    assert not torch.allclose(masked, unmasked)  # the mask does matter at padding positions


def test_a_long_prompt_is_shortened_once_and_keeps_its_view_suffix(tiny_pixel_pipeline: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_pixel_pipeline, subfolder="tokenizer")
    long_prompt = "a red cube " + "with many small ornate carvings " * 6  # far beyond 77 tokens
    fitted = fit_prompt(tokenizer, long_prompt, TEXT_MAX_LENGTH)
    assert fitted.shortened and fitted.n_tokens > TEXT_MAX_LENGTH
    assert long_prompt.startswith(fitted.text)
    for suffix in VIEW_SUFFIXES:  # every view prompt fits whole, suffix included
        ids = tokenizer(fitted.text + suffix, truncation=False).input_ids
        assert len(ids) <= TEXT_MAX_LENGTH
    assert not fit_prompt(tokenizer, "a red cube", TEXT_MAX_LENGTH).shortened

    with pytest.warns(PromptTooLong, match=rf"{fitted.n_tokens} tokens") as caught:
        guidance = PixelSDS(str(tiny_pixel_pipeline), cache_dir=str(tmp_path))
        guidance.setup(long_prompt, "cpu")
    assert len(caught) == 1, "one warning, not one per view"
    # On today's main the truncation cut the suffix off: front and back embeddings were equal.
    assert not torch.allclose(guidance.embeddings.views[0], guidance.embeddings.views[2])
    with pytest.warns(PromptTooLong):  # a cached run says it again
        PixelSDS(str(tiny_pixel_pipeline), cache_dir=str(tmp_path)).setup(long_prompt, "cpu")
