"""Lightning data module for text-to-3D stages: random training cameras and orbit views.

There is no dataset on disk: training batches are random ``CameraBatch`` objects drawn on the
fly, validation and test batches are single cameras on an orbit (per-view images, turntable
video). Resolution is an init arg, so each stage (64 px coarse, 512 px fine) sets its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from jsonargparse.typing import PositiveInt  # an int; configs then name the key and range before a run starts
from torch.utils.data import DataLoader, Dataset, IterableDataset

from magic3d.data.cameras import CameraRanges, orbit_cameras, sample_random_cameras
from magic3d.distributed import per_rank_batch_size
from magic3d.types import CameraBatch


def _as_is(batch: CameraBatch) -> CameraBatch:
    """Collate for already-batched items (module-level so a DataLoader stays picklable)."""
    return batch


def step_generator(seed: int, rank: int, epoch: int, step: int) -> torch.Generator:
    """A generator for one training step: independent streams per (seed, rank, epoch, step).

    SeedSequence mixes the four integers, so neighbouring seeds or ranks do not share streams,
    and any step can be regenerated without replaying the ones before it.
    """
    state = np.random.SeedSequence([seed, rank, epoch, step]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class RandomCameraIterable(IterableDataset):
    """Yields ``steps_per_epoch`` random camera batches per pass; each pass is one epoch.

    ``epoch_source`` returns the current epoch (the trainer's, so resumed runs continue the
    sequence); without it the dataset counts its own passes.
    """

    def __init__(
        self,
        ranges: CameraRanges,
        batch_size: int,
        height: int,
        width: int,
        steps_per_epoch: int,
        seed: int = 0,
        rank: int = 0,
        epoch_source: Callable[[], int | None] | None = None,
    ) -> None:
        super().__init__()
        self.ranges = ranges
        self.batch_size = batch_size
        self.height = height
        self.width = width
        self.steps_per_epoch = steps_per_epoch
        self.seed = seed
        self.rank = rank
        self.epoch_source = epoch_source
        self._passes = 0

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[CameraBatch]:
        epoch = self.epoch_source() if self.epoch_source is not None else None
        if epoch is None:
            epoch = self._passes
        self._passes += 1
        for step in range(self.steps_per_epoch):
            yield sample_random_cameras(
                self.ranges,
                self.batch_size,
                self.height,
                self.width,
                step_generator(self.seed, self.rank, epoch, step),
            )


class SingleViews(Dataset):
    """Cameras of a batch one at a time (each item is a ``CameraBatch`` of size 1)."""

    def __init__(self, cameras: CameraBatch) -> None:
        self.cameras = cameras

    def __len__(self) -> int:
        return self.cameras.batch_size

    def __getitem__(self, index: int) -> CameraBatch:
        return self.cameras[index : index + 1]


class RandomCameraDataModule(L.LightningDataModule):
    """Random training cameras plus orbit cameras for validation and test.

    Angles in degrees. Train: ``steps_per_epoch`` batches of ``batch_size`` random cameras per
    epoch, reproducible from ``seed``, the epoch and the global rank (so DDP ranks differ).
    ``batch_size`` is the global batch: with N processes each draws batch_size / N cameras.
    Val: ``n_val_views`` orbit views; test: ``n_test_views`` (turntable video), one camera per
    batch, at ``eval_height`` x ``eval_width`` (default: the training resolution).
    """

    def __init__(
        self,
        batch_size: PositiveInt = 1,
        height: PositiveInt = 64,
        width: PositiveInt = 64,
        distance_range: tuple[float, float] = (1.5, 2.0),
        elevation_range_deg: tuple[float, float] = (-10.0, 90.0),
        azimuth_range_deg: tuple[float, float] = (-180.0, 180.0),
        fovy_range_deg: tuple[float, float] = (40.0, 70.0),
        elevation_sampling: Literal["uniform_angle", "uniform_area"] = "uniform_angle",
        camera_perturb: float = 0.0,
        center_perturb: float = 0.0,
        up_perturb: float = 0.0,
        light_sample_strategy: Literal["magic3d", "dreamfusion"] = "magic3d",
        light_distance_range: tuple[float, float] = (0.8, 1.5),
        light_elevation_range_deg: tuple[float, float] = (30.0, 90.0),
        light_position_perturb: float = 1.0,
        # At distance 2.0 and fovy 50 deg the view spans +-0.93 units at the origin, the median
        # framing of the random range (+-0.55 .. +-1.40), so eval images look like training ones.
        eval_elevation_deg: float = 15.0,
        eval_distance: float = 2.0,
        eval_fovy_deg: float = 50.0,
        n_val_views: PositiveInt = 8,
        n_test_views: PositiveInt = 120,
        eval_height: int | None = None,
        eval_width: int | None = None,
        seed: int = 0,
        steps_per_epoch: PositiveInt = 100,
    ) -> None:
        super().__init__()
        for name, value in (
            ("batch_size", batch_size),
            ("height", height),
            ("width", width),
            ("n_val_views", n_val_views),
            ("n_test_views", n_test_views),
            ("steps_per_epoch", steps_per_epoch),
        ):
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        # Plain ints in the saved hyper-parameters: checkpoints are loaded with weights_only=True,
        # which refuses jsonargparse's PositiveInt class.
        batch_size, height, width = int(batch_size), int(height), int(width)
        n_val_views, n_test_views, steps_per_epoch = int(n_val_views), int(n_test_views), int(steps_per_epoch)
        self.save_hyperparameters()
        self.ranges = CameraRanges(
            distance=distance_range,
            elevation_deg=elevation_range_deg,
            azimuth_deg=azimuth_range_deg,
            fovy_deg=fovy_range_deg,
            elevation_sampling=elevation_sampling,
            camera_perturb=camera_perturb,
            center_perturb=center_perturb,
            up_perturb=up_perturb,
            light_sample_strategy=light_sample_strategy,
            light_distance=light_distance_range,
            light_elevation_deg=light_elevation_range_deg,
            light_position_perturb=light_position_perturb,
        )
        self.batch_size = batch_size
        self.height = height
        self.width = width
        self.eval_elevation_deg = eval_elevation_deg
        self.eval_distance = eval_distance
        self.eval_fovy_deg = eval_fovy_deg
        self.n_val_views = n_val_views
        self.n_test_views = n_test_views
        self.eval_height = eval_height if eval_height is not None else height
        self.eval_width = eval_width if eval_width is not None else width
        self.seed = seed
        self.steps_per_epoch = steps_per_epoch

    def _trainer_epoch(self) -> int | None:
        return self.trainer.current_epoch if self.trainer is not None else None

    def _global_rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def _world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def train_dataloader(self) -> DataLoader:
        dataset = RandomCameraIterable(
            self.ranges,
            per_rank_batch_size(self.batch_size, self._world_size()),
            self.height,
            self.width,
            self.steps_per_epoch,
            seed=self.seed,
            rank=self._global_rank(),
            epoch_source=self._trainer_epoch,
        )
        # Batches are built whole by the sampler (batch_size=None); sampling costs microseconds,
        # so worker processes would only add start-up time.
        return DataLoader(dataset, batch_size=None, num_workers=0, collate_fn=_as_is)

    def orbit(self, n_views: int) -> CameraBatch:
        """The evaluation orbit with ``n_views`` views at the evaluation resolution."""
        return orbit_cameras(
            n_views,
            self.eval_elevation_deg,
            self.eval_distance,
            self.eval_fovy_deg,
            self.eval_height,
            self.eval_width,
        )

    def val_dataloader(self) -> DataLoader:
        views = SingleViews(self.orbit(self.n_val_views))
        return DataLoader(views, batch_size=None, collate_fn=_as_is)

    def test_dataloader(self) -> DataLoader:
        views = SingleViews(self.orbit(self.n_test_views))
        return DataLoader(views, batch_size=None, collate_fn=_as_is)

    def transfer_batch_to_device(
        self, batch: Any, device: torch.device, dataloader_idx: int
    ) -> Any:
        # CameraBatch is a dataclass with int fields; move it explicitly rather than relying on
        # Lightning's generic collection traversal.
        if isinstance(batch, CameraBatch):
            return batch.to(device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)
