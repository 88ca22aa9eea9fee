"""A stage folder of a run (``<run>/<stage>/``: config.yaml, checkpoints/, DONE.json when
finished): which stages to evaluate, their prompt and source stage, and the evaluation of one."""

from __future__ import annotations

from pathlib import Path

import torch

from magic3d.eval.classifier import ToyWorldClassifier
from magic3d.eval.options import EvalOptions
from magic3d.eval.scene import StageResult, evaluate_scene


def stage_prompt(stage_dir: Path) -> str:
    """The stage's prompt: DONE.json's, else the config's ``model.prompt``."""
    from magic3d.config import load_yaml
    from magic3d.runs import stage_summary

    summary = stage_summary(stage_dir) or {}
    if summary.get("prompt"):
        return str(summary["prompt"])
    config_file = stage_dir / "config.yaml"
    prompt = (load_yaml(config_file).get("model") or {}).get("prompt") if config_file.is_file() else None
    if not prompt:
        raise ValueError(f"stage {stage_dir} records no prompt (neither DONE.json nor config.yaml model.prompt)")
    return str(prompt)


def stage_source(stage_dir: Path) -> str | None:
    """The sibling stage this stage started from (warm start or conversion), else None.

    Read from the stage config's ``start.checkpoint`` (``<run>/<source>/checkpoints/last.ckpt``,
    written by the recipe runner), so a comparison needs no knowledge of recipe or stage names.
    """
    from magic3d.config import load_yaml

    config_file = stage_dir / "config.yaml"
    if not config_file.is_file():
        return None
    checkpoint = (load_yaml(config_file).get("start") or {}).get("checkpoint")
    if not checkpoint:
        return None
    source = Path(checkpoint).parent.parent  # <source stage>/checkpoints/last.ckpt
    return source.name if source.name and source.name != stage_dir.name else None


def trains_a_scene(stage_dir: Path) -> bool:
    """Whether the stage optimises a 3D scene (text-to-3D), not e.g. a personalisation's adapters."""
    from magic3d.config import load_yaml
    from magic3d.stage import with_default_classes

    config_file = stage_dir / "config.yaml"
    if not config_file.is_file():
        return True  # nothing says otherwise: let the evaluation report what is missing
    model = with_default_classes(load_yaml(config_file))["model"]
    return "scene" in (model.get("init_args") or {})


def evaluate_stage(
    stage_dir: Path, classifier: ToyWorldClassifier, options: EvalOptions, device: torch.device,
    as_prompt: str | None = None,
) -> StageResult:
    """:func:`evaluate_scene` on the stage's scene rebuilt from its last checkpoint, with the
    stage's prompt (or ``as_prompt``: the toy caption a personalised prompt such as "a sks
    duck" stands for), steps and source stage."""
    from magic3d.runs import load_stage_scene, stage_summary

    summary = stage_summary(stage_dir)
    prompt = as_prompt or stage_prompt(stage_dir)
    scene = load_stage_scene(stage_dir, device)
    result = evaluate_scene(scene, prompt, classifier, options, stage=stage_dir.name)
    if as_prompt:
        result.notes.append(f"graded as {as_prompt!r} (the stage's prompt: {stage_prompt(stage_dir)!r})")
    result.started_from = stage_source(stage_dir)
    result.finished = summary is not None
    if summary is not None:
        result.steps = summary.get("steps")
    else:
        result.notes.append("stage not finished: evaluated its last checkpoint")
        ckpt = torch.load(stage_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        result.steps = int(ckpt.get("global_step", 0))
    return result


def stages_to_evaluate(run_dir: Path, stage: str | None) -> list[Path]:
    """Every finished stage of the run that made a 3D scene, or ``stage`` alone (finished or not,
    once it has a checkpoint)."""
    from magic3d.runs import stages

    everything = stages(run_dir)
    found = [p for p in everything if trains_a_scene(p)]
    if stage is not None and stage in {p.name for p in everything} - {p.name for p in found}:
        raise ValueError(f"stage {stage!r} of {run_dir} makes no 3D scene (a personalisation stage): grade its "
                         "prior with python -m magic3d.eval dreambooth PRIOR_FOLDER <stage>/lora")
    if stage is not None:
        chosen = [p for p in found if p.name == stage]
        if not chosen:
            raise ValueError(f"run {run_dir} has no stage {stage!r}; its stages: {[p.name for p in found]}")
        if not (chosen[0] / "checkpoints" / "last.ckpt").is_file():
            raise FileNotFoundError(f"stage {chosen[0]} has no checkpoints/last.ckpt yet: nothing to evaluate")
        return chosen
    finished = [p for p in found if (p / "DONE.json").is_file()]
    if not finished:
        raise FileNotFoundError(
            f"run {run_dir} has no finished stage (no <stage>/DONE.json); "
            "finish it, or pass --stage NAME to evaluate a stage's last checkpoint"
        )
    return finished
