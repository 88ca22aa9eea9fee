"""Evaluate text-to-3D runs (and pixel priors) against the toy world's ground truth.

``evaluate_run(run_dir)``: for every finished stage, rebuild the scene from its checkpoint,
render an orbit (K views, elevation 20 deg, distance 2, fovy 50, headlight, Lambertian with
ambient 0.5), and score it:

- classifier metrics on 64x64 images: R-precision over all toy-world captions, shape and
  colour accuracy, view accuracy, Janus rate (asymmetric objects only), and the R-precision
  of the ground-truth renders at the same cameras (the ceiling the classifier allows). The scene's learned
  background is removed first (``rgb - (1 - opacity) * background``) and the object is
  composited over a neutral white background, so only the object is judged;
- silhouette IoU of 128x128 renders (opacity > 0.5) against ground-truth masks;
- Chamfer distance between ground-truth surface samples and the scene's surface: points
  sampled by area on the extracted mesh for mesh scenes (``extract_mesh()``, the DMTet fine
  stage), iso-level crossings of the density on a grid for density scenes (``density(points)``,
  the NeRF); others are noted and skipped. The path is chosen by what the scene can do.

Resolution: by default the classifier's images are rendered at ``classify_size`` and the IoU
images at ``iou_size`` (cheap on CPU). ``EvalOptions.resolution`` (CLI ``--resolution 512``)
renders every view once at that size for IoU and the contact sheet, and gives the classifier
the same renders area-averaged down to ``classify_size``: the fine stage's detail lives at
512² (its training resolution), and both stages of a comparison are then judged from the
same pixels.

It writes ``<run>/eval/eval.json``, ``eval.md`` (stage x metric table, and for a stage that
started from another evaluated stage -- the fine stage of ``coarse_to_fine`` -- a side-by-side
table with the difference ``stage - source`` per metric) and ``contact_sheet.png`` (the ground
truth, then per stage the renders with the classifier's caption beneath each, same view per
column). A prompt outside the toy world gets classifier captions only.

``aggregate_runs(folder)``: evaluates (or reuses) every run under a folder and averages the
metrics per stage over prompts, and the paired differences (e.g. fine - coarse) over runs.
``evaluate_prior(pipeline)``: samples a pixel prior on toy captions (DDIM, classifier-free
guidance) and classifies the samples.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from magic3d.data.cameras import VIEW_NAMES, orbit_cameras, view_index, view_suffix
from magic3d.devices import module_device, resolve_device
from magic3d.eval.classifier import (
    DEFAULT_FOLDER,
    Prediction,
    ToyWorldClassifier,
    read_metadata,
)
from magic3d.eval.metrics import (
    PromptOutsideToyWorld,
    ToyPrompt,
    area_downsample,
    caption_hits,
    chamfer_distance,
    colour_accuracy,
    density_surface_points,
    janus_rate,
    mesh_surface_points,
    parse_prompt,
    r_precision,
    shape_accuracy,
    silhouette_iou,
    top_captions,
    view_accuracy,
)
from magic3d.toyworld.dataset import ground_truth_views
from magic3d.toyworld.shapes import (
    COLOUR_NAMES,
    SHAPE_NAMES,
    caption,
    get_shape,
    surface_points,
)
from magic3d.types import CameraBatch, Shading

EVAL_DIR = "eval"
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
METRIC_TITLES = {
    "r_precision": "R-precision ↑",
    "colour_accuracy": "colour acc ↑",
    "shape_accuracy": "shape acc ↑",
    "view_accuracy": "view acc ↑",
    "janus_rate": "Janus rate ↓",
    "silhouette_iou": "silhouette IoU ↑",
    "chamfer": "Chamfer ↓",
    "gt_r_precision": "R-precision of GT (ceiling)",
}


# render_chunk counts cameras per scene.render call at this many pixels or fewer; larger
# renders get proportionally fewer cameras per call (a NeRF's memory grows with rays).
_CHUNK_REFERENCE_PIXELS = 128 * 128


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


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


@dataclass
class SceneViews:
    object_rgb: Float[Tensor, "B H W 3"]  # object over the neutral background (CPU)
    opacity: Float[Tensor, "B H W 1"]  # CPU


@torch.no_grad()
def render_object(scene: Any, cameras: CameraBatch, options: EvalOptions) -> SceneViews:
    """Render ``cameras`` and composite the object alone over ``options.background``."""
    device = module_device(scene)
    cameras = cameras.to(device)
    backdrop = torch.tensor(options.background, device=device)
    rgbs, opacities = [], []
    pixels = cameras.height * cameras.width
    per_call = max(1, options.render_chunk * _CHUNK_REFERENCE_PIXELS // max(pixels, _CHUNK_REFERENCE_PIXELS))
    for start in range(0, cameras.batch_size, per_call):
        batch = cameras[start : start + per_call]
        shading = Shading(mode="lambertian", ambient=torch.full((batch.batch_size,), options.ambient, device=device))
        out = scene.render(batch, shading)
        opacity = out.opacity.clamp(0.0, 1.0)
        # rgb = colour * opacity + (1 - opacity) * background: take the learned background out.
        foreground = out.rgb if out.background is None else out.rgb - (1.0 - opacity) * out.background
        rgbs.append((foreground + (1.0 - opacity) * backdrop).clamp(0.0, 1.0).float().cpu())
        opacities.append(opacity.float().cpu())
    return SceneViews(torch.cat(rgbs), torch.cat(opacities))


def empty_views(cameras: CameraBatch, options: EvalOptions) -> SceneViews:
    """What an empty scene shows: the neutral backdrop everywhere, zero opacity."""
    b, h, w = cameras.batch_size, cameras.height, cameras.width
    backdrop = torch.tensor(options.background, dtype=torch.float32)
    return SceneViews(backdrop.expand(b, h, w, 3).clone(), torch.zeros(b, h, w, 1))


def eval_cameras(options: EvalOptions, size: int) -> CameraBatch:
    return orbit_cameras(options.views, options.elevation_deg, options.distance, options.fovy_deg, size, size)


# ---------------------------------------------------------------------------------------------
# One stage
# ---------------------------------------------------------------------------------------------


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


def _classifier_index(names: tuple[str, ...], name: str, what: str) -> int:
    if name not in names:
        raise ValueError(
            f"the evaluator classifier does not know the {what} {name!r} (it knows {names}); "
            "retrain it: python -m magic3d.eval train-classifier"
        )
    return names.index(name)


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

    is_mesh_scene = callable(getattr(scene, "extract_mesh", None))
    mesh = _scene_mesh(scene, notes) if is_mesh_scene else None

    def render(cameras: CameraBatch) -> SceneViews:
        if is_mesh_scene and mesh is None:
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
        shape_id = _classifier_index(classifier.shape_names, target.shape, "shape")
        colour_id = _classifier_index(classifier.colour_names, target.colour, "colour")
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

        if is_mesh_scene:
            if mesh is not None:
                chamfer_detail = _mesh_chamfer(mesh, shape, options, notes)
        elif callable(getattr(scene, "density", None)):
            chamfer_detail = _density_chamfer(scene, shape, options, notes)
        else:
            notes.append(f"{type(scene).__name__} has neither extract_mesh() nor density(points): Chamfer distance skipped")
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


@torch.no_grad()
def _scene_mesh(scene: Any, notes: list[str]) -> Any | None:
    """The mesh scene's current surface, or None (with a note) when it is empty."""
    try:
        mesh = scene.extract_mesh()
    except ValueError as err:  # DMTetScene: the SDF has no zero crossing
        notes.append(f"empty surface, scored as an empty scene: {err}")
        return None
    if mesh.faces.shape[0] == 0:
        notes.append("empty surface (no faces), scored as an empty scene")
        return None
    return mesh


