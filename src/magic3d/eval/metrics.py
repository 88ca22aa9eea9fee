"""Quality metrics for text-to-3D results against the toy world's ground truth (pure functions).

- Prompt parsing: "a red cube" / "an orange duck, back view" -> toy-world (shape, colour, view).
- Classifier metrics on rendered views: R-precision over every toy-world caption, shape and
  colour accuracy, view accuracy, Janus rate (back views that look like front views).
- Geometry: silhouette IoU against ground-truth masks, Chamfer distance between ground-truth
  surface samples and the surface of a density field (NeRF; its visible surface, the rule
  conversion and export use) or of a triangle mesh (DMTet).
- Images: area-average downsampling (high-resolution renders to the classifier's input).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from magic3d.data.cameras import VIEW_NAMES, view_index
from magic3d.eval.classifier import Prediction
from magic3d.ops.volume import DensityFn
from magic3d.ops.voxels import sample_density_grid, visible_solid, visible_surface_points
from magic3d.toyworld.shapes import COLOUR_NAMES, SHAPE_NAMES, caption

# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


class PromptOutsideToyWorld(ValueError):
    """The prompt does not name a toy-world object, so there is no ground truth for it."""


@dataclass(frozen=True)
class ToyPrompt:
    """A prompt read as a toy-world caption; ids index ``SHAPE_NAMES`` / ``COLOUR_NAMES``."""

    shape: str
    colour: str
    view: str | None = None  # "front", "side", "back", "overhead" when the prompt names one

    @property
    def shape_id(self) -> int:
        return SHAPE_NAMES.index(self.shape)

    @property
    def colour_id(self) -> int:
        return COLOUR_NAMES.index(self.colour)

    @property
    def view_id(self) -> int | None:
        return None if self.view is None else VIEW_NAMES.index(self.view)

    @property
    def caption(self) -> str:
        """The bare caption ("a red cube"), the classifier's unit of R-precision."""
        return caption(self.shape, self.colour)


_PROMPT = re.compile(r"^(?:(?:a|an|the)\s+)?(?P<colour>[a-z]+)\s+(?P<shape>[a-z]+)(?:\s*,\s*(?P<view>[a-z]+)\s+view)?$")


def parse_prompt(prompt: str) -> ToyPrompt:
    """Read ``"a red cube"``, ``"an orange duck"`` or ``"a blue car, back view"``.

    Case, surrounding spaces and a final full stop are ignored; the article is optional.
    Raises :class:`PromptOutsideToyWorld` (a ``ValueError``) naming what did not match.
    """
    text = " ".join(prompt.strip().lower().rstrip(".").split())
    match = _PROMPT.match(text)
    expected = f"'a <colour> <shape>[, <view> view]' with colour in {COLOUR_NAMES}, shape in {SHAPE_NAMES}"
    if match is None:
        raise PromptOutsideToyWorld(f"prompt {prompt!r} is not a toy-world caption: expected {expected}")
    colour, shape, view = match["colour"], match["shape"], match["view"]
    if colour not in COLOUR_NAMES:
        raise PromptOutsideToyWorld(f"prompt {prompt!r}: colour {colour!r} is not in the toy world {COLOUR_NAMES}")
    if shape not in SHAPE_NAMES:
        raise PromptOutsideToyWorld(f"prompt {prompt!r}: shape {shape!r} is not in the toy world {SHAPE_NAMES}")
    if view is not None and view not in VIEW_NAMES:
        raise PromptOutsideToyWorld(f"prompt {prompt!r}: view {view!r} is not one of {VIEW_NAMES}")
    return ToyPrompt(shape=shape, colour=colour, view=view)


# ---------------------------------------------------------------------------------------------
# Classifier-based metrics
# ---------------------------------------------------------------------------------------------


def caption_log_probs(prediction: Prediction) -> Float[Tensor, "B S C"]:
    """Joint caption score log p(shape) + log p(colour) for every (shape, colour) caption."""
    log_shape = F.log_softmax(prediction.shape_logits.float(), dim=-1)
    log_colour = F.log_softmax(prediction.colour_logits.float(), dim=-1)
    return log_shape[:, :, None] + log_colour[:, None, :]


def top_captions(prediction: Prediction) -> tuple[Int[Tensor, "B"], Int[Tensor, "B"]]:
    """(shape index, colour index) of the best-scoring caption per view."""
    scores = caption_log_probs(prediction)
    n_colours = scores.shape[-1]
    best = scores.flatten(1).argmax(dim=-1)
    return torch.div(best, n_colours, rounding_mode="floor"), best % n_colours


