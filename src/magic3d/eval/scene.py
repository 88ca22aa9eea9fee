"""Every metric for one scene and prompt: classifier metrics on orbit renders, silhouette IoU
and Chamfer distance against the toy world's ground truth.

- classifier metrics on ``classify_size`` images: R-precision over all toy-world captions,
  shape and colour accuracy, view accuracy and Janus rate (asymmetric objects only), and the
  R-precision of the ground-truth renders at the same cameras (the ceiling the classifier
  allows). The object is judged alone over a neutral backdrop (:mod:`magic3d.eval.views`);
- silhouette IoU of ``render_size`` renders (opacity > 0.5) against ground-truth masks;
- Chamfer distance between ground-truth surface samples and the scene's surface
  (:mod:`magic3d.eval.chamfer`).

Resolution: by default the classifier's images are rendered at ``classify_size`` and the IoU
images at ``iou_size`` (cheap on CPU). ``EvalOptions.resolution`` (CLI ``--resolution 512``)
renders every view once at that size for IoU and the contact sheet, and gives the classifier
the same renders area-averaged down to ``classify_size``: the fine stage's detail lives at
512² (its training resolution), and both stages of a comparison are then judged from the
same pixels. A prompt outside the toy world gets classifier captions only.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from magic3d.data.cameras import view_index
from magic3d.devices import module_device
from magic3d.eval.chamfer import scene_chamfer, scene_surface
from magic3d.eval.classifier import ToyWorldClassifier, class_index
from magic3d.eval.metrics import (
    PromptOutsideToyWorld,
    ToyPrompt,
    area_downsample,
    caption_hits,
    colour_accuracy,
    janus_rate,
    parse_prompt,
    r_precision,
    shape_accuracy,
    silhouette_iou,
    top_captions,
    view_accuracy,
)
from magic3d.eval.options import METRIC_KEYS, EvalOptions
from magic3d.eval.views import SceneViews, empty_views, eval_cameras, render_object
from magic3d.toyworld.dataset import ground_truth_views
from magic3d.toyworld.shapes import caption, get_shape
from magic3d.types import CameraBatch, Shading


@dataclass
class ViewResult:
    azimuth_deg: float
    predicted_caption: str
    predicted_view: str
    caption_hit: bool | None
    iou: float | None


@dataclass
class StageResult:
    stage: str
    prompt: str
    finished: bool
    steps: int | None
    toy_world: dict[str, str] | None
    metrics: dict[str, float | None]
    chamfer_detail: dict[str, float] | None
    views: list[ViewResult]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    scene: str | None = None  # class name of the evaluated scene (HashGridNeRF, DMTetScene, ...)
    started_from: str | None = None  # the stage this one was initialised from (its config's start)
    render_size: int | None = None  # side of the renders behind IoU and the sheet
    # Pictures for the contact sheet (not written to JSON).
    renders: Tensor | None = None
    ground_truth: Tensor | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(replace(self, renders=None, ground_truth=None))  # no deep copy of the pictures
        data.pop("renders")
        data.pop("ground_truth")
        return data


def evaluate_scene(
    scene: Any,
    prompt: str,
    classifier: ToyWorldClassifier,
    options: EvalOptions = EvalOptions(),
    stage: str = "scene",
) -> StageResult:
    """All metrics for one scene and prompt (see the module docstring).

    Mesh scenes (``extract_mesh()``) whose surface is empty are scored as empty: backdrop-only
    renders, IoU 0 where the ground truth has a silhouette, no Chamfer distance (noted).
    """
    started = time.time()
    notes: list[str] = []
    try:
        target: ToyPrompt | None = parse_prompt(prompt)
    except PromptOutsideToyWorld as err:
        target = None
        notes.append(f"{err}; only the classifier's captions are reported")

    surface = scene_surface(scene, notes)

    def render(cameras: CameraBatch) -> SceneViews:
        if surface.is_mesh_scene and surface.mesh is None:
            return empty_views(cameras, options)
        return render_object(scene, cameras, options)

    # `small`: the classifier's cameras (also the view labels); `large`: IoU and the sheet.
    small = eval_cameras(options, options.classify_size)
    large = eval_cameras(options, options.render_size)
    big = render(large)
    if options.resolution is None:
        classify_rgb = render(small).object_rgb
    else:
        # Same poses, more pixels: the classifier sees the high-resolution render box-filtered
        # to its input size, i.e. what a 64 px camera integrating each pixel would see.
        classify_rgb = area_downsample(big.object_rgb, options.classify_size)
    prediction = classifier.predict(classify_rgb)
    cam_views = view_index(small.elevation, small.azimuth)
    shapes, colours = top_captions(prediction)
    predicted = [caption(classifier.shape_names[s], classifier.colour_names[c]) for s, c in zip(shapes.tolist(), colours.tolist())]
    predicted_views = [classifier.view_names[v] for v in prediction.view_logits.argmax(-1).tolist()]

    metrics: dict[str, float | None] = {key: None for key in METRIC_KEYS}
    hits: list[bool | None] = [None] * options.views
    ious: list[float | None] = [None] * options.views
    chamfer_detail = None
    gt_rgb = None

    if target is not None:
        shape_id = class_index(classifier.shape_names, target.shape, "shape")
        colour_id = class_index(classifier.colour_names, target.colour, "colour")
        hits = caption_hits(prediction, shape_id, colour_id).tolist()
        metrics["r_precision"] = r_precision(prediction, shape_id, colour_id)
        metrics["shape_accuracy"] = shape_accuracy(prediction, shape_id)
        metrics["colour_accuracy"] = colour_accuracy(prediction, colour_id)
        shape = get_shape(target.shape)
        if shape.asymmetric:
            metrics["view_accuracy"] = view_accuracy(prediction, cam_views)
            metrics["janus_rate"] = janus_rate(prediction, small.elevation, small.azimuth)
        else:
            notes.append(f"{target.shape} is symmetric: view accuracy and Janus rate do not apply")

        # Sphere tracing runs where the scene does (thousands of images per second on a GPU).
        device = module_device(scene)
        shading = Shading(mode="lambertian", ambient=torch.full((options.views,), options.ambient, device=device))
        gt = ground_truth_views(shape, target.colour, large.to(device), shading, background=options.background)
        gt_rgb = gt.rgb.cpu()
        per_view_iou = silhouette_iou(big.opacity, gt.mask.cpu())
        ious = per_view_iou.tolist()
        metrics["silhouette_iou"] = float(per_view_iou.mean())
        # The classifier on the ground truth at the same cameras, through the same image path
        # as the scene's renders: the ceiling of R-precision.
        if options.resolution is None:
            gt_small = ground_truth_views(shape, target.colour, small.to(device), shading, background=options.background).rgb
        else:
            gt_small = area_downsample(gt_rgb, options.classify_size)
        metrics["gt_r_precision"] = r_precision(classifier.predict(gt_small), shape_id, colour_id)

        chamfer_detail = scene_chamfer(scene, surface, shape, options, notes)
        if chamfer_detail is not None:
            metrics["chamfer"] = chamfer_detail["distance"]

    view_results = [
        ViewResult(
            azimuth_deg=round(math.degrees(float(az)), 2),
            predicted_caption=predicted[i],
            predicted_view=predicted_views[i],
            caption_hit=hits[i],
            iou=None if ious[i] is None else round(float(ious[i]), 4),
        )
        for i, az in enumerate(small.azimuth.tolist())
    ]
    return StageResult(
        stage=stage,
        prompt=prompt,
        finished=True,
        steps=None,
        toy_world=None if target is None else {"shape": target.shape, "colour": target.colour, "caption": target.caption},
        metrics=metrics,
        chamfer_detail=chamfer_detail,
        views=view_results,
        notes=notes,
        seconds=round(time.time() - started, 2),
        scene=type(scene).__name__,
        render_size=options.render_size,
        renders=big.object_rgb,
        ground_truth=gt_rgb,
    )
