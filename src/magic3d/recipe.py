"""Multi-stage runner: a recipe is an ordered list of stages, each run in its own process.

Run folder layout: ``runs/<recipe>/<prompt-slug>-<time>/<stage>/`` holding ``config.yaml``
(resolved), ``checkpoints/`` (last + periodic), ``logs/`` (metrics CSV, per attempt),
``wandb/``, ``val/`` and ``train/`` images, ``turntable.mp4`` and ``DONE.json``.
Running again on an existing run folder continues each unfinished stage from its last
checkpoint; finished stages (``DONE.json``) are skipped.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from magic3d.config import (
    ConfigError,
    apply_overrides,
    deep_merge,
    dump_yaml,
    load_composed,
    load_yaml,
    recipes_dir,
)

START_MODES = ("resume", "warm_start", "convert")


@dataclass
class StageStart:
    """How a stage starts from an earlier one (``from_stage`` None: from scratch)."""

    from_stage: str | None = None
    mode: str = "warm_start"
    converter: str | None = None  # import path "package.module.function", for mode convert


@dataclass
class StageSpec:
    name: str
    config: Path
    cpu_profile: Path | None
    start: StageStart = field(default_factory=StageStart)


@dataclass
class Recipe:
    name: str
    description: str
    default_prompt: str
    stages: list[StageSpec]


def available_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def load_recipe(name: str) -> Recipe:
    path = recipes_dir() / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"Unknown recipe '{name}'. Available: {', '.join(available_recipes())}")
    data = load_yaml(path)
    stages = []
    seen: set[str] = set()
    for i, entry in enumerate(data.get("stages") or []):
        if "name" not in entry or "config" not in entry:
            raise ConfigError(f"Recipe {name}: stage #{i} needs 'name' and 'config'")
        start_data = dict(entry.get("start") or {})
        start = StageStart(
            from_stage=start_data.pop("from", None),
            mode=start_data.pop("mode", "warm_start"),
            converter=start_data.pop("converter", None),
        )
        if start_data:
            raise ConfigError(f"Recipe {name}, stage {entry['name']}: unknown start keys {sorted(start_data)}")
        if start.mode not in START_MODES:
            raise ConfigError(f"Recipe {name}, stage {entry['name']}: start mode must be one of {START_MODES}")
        if start.from_stage is not None and start.from_stage not in seen:
            raise ConfigError(
                f"Recipe {name}, stage {entry['name']}: starts from '{start.from_stage}', "
                f"which is not an earlier stage ({sorted(seen) or 'none'})"
            )
        if start.mode == "convert" and start.from_stage and not start.converter:
            raise ConfigError(f"Recipe {name}, stage {entry['name']}: mode convert needs a converter")
        profile = entry.get("cpu_profile")
        stages.append(StageSpec(
            name=entry["name"],
            config=recipes_dir() / entry["config"],
            cpu_profile=recipes_dir() / profile if profile else None,
            start=start,
        ))
        seen.add(entry["name"])
    if not stages:
        raise ConfigError(f"Recipe {name} lists no stages")
    return Recipe(name=name, description=data.get("description", ""),
                  default_prompt=data.get("default_prompt", ""), stages=stages)


def slugify(prompt: str, max_len: int = 48) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return slug[:max_len].rstrip("-") or "prompt"


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_profile(profile: str) -> str:
    if profile not in ("auto", "cpu", "full"):
        raise ConfigError(f"profile must be auto, cpu or full, got '{profile}'")
    if profile == "auto":
        return "full" if cuda_available() else "cpu"
    return profile


def compose_stage(
    spec: StageSpec, prompt: str, seed: int, overrides: list[str], profile: str, run_dir: Path
) -> dict:
    """The resolved config of one stage: stage file, CPU profile, prompt/seed, overrides."""
    config = load_composed(spec.config)
    if profile == "cpu" and spec.cpu_profile is not None:
        config = deep_merge(config, load_composed(spec.cpu_profile))
    config = deep_merge(config, {"seed": seed, "model": {"prompt": prompt}})
    if spec.start.from_stage is not None:
        source = run_dir / spec.start.from_stage / "checkpoints" / "last.ckpt"
        # The stage file (or its CPU profile) may set start.converter_args, e.g. a coarser
        # conversion grid on CPU; the recipe decides where the stage starts from.
        config["start"] = {**(config.get("start") or {}), "checkpoint": str(source),
                           "mode": spec.start.mode, "converter": spec.start.converter}
    stage_overrides = []
    for text in overrides:
        # "coarse:trainer.max_steps=10" targets one stage; plain keys target every stage.
        if ":" in text.split("=", 1)[0]:
            stage_name, rest = text.split(":", 1)
            if stage_name == spec.name:
                stage_overrides.append(rest)
        else:
            stage_overrides.append(text)
    return apply_overrides(config, stage_overrides)


def announce_cpu_profile(recipe: Recipe) -> None:
    names = [s.name for s in recipe.stages if s.cpu_profile is not None]
    print(
        "[magic3d] No CUDA GPU found: using the reduced CPU profile for "
        f"{', '.join(names) or 'no stage'} (smaller renders, grids and step counts; see the "
        "profiles/ files named by the recipe). Pass profile=full to run the paper settings.",
        flush=True,
    )


def run_recipe(
    name: str,
    prompt: str | None = None,
    seed: int = 0,
    overrides: list[str] | None = None,
    run_dir: Path | None = None,
    runs_root: Path = Path("runs"),
    profile: str = "auto",
) -> Path:
    """Run (or continue) every stage of a recipe; returns the run folder."""
    recipe = load_recipe(name)
    if prompt is None:
        prompt = recipe.default_prompt
    if not prompt or not prompt.strip():
        raise ConfigError('The prompt is empty: pass prompt="a description of the object".')
    overrides = list(overrides or [])
    profile = resolve_profile(profile)
    if profile == "cpu":
        announce_cpu_profile(recipe)
    if run_dir is None:
        run_dir = runs_root / name / f"{slugify(prompt)}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(run_dir)

    # Compose and validate every stage before running any, so a typo fails in seconds.
    from magic3d.stage import validate_stage_config

    resolved = {}
    for spec in recipe.stages:
        config = compose_stage(spec, prompt, seed, overrides, profile, run_dir)
        stage_dir = run_dir / spec.name
        existing = stage_dir / "config.yaml"
        if existing.is_file():
            previous = load_yaml(existing)
            if previous != config:
                if overrides or prompt != previous.get("model", {}).get("prompt"):
                    raise ConfigError(
                        f"{stage_dir} was started with a different config; continue it without "
                        "new overrides/prompt, or start a new run folder."
                    )
                config = previous  # e.g. recipe files edited since: keep what the run started with
        validate_stage_config(config, where=f"{name}/{spec.name}")
        resolved[spec.name] = config

    print(f"[magic3d] run folder: {run_dir}", flush=True)
    for spec in recipe.stages:
        stage_dir = run_dir / spec.name
        if (stage_dir / "DONE.json").is_file():
            print(f"[magic3d] stage {spec.name}: already finished, skipping", flush=True)
            continue
        config_path = stage_dir / "config.yaml"
        if not config_path.is_file():
            dump_yaml(resolved[spec.name], config_path)
        print(f"[magic3d] stage {spec.name}: starting ({stage_dir})", flush=True)
        cmd = [sys.executable, "-m", "magic3d", "stage", "--config", str(config_path),
               "--stage-dir", str(stage_dir)]
        code = _run_child(cmd)
        if code != 0:
            raise StageFailed(spec.name, stage_dir, code)
    return run_dir


def _run_child(cmd: list[str]) -> int:
    """Run a stage process. Ctrl-C reaches it too (same process group): wait until it has
    saved its checkpoint and exited, so nothing is left half-written behind our back."""
    child = subprocess.Popen(cmd, env=os.environ.copy())
    try:
        return child.wait()
    except KeyboardInterrupt:
        while True:  # a second Ctrl-C reaches the child too (it quits at once): keep waiting for it
            try:
                child.wait()
                break
            except KeyboardInterrupt:
                continue
        raise


class StageFailed(RuntimeError):
    def __init__(self, stage: str, stage_dir: Path, code: int) -> None:
        super().__init__(
            f"Stage '{stage}' failed (exit code {code}). Its checkpoints are kept in "
            f"{stage_dir / 'checkpoints'}; run the same command with run={stage_dir.parent} to continue."
        )
        self.code = code
