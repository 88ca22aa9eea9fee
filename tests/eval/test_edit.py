"""Edit metrics (eval/edit.py) on hand-made metrics and silhouettes: which attribute an edit
changes, what it must keep, and edit - scratch."""

from __future__ import annotations

import pytest
import torch

from magic3d.eval.edit import (
    BOTH,
    COLOUR,
    SHAPE,
    edit_markdown,
    edit_report,
    edited_attribute,
    score_result,
)
from magic3d.eval.metrics import parse_prompt


def square(side: int, views: int = 2, size: int = 8) -> torch.Tensor:
    """Opacity masks (views, size, size, 1): a filled ``side`` x ``side`` square in the corner."""
    mask = torch.zeros(views, size, size, 1)
    mask[:, :side, :side] = 1.0
    return mask


METRICS = {"r_precision": 0.25, "colour_accuracy": 0.75, "shape_accuracy": 0.5}


@pytest.mark.parametrize(("base", "edit", "attribute"), [
    ("a red cube", "a blue cube", COLOUR),
    ("a red cube", "a red torus", SHAPE),
    ("a red cube", "an orange torus", BOTH),
])
def test_edited_attribute_from_the_captions(base: str, edit: str, attribute: str) -> None:
    assert edited_attribute(parse_prompt(base), parse_prompt(edit)) == attribute


def test_the_same_object_is_no_edit() -> None:
    with pytest.raises(ValueError, match="same object"):
        edited_attribute(parse_prompt("a red cube"), parse_prompt("A red cube."))


def test_colour_edit_keeps_the_silhouette() -> None:
    # 4x4 base square, 2x2 result square inside it: IoU 4 / 16 in every view.
    scores = score_result(COLOUR, METRICS, square(4), square(2))
    assert scores.attribute_accuracy == 0.75  # colour accuracy
    assert scores.preservation == pytest.approx(0.25) == scores.silhouette_iou_to_base
    assert scores.r_precision == 0.25


def test_shape_edit_keeps_the_colour() -> None:
    scores = score_result(SHAPE, METRICS, square(4), square(4))
    assert scores.attribute_accuracy == 0.5  # shape accuracy
    assert scores.preservation == 0.75  # colour accuracy against the (unchanged) colour
    assert scores.silhouette_iou_to_base == 1.0


def test_both_changed_asks_for_the_whole_caption_and_keeps_nothing() -> None:
    scores = score_result(BOTH, METRICS, square(4), square(4))
    assert scores.attribute_accuracy == 0.25  # R-precision
    assert scores.preservation is None


def test_report_compares_the_edit_with_scratch() -> None:
    scratch_metrics = {"r_precision": 0.5, "colour_accuracy": 1.0, "shape_accuracy": 0.25}
    report = edit_report("a red cube", "a blue cube", "base/coarse", square(4),
                         ("edit/fine", METRICS, square(4)), ("scratch/fine", scratch_metrics, square(2)))
    assert report.attribute == COLOUR
    assert [s.result for s in report.scores] == ["edit", "scratch"]
    assert report.difference == pytest.approx({"attribute_accuracy": -0.25, "preservation": 0.75,
                                               "r_precision": -0.25, "silhouette_iou_to_base": 0.75})
    md = edit_markdown(report)
    assert "colour edit" in md and "| edit − scratch | -0.250 | +0.750 | -0.250 | +0.750 |" in md
    assert report.to_json()["scores"][1]["stage"] == "scratch/fine"


def test_report_without_scratch_has_no_difference() -> None:
    report = edit_report("a red cube", "a red torus", "b", square(4), ("e", METRICS, square(3)))
    assert report.difference is None and len(report.scores) == 1
    assert "edit − scratch" not in edit_markdown(report)


def test_prompts_outside_the_toy_world_are_refused() -> None:
    with pytest.raises(ValueError, match="not in the toy world"):
        edit_report("a red cube", "a glass teapot", "b", square(4), ("e", METRICS, square(4)))
