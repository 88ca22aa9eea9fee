"""YAML plumbing for recipes and stage configs: locating, merging, overriding.

A stage config may list ``extends: [parts/a.yaml, ...]``; those files are merged first (in
order), then the stage file itself on top. Merging is recursive for mappings, except that a
mapping whose ``class_path`` changes is replaced whole (its old ``init_args`` belong to
another class).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user-facing configuration problem; the message says what is wrong and how to fix it."""


def recipes_dir() -> Path:
    override = os.environ.get("MAGIC3D_RECIPES")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "recipes"


def load_yaml(path: Path) -> dict:
    try:
        with open(path) as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError:
        raise ConfigError(f"Config file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level, found {type(data).__name__}")
    return data


def deep_merge(base: dict, top: dict) -> dict:
    """``top`` wins; nested mappings merge unless their ``class_path`` differs."""
    merged = copy.deepcopy(base)
    for key, value in top.items():
        old = merged.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            if "class_path" in value and value.get("class_path") != old.get("class_path"):
                merged[key] = copy.deepcopy(value)
            else:
                merged[key] = deep_merge(old, value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_composed(path: Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Load a config with its ``extends`` chain resolved (paths relative to the recipes dir)."""
    path = path.resolve()
    if path in _seen:
        raise ConfigError(f"Circular 'extends' through {path}")
    data = load_yaml(path)
    parents = data.pop("extends", []) or []
    if isinstance(parents, str):
        parents = [parents]
    composed: dict = {}
    for parent in parents:
        composed = deep_merge(composed, load_composed(recipes_dir() / parent, _seen + (path,)))
    return deep_merge(composed, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``model.scene.radius=1.5`` -> (['model', 'scene', 'radius'], 1.5). Values are YAML."""
    if "=" not in text:
        raise ConfigError(f"Override '{text}' must look like key.path=value (e.g. trainer.max_steps=500)")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"Override '{text}' has an empty key segment")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_override(config: dict, path: list[str], value: Any) -> None:
    """Set ``value`` at ``path``. Under a ``class_path`` node, ``init_args`` may be omitted."""
    node = config
    for i, part in enumerate(path[:-1]):
        if isinstance(node, dict) and "class_path" in node and part not in ("class_path", "init_args"):
            node = node.setdefault("init_args", {})
        if not isinstance(node, dict):
            raise ConfigError(f"Cannot set {'.'.join(path)}: {'.'.join(path[:i])} is not a mapping")
        node = node.setdefault(part, {})
    last = path[-1]
    if isinstance(node, dict) and "class_path" in node and last not in ("class_path", "init_args"):
        node = node.setdefault("init_args", {})
    if not isinstance(node, dict):
        raise ConfigError(f"Cannot set {'.'.join(path)}: its parent is not a mapping")
    node[last] = value


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    result = copy.deepcopy(config)
    for text in overrides:
        path, value = parse_override(text)
        apply_override(result, path, value)
    return result


def dump_yaml(data: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as handle:
        yaml.safe_dump(data, handle, sort_keys=False)
    tmp.replace(path)
