"""A stage starting from an earlier stage's checkpoint: warm start, convert, incompatibility."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from magic3d.checkpoints import (
    FoundCheckpoint,
    StageStart,
    check_compatible,
    load_scene,
    read_checkpoint,
    start_scene,
)
from magic3d.config import ConfigError
from magic3d.scenes.hash_nerf import HashGridNeRF
from magic3d.system import TextTo3D

pytestmark = pytest.mark.slow


def _smoke_scene_args(smoke_run: Path) -> dict:
    checkpoint = torch.load(smoke_run / "coarse" / "checkpoints" / "last.ckpt", weights_only=True)
    return checkpoint["magic3d"]["scene"]["init_args"]


def start_from_checkpoint(scene, path: Path, mode: str, converter: str | None, converter_args: dict | None = None):
    start = StageStart(checkpoint=str(path), mode=mode, converter=converter, converter_args=converter_args or {})
    start_scene(scene, read_checkpoint(path), start)


def copy_background(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """A stand-in converter (the NeRF -> DMTet one comes with the fine stage)."""
    target.background.load_state_dict(source.background.state_dict())


def test_checkpoint_rebuilds_its_scene(smoke_run: Path) -> None:
    scene = load_scene(smoke_run / "coarse" / "checkpoints" / "last.ckpt")
    assert isinstance(scene, HashGridNeRF)
    state = torch.load(smoke_run / "coarse" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert torch.equal(scene.encoding.params, state["scene.encoding.params"])


def test_warm_start_copies_the_weights(smoke_run: Path) -> None:
    args = {k: v for k, v in _smoke_scene_args(smoke_run).items() if k != "background"}
    target = HashGridNeRF(**args)
    start_from_checkpoint(target, smoke_run / "coarse" / "checkpoints" / "last.ckpt", "warm_start", None)
    source = load_scene(smoke_run / "coarse" / "checkpoints" / "last.ckpt")
    for (name, a), (_, b) in zip(sorted(target.state_dict().items()), sorted(source.state_dict().items())):
        assert torch.equal(a, b), name


def test_warm_start_into_another_shape_says_use_convert(smoke_run: Path) -> None:
    target = HashGridNeRF(n_levels=2, log2_hashmap_size=8, hidden_dim=8, grid_resolution=0)
    with pytest.raises(ConfigError, match="Use mode convert"):
        start_from_checkpoint(target, smoke_run / "coarse" / "checkpoints" / "last.ckpt", "warm_start", None)


def test_convert_calls_the_named_function(smoke_run: Path) -> None:
    target = HashGridNeRF(n_levels=2, log2_hashmap_size=8, hidden_dim=8, grid_resolution=0)
    start_from_checkpoint(target, smoke_run / "coarse" / "checkpoints" / "last.ckpt", "convert",
                          f"{__name__}.copy_background")
    source = load_scene(smoke_run / "coarse" / "checkpoints" / "last.ckpt")
    for (name, a), (_, b) in zip(sorted(target.background.state_dict().items()),
                                 sorted(source.background.state_dict().items())):
        assert torch.equal(a, b), name
    with pytest.raises(ConfigError, match="not found"):
        start_from_checkpoint(target, smoke_run / "coarse" / "checkpoints" / "last.ckpt", "convert",
                              "magic3d.no_such_module.convert")


def test_incompatible_checkpoint_is_named(smoke_run: Path) -> None:
    class NoGuidance(torch.nn.Module):
        def param_groups(self) -> dict:
            return {}

    other = TextTo3D(HashGridNeRF(n_levels=2, log2_hashmap_size=8, hidden_dim=8, grid_resolution=0), NoGuidance())
    path = smoke_run / "coarse" / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match="does not fit this stage's config"):
        check_compatible(other, FoundCheckpoint(path, read_checkpoint(path)))


def record_settings(source: torch.nn.Module, target: torch.nn.Module, resolution: int = 128) -> None:
    target.recorded_resolution = resolution


def test_converter_args_reach_the_converter(smoke_run: Path) -> None:
    target = HashGridNeRF(n_levels=2, log2_hashmap_size=8, hidden_dim=8, grid_resolution=0)
    ckpt = smoke_run / "coarse" / "checkpoints" / "last.ckpt"
    start_from_checkpoint(target, ckpt, "convert", f"{__name__}.record_settings", {"resolution": 64})
    assert target.recorded_resolution == 64
    with pytest.raises(ConfigError, match="does not accept"):
        start_from_checkpoint(target, ckpt, "convert", f"{__name__}.record_settings", {"resolutoin": 64})