def _mesh_chamfer(mesh: Any, shape: Any, options: EvalOptions, notes: list[str]) -> dict[str, float] | None:
    generator = torch.Generator().manual_seed(options.seed)
    surface = mesh_surface_points(mesh.vertices, mesh.faces, options.chamfer_points, generator=generator)
    if surface.points.shape[0] == 0:
        notes.append("the mesh has no area (degenerate faces only): Chamfer distance skipped")
        return None
    return _chamfer_to_ground_truth(shape, surface.points, options, "mesh", surface_area=surface.area,
                                    n_vertices=surface.n_vertices, n_faces=surface.n_faces)


def _density_chamfer(scene: Any, shape: Any, options: EvalOptions, notes: list[str]) -> dict[str, float] | None:
    device = module_device(scene)
    radius = float(getattr(scene, "radius", 1.0))
    generator = torch.Generator().manual_seed(options.seed)
    surface = density_surface_points(
        scene.density, radius, options.chamfer_resolution, options.chamfer_points, device=device, generator=generator
    )
    if surface.points.shape[0] == 0:
        notes.append(
            f"no voxel has density above {surface.threshold:.1f} (half opacity over one voxel): "
            "the scene is empty at that level, Chamfer distance skipped"
        )
        return None
    return _chamfer_to_ground_truth(shape, surface.points, options, "density", density_threshold=surface.threshold,
                                    occupied_fraction=surface.occupied_fraction, voxel_size=surface.voxel_size)