def caption_hits(prediction: Prediction, shape_id: int, colour_id: int) -> Bool[Tensor, "B"]:
    """True for each view whose top caption among ALL captions is the prompt's."""
    shapes, colours = top_captions(prediction)
    return (shapes == shape_id) & (colours == colour_id)


def r_precision(prediction: Prediction, shape_id: int, colour_id: int) -> float:
    """Share of views whose top caption (over every shape x colour) is the prompt's (R = 1)."""
    return float(caption_hits(prediction, shape_id, colour_id).float().mean())


def shape_accuracy(prediction: Prediction, shape_id: int) -> float:
    return float((prediction.shape_logits.argmax(-1) == shape_id).float().mean())


def colour_accuracy(prediction: Prediction, colour_id: int) -> float:
    return float((prediction.colour_logits.argmax(-1) == colour_id).float().mean())


def view_accuracy(prediction: Prediction, view_ids: Int[Tensor, "B"]) -> float:
    """Share of views whose predicted view (front/side/back/overhead) is the camera's."""
    return float((prediction.view_logits.argmax(-1).cpu() == view_ids.cpu()).float().mean())


def janus_rate(
    prediction: Prediction, elevation: Float[Tensor, "B"], azimuth: Float[Tensor, "B"]
) -> float | None:
    """Share of back views (|azimuth| > 135 deg, not overhead) that the view head calls "front".

    Meaningful for asymmetric objects only (a sphere's back is its front); the caller decides.
    None when no camera is a back view.
    """
    back = view_index(elevation.cpu(), azimuth.cpu()) == VIEW_NAMES.index("back")
    if not bool(back.any()):
        return None
    called_front = prediction.view_logits.argmax(-1).cpu() == VIEW_NAMES.index("front")
    return float(called_front[back].float().mean())


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------


def silhouette_iou(
    opacity: Float[Tensor, "B H W 1"] | Float[Tensor, "B H W"],
    mask: Float[Tensor, "B H W 1"] | Float[Tensor, "B H W"],
    threshold: float = 0.5,
) -> Float[Tensor, "B"]:
    """Per-view IoU of ``opacity > threshold`` and ``mask > threshold``; 1 when both are empty."""
    if opacity.shape != mask.shape:
        raise ValueError(f"opacity {tuple(opacity.shape)} and mask {tuple(mask.shape)} must have the same shape")
    a = (opacity > threshold).flatten(1)
    b = (mask.to(opacity.device) > threshold).flatten(1)
    inter = (a & b).sum(-1).float()
    union = (a | b).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(union))


@dataclass
class ChamferResult:
    """Symmetric Chamfer distance = mean of the two directed mean nearest-neighbour distances."""

    distance: float
    gt_to_pred: float  # completeness: how far ground-truth surface is from the reconstruction
    pred_to_gt: float  # accuracy: how far the reconstruction is from the ground truth


