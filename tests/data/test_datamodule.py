"""Tests for magic3d.data.datamodule: batch shapes, counts, seeding, Lightning integration."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from magic3d.data.datamodule import RandomCameraDataModule, RandomCameraIterable, step_generator
from magic3d.types import CameraBatch


def _first_batches(dm: RandomCameraDataModule, n: int = 3) -> list[CameraBatch]:
    it = iter(dm.train_dataloader())
    return [next(it) for _ in range(n)]


def test_train_batches_are_camera_batches_of_the_right_shape():
    dm = RandomCameraDataModule(batch_size=4, height=32, width=48, steps_per_epoch=5)
    batches = list(dm.train_dataloader())
    assert len(batches) == 5 == len(dm.train_dataloader())
    for b in batches:
        assert isinstance(b, CameraBatch)
        assert b.c2w.shape == (4, 4, 4) and b.light_position.shape == (4, 3)
        assert b.fovy.shape == b.elevation.shape == b.azimuth.shape == b.distance.shape == (4,)
        assert (b.height, b.width) == (32, 48)
    # Consecutive steps differ.
    assert not torch.equal(batches[0].c2w, batches[1].c2w)


def test_same_seed_same_batches_different_seed_different_batches():
    a = _first_batches(RandomCameraDataModule(batch_size=2, seed=0))
    b = _first_batches(RandomCameraDataModule(batch_size=2, seed=0))
    c = _first_batches(RandomCameraDataModule(batch_size=2, seed=1))
    for x, y in zip(a, b):
        assert torch.equal(x.c2w, y.c2w) and torch.equal(x.light_position, y.light_position)
    assert not any(torch.equal(x.c2w, z.c2w) for x, z in zip(a, c))


def test_epochs_and_ranks_get_different_streams():
    dm = RandomCameraDataModule(batch_size=2, steps_per_epoch=2)
    loader = dm.train_dataloader()
    epoch0, epoch1 = list(loader), list(loader)  # without a trainer, passes count epochs
    assert not torch.equal(epoch0[0].c2w, epoch1[0].c2w)
    rank0 = RandomCameraIterable(dm.ranges, 2, 8, 8, steps_per_epoch=1, seed=0, rank=0)
    rank1 = RandomCameraIterable(dm.ranges, 2, 8, 8, steps_per_epoch=1, seed=0, rank=1)
    assert not torch.equal(next(iter(rank0)).c2w, next(iter(rank1)).c2w)
    # The first pass of rank 0 is exactly the data module's epoch 0.
    assert torch.equal(next(iter(RandomCameraIterable(dm.ranges, 2, 64, 64, 1))).c2w, epoch0[0].c2w)
    assert step_generator(0, 0, 0, 0).initial_seed() != step_generator(0, 0, 0, 1).initial_seed()


def test_val_and_test_loaders_give_single_orbit_views():
    dm = RandomCameraDataModule(height=16, width=16, n_val_views=8, n_test_views=12, eval_height=24)
    val = list(dm.val_dataloader())
    test = list(dm.test_dataloader())
    assert len(val) == 8 and len(test) == 12
    for b in val + test:
        assert isinstance(b, CameraBatch) and b.batch_size == 1
        assert (b.height, b.width) == (24, 16)  # eval_width defaults to the training width
    assert val[0].azimuth.item() == 0.0
    torch.testing.assert_close(val[0].elevation, torch.tensor([math.radians(15.0)]))
    torch.testing.assert_close(val[0].distance, torch.tensor([2.0]))


def test_transfer_batch_to_device_keeps_camera_batch():
    dm = RandomCameraDataModule()
    batch = next(iter(dm.train_dataloader()))
    moved = dm.transfer_batch_to_device(batch, torch.device("cpu"), 0)
    assert isinstance(moved, CameraBatch) and moved.device.type == "cpu"
    other = dm.transfer_batch_to_device({"x": torch.ones(1)}, torch.device("cpu"), 0)
    assert torch.equal(other["x"], torch.ones(1))


def test_invalid_args_raise():
    with pytest.raises(ValueError, match="batch_size"):
        RandomCameraDataModule(batch_size=0)
    with pytest.raises(ValueError, match="elevation_deg"):
        RandomCameraDataModule(elevation_range_deg=(-100.0, 0.0))


class _Recorder(L.LightningModule):
    """Records what the trainer hands to each hook; one dummy parameter so fit runs."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.train_batches: list[tuple[int, CameraBatch]] = []
        self.val_batches: list[CameraBatch] = []

    def training_step(self, batch, batch_idx):
        self.train_batches.append((self.current_epoch, batch))
        return (self.w * batch.distance.sum()).sum()

    def validation_step(self, batch, batch_idx):
        self.val_batches.append(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_trainer_fit_receives_camera_batches(tmp_path):
    dm = RandomCameraDataModule(batch_size=3, height=8, width=8, steps_per_epoch=2, n_val_views=4)
    model = _Recorder()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    assert [e for e, _ in model.train_batches] == [0, 0, 1, 1]
    assert all(isinstance(b, CameraBatch) and b.batch_size == 3 for _, b in model.train_batches)
    assert not torch.equal(model.train_batches[0][1].c2w, model.train_batches[2][1].c2w)
    assert len(model.val_batches) == 2 * 4 and all(b.batch_size == 1 for b in model.val_batches)
    # Epoch 0 under the trainer equals epoch 0 without one (reproducible from the seed alone).
    fresh = next(iter(RandomCameraDataModule(batch_size=3, height=8, width=8).train_dataloader()))
    assert torch.equal(fresh.c2w, model.train_batches[0][1].c2w)
