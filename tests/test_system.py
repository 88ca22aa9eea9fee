"""TextTo3D: NaN handling, shading schedule, optimiser groups, regulariser weights."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from magic3d.data.datamodule import RandomCameraDataModule
from magic3d.scenes.hash_nerf import HashGridNeRF
from magic3d.system import NonFiniteLossError, TextTo3D
from magic3d.types import GuidanceOutput


class ScriptedGuidance(nn.Module):
    """Stub prior: a quadratic pull towards grey, NaN on the steps listed in ``nan_steps``."""

    def __init__(self, nan_steps: set[int]) -> None:
        super().__init__()
        self.nan_steps = nan_steps
        self.calls = 0

    def setup(self, prompt: str, device) -> None:
        self.prompt = prompt

    def param_groups(self) -> dict:
        return {}

    def step(self, rgb, cameras, progress) -> GuidanceOutput:
        loss = ((rgb - 0.5) ** 2).mean()
        if self.calls in self.nan_steps:
            loss = loss * float("nan")
        self.calls += 1
        return GuidanceOutput(loss=loss, grad_norm=loss.detach(), timesteps=torch.zeros(rgb.shape[0], dtype=torch.long))


def tiny_scene() -> HashGridNeRF:
    return HashGridNeRF(n_levels=2, log2_hashmap_size=8, base_resolution=4, hidden_dim=8,
                        n_samples_per_ray=8, grid_resolution=0)


def fit(model: TextTo3D, steps: int, tmp_path) -> L.Trainer:
    data = RandomCameraDataModule(batch_size=1, height=8, width=8, steps_per_epoch=steps, n_val_views=1)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path,
                        enable_model_summary=False)
    trainer.fit(model, datamodule=data)
    return trainer


def test_a_nan_step_is_skipped_and_counted(tmp_path) -> None:
    model = TextTo3D(tiny_scene(), ScriptedGuidance({1}), prompt="a cube", preview_every=0)
    before = {k: v.clone() for k, v in model.scene.state_dict().items()}
    trainer = fit(model, 4, tmp_path)
    assert int(model.skipped_steps) == 1
    assert trainer.global_step == 4, "a skipped step still counts as a step of the schedule"
    after = model.scene.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the other steps still train"
    assert all(torch.isfinite(v).all() for v in after.values()), "NaN must never reach the weights"


def test_many_nan_steps_in_a_row_stop_the_run(tmp_path) -> None:
    model = TextTo3D(tiny_scene(), ScriptedGuidance(set(range(100))), prompt="a cube",
                     max_consecutive_nonfinite=3, preview_every=0)
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        fit(model, 10, tmp_path)


def test_empty_prompt_fails_in_setup(tmp_path) -> None:
    model = TextTo3D(tiny_scene(), ScriptedGuidance(set()), prompt="", preview_every=0)
    with pytest.raises(ValueError, match="prompt is empty"):
        fit(model, 1, tmp_path)


def test_per_part_learning_rates() -> None:
    model = TextTo3D(tiny_scene(), ScriptedGuidance(set()), lr=0.01, lr_overrides={"background": 0.1})
    groups = {g["name"]: g["lr"] for g in model.configure_optimizers().param_groups}
    assert groups == {"encoding": 0.01, "network": 0.01, "background": 0.1}
    with pytest.raises(ValueError, match="unknown parameter groups"):
        TextTo3D(tiny_scene(), ScriptedGuidance(set()), lr_overrides={"backgruond": 0.1}).configure_optimizers()


class TrainableGuidance(ScriptedGuidance):
    """A guidance that owns trainable weights (as a LoRA-tuned prior does)."""

    def __init__(self) -> None:
        super().__init__(set())
        self.adapter = nn.Parameter(torch.zeros(3))

    def param_groups(self) -> dict:
        return {"lora": [self.adapter]}

    def step(self, rgb, cameras, progress) -> GuidanceOutput:
        out = super().step(rgb + self.adapter, cameras, progress)
        return out


def test_guidance_parameters_reach_the_optimiser_with_their_own_rate(tmp_path) -> None:
    guidance = TrainableGuidance()
    model = TextTo3D(tiny_scene(), guidance, prompt="a cube", lr=0.01, lr_overrides={"guidance/lora": 1e-3},
                     preview_every=0)
    groups = {g["name"]: (g["lr"], g["params"]) for g in model.configure_optimizers().param_groups}
    assert groups["guidance/lora"][0] == 1e-3 and groups["guidance/lora"][1] == [guidance.adapter]
    fit(model, 3, tmp_path)
    assert guidance.adapter.abs().sum() > 0, "the guidance's own weights train"


def test_regulariser_weights_must_name_the_scenes_terms() -> None:
    model = TextTo3D(tiny_scene(), ScriptedGuidance(set()), regularisers={})
    assert model.regularisers == {}
    with pytest.raises(ValueError, match="renders \\['orientation', 'sparsity'\\]"):
        TextTo3D(tiny_scene(), ScriptedGuidance(set()), regularisers={"laplacian": 1.0})
    with pytest.raises(ValueError, match="lambda_orientation"):
        TextTo3D(tiny_scene(), ScriptedGuidance(set()), regularisers={"orientation": 1.0})


def test_albedo_only_then_random_shading() -> None:
    model = TextTo3D(tiny_scene(), ScriptedGuidance(set()), albedo_only_steps=5, textureless_probability=0.5)
    first = model.sample_shading(4, torch.device("cpu"))
    assert first.mode == "albedo" and torch.all(first.ambient == 1)
    model.albedo_only_steps = 0
    modes = {model.sample_shading(4, torch.device("cpu")).mode for _ in range(50)}
    assert modes == {"lambertian", "textureless"}


def test_orientation_weight_ramps_linearly() -> None:
    model = TextTo3D(tiny_scene(), ScriptedGuidance(set()), lambda_orientation=(10.0, 1000.0),
                     orientation_ramp_steps=100)
    assert model.orientation_weight() == pytest.approx(10.0)  # global_step is 0 without a trainer
