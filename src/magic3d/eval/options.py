"""What an evaluation measures and how: the metric names every report shares, and the options
(cameras, resolutions, geometry sampling) recorded in each eval.json."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

# Every stage result, comparison and summary has exactly these keys (None where a metric does
# not apply), so reports of different runs line up column by column.
METRIC_KEYS = (
    "r_precision",
    "colour_accuracy",
    "shape_accuracy",
    "view_accuracy",
    "janus_rate",
    "silhouette_iou",
    "chamfer",
    "gt_r_precision",
)

# eval.json's version: a report of another version is evaluated again, never averaged with this
# one's. 2: density scenes' Chamfer on the visible surface (was a fixed half-opacity level).
REPORT_VERSION = 2


@dataclass
class EvalOptions:
    """Cameras, resolutions and geometry sampling of an evaluation (recorded in eval.json).

    ``resolution`` None: the classifier's views are rendered at ``classify_size`` and the IoU /
    contact-sheet views at ``iou_size``. ``resolution`` N: one render per view at N x N for
    IoU and the sheet, area-averaged down to ``classify_size`` for the classifier
    (``iou_size`` is then unused).
    """

    views: int = 16
    elevation_deg: float = 20.0
    distance: float = 2.0
    fovy_deg: float = 50.0
    classify_size: int = 64
    iou_size: int = 128
    ambient: float = 0.5
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)  # neutral backdrop for the classifier
    chamfer_resolution: int = 96  # density grid (density scenes; mesh scenes sample their mesh)
    chamfer_points: int = 5000
    render_chunk: int = 4  # cameras per scene.render call at <= 128^2 (bounds memory at 1024 samples/ray)
    seed: int = 0
    resolution: int | None = None

    def __post_init__(self) -> None:
        self.background = tuple(float(c) for c in self.background)
        if self.views < 1:
            raise ValueError(f"views={self.views} must be >= 1")
        if self.classify_size < 8 or self.iou_size < 8:
            raise ValueError(f"classify_size={self.classify_size} and iou_size={self.iou_size} must be >= 8")
        if self.resolution is not None and self.resolution < self.classify_size:
            raise ValueError(
                f"resolution={self.resolution} must be >= classify_size={self.classify_size} "
                "(the classifier's images are area-averaged down from it), e.g. 512"
            )

    @property
    def render_size(self) -> int:
        """Side of the views used for IoU and the contact sheet."""
        return self.iou_size if self.resolution is None else self.resolution

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "EvalOptions":
        """Options recorded in an eval.json (keys this version does not know are ignored;
        missing ones, from older files, take their defaults)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
