"""Warm start from an exported prior folder (``--init-from``): weights, tokenizer, steps and
seconds carry over, the learning rate warms up again, the latent prior's VAE stays frozen,
and bad folders are refused with the fix. Smoke configs on CPU."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import re  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from magic3d.priors import default_config, train_prior  # noqa: E402
from magic3d.priors.trainer import PriorTrainer  # noqa: E402
from magic3d.priors.warm_start import read_warm_start  # noqa: E402


@pytest.fixture(autouse=True)
def _offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAGIC3D_CACHE", str(tmp_path / "magic3d_cache"))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def exported_pixel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("warm") / "pixel"
    train_prior("pixel", out, smoke=True, max_steps=2, device="cpu", log=lambda _: None)
    return out


def _exported_unet(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def test_warm_start_loads_exported_weights_into_live_and_ema(exported_pixel: Path) -> None:
    warm = read_warm_start(exported_pixel, "pixel")
    trainer = PriorTrainer(warm.config, torch.device("cpu"), seed=123, warm=warm, log=lambda _: None)
    phase = trainer.phases["unet"]
    saved = _exported_unet(exported_pixel)
    live = dict(trainer.phases["unet"].modules["unet"].named_parameters())
    for key, tensor in saved.items():
        # fp16 -> fp32 is exact, so equality is exact.
        assert torch.equal(live[key].detach(), tensor.float()), key
        assert torch.equal(phase.ema.shadow["unet"][key], tensor.float()), key
    assert phase.step == 2 and phase.warmup_from == 2 and phase.seconds > 0
    assert trainer.seed == warm.seed == 0  # the folder's seed, not the argument
    assert trainer.tokenizer("a red cube").input_ids == read_tokenizer_ids(exported_pixel, "a red cube")


def read_tokenizer_ids(folder: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder / "tokenizer")(text).input_ids


def test_init_from_continues_steps_and_rewarms_the_learning_rate(exported_pixel: Path, tmp_path: Path) -> None:
    logs: list[str] = []
    before = json.loads((exported_pixel / "training.json").read_text())
    result = train_prior("pixel", tmp_path / "next", max_steps=4, device="cpu", init_from=exported_pixel,
                         state_path=tmp_path / "state.pt", log=logs.append)
    assert result.steps == {"unet": 4}
    after = json.loads((tmp_path / "next" / "training.json").read_text())
    assert after["phases"][0]["seconds"] > before["phases"][0]["seconds"]  # the budget is cumulative
    assert len(after["runs"]) == len(before["runs"]) + 1
    assert any("warm start from" in line for line in logs)
    # Smoke warm-up is 2 steps: the first step after a warm start runs at <= half the base lr
    # (step 2 of a schedule without the re-warm-up would already be at the full lr).
    base_lr = default_config("pixel", smoke=True).lr
    first = next(line for line in logs if re.search(r"\] step 3 \|", line))
    lr = float(re.search(r"lr ([0-9.e+-]+)", first).group(1))
    assert lr <= 0.5 * base_lr * (1 + 1e-6)


def test_resume_state_wins_over_init_from(exported_pixel: Path, tmp_path: Path) -> None:
    state = tmp_path / "state.pt"
    train_prior("pixel", tmp_path / "a", smoke=True, max_steps=1, device="cpu", state_path=state, log=lambda _: None)
    logs: list[str] = []
    result = train_prior("pixel", tmp_path / "a", smoke=True, max_steps=3, device="cpu", state_path=state,
                         resume=True, init_from=exported_pixel, log=logs.append)
    assert result.steps == {"unet": 3}
    assert any("ignored" in line for line in logs)


def test_latent_warm_start_keeps_the_vae_frozen(tmp_path: Path) -> None:
    first = tmp_path / "latent"
    train_prior("latent", first, smoke=True, max_steps=2, device="cpu", log=lambda _: None)
    result = train_prior("latent", tmp_path / "latent2", max_steps=4, device="cpu", init_from=first,
                         state_path=tmp_path / "state.pt", log=lambda _: None)
    assert result.steps == {"vae": 2, "unet": 4}
    vae_before = load_file(first / "vae" / "diffusion_pytorch_model.safetensors")
    vae_after = load_file(tmp_path / "latent2" / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(vae_before[k], vae_after[k]) for k in vae_before)
    sf = lambda folder: json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"]  # noqa: E731
    assert sf(tmp_path / "latent2") == sf(first)


def test_bad_init_from_folders_name_the_fix(exported_pixel: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="training.json is missing"):
        read_warm_start(tmp_path / "nothing", "pixel")
    with pytest.raises(ValueError, match="holds a 'pixel' prior, not 'latent'"):
        read_warm_start(exported_pixel, "latent")
    broken = tmp_path / "broken"
    shutil.copytree(exported_pixel, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(FileNotFoundError, match="unet/ is missing"):
        train_prior("pixel", tmp_path / "out", max_steps=3, device="cpu", init_from=broken,
                    state_path=tmp_path / "s.pt", log=lambda _: None)
