"""TextTo3D: NaN handling, shading schedule, optimiser groups, regulariser weights."""

from __future__ import annotations

import math
from dataclasses import fields, replace
from types import SimpleNamespace
from unittest.mock import PropertyMock, patch

import lightning as L
import pytest
import torch
from torch import nn

from magic3d.data.cameras import orbit_cameras
from magic3d.data.datamodule import RandomCameraDataModule
from magic3d.guidance.base import ScoreDistillation
from magic3d.guidance.frozen import PipelineLayout
from magic3d.scenes.base import SceneModule
from magic3d.scenes.hash_nerf import HashGridNeRF
from magic3d.system import NonFiniteLossError, TextTo3D
from magic3d.types import CameraBatch, GuidanceOutput, RenderOutput, Shading


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


def at_step(step: int):
    """Patch ``TextTo3D.global_step`` (Lightning reads it from the trainer) to ``step``."""
    return patch.object(TextTo3D, "global_step", new_callable=PropertyMock, return_value=step)


def test_albedo_only_then_random_shading() -> None:
    model = TextTo3D(tiny_scene(), ScriptedGuidance(set()), albedo_only_steps=5, textureless_probability=0.5)
    first = model.sample_shading(4, torch.device("cpu"))
    assert first.mode == "albedo" and torch.all(first.ambient == 1)
    with at_step(4):
        assert model.sample_shading(4, torch.device("cpu")).mode == "albedo"  # the last albedo step
    with at_step(5):
        modes = {model.sample_shading(4, torch.device("cpu")).mode for _ in range(50)}
    assert modes == {"lambertian", "textureless"}


@pytest.mark.parametrize("probability", [0.0, 1.0])
def test_textureless_probability_is_the_share_of_textureless_batches(probability: float) -> None:
    model = TextTo3D(tiny_scene(), ScriptedGuidance(set()), textureless_probability=probability,
                     ambient_range=(0.2, 0.4))
    draws = [model.sample_shading(8, torch.device("cpu")) for _ in range(20)]
    expected = "textureless" if probability == 1.0 else "lambertian"
    assert {d.mode for d in draws} == {expected}
    ambient = torch.stack([d.ambient for d in draws])
    assert bool(((ambient >= 0.2) & (ambient <= 0.4)).all()) and ambient.std() > 0


def test_orientation_weight_ramps_linearly() -> None:
    model = TextTo3D(tiny_scene(), ScriptedGuidance(set()), lambda_orientation=(10.0, 1000.0),
                     orientation_ramp_steps=100)
    # Every value below is exact in binary floating point (25 / 100 = 0.25), hence ==.
    assert model.orientation_weight() == 10.0  # global_step is 0 without a trainer
    with at_step(25):
        assert model.orientation_weight() == 10.0 + 990.0 * 0.25  # a quarter of the way
    with at_step(100):
        assert model.orientation_weight() == 1000.0  # the end of the ramp
    with at_step(250):
        assert model.orientation_weight() == 1000.0  # and it stays there


