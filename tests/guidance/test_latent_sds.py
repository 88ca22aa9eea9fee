"""LatentSDS: stub-UNet exactness on the latents, gradients through the VAE encoder, chunked
encoding, epsilon/v conversion, and the tiny Stable Diffusion pipeline loaded offline."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from magic3d.data.cameras import orbit_cameras
from magic3d.guidance.base import sds_weight
from magic3d.testing.random_pipelines import (
    build_latent_pipeline,
    build_latent_scheduler,
    build_latent_unet,
    build_vae,
)
from magic3d.guidance.latent_sds import LatentSDS
from magic3d.guidance.prediction import eps_from_prediction
from magic3d.guidance.prompts import PromptEmbeddings
from magic3d.types import CameraBatch

S = 8  # stub UNet latent size; with the tiny 8x VAE the renders are 64x64
L, D = 4, 6  # stub token count and width


class StubUNet(nn.Module):
    """Returns fixed targets: ``eps_cond`` for the first half of the CFG batch, ``eps_uncond``
    for the second. With ``alphas_cumprod`` it returns the v-prediction that corresponds to
    those epsilons for the x_t it sees. Records calls."""

    def __init__(self, eps_cond: torch.Tensor, eps_uncond: torch.Tensor, alphas_cumprod: torch.Tensor | None = None):
        super().__init__()
        self.config = SimpleNamespace(sample_size=eps_cond.shape[-1])
        self.eps = torch.cat([eps_cond, eps_uncond])
        self.alphas_cumprod = alphas_cumprod
        self.calls: list[dict] = []

    def forward(self, sample, timestep, encoder_hidden_states, return_dict=False):
        start = sum(c["sample"].shape[0] for c in self.calls)
        self.calls.append({"sample": sample, "t": timestep, "context": encoder_hidden_states})
        eps = self.eps[start : start + sample.shape[0]].to(sample)
        if self.alphas_cumprod is not None:
            ab = self.alphas_cumprod[timestep].view(-1, 1, 1, 1)
            x0 = (sample - (1 - ab).sqrt() * eps) / ab.sqrt()
            return (ab.sqrt() * eps - (1 - ab).sqrt() * x0,)
        return (eps,)

    def all(self, key: str) -> torch.Tensor:
        return torch.cat([c[key] for c in self.calls])


def stub_embeddings() -> PromptEmbeddings:
    views = torch.arange(4, dtype=torch.float32).view(4, 1, 1).expand(4, L, D).clone()
    return PromptEmbeddings(base=torch.full((L, D), 10.0), views=views, uncond=torch.full((L, D), -1.0))


def cameras(n: int, size: int = 64) -> CameraBatch:
    cams = orbit_cameras(n, 0.0, 2.0, 50.0, size, size)
    cams.azimuth = torch.tensor([math.radians(a) for a in (0, 90, 180, -90, 45, 135)[:n]])
    return cams


@pytest.fixture(scope="module")
def tiny_vae() -> nn.Module:
    return build_vae("tiny", seed=0)


def stub_guidance(vae: nn.Module, batch: int, v_prediction: bool = False, **kwargs):
    g = torch.Generator().manual_seed(0)
    eps_c, eps_u = torch.randn(batch, 4, S, S, generator=g), torch.randn(batch, 4, S, S, generator=g)
    scheduler = build_latent_scheduler("v_prediction" if v_prediction else "epsilon")
    alphas = torch.as_tensor(scheduler.alphas_cumprod).float() if v_prediction else None
    unet = StubUNet(eps_c, eps_u, alphas)
    guidance = LatentSDS.from_modules(unet, vae, scheduler, text_embeddings=stub_embeddings(), **kwargs)
    guidance.setup("ignored: embeddings given", "cpu")
    return guidance, unet


def capture_latents(guidance: LatentSDS) -> list[torch.Tensor]:
    """Make ``guidance.encode`` keep its output's gradient, for d loss / d z."""
    seen: list[torch.Tensor] = []
    encode = guidance.encode

    def spy(x):
        z = encode(x)
        z.retain_grad()
        seen.append(z)
        return z

    guidance.encode = spy  # instance attribute shadows the method
    return seen


