"""Embedded-prior training: smoke runs on CPU export folders that the guidance loads offline,
resume continues the step count, the size guard refuses, the latent prior's VAE and UNet fit
together. Sizes are the ``smoke`` configs (16 px pixel prior, 64 px latent prior)."""

from __future__ import annotations

import json
import os

# Before any diffusers/transformers import: huggingface_hub reads these at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from magic3d.data.cameras import orbit_cameras  # noqa: E402
from magic3d.guidance.prompts import encode_texts  # noqa: E402
from magic3d.priors import default_config, default_state_path, train_prior  # noqa: E402
from magic3d.priors.captions import NO_SUFFIX, CaptionTable  # noqa: E402
from magic3d.priors.configs import (  # noqa: E402
    TEXT_MAX_LENGTH,
    build_text_encoder,
    build_train_scheduler,
    tokenizer_from_json,
    train_tokenizer_json,
)
from magic3d.priors.export import check_size  # noqa: E402
from magic3d.priors.losses import NoiseSchedule, learned_variance_kl  # noqa: E402
from magic3d.priors.train import load_state  # noqa: E402


@pytest.fixture(autouse=True)
def _offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAGIC3D_CACHE", str(tmp_path / "magic3d_cache"))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def pixel_run(tmp_path_factory: pytest.TempPathFactory):
    """One smoke training of the pixel prior (2 steps), shared by the pixel tests."""
    root = tmp_path_factory.mktemp("priors")
    logs: list[str] = []
    result = train_prior("pixel", root / "pixel", smoke=True, max_steps=2, device="cpu", log=logs.append)
    return result, logs


@pytest.fixture(scope="module")
def tokenizer():
    return tokenizer_from_json(train_tokenizer_json())


def test_pixel_smoke_export_loads_in_pixel_sds(pixel_run, tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    from magic3d.guidance.pixel_sds import PixelSDS

    result, _ = pixel_run
    folder = result.out
    assert result.exported and result.steps == {"unet": 2}
    for part in ("unet", "text_encoder", "tokenizer", "scheduler", "model_index.json", "README.md",
                 "samples.png", "training.json"):
        assert (folder / part).exists(), part
    with safe_open(str(folder / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}  # stored small
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32)
    assert next(unet.parameters()).dtype == torch.float32  # upcast on load for CPU use

    guidance = PixelSDS(pretrained=str(folder), guidance_scale=5.0, half_precision=False, cache_dir=str(tmp_path))
    guidance.setup("a blue torus", "cpu")
    size = unet.config.sample_size
    rgb = torch.rand(2, size, size, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    out = guidance.step(rgb, orbit_cameras(2, 10.0, 2.0, 50.0, size, size), progress=0.3)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(rgb.grad).all()
    assert rgb.grad.abs().sum() > 0
    card = (folder / "README.md").read_text()
    assert "| unet | 2 |" in card and "To be filled by the evaluator" in card


def test_resume_continues_step_count_and_rerun_is_idempotent(pixel_run) -> None:
    first, _ = pixel_run
    logs: list[str] = []
    resumed = train_prior("pixel", first.out, smoke=True, max_steps=4, resume=True, device="cpu", log=logs.append)
    assert any("resuming" in line for line in logs)
    assert resumed.steps == {"unet": 4} and resumed.exported
    state = load_state(default_state_path(first.out, "pixel"))
    history_steps = [int(h[0]) for h in state["phases"]["unet"]["history"]]
    assert history_steps == [1, 2, 3, 4]  # log_every=1 in smoke: the curve continues, not restarts
    assert state["n_images"] == 64 and len(state["runs"]) == 2
    assert json.loads((first.out / "training.json").read_text())["steps"] == {"unet": 4}

    again = train_prior("pixel", first.out, smoke=True, max_steps=4, resume=True, device="cpu", log=logs.append)
    assert not again.exported and again.steps == {"unet": 4}


def test_size_guard_refuses_before_training(tmp_path: Path) -> None:
    out = tmp_path / "pixel"
    with pytest.raises(ValueError, match="max_mb=0.01"):
        train_prior("pixel", out, smoke=True, device="cpu", max_mb=0.01, log=lambda _: None)
    assert not out.exists() and not default_state_path(out, "pixel").exists()
    # The same check guards export: 1000x1000 weights + bias are 2.002 MB in fp16.
    with pytest.raises(ValueError, match="2.00 MB"):
        check_size({"unet": nn.Linear(1000, 1000)}, max_mb=2.0)
    assert check_size({"unet": nn.Linear(10, 10)}, max_mb=2.0) == pytest.approx(110 * 2 / 1e6)


def test_latent_smoke_vae_and_unet_fit_together(tmp_path: Path) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    result = train_prior("latent", tmp_path / "latent", smoke=True, max_steps=2, device="cpu", log=lambda _: None)
    folder = result.out
    assert result.steps == {"vae": 2, "unet": 2}
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32)
    scaling = vae.config.scaling_factor
    assert scaling > 0 and scaling != 0.18215  # computed from the data, not SD's default
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32)
    with torch.no_grad():
        latents = vae.encode(image).latent_dist.sample() * scaling
        context = encode_texts(tokenizer, text_encoder, ["a red cube, side view"], TEXT_MAX_LENGTH)
        eps = unet(latents, torch.tensor([300]), encoder_hidden_states=context).sample
    assert latents.shape == (1, 4, 8, 8)
    assert eps.shape == latents.shape and torch.isfinite(eps).all()