def seeded_draws(world_size: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What one DDP rank draws after ``TextTo3D.setup`` when Lightning seeded every rank with
    the run's seed: (global-RNG draws: SDS timesteps, noise, ray jitter; shading draws).
    A stand-in trainer gives the world size and rank; no process group is started."""
    model = TextTo3D(tiny_scene(), ScriptedGuidance(set()), prompt="a cube")
    model._trainer = SimpleNamespace(world_size=world_size, global_rank=rank,
                                     strategy=SimpleNamespace(root_device=torch.device("cpu")))
    with torch.random.fork_rng():  # leave the session's RNG as it was
        torch.manual_seed(1234)  # seed_everything: the same seed on every rank
        model.setup("fit")
        global_draws = torch.rand(16)
    assert model.global_rank == rank
    return global_draws, torch.rand(16, generator=model._shading_generator)


def test_setup_seeds_each_ddp_rank_apart() -> None:
    rank0, rank1 = seeded_draws(2, 0), seeded_draws(2, 1)
    # Else every rank draws the same timesteps, noise and shading for its cameras.
    assert not torch.equal(rank0[0], rank1[0]), "global RNG: ranks must differ"
    assert not torch.equal(rank0[1], rank1[1]), "shading generator: ranks must differ"
    again = seeded_draws(2, 1)
    assert torch.equal(again[0], rank1[0]) and torch.equal(again[1], rank1[1]), "a rank is reproducible"
    # One process keeps the run's seed untouched, so a CPU run repeats bit for bit.
    single = seeded_draws(1, 0)
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        assert torch.equal(single[0], torch.rand(16))


# ------------------------------------------------------------------------------ loss terms
class TermsScene(SceneModule):
    """Renders nothing; declares one more regulariser so its weight can be checked."""

    def regulariser_names(self) -> tuple[str, ...]:
        return ("orientation", "sparsity", "smoothness")


def hand_render(regularisers: dict[str, float]) -> RenderOutput:
    opacity = torch.tensor([0.5, 0.5, 0.5, 0.1]).view(1, 2, 2, 1)
    return RenderOutput(rgb=torch.zeros(1, 2, 2, 3), opacity=opacity, depth=torch.zeros(1, 2, 2, 1),
                        regularisers={k: torch.tensor(v) for k, v in regularisers.items()})


def test_loss_terms_weigh_each_regulariser_as_documented() -> None:
    model = TextTo3D(TermsScene(), ScriptedGuidance(set()), lambda_orientation=(2.0, 2.0), lambda_sparsity=3.0,
                     lambda_opaque=0.5, regularisers={"smoothness": 7.0})
    terms = model.loss_terms(hand_render({"orientation": 0.25, "sparsity": 0.125, "smoothness": 0.01}),
                             torch.tensor(1.0))
    # The opaque term is the mean binary entropy of the opacity: three pixels at 0.5 (ln 2 each)
    # and one at 0.1.
    entropy = (3 * math.log(2.0) - (0.1 * math.log(0.1) + 0.9 * math.log(0.9))) / 4
    # float32 logs and sums of O(1) values: 1e-6 relative.
    assert float(terms.opaque) == pytest.approx(entropy, rel=1e-6)
    assert float(terms.orientation) == 0.25 and float(terms.sparsity) == 0.125
    assert float(terms.sds) == 1.0 and set(terms.scene) == {"smoothness"}
    expected = 1.0 + 2.0 * 0.25 + 3.0 * 0.125 + 0.5 * entropy + 7.0 * 0.01
    assert float(terms.total) == pytest.approx(expected, rel=1e-6)
    # Without the scene's own sparsity term, sparsity is the mean opacity.
    fallback = model.loss_terms(hand_render({"orientation": 0.25, "smoothness": 0.01}), torch.tensor(1.0))
    assert float(fallback.sparsity) == pytest.approx(0.4, rel=1e-6)  # (3 * 0.5 + 0.1) / 4 in float32


class StubSDS(ScoreDistillation):
    """Real SDS math with a stub noise predictor; timesteps and noise repeat every ``period``
    samples, so a batch of the same cameras twice sees the same draws twice."""

    LAYOUT = PipelineLayout(name="none", parts=("unet",), text_encoder_class="none")

    def __init__(self, period: int) -> None:
        super().__init__("<no pipeline>", guidance_scale=5.0, weighting="uniform")
        self.period = period
        self.set_alphas_cumprod(torch.linspace(0.999, 0.01, 1000))

    def setup(self, prompt, device) -> None:
        pass

    def step(self, rgb, cameras, progress) -> GuidanceOutput:
        x = rgb.permute(0, 3, 1, 2) * 2.0 - 1.0
        repeats = x.shape[0] // self.period
        noise = torch.randn(self.period, *x.shape[1:], generator=torch.Generator().manual_seed(0))
        timesteps = torch.arange(100, 100 + 300 * self.period, 300)
        return self.distill(x, lambda x_t, t: (0.5 * x_t, 0.2 * x_t), progress,
                            timesteps.repeat(repeats), noise.repeat(repeats, 1, 1, 1))


def twice(cameras: CameraBatch) -> CameraBatch:
    return replace(cameras, **{f.name: torch.cat([getattr(cameras, f.name)] * 2) for f in fields(CameraBatch)
                               if isinstance(getattr(cameras, f.name), torch.Tensor)})


def test_loss_reductions_are_batch_means() -> None:
    """The same views twice in one batch give the same loss and the same gradient as once.

    Every term is a mean over the batch (the SDS surrogate over samples, the orientation term
    over rays, sparsity and the opaque term over pixels), so the learning rate does not depend
    on the batch size or on the number of DDP processes. A sum would double here; the slow
    two-process test checks the same across processes."""
    scene = tiny_scene().eval()  # midpoint samples: the duplicated views render identically
    cameras = orbit_cameras(2, 20.0, 2.0, 50.0, 8, 8)
    shading = Shading(mode="lambertian", ambient=torch.full((2,), 0.3))
    names = ("sds", "orientation", "sparsity", "opaque", "total")
    results = []
    for cams, shade in ((cameras, shading), (twice(cameras), replace(shading, ambient=shading.ambient.repeat(2)))):
        model = TextTo3D(scene, StubSDS(period=2), lambda_orientation=(5.0, 5.0), lambda_sparsity=2.0,
                         lambda_opaque=0.5)
        render = scene.render(cams, shade)
        terms = model.loss_terms(render, model.guidance.step(render.rgb, cams, 0.0).loss)
        scene.zero_grad()
        terms.total.backward()
        grads = torch.cat([p.grad.flatten() for p in scene.parameters() if p.grad is not None])
        results.append(({name: float(getattr(terms, name).detach()) for name in names}, grads))
    (once, grad_once), (doubled, grad_doubled) = results
    assert once["orientation"] > 0 and once["sds"] > 0 and grad_once.abs().sum() > 0
    # Means of twice as many equal float32 values: summation order only, 1e-5 relative.
    for name in names:
        assert doubled[name] == pytest.approx(once[name], rel=1e-5), name
    torch.testing.assert_close(grad_doubled, grad_once, rtol=1e-4, atol=1e-7 * float(grad_once.abs().max()))
