"""Priors trained with v prediction: the loss's target, the exported scheduler, and the guidance
and sampler that read it (the parameterisation travels in scheduler/scheduler_config.json)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from magic3d.priors.configs import default_config
from magic3d.priors.losses import NoiseSchedule, denoiser_loss
from magic3d.testing.random_pipelines import build_scheduler


class OracleUNet(nn.Module):
    """For x0 = 0, x_t = sqrt(1 - ab) eps: outputs the exact v (= sqrt(ab) eps) or epsilon."""

    def __init__(self, schedule: NoiseSchedule, predicts: str) -> None:
        super().__init__()
        self.schedule, self.predicts = schedule, predicts

    def forward(self, x_t, t, encoder_hidden_states=None, return_dict=False):
        ab = self.schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = x_t / (1 - ab).sqrt()
        return ((ab.sqrt() * eps if self.predicts == "v_prediction" else eps),)


@pytest.mark.parametrize("predicts", ["epsilon", "v_prediction"])
def test_denoiser_loss_trains_the_configured_target(predicts: str) -> None:
    schedule = NoiseSchedule(torch.as_tensor(build_scheduler().betas), torch.device("cpu"))
    x0 = torch.zeros(64, 3, 4, 4)
    context = torch.zeros(64, 1, 2)
    torch.manual_seed(0)
    for target in ("epsilon", "v_prediction"):
        loss = denoiser_loss(OracleUNet(schedule, predicts), x0, context, schedule, 0.0, contextlib.nullcontext,
                             5.0, prediction_type=target)[1]
        if target == predicts:
            # x_t / sqrt(1 - ab) recovers eps to float32 rounding; 1 - ab >= 1e-4 on IF's schedule
            assert loss < 1e-8
        else:
            assert loss > 1e-3  # the other parameterisation is a different function of x_t


def test_v_prior_exports_its_prediction_type_and_the_guidance_reads_it(tmp_path: Path) -> None:
    from magic3d.data.cameras import orbit_cameras
    from magic3d.guidance.pixel_sds import PixelSDS
    from magic3d.priors.train import train_prior

    config = dataclasses.replace(default_config("pixel", smoke=True), prediction_type="v_prediction")
    result = train_prior("pixel", tmp_path / "pixel", smoke=True, max_steps=1, device="cpu", config=config,
                         log=lambda _: None)
    scheduler = json.loads((result.out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    assert "DDPM v MSE" in (result.out / "README.md").read_text()
    guidance = PixelSDS(pretrained=str(result.out), half_precision=False, cache_dir=str(tmp_path))
    guidance.setup("a red cube", "cpu")
    assert guidance.resolved_prediction_type == "v_prediction"
    size = guidance.unet.config.sample_size
    rgb = torch.rand(1, size, size, 3, requires_grad=True)
    guidance.step(rgb, orbit_cameras(1, 10.0, 2.0, 50.0, size, size), progress=0.5).loss.backward()
    assert torch.isfinite(rgb.grad).all()