def _chamfer_to_ground_truth(
    shape: Any, points: Float[Tensor, "P 3"], options: EvalOptions, source: str, **details: float
) -> dict[str, float]:
    gt_points = surface_points(shape, options.chamfer_points, torch.Generator().manual_seed(options.seed))
    result = chamfer_distance(gt_points, points)
    return {"distance": result.distance, "gt_to_pred": result.gt_to_pred, "pred_to_gt": result.pred_to_gt,
            "source": source, **details, "n_points": int(points.shape[0])}


def evaluate_stage(
    stage_dir: Path, classifier: ToyWorldClassifier, options: EvalOptions, device: torch.device
) -> StageResult:
    from magic3d.runs import load_stage_scene, stage_summary

    summary = stage_summary(stage_dir)
    prompt = stage_prompt(stage_dir)
    scene = load_stage_scene(stage_dir, device)
    result = evaluate_scene(scene, prompt, classifier, options, stage=stage_dir.name)
    result.started_from = stage_source(stage_dir)
    result.finished = summary is not None
    if summary is not None:
        result.steps = summary.get("steps")
    else:
        result.notes.append("stage not finished: evaluated its last checkpoint")
        ckpt = torch.load(stage_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        result.steps = int(ckpt.get("global_step", 0))
    return result


# ---------------------------------------------------------------------------------------------
# A run
# ---------------------------------------------------------------------------------------------


@dataclass
class RunEval:
    run: str
    stages: list[StageResult]
    json_path: Path
    markdown_path: Path
    sheet_path: Path
    comparisons: list["StageComparison"] = field(default_factory=list)


@dataclass
class StageComparison:
    """A stage against the stage it started from (fine vs coarse), at the same cameras and
    resolution: ``difference[key] = stage - baseline`` (None where either value is None)."""

    stage: str
    baseline: str
    difference: dict[str, float | None]


def metric_difference(
    stage: dict[str, float | None], baseline: dict[str, float | None]
) -> dict[str, float | None]:
    """``stage - baseline`` for every metric key (None where either side has no value)."""
    return {
        key: None if stage.get(key) is None or baseline.get(key) is None else float(stage[key]) - float(baseline[key])
        for key in METRIC_KEYS
    }


def compare_stages(results: list[StageResult]) -> list[StageComparison]:
    """One comparison per evaluated stage whose ``started_from`` stage was evaluated too."""
    by_name = {r.stage: r for r in results}
    return [
        StageComparison(r.stage, r.started_from, metric_difference(r.metrics, by_name[r.started_from].metrics))
        for r in results
        if r.started_from is not None and r.started_from in by_name
    ]


def _stages_to_evaluate(run_dir: Path, stage: str | None) -> list[Path]:
    from magic3d.runs import stages

    found = stages(run_dir)
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


def load_classifier(classifier: str | Path | ToyWorldClassifier, device: torch.device) -> ToyWorldClassifier:
    if isinstance(classifier, ToyWorldClassifier):
        return classifier.to(device).eval()
    return ToyWorldClassifier.load(classifier, device)


def _classifier_info(classifier: str | Path | ToyWorldClassifier) -> dict[str, Any]:
    if isinstance(classifier, ToyWorldClassifier):
        return {"folder": None}
    meta = read_metadata(classifier)
    return {"folder": str(classifier), "heldout_accuracy": meta.get("heldout_accuracy")}


def evaluate_run(
    run_dir: str | Path,
    options: EvalOptions = EvalOptions(),
    stage: str | None = None,
    classifier: str | Path | ToyWorldClassifier = DEFAULT_FOLDER,
    device: str | torch.device = "auto",
) -> RunEval:
    """Evaluate every finished stage (or ``stage``) and write eval.json / eval.md / contact_sheet.png."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    dev = resolve_device(device)
    model = load_classifier(classifier, dev)
    results = []
    for stage_dir in tqdm(_stages_to_evaluate(run_dir, stage), desc=f"eval {run_dir.name}", unit="stage"):
        results.append(evaluate_stage(stage_dir, model, options, dev))

    comparisons = compare_stages(results)
    out = run_dir / EVAL_DIR
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "run": str(run_dir),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "options": asdict(options),
        "classifier": _classifier_info(classifier),
        "stages": [r.to_json() for r in results],
        "comparisons": [asdict(c) for c in comparisons],
    }
    json_path = out / "eval.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path = out / "eval.md"
    md_path.write_text(run_markdown(run_dir, results, options, report["classifier"]))
    sheet_path = save_contact_sheet(results, out / "contact_sheet.png")
    return RunEval(str(run_dir), results, json_path, md_path, sheet_path, comparisons)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def metrics_table(
    rows: list[tuple[str, dict[str, float | None]]], first: str, extra: list[str] | None = None, signed: bool = False
) -> str:
    extra = extra or []
    header = [first, *extra, *(METRIC_TITLES[k] for k in METRIC_KEYS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    fmt = _signed if signed else _fmt
    for name, values in rows:
        cells = [name, *(str(values.get(e, "")) for e in extra), *(fmt(values.get(k)) for k in METRIC_KEYS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _settings_line(options: EvalOptions) -> str:
    if options.resolution is None:
        pixels = f"classifier at {options.classify_size}px, IoU at {options.iou_size}px"
    else:
        pixels = (f"rendered at {options.resolution}² (IoU and sheet), classifier on those renders "
                  f"area-averaged to {options.classify_size}px")
    return (
        f"{options.views} orbit views, elevation {options.elevation_deg:g}°, distance {options.distance:g}, "
        f"fovy {options.fovy_deg:g}°; {pixels}; Chamfer (scene units) on area samples of the extracted mesh "
        f"(mesh scenes) or on a {options.chamfer_resolution}³ density grid (density scenes)."
    )


def _signed(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:+.{digits}f}"


def comparison_table(
    stage: str, baseline: str, stage_metrics: dict[str, Any], baseline_metrics: dict[str, Any],
    difference: dict[str, float | None],
) -> str:
    """Metric rows, columns baseline | stage | stage − baseline (arrows in the titles say
    which sign is an improvement)."""
    lines = [f"| metric | {baseline} | {stage} | {stage} − {baseline} |", "|---|---|---|---|"]
    for key in METRIC_KEYS:
        lines.append(f"| {METRIC_TITLES[key]} | {_fmt(baseline_metrics.get(key))} | {_fmt(stage_metrics.get(key))} "
                     f"| {_signed(difference.get(key))} |")
    return "\n".join(lines) + "\n"


def run_markdown(
    run_dir: Path, results: list[StageResult], options: EvalOptions, classifier: dict[str, Any] | None = None
) -> str:
    rows = [(r.stage, {**r.metrics, "prompt": r.prompt, "steps": r.steps, "scene": r.scene or ""}) for r in results]
    accuracy = (classifier or {}).get("heldout_accuracy") or {}
    reference = (
        f" Classifier held-out accuracy on toy renders: shape {accuracy['shape']:.1%}, colour {accuracy['colour']:.1%}."
        if "shape" in accuracy and "colour" in accuracy else ""
    )
    text = [
        f"# Evaluation of `{run_dir}`\n",
        f"{_settings_line(options)}{reference}\n",
        metrics_table(rows, "stage", ["prompt", "steps", "scene"]),
    ]
    by_name = {r.stage: r for r in results}
    for comparison in compare_stages(results):
        stage, baseline = by_name[comparison.stage], by_name[comparison.baseline]
        text += [
            f"\n## {comparison.stage} vs {comparison.baseline}\n",
            f"`{comparison.stage}` started from `{comparison.baseline}`; both rendered with the cameras and "
            f"resolution above ({options.render_size}²).\n",
            comparison_table(comparison.stage, comparison.baseline, stage.metrics, baseline.metrics,
                             comparison.difference),
        ]
    notes = [f"- **{r.stage}**: {note}" for r in results for note in r.notes]
    if notes:
        text += ["\n## Notes\n", "\n".join(notes) + "\n"]
    return "\n".join(text)


def _row_summary(result: StageResult) -> str:
    m = result.metrics
    parts = [f"{label} {m[key]:.2f}" for key, label in (("r_precision", "R-prec"), ("silhouette_iou", "IoU"),
                                                        ("chamfer", "Chamfer")) if m.get(key) is not None]
    return f" ({', '.join(parts)})" if parts else ""


def save_contact_sheet(results: list[StageResult], path: Path) -> Path:
    """One column per view: the ground truth of each prompt once, then each stage's renders
    with the predicted caption beneath (green = the prompt's), so stages of a run line up
    view by view (fine under coarse)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: list[tuple[str, StageResult, Tensor, bool]] = []
    gt_shown: set[str] = set()
    for r in results:
        if r.ground_truth is not None and r.prompt not in gt_shown:
            gt_shown.add(r.prompt)
            rows.append((f"ground truth: {r.prompt}", r, r.ground_truth, False))
        if r.renders is not None:
            rows.append((f"{r.stage}: {r.prompt}{_row_summary(r)}", r, r.renders, True))
    n_cols = max((row[2].shape[0] for row in rows), default=1)
    n_rows = max(len(rows), 1)
    # Large enough to see a 512² render's detail (up to 256 px a view at 110 dpi), small at 64-128 px.
    size = max((row[2].shape[1] for row in rows), default=64)
    cell = max(1.3, min(size, 256) / 110)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(cell * n_cols, (cell + 0.35) * n_rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (title, result, images, predicted) in enumerate(rows):
        axes[i, 0].set_title(title, loc="left", fontsize=8)
        for j in range(images.shape[0]):
            ax = axes[i, j]
            ax.imshow(images[j].clamp(0, 1).numpy())
            if predicted:
                view = result.views[j]
                colour = "black" if view.caption_hit is None else ("green" if view.caption_hit else "red")
                label = f"{view.predicted_caption.split(' ', 1)[1]}\n{view.predicted_view} (az {view.azimuth_deg:.0f}°)"
                ax.text(0.5, -0.04, label, transform=ax.transAxes, ha="center", va="top", fontsize=5.5, color=colour)
            else:
                ax.text(0.5, -0.04, f"az {result.views[j].azimuth_deg:.0f}°", transform=ax.transAxes,
                        ha="center", va="top", fontsize=5.5)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Many runs
# ---------------------------------------------------------------------------------------------


@dataclass
class AggregateEval:
    runs: list[str]
    per_stage: dict[str, dict[str, float | int | None]]
    json_path: Path
    markdown_path: Path
    # "fine - coarse": mean over runs of the paired per-run differences (and counts "<key>_n").
    per_comparison: dict[str, dict[str, float | int | None]] = field(default_factory=dict)


def find_runs(folder: Path) -> list[Path]:
    """Run folders under ``folder``: parents of stage folders (``<run>/<stage>/config.yaml``)."""
    runs = {p.parent.parent for p in folder.rglob("config.yaml")}
    return sorted(r for r in runs if (r / EVAL_DIR / "eval.json").is_file() or any(r.glob("*/DONE.json")))


def aggregate_runs(
    folder: str | Path,
    options: EvalOptions = EvalOptions(),
    classifier: str | Path | ToyWorldClassifier = DEFAULT_FOLDER,
    device: str | torch.device = "auto",
    reevaluate: bool = False,
) -> AggregateEval:
    """Evaluate each run under ``folder`` and average every metric per stage over prompts;
    writes eval_summary.json / .md in ``folder``.

    A run's eval.json is reused unless ``reevaluate`` or it was made with other options (for
    example at another ``resolution``): averages never mix settings. Runs whose report compares
    a stage with the stage it started from (fine vs coarse) also give the mean of the paired
    differences, per comparison."""
    folder = Path(folder)
    runs = find_runs(folder)
    if not runs:
        raise FileNotFoundError(f"no runs with a finished stage under {folder}")
    dev = resolve_device(device)
    model = None
    per_run: list[tuple[Path, dict[str, Any]]] = []
    for run in tqdm(runs, desc="runs", unit="run"):
        report_file = run / EVAL_DIR / "eval.json"
        if reevaluate or not _reusable(report_file, options):
            if not reevaluate and report_file.is_file():
                tqdm.write(f"{run}: eval.json was made with other options; evaluating again")
            model = model or load_classifier(classifier, dev)
            evaluate_run(run, options, classifier=model, device=dev)
        per_run.append((run, json.loads(report_file.read_text())))

    grouped: dict[str, list[dict[str, Any]]] = {}
    for _, report in per_run:
        for stage in report["stages"]:
            grouped.setdefault(stage["stage"], []).append(stage)
    per_stage = {name: _mean_metrics([e["metrics"] for e in entries], "prompts") for name, entries in grouped.items()}

    paired: dict[str, list[dict[str, Any]]] = {}
    for _, report in per_run:
        for comparison in report.get("comparisons") or []:  # absent in reports of older versions
            paired.setdefault(f"{comparison['stage']} - {comparison['baseline']}", []).append(comparison["difference"])
    per_comparison = {name: _mean_metrics(diffs, "runs") for name, diffs in paired.items()}

    rows = [
        (f"{Path(run).relative_to(folder) if Path(run) != folder else run.name} / {s['stage']}",
         {**s["metrics"], "prompt": s["prompt"]})
        for run, report in per_run
        for s in report["stages"]
    ]
    summary_rows = [(name, {**values}) for name, values in per_stage.items()]
    md = [
        f"# Evaluation summary of `{folder}` ({len(per_run)} runs)\n",
        f"{_settings_line(options)}\n",
        "Means over prompts per stage (Janus rate over asymmetric objects only; `prompts` = runs with the stage).\n",
        metrics_table(summary_rows, "stage", ["prompts"]),
    ]
    if per_comparison:
        md += [
            "\n## Stage differences (paired per run)\n",
            "Mean over runs of `stage − the stage it started from`, each run compared with itself "
            "(same prompt, cameras and resolution); `runs` = runs with both stages.\n",
            metrics_table([(name, {**values}) for name, values in per_comparison.items()], "difference", ["runs"],
                          signed=True),
        ]
    md += ["\n## Per run\n", metrics_table(rows, "run / stage", ["prompt"])]
    json_path = folder / "eval_summary.json"
    md_path = folder / "eval_summary.md"
    json_path.write_text(json.dumps({
        "folder": str(folder),
        "options": asdict(options),
        "runs": [str(r) for r, _ in per_run],
        "per_stage": per_stage,
        "per_comparison": per_comparison,
        "per_run": [{"run": str(r), "stages": [
            {"stage": s["stage"], "prompt": s["prompt"], "metrics": s["metrics"]} for s in rep["stages"]
        ], "comparisons": rep.get("comparisons") or []} for r, rep in per_run],
    }, indent=2) + "\n")
    md_path.write_text("\n".join(md))
    return AggregateEval([str(r) for r, _ in per_run], per_stage, json_path, md_path, per_comparison)


def _reusable(report_file: Path, options: EvalOptions) -> bool:
    """An eval.json exists and was made with ``options`` (older files: missing keys = defaults)."""
    if not report_file.is_file():
        return False
    try:
        stored = EvalOptions.from_json(json.loads(report_file.read_text()).get("options") or {})
    except (ValueError, TypeError):
        return False
    return _effective_settings(stored) == _effective_settings(options)


def _effective_settings(options: EvalOptions) -> dict[str, Any]:
    """The options that shape the results (``iou_size`` is unused once ``resolution`` is set)."""
    settings = asdict(options)
    if options.resolution is not None:
        settings.pop("iou_size")
    return settings


def _mean_metrics(entries: list[dict[str, Any]], count_key: str) -> dict[str, float | int | None]:
    """Mean per metric key over the entries that have a value, with ``<key>_n`` counts."""
    summary: dict[str, float | int | None] = {count_key: len(entries)}
    for key in METRIC_KEYS:
        values = [e[key] for e in entries if e.get(key) is not None]
        summary[key] = float(np.mean(values)) if values else None
        summary[f"{key}_n"] = len(values)
    return summary


# ---------------------------------------------------------------------------------------------
# A pixel prior
# ---------------------------------------------------------------------------------------------


@dataclass
class PriorEval:
    pipeline: str
    n_images: int
    shape_accuracy: float
    colour_accuracy: float
    caption_accuracy: float  # both right
    view_accuracy_asymmetric: float | None  # requested view = predicted, asymmetric shapes only
    per_shape_accuracy: dict[str, float]
    per_colour_accuracy: dict[str, float]
    settings: dict[str, Any]
    seconds: float
    samples: Tensor | None = None  # (N, H, W, 3) in [0, 1], for the sample sheet

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("samples")
        return data


@dataclass
class PriorPipeline:
    """The parts of an embedded prior folder that sampling needs (fp32, on one device)."""

    unet: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict[str, Any]
    vae: Any = None  # latent priors only
    scaling_factor: float = 1.0


def load_prior_pipeline(folder: Path, device: torch.device) -> PriorPipeline:
    """A pixel (IF layout) or latent (Stable Diffusion layout: with vae/) prior folder, fp32."""
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer

    missing = [p for p in ("unet", "text_encoder", "tokenizer", "scheduler") if not (folder / p).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{folder} is not a prior pipeline folder: no {', '.join(m + '/' for m in missing)} "
            "(expected unet/, text_encoder/, tokenizer/, scheduler/ [, vae/] as written by python -m magic3d.priors)"
        )
    index_file = folder / "model_index.json"
    encoder_class = "T5EncoderModel"
    if index_file.is_file():
        encoder_class = json.loads(index_file.read_text()).get("text_encoder", [None, encoder_class])[1]
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32).to(device).eval()
    text_encoder = getattr(transformers, encoder_class).from_pretrained(folder / "text_encoder", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    vae, scaling = None, 1.0
    if (folder / "vae").is_dir():
        vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32).to(device).eval()
        scaling = float(vae.config.scaling_factor)
    return PriorPipeline(unet, text_encoder.to(device).eval(), tokenizer, json.loads(scheduler_file.read_text()),
                         vae, scaling)


def prior_captions(
    shapes: tuple[str, ...], colours: tuple[str, ...], n_per_caption: int
) -> tuple[list[str], list[tuple[int, int, int]]]:
    """Every shape x colour, ``n_per_caption`` samples each with the view suffix cycling
    front, side, back, overhead; returns the captions and (shape id, colour id, view id)."""
    captions, labels = [], []
    for shape in shapes:
        for colour in colours:
            for k in range(n_per_caption):
                view = k % len(VIEW_NAMES)
                captions.append(caption(shape, colour, view_suffix(view)))
                labels.append((SHAPE_NAMES.index(shape), COLOUR_NAMES.index(colour), view))
    return captions, labels


@torch.no_grad()
def evaluate_prior(
    pipeline_folder: str | Path,
    n_per_caption: int = 8,
    steps: int = 50,
    guidance_scale: float = 5.0,
    classifier: str | Path | ToyWorldClassifier = DEFAULT_FOLDER,
    shapes: tuple[str, ...] = (),
    colours: tuple[str, ...] = (),
    batch_size: int = 256,
    device: str | torch.device = "auto",
    seed: int = 0,
) -> PriorEval:
    """Sample the prior (DDIM, CFG against "") on toy captions and classify the samples.

    Works for pixel and latent priors (latents decoded by the prior's VAE). Empty ``shapes`` /
    ``colours`` mean all of them. Samples of another size than the classifier's input (the
    tiny test pipeline is 32x32, the latent prior 256x256) are resized by the classifier.
    """
    from magic3d.priors.train import (
        ddim_sample,  # the priors' own sampler and text path
    )

    if n_per_caption < 1:
        raise ValueError(f"n_per_caption={n_per_caption} must be >= 1")
    started = time.time()
    folder = Path(pipeline_folder)
    dev = resolve_device(device)
    model = load_classifier(classifier, dev)
    pipe = load_prior_pipeline(folder, dev)
    shapes = tuple(shapes) or SHAPE_NAMES
    colours = tuple(colours) or COLOUR_NAMES
    captions, labels = prior_captions(shapes, colours, n_per_caption)

    images = []
    for k, start in enumerate(tqdm(range(0, len(captions), batch_size), desc="prior samples", unit="batch")):
        batch = ddim_sample(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler_config,
                            captions[start : start + batch_size], steps, guidance_scale, seed=seed + k,
                            vae=pipe.vae, scaling_factor=pipe.scaling_factor)
        images.append(batch.float() / 255.0)
    samples = torch.cat(images)
    prediction: Prediction = model.predict(samples)

    label = torch.tensor(labels)
    shape_idx = torch.tensor([_classifier_index(model.shape_names, SHAPE_NAMES[s], "shape") for s in label[:, 0].tolist()])
    colour_idx = torch.tensor([_classifier_index(model.colour_names, COLOUR_NAMES[c], "colour") for c in label[:, 1].tolist()])
    shape_ok = prediction.shape_logits.argmax(-1) == shape_idx
    colour_ok = prediction.colour_logits.argmax(-1) == colour_idx
    view_ok = prediction.view_logits.argmax(-1) == label[:, 2]
    asymmetric = torch.tensor([get_shape(SHAPE_NAMES[s]).asymmetric for s in label[:, 0].tolist()])
    return PriorEval(
        pipeline=str(folder),
        n_images=len(captions),
        shape_accuracy=float(shape_ok.float().mean()),
        colour_accuracy=float(colour_ok.float().mean()),
        caption_accuracy=float((shape_ok & colour_ok).float().mean()),
        view_accuracy_asymmetric=float(view_ok[asymmetric].float().mean()) if bool(asymmetric.any()) else None,
        per_shape_accuracy={s: float(shape_ok[label[:, 0] == SHAPE_NAMES.index(s)].float().mean()) for s in shapes},
        per_colour_accuracy={c: float(colour_ok[label[:, 1] == COLOUR_NAMES.index(c)].float().mean()) for c in colours},
        settings={"n_per_caption": n_per_caption, "steps": steps, "guidance_scale": guidance_scale,
                  "shapes": list(shapes), "colours": list(colours), "seed": seed, "sampler": "DDIM",
                  "classifier": _classifier_info(classifier)},
        seconds=round(time.time() - started, 1),
        samples=samples,
    )


def prior_quality_markdown(result: PriorEval | dict[str, Any], report: Path | str | None = None) -> str:
    """The model card's Quality section from a prior evaluation (object or its JSON)."""
    data = result.to_json() if isinstance(result, PriorEval) else result
    s = data["settings"]
    held = s.get("classifier", {}).get("heldout_accuracy", {})
    ceiling = f" (the evaluator's own held-out accuracy: shape {held['shape']:.3f}, colour {held['colour']:.3f})" if held else ""
    worst = sorted(data["per_shape_accuracy"].items(), key=lambda kv: kv[1])[:3]
    lines = [
        f"Toy-world evaluator on {data['n_images']} DDIM samples ({s['steps']} steps, guidance "
        f"{s['guidance_scale']:g}, {s['n_per_caption']} per caption over every shape and colour, view "
        f"suffixes cycling {', '.join(VIEW_NAMES)}){ceiling}. Targets (issue 3): shape and colour "
        "accuracy >= 0.90, view >= 0.80 on asymmetric objects.",
        "",
        "| shape acc | colour acc | caption acc | view acc (asymmetric) |",
        "|---|---|---|---|",
        f"| {_fmt(data['shape_accuracy'])} | {_fmt(data['colour_accuracy'])} | {_fmt(data['caption_accuracy'])} "
        f"| {_fmt(data['view_accuracy_asymmetric'])} |",
        "",
        "Per colour: " + ", ".join(f"{k} {v:.2f}" for k, v in data["per_colour_accuracy"].items()) + ".",
        "Hardest shapes: " + ", ".join(f"{k} {v:.2f}" for k, v in worst) + ".",
    ]
    if report is not None:
        lines += ["", f"Report: `{report}` (reproduce with `python -m magic3d.eval prior <this folder>`)."]
    return "\n".join(lines)


def write_prior_report(result: PriorEval, out: str | Path, max_images: int = 64) -> tuple[Path, Path, Path]:
    """prior_eval.json, prior_eval.md and a sheet of the first ``max_images`` samples in ``out``."""
    from magic3d.visuals import save_png

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "prior_eval.json"
    json_path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    md_path = out / "prior_eval.md"
    s = result.settings
    md_path.write_text(
        f"# Prior evaluation of `{result.pipeline}`\n\n"
        f"{result.n_images} DDIM samples ({s['steps']} steps, guidance {s['guidance_scale']:g}, "
        f"{s['n_per_caption']} per caption, view suffixes cycling {', '.join(VIEW_NAMES)}).\n\n"
        "| shape acc | colour acc | caption acc | view acc (asymmetric) |\n|---|---|---|---|\n"
        f"| {_fmt(result.shape_accuracy)} | {_fmt(result.colour_accuracy)} | {_fmt(result.caption_accuracy)} "
        f"| {_fmt(result.view_accuracy_asymmetric)} |\n"
    )
    sheet_path = out / "prior_samples.png"
    if result.samples is not None and result.samples.shape[0] > 0:
        images = result.samples[:max_images]
        n, h, w, _ = images.shape
        cols = min(n, 16)
        rows = math.ceil(n / cols)
        grid = torch.ones(rows * h, cols * w, 3)
        for i in range(n):
            r, c = divmod(i, cols)
            grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = images[i]
        save_png(grid, sheet_path)
    return json_path, md_path, sheet_path
