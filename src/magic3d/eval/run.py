"""Evaluate a run: every finished stage (or one), and each stage against the stage it started
from, written to ``<run>/eval/``: eval.json, eval.md (stage x metric table, plus a
side-by-side table with ``stage - source`` per metric for the fine stage of
``coarse_to_fine``) and contact_sheet.png; and, for stages that trained with W&B, into their
W&B runs (``eval/wandb_report.py``)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from magic3d.devices import resolve_device
from magic3d.eval.classifier import DEFAULT_FOLDER, ToyWorldClassifier, classifier_info, load_classifier
from magic3d.eval.compare import StageComparison, compare_stages
from magic3d.eval.contact_sheet import save_contact_sheet
from magic3d.eval.markdown import run_markdown
from magic3d.eval.options import REPORT_VERSION, EvalOptions
from magic3d.eval.scene import StageResult
from magic3d.eval.stage import evaluate_stage, stages_to_evaluate
from magic3d.eval.wandb_report import log_run_eval
from magic3d.tracking import WandbRunRecord

EVAL_DIR = "eval"  # <run>/eval/ holds a run's reports


@dataclass
class RunEval:
    run: str
    stages: list[StageResult]
    json_path: Path
    markdown_path: Path
    sheet_path: Path
    comparisons: list[StageComparison] = field(default_factory=list)
    wandb_runs: list[WandbRunRecord] = field(default_factory=list)  # W&B runs the evaluation was logged into


def evaluate_run(
    run_dir: str | Path,
    options: EvalOptions = EvalOptions(),
    stage: str | None = None,
    classifier: str | Path | ToyWorldClassifier = DEFAULT_FOLDER,
    device: str | torch.device = "auto",
    as_prompt: str | None = None,
) -> RunEval:
    """Evaluate every finished stage (or ``stage``) and write eval.json / eval.md / contact_sheet.png.

    ``run_dir`` may also be one stage folder of a run: that stage alone is evaluated.
    ``as_prompt`` grades every stage as if prompted with this toy caption (a personalised run's
    "a sks duck" is the subject's "a pink duck").
    """
    from magic3d.runs import is_stage_dir

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    if is_stage_dir(run_dir):
        if stage is not None and stage != run_dir.name:
            raise ValueError(f"{run_dir} is stage {run_dir.name!r} itself; drop --stage {stage} or pass the run folder")
        run_dir, stage = run_dir.parent, run_dir.name
    dev = resolve_device(device)
    model = load_classifier(classifier, dev)
    results = []
    for stage_dir in tqdm(stages_to_evaluate(run_dir, stage), desc=f"eval {run_dir.name}", unit="stage"):
        results.append(evaluate_stage(stage_dir, model, options, dev, as_prompt))

    comparisons = compare_stages(results)
    out = run_dir / EVAL_DIR
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "version": REPORT_VERSION,
        "run": str(run_dir),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "options": asdict(options),
        "classifier": classifier_info(classifier),
        "stages": [r.to_json() for r in results],
        "comparisons": [asdict(c) for c in comparisons],
    }
    json_path = out / "eval.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path = out / "eval.md"
    md_path.write_text(run_markdown(run_dir, results, options, report["classifier"]))
    sheet_path = save_contact_sheet(results, out / "contact_sheet.png")
    wandb_runs = log_run_eval(run_dir, results, comparisons, sheet_path)
    return RunEval(str(run_dir), results, json_path, md_path, sheet_path, comparisons, wandb_runs)
