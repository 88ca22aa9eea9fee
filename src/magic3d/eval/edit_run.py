"""``python -m magic3d.eval edit BASE_RUN EDIT_RUN [--scratch RUN]``: the edit metrics of
:mod:`magic3d.eval.edit` for real runs, written to ``<edit run>/eval/edit.json`` and ``edit.md``.

Which stages are compared:

- the edit: EDIT_RUN's last finished stage (or EDIT_RUN itself when it is a stage folder); its
  prompt is the edited prompt;
- the base: BASE_RUN's last finished stage on another prompt (or the stage folder given), so an
  edit run that made its own coarse stage can be its own base (``edit RUN RUN``), and a run
  started with ``base=`` is compared with that base run's result;
- scratch: SCRATCH's last finished stage, which must have been made from the edited prompt.

Each is rendered at the same orbit cameras (:class:`~magic3d.eval.options.EvalOptions`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from magic3d.devices import resolve_device
from magic3d.eval.classifier import DEFAULT_FOLDER, ToyWorldClassifier, classifier_info, load_classifier
from magic3d.eval.edit import EditReport, edit_markdown, edit_report
from magic3d.eval.markdown import settings_line
from magic3d.eval.metrics import parse_prompt
from magic3d.eval.options import REPORT_VERSION, EvalOptions
from magic3d.eval.run import EVAL_DIR
from magic3d.eval.scene import evaluate_scene
from magic3d.eval.stage import stage_prompt
from magic3d.eval.views import eval_cameras, render_object


def finished_stages(run_dir: Path) -> list[Path]:
    from magic3d.runs import stages

    return [p for p in stages(run_dir) if (p / "DONE.json").is_file()]


def edit_stage(edit_run: Path) -> Path:
    """The edited result: the stage folder given, or the run's last finished stage."""
    from magic3d.runs import final_stage_dir

    return final_stage_dir(edit_run)


def base_stage(base_run: Path, edit_prompt: str) -> Path:
    """The base result: the stage folder given, or the run's last finished stage whose prompt is
    not the edited one."""
    from magic3d.runs import is_stage_dir

    if is_stage_dir(base_run):
        return base_run
    if not base_run.is_dir():
        raise FileNotFoundError(f"base run {base_run} does not exist")
    candidates = [p for p in finished_stages(base_run) if stage_prompt(p) != edit_prompt]
    if not candidates:
        raise ValueError(f"base run {base_run} has no finished stage on a prompt other than the edited "
                         f"{edit_prompt!r}: pass the base run (or its stage folder) the edit started from")
    return candidates[-1]


def scratch_stage(scratch_run: Path, edit_prompt: str) -> Path:
    """The from-scratch result, checked to be a generation of the edited prompt."""
    stage = edit_stage(scratch_run)
    prompt = stage_prompt(stage)
    if parse_prompt(prompt).caption != parse_prompt(edit_prompt).caption:
        raise ValueError(f"--scratch {scratch_run} was made from {prompt!r}, not the edited prompt {edit_prompt!r}: "
                         "pass a run of the edited prompt")
    return stage


def evaluate_edit(
    base_run: str | Path,
    edit_run: str | Path,
    scratch_run: str | Path | None = None,
    options: EvalOptions = EvalOptions(),
    classifier: str | Path | ToyWorldClassifier = DEFAULT_FOLDER,
    device: str | torch.device = "auto",
) -> tuple[EditReport, Path, Path]:
    """Score the edit (and scratch) against the base; returns the report, edit.json and edit.md."""
    from magic3d.runs import is_stage_dir, load_stage_scene

    edit_dir = edit_stage(Path(edit_run))
    edit_prompt = stage_prompt(edit_dir)
    base_dir = base_stage(Path(base_run), edit_prompt)
    base_prompt = stage_prompt(base_dir)
    scratch_dir = None if scratch_run is None else scratch_stage(Path(scratch_run), edit_prompt)
    for prompt in (base_prompt, edit_prompt):  # toy-world captions, checked before any model loads
        parse_prompt(prompt)

    dev = resolve_device(device)
    model = load_classifier(classifier, dev)
    cameras = eval_cameras(options, options.render_size)
    measured = {}
    jobs = [("base", base_dir), ("edit", edit_dir)] + ([("scratch", scratch_dir)] if scratch_dir else [])
    for role, stage_dir in tqdm(jobs, desc="edit eval", unit="stage"):
        scene = load_stage_scene(stage_dir, dev)
        opacity = render_object(scene, cameras, options).opacity
        metrics = None
        if role != "base":  # the base is only looked at; the results are judged on the edited prompt
            metrics = evaluate_scene(scene, edit_prompt, model, options, stage=stage_dir.name).metrics
        measured[role] = (str(stage_dir), metrics, opacity)
        del scene

    report = edit_report(base_prompt, edit_prompt, str(base_dir), measured["base"][2], measured["edit"],
                         measured.get("scratch"))
    report.options = asdict(options)
    report.classifier = classifier_info(classifier)
    run_dir = Path(edit_run) if not is_stage_dir(Path(edit_run)) else Path(edit_run).parent
    out = run_dir / EVAL_DIR
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "edit.json", out / "edit.md"
    data = {"version": REPORT_VERSION, "created": time.strftime("%Y-%m-%d %H:%M:%S"), **report.to_json()}
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    md_path.write_text(edit_markdown(report, settings_line(options)))
    return report, json_path, md_path