def test_training_captions_use_the_guidance_text_path(tokenizer) -> None:
    torch.manual_seed(0)
    encoder = build_text_encoder(default_config("pixel", smoke=True).text, len(tokenizer)).eval()
    table = CaptionTable(tokenizer)
    # Toy-world words are single tokens: "a red cube, front view" + eos.
    assert len(tokenizer("a red cube, front view").input_ids) == 7
    shape, colour, view = torch.tensor([1, 4]), torch.tensor([0, 5]), torch.tensor([0, 3])
    rows = torch.cat([table.rows(shape, colour, view), table.rows(shape, colour, torch.full_like(view, NO_SUFFIX)),
                      torch.tensor([table.empty_row])])
    texts = [table.texts[r] for r in rows.tolist()]
    assert texts == ["a red cube, front view", "an orange torus, overhead view",
                     "a red cube", "an orange torus", ""]
    with torch.no_grad():
        ours = table.encode(encoder, rows)
    # Same tokenizer call and encoder call as the guidance: identical up to float summation order.
    torch.testing.assert_close(ours, encode_texts(tokenizer, encoder, texts, TEXT_MAX_LENGTH), rtol=0, atol=1e-6)
    drop = table.sample_rows(shape.repeat(500), colour.repeat(500), view.repeat(500), 0.75, 0.1)
    dropped = (drop == table.empty_row).float().mean().item()
    assert 0.06 < dropped < 0.14  # 1000 Bernoulli(0.1) draws: std 0.0095, bounds are ~4 sigma


def test_learned_variance_kl_vanishes_at_the_true_posterior() -> None:
    schedule = NoiseSchedule(torch.as_tensor(build_train_scheduler(default_config("pixel")).betas), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(6, 3, 4, 4, generator=g)
    t = torch.tensor([1, 10, 100, 500, 900, 999])
    at_min = torch.full_like(noise, -1.0)  # learned_range v = -1 selects the posterior variance
    exact = learned_variance_kl(at_min, noise, noise, t, schedule)
    # KL of identical Gaussians is 0; float32 log/exp round-off stays far below 1e-5 bits.
    assert exact.abs().item() < 1e-5
    assert learned_variance_kl(torch.ones_like(noise), noise, noise, t, schedule).item() > 0
    wrong_mean = learned_variance_kl(at_min, noise + 0.1, noise, t, schedule).item()
    assert wrong_mean > 0
    # t = 0 is excluded (iDDPM's decoder term): only that sample -> exactly 0
    assert learned_variance_kl(torch.ones_like(noise[:1]), noise[:1], noise[:1], torch.tensor([0]), schedule) == 0


def test_cli_smoke_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from magic3d.priors.__main__ import main

    out = tmp_path / "priors" / "pixel"
    assert main(["train", "--kind", "pixel", "--out", str(out), "--smoke", "--max-steps", "1", "--device", "cpu"]) == 0
    assert "pixel prior exported" in capsys.readouterr().out
    assert (tmp_path / "priors" / ".prior_ckpt" / "pixel" / "train_state.pt").is_file()
    assert "--max-steps 1" in (out / "README.md").read_text()  # the card records the command


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["pixel", "latent"])
def test_shipped_config_trains_resumes_and_exports_on_gpu(kind: str, tmp_path: Path) -> None:
    import dataclasses

    config = dataclasses.replace(default_config(kind), n_images=1024, log_every=5, sample_rows=1, sample_steps=10)
    logs: list[str] = []
    out = tmp_path / kind
    first = train_prior(kind, out, config=config, device="cuda", max_steps=10, log=logs.append)
    assert all(step == 10 for step in first.steps.values())
    resumed = train_prior(kind, out, device="cuda", max_steps=20, resume=True, log=logs.append)
    # The VAE is frozen once the UNet has trained on its latents, so only the UNet continues.
    expected = {"vae": 10, "unet": 20} if kind == "latent" else {"unet": 20}
    assert resumed.steps == expected
    assert any("images/s" in line for line in logs)  # render throughput is reported
    state = load_state(default_state_path(out, kind))
    for phase in state["phases"].values():
        assert all(torch.isfinite(torch.tensor(h[2])) for h in phase["history"])
    assert resumed.fp16_mb <= config.max_mb
