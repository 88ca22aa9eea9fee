"""magic3d.checkpoints: checksummed writes, verified reads, fallback past corrupt files, no
non-finite checkpoints, bounded retention and no -v1 copies."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from magic3d.checkpoints import (
    CorruptCheckpoint,
    NonFiniteStateError,
    PeriodicCheckpoints,
    StageCheckpointIO,
    checksum_path,
    latest_valid_checkpoint,
    read_checkpoint,
    write_checkpoint,
)
from magic3d.config import ConfigError


def checkpoint_of(step: int, value: float = 1.0, size: int = 4096) -> dict:
    weights = torch.full((size,), value)
    return {"state_dict": {"layer.weight": weights}, "global_step": step, "magic3d": {"prompt": "a red cube"},
            "optimizer_states": [{"state": {0: {"exp_avg": weights.clone()}}}]}


def scribble_middle(path: Path, n_bytes: int = 4096, at: float = 0.25) -> None:
    """Overwrite ``n_bytes`` inside the file (at fraction ``at``): same size, garbage inside.
    A quarter in lands inside the first tensor's record of :func:`checkpoint_of` files."""
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.seek(int(size * at) - n_bytes // 2)
        handle.write(os.urandom(n_bytes))
    assert path.stat().st_size == size


def test_round_trip_writes_a_checksum(tmp_path: Path) -> None:
    path = tmp_path / "step000010.ckpt"
    write_checkpoint(checkpoint_of(10), path)
    assert checksum_path(path).is_file()
    loaded = read_checkpoint(path)
    assert loaded["global_step"] == 10 and torch.equal(loaded["state_dict"]["layer.weight"], torch.ones(4096))
    assert not list(tmp_path.glob(".*tmp")), "no temp files left behind"


def test_garbage_in_the_middle_is_caught_by_the_checksum(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    write_checkpoint(checkpoint_of(10, size=1 << 16), path)
    scribble_middle(path)
    # What today's main did: torch.load reads the damaged file without complaint.
    silently = torch.load(path, weights_only=True)
    assert not torch.equal(silently["state_dict"]["layer.weight"], torch.ones(1 << 16))
    with pytest.raises(CorruptCheckpoint, match="do not match"):
        read_checkpoint(path)


def test_non_finite_weights_count_as_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    write_checkpoint(checkpoint_of(3, value=float("nan")), path)
    with pytest.raises(CorruptCheckpoint, match="non-finite weights"):
        read_checkpoint(path)
    bad_optimiser = checkpoint_of(3)
    bad_optimiser["optimizer_states"][0]["state"][0]["exp_avg"][7] = float("inf")
    write_checkpoint(bad_optimiser, path)
    with pytest.raises(CorruptCheckpoint, match="optimiser state"):
        read_checkpoint(path)


def test_one_non_finite_tensor_among_finite_ones_is_found_and_named(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    checkpoint = checkpoint_of(3)
    checkpoint["state_dict"]["layer.bias"] = torch.tensor([0.0, float("nan")])
    checkpoint["state_dict"]["layer.scale"] = torch.ones(2)
    write_checkpoint(checkpoint, path)
    with pytest.raises(CorruptCheckpoint, match=r"non-finite weights \(layer\.bias\)"):
        read_checkpoint(path)


def test_other_ranks_skip_corrupt_files_without_moving_them(tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "checkpoints"
    for step in (10, 20):
        write_checkpoint(checkpoint_of(step), ckpt_dir / f"step{step:06d}.ckpt")
    scribble_middle(ckpt_dir / "step000020.ckpt")
    messages: list[str] = []
    found = latest_valid_checkpoint(ckpt_dir, is_rank_zero=False, log=messages.append)
    assert found.step == 10, "the same verdict as rank 0"
    assert (ckpt_dir / "step000020.ckpt").is_file() and not list(ckpt_dir.glob("*.corrupt")), "rank 0 moves files"
    assert messages == [], "rank 0 alone reports"


def test_the_next_valid_checkpoint_is_used_and_the_corrupt_one_kept(tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        write_checkpoint(checkpoint_of(step), ckpt_dir / f"step{step:06d}.ckpt")
    write_checkpoint(checkpoint_of(30), ckpt_dir / "last.ckpt")
    scribble_middle(ckpt_dir / "last.ckpt")
    write_checkpoint(checkpoint_of(30, value=float("nan")), ckpt_dir / "step000030.ckpt")
    messages: list[str] = []
    found = latest_valid_checkpoint(ckpt_dir, log=messages.append)
    assert found.path.name == "step000020.ckpt" and found.step == 20
    assert (ckpt_dir / "last.ckpt.corrupt").is_file() and (ckpt_dir / "step000030.ckpt.corrupt").is_file()
    assert not (ckpt_dir / "last.ckpt").exists(), "moved out of the way, so no later save overwrites it"
    assert len(messages) == 2 and "step000030.ckpt" in messages[1]
    # A second look finds the same one without touching anything else.
    assert latest_valid_checkpoint(ckpt_dir).path.name == "step000020.ckpt"


def test_only_corrupt_checkpoints_stop_the_stage_and_an_empty_folder_starts_fresh(tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "checkpoints"
    assert latest_valid_checkpoint(ckpt_dir) is None
    ckpt_dir.mkdir()
    (ckpt_dir / "last.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CorruptCheckpoint, match="Every checkpoint"):
        latest_valid_checkpoint(ckpt_dir, log=lambda _: None)
    assert (ckpt_dir / "last.ckpt.corrupt").read_bytes() == b"not a checkpoint"


def test_checkpoint_io_hands_back_the_checkpoint_read_at_start(tmp_path: Path, monkeypatch) -> None:
    import magic3d.checkpoints as C

    path = tmp_path / "last.ckpt"
    write_checkpoint(checkpoint_of(5), path)
    found = latest_valid_checkpoint(tmp_path)
    reads = []
    monkeypatch.setattr(C, "read_checkpoint", lambda p: reads.append(p) or {})
    io = StageCheckpointIO()
    io.preload(found)
    assert io.load_checkpoint(str(path)) is found.checkpoint
    assert reads == [], "read once: Lightning's load gets the same dictionary"
    io.load_checkpoint(str(path))  # handed back once; a later load reads the file as it is now
    assert reads == [path]


# ------------------------------------------------------------------ through a Lightning fit


class Regression(L.LightningModule):
    """y = 2x with one weight; ``poison_at`` turns the weight into NaN at that step."""

    def __init__(self, poison_at: int | None = None) -> None:
        super().__init__()
        self.layer = nn.Linear(1, 1)
        self.poison_at = poison_at

    def training_step(self, batch, batch_idx):
        if self.poison_at is not None and self.global_step == self.poison_at:
            with torch.no_grad():
                self.layer.weight.fill_(float("nan"))
        x = batch[0]
        return ((self.layer(x) - 2 * x) ** 2).mean()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["magic3d"] = {}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(64, 1))
        return torch.utils.data.DataLoader(data, batch_size=4)


def fit(ckpt_dir: Path, steps: int, every: int, keep: int, poison_at: int | None = None) -> PeriodicCheckpoints:
    periodic = PeriodicCheckpoints(ckpt_dir, every, keep)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[periodic], plugins=[StageCheckpointIO()],
                        default_root_dir=ckpt_dir.parent)
    trainer.fit(Regression(poison_at))
    periodic.save_last(trainer)
    return periodic


def test_retention_keeps_last_and_keep_periodic_ones_with_no_versions(tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "checkpoints"
    fit(ckpt_dir, steps=10, every=2, keep=2)
    names = sorted(p.name for p in ckpt_dir.iterdir())
    assert names == ["last.ckpt", "last.ckpt.sha256", "step000008.ckpt", "step000008.ckpt.sha256",
                     "step000010.ckpt", "step000010.ckpt.sha256"]
    # last.ckpt is the newest periodic file itself (a hard link): no second copy on disk.
    assert os.path.samefile(ckpt_dir / "last.ckpt", ckpt_dir / "step000010.ckpt")
    assert read_checkpoint(ckpt_dir / "last.ckpt")["global_step"] == 10
    fit(ckpt_dir, steps=10, every=2, keep=2)  # a second fit into the same folder: still no -v1
    assert not [p for p in ckpt_dir.iterdir() if "-v" in p.name]


def test_non_finite_weights_are_never_written(tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "checkpoints"
    with pytest.raises(NonFiniteStateError, match="non-finite at step 6"):
        fit(ckpt_dir, steps=10, every=3, keep=5, poison_at=5)
    assert sorted(p.name for p in ckpt_dir.glob("*.ckpt")) == ["last.ckpt", "step000003.ckpt"]
    assert read_checkpoint(ckpt_dir / "last.ckpt")["global_step"] == 3


class NotAllowedByWeightsOnly:
    """Any class the weights_only unpickler refuses."""


def test_an_intact_but_unloadable_checkpoint_is_not_moved_away(tmp_path: Path) -> None:
    # Its checksum matches, so the bytes are as written: a reader problem, not damage.
    checkpoint = checkpoint_of(2)
    checkpoint["hparams"] = NotAllowedByWeightsOnly()
    write_checkpoint(checkpoint, tmp_path / "last.ckpt")
    with pytest.raises(ConfigError, match="intact but cannot be loaded") as caught:
        latest_valid_checkpoint(tmp_path)
    assert not isinstance(caught.value, CorruptCheckpoint)
    assert (tmp_path / "last.ckpt").is_file()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: Adam keeps `step` on the CPU beside CUDA moments")
def test_non_finite_check_handles_optimiser_state_on_two_devices() -> None:
    from magic3d.checkpoints import first_non_finite

    model = nn.Linear(4, 4).cuda()
    optimiser = torch.optim.Adam(model.parameters())
    model(torch.ones(2, 4, device="cuda")).sum().backward()
    optimiser.step()
    checkpoint = {"state_dict": model.state_dict(), "optimizer_states": [optimiser.state_dict()]}
    assert {t.device.type for t in optimiser.state_dict()["state"][0].values()} == {"cpu", "cuda"}
    assert first_non_finite(checkpoint) is None
    optimiser.state_dict()["state"][0]["exp_avg"].fill_(float("nan"))
    assert first_non_finite(checkpoint) == "optimiser state"
