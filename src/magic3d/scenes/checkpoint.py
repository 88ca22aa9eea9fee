"""Starting a scene from another stage's checkpoint: warm start (same class) or convert.

Checkpoints describe themselves: ``checkpoint["magic3d"]["stage_config"]`` holds the resolved
stage config, so the source scene is rebuilt from its own class path and init args.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from magic3d.config import ConfigError


def _scene_state(checkpoint: dict) -> dict[str, torch.Tensor]:
    prefix = "scene."
    return {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}


def build_scene(spec: dict) -> nn.Module:
    """Instantiate a scene from a ``{class_path, init_args}`` mapping."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--scene", type=nn.Module)
    try:
        cfg = parser.parse_object({"scene": spec})
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"Cannot rebuild scene {spec.get('class_path')}: {err}") from None
    return parser.instantiate_classes(cfg).scene


def load_scene_from_checkpoint(path: Path) -> nn.Module:
    from magic3d.stage import check_checkpoint

    checkpoint = check_checkpoint(Path(path))
    config = checkpoint["magic3d"].get("stage_config") or {}
    spec = config.get("model", {}).get("scene")
    if spec is None:
        raise ConfigError(f"Checkpoint {path} does not record its scene config; cannot rebuild it")
    scene = build_scene(spec)
    scene.load_state_dict(_scene_state(checkpoint))
    return scene


def import_function(path: str) -> Callable:
    module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"Converter '{path}' not found (expected package.module.function)") from None


def start_from_checkpoint(scene: nn.Module, path: Path, mode: str, converter: str | None,
                          converter_args: dict | None = None) -> None:
    """Fill ``scene`` in place from the checkpoint at ``path`` (``converter_args`` are passed
    to the converter as keyword arguments)."""
    if mode == "warm_start":
        from magic3d.stage import check_checkpoint

        state = _scene_state(check_checkpoint(Path(path)))
        expected = scene.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        reshaped = [k for k in expected if k in state and state[k].shape != expected[k].shape]
        if missing or unexpected or reshaped:
            raise ConfigError(
                f"Warm start from {path}: the checkpoint's scene does not match this stage's scene "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]}, other shapes {reshaped[:3]}). "
                "Use mode convert."
            )
        scene.load_state_dict(state)
    elif mode == "convert":
        if converter is None:
            raise ConfigError("Start mode 'convert' needs a converter import path")
        source = load_scene_from_checkpoint(Path(path))
        convert = import_function(converter)
        try:
            convert(source, scene, **(converter_args or {}))
        except TypeError as err:
            if converter_args and "unexpected keyword" in str(err):
                raise ConfigError(f"Converter {converter} does not accept {sorted(converter_args)}: {err}") from None
            raise
    else:
        raise ConfigError(f"Unknown start mode '{mode}' (warm_start, convert or resume)")