@pytest.mark.parametrize(("weighting", "v_prediction"), [("sds", False), ("uniform", False), ("sds", True)])
def test_latent_gradient_is_sds_formula(tiny_vae: nn.Module, weighting: str, v_prediction: bool) -> None:
    batch = 3
    guidance, unet = stub_guidance(
        tiny_vae, batch, v_prediction, guidance_scale=7.0, weighting=weighting, min_step_percent=0.3
    )
    assert guidance.resolved_prediction_type == ("v_prediction" if v_prediction else "epsilon")
    seen = capture_latents(guidance)
    rgb = torch.rand(batch, 64, 64, 3, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out = guidance.step(rgb, cameras(batch), progress=0.0)
    out.loss.backward()

    (z,) = seen
    z_t, t = unet.all("sample")[:batch], unet.all("t")[:batch]
    ab = guidance.alphas_cumprod[t].view(-1, 1, 1, 1)
    noise = (z_t - ab.sqrt() * z.detach()) / (1 - ab).sqrt()  # recovered from what the UNet saw
    eps_c, eps_u = unet.eps[:batch], unet.eps[batch:]
    expected = sds_weight(ab.flatten(), weighting).view(-1, 1, 1, 1) * (eps_u + 7 * (eps_c - eps_u) - noise)
    # d loss / d z = grad / B (base convention). Noise recovery in float32 with 1 - ab >= 0.05
    # (t >= 300 of SD's schedule) costs ~1e-5; the v -> eps round trip adds a few float32 ulps of
    # |x_t| ~ 1 (the tiny VAE's latents times 0.18), and the surrogate round trip ~1e-6 |z|.
    torch.testing.assert_close(z.grad * batch, expected, rtol=1e-4, atol=2e-4)
    assert not out.skipped and torch.equal(out.timesteps, t)
    assert unet.all("sample").shape == (2 * batch, 4, S, S)


def test_gradient_reaches_render_through_the_vae_encoder(tiny_vae: nn.Module) -> None:
    guidance, _ = stub_guidance(tiny_vae, 2)
    seen = capture_latents(guidance)
    rgb = torch.rand(2, 96, 96, 3, generator=torch.Generator().manual_seed(2), requires_grad=True)  # resized to 64
    guidance.step(rgb, cameras(2, 96), progress=0.5).loss.backward()
    assert rgb.grad.shape == rgb.shape
    assert torch.isfinite(rgb.grad).all() and rgb.grad.abs().max() > 0
    # It is exactly the VAE-encoder VJP of d loss / d z (no other path from rgb to the loss).
    probe = rgb.detach().requires_grad_(True)
    (vjp,) = torch.autograd.grad(LatentSDS.encode(guidance, guidance.to_vae_input(probe)), probe, seen[0].grad)
    # Same float32 ops in the same order: only checkpoint recomputation could differ, and it
    # is deterministic on CPU.
    torch.testing.assert_close(rgb.grad, vjp, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("sample_latents", [False, True])
def test_chunked_encoding_equals_one_call(tiny_vae: nn.Module, sample_latents: bool) -> None:
    # 32 px (4x4 latents): encode() takes any multiple of 8, and CPU time stays small.
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    cotangent = torch.randn(5, 4, 4, 4, generator=torch.Generator().manual_seed(4))
    results = []
    for chunk, recompute in ((8, True), (2, True), (2, False)):
        guidance, _ = stub_guidance(tiny_vae, 1, vae_chunk_size=chunk, vae_recompute=recompute,
                                    sample_latents=sample_latents)
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(0)  # same posterior noise draws in every chunking
        z = guidance.encode(xi)
        (grad,) = torch.autograd.grad(z, xi, cotangent)
        results.append((z.detach(), grad))
    (z_ref, grad_ref), *others = results
    assert z_ref.shape == (5, 4, 4, 4)
    for z, grad in others:
        # GroupNorm and convs are per-sample, but CPU conv kernels may block differently for
        # other batch sizes: allow float32 rounding (values are O(1)).
        torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-6)


def test_latents_use_the_posterior_mean_times_scaling_factor(tiny_vae: nn.Module) -> None:
    guidance, _ = stub_guidance(tiny_vae, 1)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        expected = tiny_vae.encode(x).latent_dist.mean * 0.18215
        torch.testing.assert_close(guidance.encode(x), expected, rtol=0, atol=0)


def test_v_prediction_conversion_on_known_case() -> None:
    g = torch.Generator().manual_seed(5)
    x0, eps = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    ab = torch.tensor([0.9, 0.5, 0.01])
    a, s = ab.sqrt().view(-1, 1, 1, 1), (1 - ab).sqrt().view(-1, 1, 1, 1)
    x_t = a * x0 + s * eps
    # float32 rounding of a few products of O(1) values.
    torch.testing.assert_close(eps_from_prediction(a * eps - s * x0, x_t, ab, "v_prediction"), eps)
    torch.testing.assert_close(eps_from_prediction(x0, x_t, ab, "sample"), eps, rtol=1e-4, atol=1e-4)
    assert eps_from_prediction(eps, x_t, ab, "epsilon") is eps
    # A hand-checked point: ab = 0.5, x0 = 1, eps = 0 -> x_t = sqrt(0.5), v = -sqrt(0.5);
    # eps = sqrt(0.5) v + sqrt(0.5) x_t = -0.5 + 0.5 = 0.
    one = torch.ones(1, 1, 1, 1)
    got = eps_from_prediction(-math.sqrt(0.5) * one, math.sqrt(0.5) * one, torch.tensor([0.5]), "v_prediction")
    assert abs(float(got)) < 1e-7
    with pytest.raises(ValueError, match="prediction_type"):
        eps_from_prediction(eps, x_t, ab, "flow")


def test_invalid_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="vae_chunk_size"):
        LatentSDS("unused", vae_chunk_size=0)
    with pytest.raises(ValueError, match="prediction_type"):
        LatentSDS("unused", prediction_type="flow")
    with pytest.raises(RuntimeError, match="setup"):
        LatentSDS("unused").step(torch.rand(1, 64, 64, 3), cameras(1), 0.0)
    guidance = LatentSDS("unused")
    assert guidance.guidance_scale == 100.0 and guidance.schedule.bounds(0.0) == (20, 500)


