"""Several processes (Lightning DDP over gloo on CPU): the same update as one process, resume,
rank-0-only files, and the small helpers behind them.

The equality test runs this file as a script (``python tests/test_ddp.py worker ...``):
Lightning's DDP launcher starts rank 1 by running the same command again, which a script file
does reliably under pytest (``ddp_spawn`` would have to pickle the model).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from magic3d.data.datamodule import RandomCameraDataModule, RandomCameraIterable, _as_is
from magic3d.distributed import per_rank_batch_size, rank_zero_first, requested_devices, resolve_strategy
from magic3d.guidance.pixel_sds import PixelSDS
from magic3d.scenes.background import EnvironmentMapBackground
from magic3d.scenes.hash_nerf import HashGridNeRF
from magic3d.system import TextTo3D
from magic3d.types import CameraBatch

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
GLOBAL_BATCH = 4
COMPARED_STEPS = 2  # optimiser steps compared with the single process
POISONED_STEP = 2  # then one step whose loss is NaN on rank 1 only


# ------------------------------------------------------------------------ deterministic parts
class MidpointNeRF(HashGridNeRF):
    """Samples at step midpoints: stratified jitter comes from each process's global RNG, which
    a rank and the single process consume differently."""

    def render(self, cameras, shading):
        was_training, self.training = self.training, False
        try:
            return super().render(cameras, shading)
        finally:
            self.training = was_training


class CameraKeyedSDS(PixelSDS):
    """Timestep and noise drawn from a seed made of the camera itself, so a camera gets the same
    draw whichever process renders it. Counts text-encoder loads; ``poison`` makes the loss NaN."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.encoder_loads = 0
        self.poison = False
        self._cameras: CameraBatch | None = None
        load = self.frozen._load_text_encoder

        def counted_load(device, dtype):
            self.encoder_loads += 1
            return load(device, dtype)

        self.frozen._load_text_encoder = counted_load

    def step(self, rgb, cameras, progress):
        self._cameras = cameras
        out = super().step(rgb, cameras, progress)
        return replace(out, loss=out.loss * float("nan")) if self.poison else out

    def distill(self, x, predict_noise, progress, timesteps=None, noise=None):
        t_min, t_max = self.schedule.bounds(progress)
        ts, eps = [], []
        for azimuth in self._cameras.azimuth.tolist():
            generator = torch.Generator().manual_seed(int(abs(azimuth) * 1e9))
            ts.append(int(torch.randint(t_min, t_max + 1, (1,), generator=generator)))
            eps.append(torch.randn(x.shape[1:], generator=generator))
        return super().distill(x, predict_noise, progress, torch.tensor(ts), torch.stack(eps))


class SGDTextTo3D(TextTo3D):
    """Plain SGD: the update is lr x gradient, so a wrong loss reduction (sum where a mean is
    needed) changes it by the factor N. Adam's first steps are scale-invariant and would hide it."""

    def configure_optimizers(self):
        return torch.optim.SGD([{"params": list(self.scene.parameters()), "name": "all"}], lr=1e-4)


def build_model(pipeline: Path) -> TextTo3D:
    L.seed_everything(0, verbose=False)
    # No random solid backgrounds either: they too come from each process's global RNG.
    scene = MidpointNeRF(n_levels=2, log2_hashmap_size=8, base_resolution=4, hidden_dim=8, n_samples_per_ray=16,
                         grid_resolution=8, grid_update_every=1, grid_warmup_steps=100,
                         background=EnvironmentMapBackground(hidden_dim=8, random_aug_prob=0.0))
    guidance = CameraKeyedSDS(str(pipeline), guidance_scale=10.0)
    # Albedo shading (no random shading draw) and no orientation loss: the normal head never
    # reaches the loss, which DDP must accept. Sparsity and opacity terms check their reduction.
    return SGDTextTo3D(scene, guidance, prompt="a red cube", albedo_only_steps=100, lambda_sparsity=1.0,
                       lambda_opaque=0.1, preview_every=0)


def data_module(kind: type[RandomCameraDataModule] = RandomCameraDataModule) -> RandomCameraDataModule:
    return kind(batch_size=GLOBAL_BATCH, height=8, width=8, steps_per_epoch=COMPARED_STEPS + 1)


def trainer(devices: int, steps: int, callbacks=()) -> L.Trainer:
    strategy = resolve_strategy("ddp" if devices > 1 else "auto", devices, "cpu")
    return L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=steps, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False,
                     callbacks=list(callbacks))


def cat_cameras(batches: list[CameraBatch]) -> CameraBatch:
    tensors = {f.name: torch.cat([getattr(b, f.name) for b in batches])
               for f in fields(CameraBatch) if isinstance(getattr(batches[0], f.name), torch.Tensor)}
    return replace(batches[0], **tensors)


