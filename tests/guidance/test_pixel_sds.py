"""PixelSDS: stub-UNet exactness through the pixel pipeline, and the tiny IF pipeline built
in code, loaded offline from disk."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from magic3d.data.cameras import orbit_cameras, view_index
from magic3d.guidance.base import sds_weight
from magic3d.testing.random_pipelines import build_scheduler
from magic3d.guidance.pixel_sds import PixelSDS
from magic3d.guidance.prompts import PromptEmbeddings
from magic3d.types import CameraBatch

S = 16  # stub UNet resolution
L, D = 4, 6  # stub token count and width


class StubUNet(nn.Module):
    """Predicts ``eps_cond`` for the first half of the CFG batch and ``eps_uncond`` for the
    second, plus a 3-channel 'variance' that is NaN (it must never be read). Records calls."""

    def __init__(self, eps_cond: torch.Tensor, eps_uncond: torch.Tensor, out_channels: int = 6):
        super().__init__()
        self.config = SimpleNamespace(sample_size=eps_cond.shape[-1])
        self.eps = torch.cat([eps_cond, eps_uncond])
        self.out_channels = out_channels
        self.calls: list[dict] = []

    def forward(self, sample, timestep, encoder_hidden_states, return_dict=False):
        start = sum(c["sample"].shape[0] for c in self.calls)
        self.calls.append({"sample": sample, "t": timestep, "context": encoder_hidden_states})
        eps = self.eps[start : start + sample.shape[0]].to(sample)
        if self.out_channels > eps.shape[1]:
            variance = torch.full_like(eps, float("nan"))
            eps = torch.cat([eps, variance[:, : self.out_channels - eps.shape[1]]], dim=1)
        return (eps,)

    def all(self, key: str) -> torch.Tensor:
        return torch.cat([c[key] for c in self.calls])


def stub_embeddings() -> PromptEmbeddings:
    """Token values encode which text they stand for: views i -> i, base -> 10, uncond -> -1."""
    views = torch.arange(4, dtype=torch.float32).view(4, 1, 1).expand(4, L, D).clone()
    return PromptEmbeddings(base=torch.full((L, D), 10.0), views=views, uncond=torch.full((L, D), -1.0))


def cameras_for(elevation_deg: list[float], azimuth_deg: list[float]) -> CameraBatch:
    n = len(elevation_deg)
    cams = orbit_cameras(n, 0.0, 2.0, 50.0, S, S)
    cams.elevation = torch.tensor([math.radians(e) for e in elevation_deg])
    cams.azimuth = torch.tensor([math.radians(a) for a in azimuth_deg])
    return cams


def stub_guidance(batch: int, seed: int = 0, prediction_type: str = "epsilon", **kwargs) -> tuple[PixelSDS, StubUNet]:
    g = torch.Generator().manual_seed(seed)
    eps_c = torch.randn(batch, 3, S, S, generator=g)
    eps_u = torch.randn(batch, 3, S, S, generator=g)
    unet = StubUNet(eps_c, eps_u)
    guidance = PixelSDS.from_modules(unet, build_scheduler(prediction_type), text_embeddings=stub_embeddings(),
                                     **kwargs)
    guidance.setup("ignored: embeddings given", "cpu")
    return guidance, unet


@pytest.mark.parametrize(("weighting", "prediction_type"), [("sds", "epsilon"), ("uniform", "epsilon"),
                                                          ("sqrt_alpha_one_minus", "epsilon"), ("sds", "v_prediction")])
def test_rgb_gradient_is_sds_formula_through_preprocessing(weighting: str, prediction_type: str) -> None:
    batch = 4
    guidance, unet = stub_guidance(batch, prediction_type=prediction_type, guidance_scale=5.0, weighting=weighting,
                                   min_step_percent=0.3)
    assert guidance.resolved_prediction_type == prediction_type  # "auto" read the scheduler config
    rgb = torch.rand(batch, S, S, 3, generator=torch.Generator().manual_seed(1), requires_grad=True)
    cams = cameras_for([0, 0, 0, 80], [0, 90, 180, 0])
    out = guidance.step(rgb, cams, progress=0.0)
    out.loss.backward()

    x = rgb.detach().permute(0, 3, 1, 2) * 2 - 1  # no resize at the UNet's resolution
    x_t, t = unet.all("sample")[:batch], unet.all("t")[:batch]
    ab = guidance.alphas_cumprod[t].view(-1, 1, 1, 1)
    noise = (x_t - ab.sqrt() * x) / (1 - ab).sqrt()  # recovered from what the UNet saw
    eps_c, eps_u = unet.eps[:batch], unet.eps[batch:]
    if prediction_type == "v_prediction":  # the stub's outputs are v: eps = sqrt(ab) v + sqrt(1 - ab) x_t
        eps_c, eps_u = (ab.sqrt() * v + (1 - ab).sqrt() * x_t for v in (eps_c, eps_u))
    expected = sds_weight(ab.flatten(), weighting).view(-1, 1, 1, 1) * (eps_u + 5 * (eps_c - eps_u) - noise)
    # d loss / d rgb = d x / d rgb (= 2) * grad / B, channel-last. Recovering the noise from
    # x_t in float32 with 1 - ab >= 0.05 (t >= 300) costs < 1e-5; the float32 surrogate
    # round trip x - (x - grad) costs ~1e-6 * |x|.
    torch.testing.assert_close(rgb.grad * batch / 2, expected.permute(0, 2, 3, 1), rtol=1e-4, atol=2e-4)
    assert torch.isfinite(rgb.grad).all() and not out.skipped  # NaN variance channels unused
    assert torch.equal(out.timesteps, t)


def test_cfg_batch_and_view_dependent_embeddings() -> None:
    guidance, unet = stub_guidance(4)
    rgb = torch.rand(4, S, S, 3)
    cams = cameras_for([0, 10, 20, 80], [10, -100, 170, 0])  # front, side, back, overhead
    guidance.step(rgb, cams, progress=0.0)
    (call,) = unet.calls
    assert call["sample"].shape == (8, 3, S, S)
    assert torch.equal(call["sample"][:4], call["sample"][4:])  # same x_t for both branches
    assert torch.equal(call["t"][:4], call["t"][4:])
    context = call["context"][:, 0, 0]
    assert context.tolist() == [0.0, 1.0, 2.0, 3.0, -1.0, -1.0, -1.0, -1.0]
    assert torch.equal(view_index(cams.elevation, cams.azimuth), torch.tensor([0, 1, 2, 3]))

    plain, unet = stub_guidance(4, view_dependent_prompting=False)
    plain.step(rgb, cams, progress=0.0)
    assert unet.calls[0]["context"][:4, 0, 0].tolist() == [10.0] * 4


def test_chunked_unet_calls_match_single_call() -> None:
    rgb = torch.rand(3, S, S, 3)
    cams = cameras_for([0, 0, 0], [0, 90, 180])
    results = []
    for chunk in (None, 1, 4):
        guidance, unet = stub_guidance(3, max_batch_per_unet_call=chunk)
        torch.manual_seed(0)
        results.append((guidance.step(rgb, cams, progress=0.0), unet))
    (ref, ref_unet), *others = results
    assert len(ref_unet.calls) == 1
    assert [len(u.calls) for _, u in others] == [6, 2]
    for out, unet in others:
        assert torch.equal(out.loss, ref.loss) and torch.equal(unet.all("sample"), ref_unet.all("sample"))


def test_renders_are_resized_to_the_unet_resolution() -> None:
    guidance, unet = stub_guidance(2)
    rgb = torch.rand(2, 3 * S, 3 * S, 3, requires_grad=True)
    out = guidance.step(rgb, cameras_for([0, 0], [0, 180]), progress=0.5)
    out.loss.backward()
    assert unet.calls[0]["sample"].shape == (4, 3, S, S)
    assert rgb.grad.shape == rgb.shape and torch.count_nonzero(rgb.grad) > 0
    constant = torch.full((1, 2 * S, 2 * S, 3), 0.25)
    # Resizing a constant image keeps it constant (bilinear weights sum to 1; float32 ulps).
    torch.testing.assert_close(guidance.to_model_space(constant), torch.full((1, 3, S, S), -0.5))


def test_stub_guidance_has_empty_state_dict() -> None:
    guidance, unet = stub_guidance(1)
    assert guidance.state_dict() == {} and list(guidance.parameters()) == []
    guidance.setup("again", "cpu")  # a second setup (Lightning stages) keeps the modules
    assert guidance.unet is unet


def test_step_before_setup_raises() -> None:
    guidance = PixelSDS("unused")
    with pytest.raises(RuntimeError, match="setup"):
        guidance.step(torch.rand(1, S, S, 3), cameras_for([0], [0]), 0.0)


# ---------------------------------------------------------------- tiny pipeline on disk


def test_tiny_pipeline_loads_offline_and_steps(tiny_pixel_pipeline: Path, tmp_path: Path) -> None:
    guidance = PixelSDS(str(tiny_pixel_pipeline), guidance_scale=20.0, cache_dir=str(tmp_path))
    guidance.setup("a red cube", "cpu")
    assert all(not p.requires_grad for p in guidance.unet.parameters())
    assert not guidance.unet.training
    torch.manual_seed(0)
    rgb = torch.rand(2, 48, 48, 3, requires_grad=True)  # not the UNet's 32: exercises resize
    out = guidance.step(rgb, orbit_cameras(2, 20.0, 2.0, 50.0, 48, 48), progress=0.1)
    out.loss.backward()
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert torch.isfinite(rgb.grad).all() and rgb.grad.abs().max() > 0
    assert not out.skipped and out.timesteps.shape == (2,)


def test_frozen_unet_is_not_in_state_dict(tiny_pixel_pipeline: Path, tmp_path: Path) -> None:
    guidance = PixelSDS(str(tiny_pixel_pipeline), cache_dir=str(tmp_path))
    guidance.setup("a red cube", "cpu")
    assert guidance.state_dict() == {}
    assert list(guidance.parameters()) == [] and list(guidance.buffers()) == []
    parent = nn.Sequential(guidance)
    parent.to(torch.float64)  # a parent's dtype/device move must not reach the frozen UNet
    assert next(guidance.unet.parameters()).dtype == torch.float32


def test_from_modules_with_text_encoder(tiny_pixel_pipeline: Path) -> None:
    from diffusers import UNet2DConditionModel

    from magic3d.testing.random_pipelines import build_text_encoder, build_tokenizer

    unet = UNet2DConditionModel.from_pretrained(tiny_pixel_pipeline, subfolder="unet")
    guidance = PixelSDS.from_modules(
        unet, build_scheduler(), tokenizer=build_tokenizer(), text_encoder=build_text_encoder("tiny")
    )
    guidance.setup("a blue torus", "cpu")
    assert guidance.embeddings.views.shape == (4, 77, 32)
    rgb = torch.rand(1, 32, 32, 3, requires_grad=True)
    guidance.step(rgb, orbit_cameras(1, 0.0, 2.0, 50.0, 32, 32), 0.0).loss.backward()
    assert torch.isfinite(rgb.grad).all()
    with pytest.raises(ValueError, match="text_embeddings"):
        PixelSDS.from_modules(unet, build_scheduler())


def test_missing_local_folder_gives_short_error() -> None:
    with pytest.raises(FileNotFoundError) as info:
        PixelSDS("/no/such/pipeline").setup("a cat", "cpu")
    message = str(info.value)
    assert "/no/such/pipeline" in message and "does not exist" in message and "unet/" in message
    assert info.value.__cause__ is None and info.value.__context__ is None  # no chained traceback


def test_unknown_hub_id_offline_gives_short_error() -> None:
    with pytest.raises(FileNotFoundError) as info:
        PixelSDS("magic3d-tests/no-such-model").setup("a cat", "cpu")
    message = str(info.value)
    assert "magic3d-tests/no-such-model" in message
    assert "HF_HUB_OFFLINE" in message and "local" in message
    assert info.value.__suppress_context__  # raised `from None`: no chained traceback
    assert len(message.splitlines()) == 1


def test_folder_without_unet_names_the_missing_subfolder(tmp_path: Path) -> None:
    (tmp_path / "scheduler").mkdir()
    with pytest.raises(FileNotFoundError, match="unet/"):
        PixelSDS(str(tmp_path)).setup("a cat", "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_step_in_bf16_after_cpu_setup(tiny_pixel_pipeline: Path, tmp_path: Path) -> None:
    guidance = PixelSDS(str(tiny_pixel_pipeline), cache_dir=str(tmp_path), enable_channels_last=True)
    guidance.setup("a red cube", "cpu")  # Lightning may call setup before moving the model
    rgb = torch.rand(4, 64, 64, 3, device="cuda", requires_grad=True)
    out = guidance.step(rgb, orbit_cameras(4, 20.0, 2.0, 50.0, 64, 64).to("cuda"), 0.0)
    out.loss.backward()
    assert next(guidance.unet.parameters()).dtype == torch.bfloat16
    assert next(guidance.unet.parameters()).device.type == "cuda"
    assert torch.isfinite(rgb.grad).all() and rgb.grad.abs().max() > 0