def test_sd_2_1_base_architecture_on_meta_device() -> None:
    unet, vae = build_latent_unet("sd-2.1-base", "meta"), build_vae("sd-2.1-base", "meta")
    # Parameter counts of the real stabilityai/stable-diffusion-2-1-base UNet and VAE.
    assert sum(p.numel() for p in unet.parameters()) == 865_910_724
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    guidance = LatentSDS.from_modules(unet, vae, build_latent_scheduler(), text_embeddings=stub_embeddings())
    guidance.frozen.models.update(unet=unet, vae=vae)  # inspect sizes without moving meta tensors
    assert guidance.image_size == (512, 512)


# ---------------------------------------------------------------- tiny pipeline on disk


@pytest.fixture(scope="module")
def tiny_latent_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_latent_pipeline(tmp_path_factory.mktemp("tiny_sd"), "tiny", seed=0)


def test_tiny_pipeline_loads_offline_and_steps(tiny_latent_pipeline: Path, tmp_path: Path) -> None:
    guidance = LatentSDS(str(tiny_latent_pipeline), cache_dir=str(tmp_path), vae_chunk_size=1)
    guidance.setup("a red cube", "cpu")
    for module in (guidance.unet, guidance.vae):
        assert all(not p.requires_grad for p in module.parameters()) and not module.training
    assert guidance.image_size == (64, 64) and guidance.resolved_prediction_type == "epsilon"
    assert guidance.embeddings.views.shape == (4, 77, 32)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1  # embeddings cached on disk
    torch.manual_seed(0)
    rgb = torch.rand(2, 48, 48, 3, requires_grad=True)
    out = guidance.step(rgb, cameras(2, 48), progress=0.1)
    out.loss.backward()
    assert out.loss.ndim == 0 and torch.isfinite(out.loss) and not out.skipped
    assert torch.isfinite(rgb.grad).all() and rgb.grad.abs().max() > 0
    assert int(out.timesteps.max()) <= 500  # fine-stage default range [0.02, 0.5]


def test_frozen_models_are_not_in_state_dict(tiny_latent_pipeline: Path, tmp_path: Path) -> None:
    guidance = LatentSDS(str(tiny_latent_pipeline), cache_dir=str(tmp_path))
    guidance.setup("a red cube", "cpu")
    assert guidance.state_dict() == {}
    assert list(guidance.parameters()) == [] and list(guidance.buffers()) == []
    nn.Sequential(guidance).to(torch.float64)  # a parent's move must not reach frozen models
    assert next(guidance.unet.parameters()).dtype == torch.float32
    assert next(guidance.vae.parameters()).dtype == torch.float32
    unet = guidance.unet
    guidance.setup("a blue torus", "cpu")  # a second setup keeps the models
    assert guidance.unet is unet


def test_v_prediction_pipeline_is_detected(tmp_path: Path) -> None:
    from diffusers import DDPMScheduler

    build_latent_scheduler("v_prediction").save_pretrained(tmp_path / "scheduler")
    assert DDPMScheduler.from_pretrained(tmp_path, subfolder="scheduler").config.prediction_type == "v_prediction"


def test_missing_local_folder_gives_short_error() -> None:
    with pytest.raises(FileNotFoundError) as info:
        LatentSDS("/no/such/sd-pipeline").setup("a cat", "cpu")
    message = str(info.value)
    assert "/no/such/sd-pipeline" in message and "does not exist" in message and "vae/" in message
    assert info.value.__cause__ is None and info.value.__context__ is None
    assert len(message.splitlines()) == 1


def test_unknown_hub_id_offline_gives_short_error() -> None:
    with pytest.raises(FileNotFoundError) as info:
        LatentSDS("magic3d-tests/no-such-sd-model").setup("a cat", "cpu")
    message = str(info.value)
    assert "magic3d-tests/no-such-sd-model" in message and "HF_HUB_OFFLINE" in message
    assert info.value.__suppress_context__ and len(message.splitlines()) == 1


def test_folder_without_vae_names_the_missing_subfolder(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    (tmp_path / "scheduler").mkdir()
    with pytest.raises(FileNotFoundError, match="no vae/ subfolder.*Stable Diffusion"):
        LatentSDS(str(tmp_path)).setup("a cat", "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_step_in_bf16_after_cpu_setup(tiny_latent_pipeline: Path, tmp_path: Path) -> None:
    guidance = LatentSDS(str(tiny_latent_pipeline), cache_dir=str(tmp_path), vae_chunk_size=2)
    guidance.setup("a red cube", "cpu")
    rgb = torch.rand(5, 128, 128, 3, device="cuda", requires_grad=True)
    out = guidance.step(rgb, cameras(5, 128).to("cuda"), 0.0)
    out.loss.backward()
    for module in (guidance.unet, guidance.vae):
        param = next(module.parameters())
        assert param.dtype == torch.bfloat16 and param.device.type == "cuda"
    assert torch.isfinite(rgb.grad).all() and rgb.grad.abs().max() > 0