class UnionOfRanks(IterableDataset):
    """Per step, the cameras ranks 0..WORLD-1 draw, as one batch."""

    def __init__(self, dm: RandomCameraDataModule) -> None:
        self.ranks = [RandomCameraIterable(dm.ranges, GLOBAL_BATCH // WORLD, dm.height, dm.width,
                                           dm.steps_per_epoch, seed=dm.seed, rank=r) for r in range(WORLD)]

    def __len__(self) -> int:
        return len(self.ranks[0])

    def __iter__(self):
        for batches in zip(*self.ranks):
            yield cat_cameras(list(batches))


class SingleProcessTwin(RandomCameraDataModule):
    """One process seeing, at every step, exactly the union of the ranks' cameras."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(UnionOfRanks(self), batch_size=None, collate_fn=_as_is)


class Snapshots(L.Callback):
    """Each rank keeps its scene after the compared steps and at the end, then checks in."""

    def __init__(self, out: Path) -> None:
        self.out, self.states = out, {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        module.guidance.poison = trainer.global_step == POISONED_STEP and trainer.global_rank == 1

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == COMPARED_STEPS:
            self.states["compared"] = {k: v.clone() for k, v in module.scene.state_dict().items()}

    def on_train_end(self, trainer, module) -> None:
        wrapped = [name for name, _ in trainer.strategy.model.named_parameters()]
        torch.save({"compared": self.states["compared"], "final": module.scene.state_dict(),
                    "skipped": int(module.skipped_steps), "batch": next(iter(trainer.train_dataloader)).batch_size,
                    "encoder_loads": module.guidance.encoder_loads,
                    "guidance_params_in_ddp": [n for n in wrapped if "guidance" in n]},
                   self.out / f"rank{trainer.global_rank}.pt")
        trainer.strategy.barrier()  # rank 0's process must not exit before rank 1 has written


def worker(pipeline: Path, out: Path) -> None:
    model = build_model(pipeline)
    trainer(WORLD, COMPARED_STEPS + 1, [Snapshots(out)]).fit(model, datamodule=data_module())


# ------------------------------------------------------------------------------------- tests
@pytest.mark.slow
def test_two_processes_make_the_single_process_update(tiny_pixel_pipeline: Path, tmp_path: Path) -> None:
    env = {**os.environ, "MAGIC3D_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run([sys.executable, __file__, "worker", str(tiny_pixel_pipeline), str(tmp_path)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    reference = build_model(tiny_pixel_pipeline)
    before = {k: v.clone() for k, v in reference.scene.state_dict().items()}
    trainer(1, COMPARED_STEPS).fit(reference, datamodule=data_module(SingleProcessTwin))

    assert ranks[0]["batch"] == ranks[1]["batch"] == GLOBAL_BATCH // WORLD
    assert ranks[0]["guidance_params_in_ddp"] == [], "the frozen prior must stay outside DDP"
    assert [r["encoder_loads"] for r in ranks] == [1, 0], "rank 1 must read rank 0's embedding cache"
    for name, value in reference.scene.state_dict().items():
        # The ranks hold bit-identical weights and occupancy grids (same averaged gradient,
        # same step-seeded grid update), so there is nothing to tolerate between them.
        assert torch.equal(ranks[0]["compared"][name], ranks[1]["compared"][name]), name
        if not value.is_floating_point():
            continue
        # The same update as one process on the union batch, up to float32 rounding: the
        # gradient's summation order differs (two half-batch sums averaged vs one sum, ~1e-7
        # relative; seen: <= 4e-6 of the largest update) and each weight is rounded to ~6e-8 of
        # its size (rtol). A sum-instead-of-mean reduction would change updates by 50 %.
        update = (value - before[name]).abs().max()
        torch.testing.assert_close(ranks[0]["compared"][name], value, rtol=1e-6, atol=1e-3 * float(update),
                                   msg=lambda m: f"{name}: {m}")
    assert not torch.equal(before["encoding.params"], reference.scene.state_dict()["encoding.params"])
    normal_head = [k for k in before if k.startswith("normal_head")]
    assert all(torch.equal(before[k], ranks[0]["compared"][k]) for k in normal_head), "unused: no update"

    # A NaN on rank 1 alone: both ranks skip that step, so the weights stay equal and unchanged.
    for rank in ranks:
        assert rank["skipped"] == 1
        for name, value in rank["final"].items():
            if name.startswith("occupancy"):
                continue  # the grid is re-evaluated at every step, skipped or not
            assert torch.equal(value, rank["compared"][name]), name


def _stage_config(tmp_path: Path, pipeline: Path, max_steps: int) -> Path:
    from magic3d.config import dump_yaml
    from magic3d.recipe import compose_stage, load_recipe

    overrides = [f"model.guidance.pretrained={pipeline}", "trainer.accelerator=cpu", f"trainer.devices={WORLD}",
                 "trainer.strategy=ddp", f"trainer.max_steps={max_steps}", "data.batch_size=2",
                 "data.steps_per_epoch=2", "data.n_val_views=2", "run.checkpoint_every=2", "run.video_views=2",
                 "model.preview_every=2", "trainer.log_every_n_steps=1"]
    spec = load_recipe("coarse_only").stages[0]
    config = compose_stage(spec, "a red cube", 0, overrides, "cpu", tmp_path / "run")
    path = tmp_path / f"config_{max_steps}.yaml"
    dump_yaml(config, path)
    return path


def _run_stage(config: Path, stage_dir: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MAGIC3D_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "magic3d", "stage", "--config", str(config),
                           "--stage-dir", str(stage_dir)], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_checkpoint_and_resume_under_ddp_write_each_file_once(tiny_pixel_pipeline: Path, tmp_path: Path) -> None:
    stage_dir = tmp_path / "run" / "coarse"
    first = _run_stage(_stage_config(tmp_path, tiny_pixel_pipeline, 2), stage_dir, tmp_path / "cache")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert json.loads((stage_dir / "DONE.json").read_text())["steps"] == 2

    second = _run_stage(_stage_config(tmp_path, tiny_pixel_pipeline, 4), stage_dir, tmp_path / "cache")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert second.stdout.count("resuming from") == 1, "rank 0 alone reports"
    assert json.loads((stage_dir / "DONE.json").read_text())["steps"] == 4
    assert torch.load(stage_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4

    files = sorted(str(p.relative_to(stage_dir)) for p in stage_dir.rglob("*") if p.is_file())
    assert files == [
        "DONE.json", "checkpoints/last.ckpt", "checkpoints/last.ckpt.sha256", "checkpoints/step000002.ckpt",
        "checkpoints/step000002.ckpt.sha256", "checkpoints/step000004.ckpt", "checkpoints/step000004.ckpt.sha256",
        "logs/version_0/hparams.yaml", "logs/version_0/metrics.csv",  # one metrics file per attempt,
        "logs/version_1/hparams.yaml", "logs/version_1/metrics.csv",  # not one per rank
        "train/step_000000.png", "train/step_000002.png", "turntable.mp4",
        "val/step_000002.png", "val/step_000004.png",
    ]
    second_attempt = pd.read_csv(stage_dir / "logs" / "version_1" / "metrics.csv")
    assert second_attempt["step"].min() >= 2, "the resumed attempt continues, it does not restart"


# ------------------------------------------------------------------------ helpers, no processes
def test_the_global_batch_splits_evenly_or_says_how() -> None:
    assert per_rank_batch_size(32, 8) == 4 and per_rank_batch_size(3, 1) == 3
    with pytest.raises(ValueError, match=r"batch_size=6 .* 4 processes .* use 4 or 8"):
        per_rank_batch_size(6, 4)


def test_data_module_draws_its_share_of_the_global_batch() -> None:
    dm = RandomCameraDataModule(batch_size=4, height=8, width=8, steps_per_epoch=1)

    class FakeTrainer:
        world_size, global_rank, current_epoch = 2, 1, 0

    dm.trainer = FakeTrainer()
    batch = next(iter(dm.train_dataloader()))
    own = next(iter(RandomCameraIterable(dm.ranges, 2, 8, 8, 1, seed=0, rank=1)))
    assert batch.batch_size == 2 and torch.equal(batch.c2w, own.c2w), "rank 1's own stream, half the batch"


def test_ddp_strategy_is_configured_and_other_strategies_pass_through() -> None:
    from lightning.pytorch.strategies import DDPStrategy

    for strategy, devices in (("ddp", 1), ("auto", 2), ("auto", [0, 1]), ("auto", "0,1")):
        resolved = resolve_strategy(strategy, devices, "cpu")
        assert isinstance(resolved, DDPStrategy) and resolved._ddp_kwargs["find_unused_parameters"]
    assert resolve_strategy("auto", 1, "cpu") == "auto"
    assert resolve_strategy("ddp_spawn", 2, "cpu") == "ddp_spawn"
    assert requested_devices("auto", "cpu") is None and requested_devices("3") == 3


def test_rank_zero_first_is_a_plain_block_without_a_process_group() -> None:
    ran = []
    with rank_zero_first():
        ran.append(1)
    assert ran == [1]


def test_make_gpus_passes_devices_and_ddp() -> None:
    def dry_run(*args: str) -> str:
        result = subprocess.run(["make", "-n", "-C", str(REPO), "run", *args], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        command = next(line for line in result.stdout.splitlines() if "-m magic3d run" in line)
        return " ".join(shlex.split(command))  # the argv the shell passes, quotes removed

    assert "trainer.devices=4 trainer.strategy=ddp" in dry_run("gpus=4")
    one = dry_run("gpus=1")
    assert "trainer.devices=1" in one and "strategy" not in one
    assert "trainer.devices" not in dry_run()


if __name__ == "__main__" and sys.argv[1] == "worker":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    worker(Path(sys.argv[2]), Path(sys.argv[3]))
