"""Edit metrics (toy world, pure functions): how well a prompt-based edit (§6) changed what the
edit asked for and kept the rest, and how it compares with generating the edited prompt from
scratch.

The edited attribute is found by comparing the two toy-world captions ("a red cube" -> "a blue
cube" edits the colour; -> "a red torus" the shape; -> "a blue torus" both). Then, for a result
evaluated against the *edited* prompt (:class:`~magic3d.eval.scene.StageResult` metrics):

- attribute accuracy: colour accuracy for a colour edit, shape accuracy for a shape edit,
  R-precision (both right at once) when both change;
- preservation: for a colour edit the shape should stay, so the silhouette IoU of the result to
  the base result at the same cameras; for a shape edit the colour should stay, so the result's
  colour accuracy (the edited prompt keeps the base colour); none when both change.

A result generated from the edited prompt alone ("scratch") is scored the same way; ``edit -
scratch`` says what starting from the base model bought. Orchestration (loading runs, rendering,
writing edit.json / edit.md) is in :mod:`magic3d.eval.edit_run`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from jaxtyping import Float
from torch import Tensor

from magic3d.eval.markdown import format_signed, format_value
from magic3d.eval.metrics import ToyPrompt, parse_prompt, silhouette_iou

COLOUR, SHAPE, BOTH = "colour", "shape", "colour and shape"
SCORE_KEYS = ("attribute_accuracy", "preservation", "r_precision", "silhouette_iou_to_base")


def edited_attribute(base: ToyPrompt, edit: ToyPrompt) -> str:
    """"colour", "shape" or "colour and shape": what differs between the two captions."""
    colour, shape = base.colour != edit.colour, base.shape != edit.shape
    if colour and shape:
        return BOTH
    if colour:
        return COLOUR
    if shape:
        return SHAPE
    raise ValueError(f"the edit prompt names the same object as the base prompt ({edit.caption!r}): "
                     "an edit changes the colour or the shape")


def preservation_metric(attribute: str) -> str | None:
    """What measures the part an edit of ``attribute`` should keep (None when both change)."""
    return {COLOUR: "silhouette_iou_to_base", SHAPE: "colour_accuracy", BOTH: None}[attribute]


def attribute_metric(attribute: str) -> str:
    """The StageResult metric that says whether the edited attribute is right."""
    return {COLOUR: "colour_accuracy", SHAPE: "shape_accuracy", BOTH: "r_precision"}[attribute]


@dataclass
class EditScores:
    """One result (the edit, or the edited prompt from scratch) scored as an edit of the base."""

    result: str  # "edit" or "scratch"
    stage: str  # the evaluated stage folder
    attribute: str
    attribute_accuracy: float | None
    preservation: float | None
    r_precision: float | None
    silhouette_iou_to_base: float  # mean over views; the preservation for a colour edit


def score_result(
    attribute: str,
    metrics: Mapping[str, float | None],
    base_opacity: Float[Tensor, "B H W 1"],
    result_opacity: Float[Tensor, "B H W 1"],
    result: str = "edit",
    stage: str = "",
) -> EditScores:
    """Score a result from its metrics against the edited prompt and its silhouettes beside the
    base result's (same cameras, opacity > 0.5)."""
    iou = float(silhouette_iou(result_opacity, base_opacity).mean())
    kept = preservation_metric(attribute)
    preservation = iou if kept == "silhouette_iou_to_base" else (None if kept is None else metrics.get(kept))
    return EditScores(result=result, stage=stage, attribute=attribute,
                      attribute_accuracy=metrics.get(attribute_metric(attribute)), preservation=preservation,
                      r_precision=metrics.get("r_precision"), silhouette_iou_to_base=iou)


def score_difference(edit: EditScores, scratch: EditScores) -> dict[str, float | None]:
    """``edit - scratch`` per score (None where either is missing)."""
    def diff(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else float(a) - float(b)

    return {key: diff(getattr(edit, key), getattr(scratch, key)) for key in SCORE_KEYS}


@dataclass
class EditReport:
    base_prompt: str
    edit_prompt: str
    attribute: str
    base_stage: str
    scores: list[EditScores]  # the edit first, then scratch when given
    difference: dict[str, float | None] | None = None  # edit - scratch
    options: dict[str, Any] = field(default_factory=dict)
    classifier: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def edit_report(
    base_prompt: str,
    edit_prompt: str,
    base_stage: str,
    base_opacity: Float[Tensor, "B H W 1"],
    edit: tuple[str, Mapping[str, float | None], Float[Tensor, "B H W 1"]],
    scratch: tuple[str, Mapping[str, float | None], Float[Tensor, "B H W 1"]] | None = None,
) -> EditReport:
    """The report from the base result's silhouettes and, for the edit (and scratch), its
    (stage, metrics against the edited prompt, silhouettes)."""
    attribute = edited_attribute(parse_prompt(base_prompt), parse_prompt(edit_prompt))
    scores = [score_result(attribute, edit[1], base_opacity, edit[2], "edit", edit[0])]
    difference = None
    if scratch is not None:
        scores.append(score_result(attribute, scratch[1], base_opacity, scratch[2], "scratch", scratch[0]))
        difference = score_difference(scores[0], scores[1])
    return EditReport(base_prompt, edit_prompt, attribute, base_stage, scores, difference)


def edit_markdown(report: EditReport, settings: str = "") -> str:
    """edit.md: the scores table (and edit - scratch), with what each column measures."""
    kept = preservation_metric(report.attribute)
    kept_title = {"silhouette_iou_to_base": "shape kept: silhouette IoU to base ↑",
                  "colour_accuracy": "colour kept: colour acc ↑", None: "kept (nothing: both change)"}[kept]
    titles = [f"{report.attribute} right: {attribute_metric(report.attribute).replace('_', ' ')} ↑", kept_title,
              "R-precision ↑", "silhouette IoU to base"]
    lines = [f"# Edit: {report.base_prompt!r} → {report.edit_prompt!r} ({report.attribute} edit)", "",
             f"Base result: `{report.base_stage}`.", ""]
    for s in report.scores:
        lines.append(f"- {s.result}: `{s.stage}`")
    lines += ["", "| result | " + " | ".join(titles) + " |", "|" + "---|" * (len(titles) + 1)]
    for s in report.scores:
        lines.append(f"| {s.result} | " + " | ".join(format_value(getattr(s, k)) for k in SCORE_KEYS) + " |")
    if report.difference is not None:
        lines.append("| edit − scratch | " + " | ".join(format_signed(report.difference[k]) for k in SCORE_KEYS) + " |")
    lines += ["", "Accuracies are the evaluator's over the orbit views, against the edited prompt. The silhouette "
              "IoU to base compares opacity > 0.5 with the base result's at the same cameras: for a colour edit "
              "it is what should not change; from scratch it shows how different a fresh generation is."]
    if settings:
        lines += ["", settings]
    return "\n".join(lines) + "\n"