def nearest_distances(
    source: Float[Tensor, "P 3"], target: Float[Tensor, "Q 3"], chunk: int = 4096
) -> Float[Tensor, "P"]:
    """Distance from each source point to its nearest target point (chunked ``cdist``).

    Direct differences, not the |a|^2 + |b|^2 - 2ab matrix-product shortcut, whose
    cancellation error (~1e-7 in squared distance) would show as ~3e-4 on coincident points.
    """
    if target.shape[0] == 0:
        raise ValueError("nearest_distances: the target point set is empty")
    target = target.to(source)
    return torch.cat([
        torch.cdist(source[i : i + chunk], target, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
        for i in range(0, source.shape[0], chunk)
    ])


def chamfer_distance(gt: Float[Tensor, "P 3"], pred: Float[Tensor, "Q 3"], chunk: int = 4096) -> ChamferResult:
    """Symmetric mean nearest-neighbour distance between two point sets (same units as the points)."""
    if gt.shape[0] == 0 or pred.shape[0] == 0:
        raise ValueError(f"chamfer_distance needs two non-empty point sets, got {gt.shape[0]} and {pred.shape[0]}")
    gt_to_pred = float(nearest_distances(gt, pred, chunk).mean())
    pred_to_gt = float(nearest_distances(pred.to(gt), gt, chunk).mean())
    return ChamferResult(0.5 * (gt_to_pred + pred_to_gt), gt_to_pred, pred_to_gt)


@dataclass
class DensitySurface:
    points: Float[Tensor, "N 3"]  # visible-surface points (subsampled), CPU
    level: float | None  # median density where the visible solid meets the outside; None: nothing opaque
    occupied_fraction: float  # share of the grid's voxels in the visible solid
    voxel_size: float
    max_optical_depth: float  # largest optical depth from outside (< ln 2: nothing is opaque)


@torch.no_grad()
def density_surface_points(
    density: DensityFn,
    radius: float,
    resolution: int = 96,
    n_points: int = 5000,
    device: torch.device | str = "cpu",
    chunk: int = 1 << 18,
    generator: torch.Generator | None = None,
) -> DensitySurface:
    """Surface samples of a density field by the visible-surface rule that conversion and
    export use (``magic3d.ops.voxels``): where the optical depth from outside reaches ln 2.

    The field is sampled at voxel centres of a ``resolution``^3 grid over [-radius, radius]^3.
    A fixed density level (half opacity over one voxel) would report "no surface" for soft
    NeRFs that render opaque through their thickness without any voxel reaching it. At most
    ``n_points`` are kept (random subset from ``generator``); a field with nothing opaque
    gives no points.
    """
    h = 2.0 * radius / resolution
    grid = sample_density_grid(density, radius, resolution, device, chunk)
    visible = visible_solid(grid, h)
    points = visible_surface_points(grid, radius).cpu()
    if points.shape[0] > n_points:
        points = points[torch.randperm(points.shape[0], generator=generator)[:n_points]]
    return DensitySurface(points, visible.boundary_level, float(visible.solid.float().mean()), h,
                          visible.max_optical_depth)


@dataclass
class MeshSurface:
    points: Float[Tensor, "N 3"]  # area-uniform samples on the triangles, CPU
    area: float  # total surface area (scene units squared)
    n_vertices: int
    n_faces: int


@torch.no_grad()
def mesh_surface_points(
    vertices: Float[Tensor, "V 3"],
    faces: Int[Tensor, "F 3"],
    n_points: int = 5000,
    generator: torch.Generator | None = None,
) -> MeshSurface:
    """``n_points`` samples uniform by area on a triangle mesh (for Chamfer distances).

    A face is drawn with probability proportional to its area, then a point uniform inside it
    with the square-root barycentric map (u = 1 - sqrt(r1), v = sqrt(r1) (1 - r2)), so every
    unit of surface gets the same expected number of points, as ``surface_points`` gives the
    ground truth. Degenerate (zero-area) faces are never drawn. Runs on CPU in float64 (a
    few thousand points; the area weights of tiny faces stay exact). No faces (or zero total
    area) give no points.
    """
    if n_points < 1:
        raise ValueError(f"n_points={n_points} must be >= 1")
    v = vertices.detach().to("cpu", torch.float64)
    f = faces.detach().to("cpu", torch.long)
    corners = v[f]  # (F, 3, 3)
    area = 0.5 * torch.linalg.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]).norm(dim=-1)
    total = float(area.sum()) if f.shape[0] else 0.0
    if total <= 0.0:
        return MeshSurface(v.new_zeros(0, 3).float(), 0.0, int(v.shape[0]), int(f.shape[0]))
    chosen = torch.multinomial(area, n_points, replacement=True, generator=generator)
    r1, r2 = torch.rand(2, n_points, generator=generator, dtype=torch.float64)
    s = r1.sqrt()
    u, w = 1.0 - s, s * (1.0 - r2)  # weights of corners 0 and 1; corner 2 gets the rest
    tri = corners[chosen]
    points = u[:, None] * tri[:, 0] + w[:, None] * tri[:, 1] + (1.0 - u - w)[:, None] * tri[:, 2]
    return MeshSurface(points.float(), total, int(v.shape[0]), int(f.shape[0]))


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def area_downsample(images: Float[Tensor, "B H W C"], size: int) -> Float[Tensor, "B h w C"]:
    """Box-filter channel-last images down to ``size`` x ``size`` (identity at that size).

    Each output pixel is the mean of the input pixels it covers (``F.interpolate`` "area" =
    adaptive average pooling; exact box averages when the size divides the input): the
    picture a camera integrating light over the larger pixel would take, i.e. a render at
    ``size`` with many samples per pixel. Bilinear resampling (even antialiased) weights
    pixels by a tent instead and blurs across block edges; plain subsampling aliases thin
    high-resolution detail away or into jaggies.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, H, W, C) channel-last, got {tuple(images.shape)}")
    h, w = images.shape[1:3]
    if size > min(h, w):
        raise ValueError(f"area_downsample: size={size} is larger than the {h}x{w} images (it only shrinks)")
    if (h, w) == (size, size):
        return images
    x = images.permute(0, 3, 1, 2).float()
    return F.interpolate(x, size=(size, size), mode="area").permute(0, 2, 3, 1).contiguous()
