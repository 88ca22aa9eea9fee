"""The data module of a personalisation stage: one item per training step.

The images themselves belong to the stage module, which can only prepare them once its prior is
loaded (their size is the prior's; class images are the prior's samples). What a step draws
(which images, timesteps, noise) comes from a generator keyed by the run's seed, the rank and
the global step (:func:`magic3d.data.datamodule.step_generator`), so a stage resumed from a
checkpoint trains exactly as one that never stopped. This module only paces the steps and says
how many subject images each process takes per step.
"""

from __future__ import annotations

import lightning as L
import torch
from jsonargparse.typing import PositiveInt
from torch.utils.data import DataLoader, IterableDataset

from magic3d.distributed import per_rank_batch_size


class _Steps(IterableDataset):
    def __init__(self, per_rank: int, steps_per_epoch: int) -> None:
        super().__init__()
        self.per_rank = per_rank
        self.steps_per_epoch = steps_per_epoch

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self):
        for _ in range(self.steps_per_epoch):
            yield torch.tensor(self.per_rank)


class PersonalisationSteps(L.LightningDataModule):
    """Steps of a personalisation stage.

    Args:
        batch_size: subject images per step over all processes (each of N takes batch_size / N);
            prior preservation adds as many class images.
        steps_per_epoch: steps per epoch (the stage's cadence; it has no validation loop).
    """

    def __init__(self, batch_size: PositiveInt = 1, steps_per_epoch: PositiveInt = 100) -> None:
        super().__init__()
        if batch_size < 1 or steps_per_epoch < 1:
            raise ValueError(f"batch_size={batch_size} and steps_per_epoch={steps_per_epoch} must be >= 1")
        self.batch_size = int(batch_size)
        self.steps_per_epoch = int(steps_per_epoch)

    def train_dataloader(self) -> DataLoader:
        world = self.trainer.world_size if self.trainer is not None else 1
        steps = _Steps(per_rank_batch_size(self.batch_size, world), self.steps_per_epoch)
        return DataLoader(steps, batch_size=None, num_workers=0)
