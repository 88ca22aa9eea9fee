"""Chamfer distance between a scene's surface and the toy-world ground truth.

The surface depends on what the scene can do: points sampled by area on the extracted mesh
for mesh scenes (the DMTet fine stage), the visible surface of the density on a grid for
density scenes (the NeRF; the rule conversion and export use); other scenes are noted and
skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from magic3d.eval.metrics import chamfer_distance, density_surface_points, mesh_surface_points
from magic3d.eval.options import EvalOptions
from magic3d.ops.marching_tets import Mesh
from magic3d.scenes.base import DensityField, Scene
from magic3d.toyworld.shapes import Shape, surface_points


@dataclass
class SceneSurface:
    """Whether a scene has a mesh of its own, and that mesh (None when it is empty)."""

    is_mesh_scene: bool
    mesh: Mesh | None


def scene_surface(scene: Scene, notes: list[str]) -> SceneSurface:
    """The scene's own mesh; an empty one (DMTet with no SDF sign change) is noted and None."""
    try:
        mesh = scene.extract_mesh()
    except ValueError as err:  # DMTetScene: the SDF has no zero crossing
        notes.append(f"empty surface, scored as an empty scene: {err}")
        return SceneSurface(True, None)
    if mesh is None:
        return SceneSurface(False, None)
    if mesh.faces.shape[0] == 0:
        notes.append("empty surface (no faces), scored as an empty scene")
        return SceneSurface(True, None)
    return SceneSurface(True, mesh)


def scene_chamfer(
    scene: Scene, surface: SceneSurface, shape: Shape, options: EvalOptions, notes: list[str]
) -> dict[str, float] | None:
    """The Chamfer detail of ``scene`` (``surface``: its own mesh, see :func:`scene_surface`),
    or None with a note saying why there is none."""
    if surface.is_mesh_scene:
        return None if surface.mesh is None else mesh_chamfer(surface.mesh, shape, options, notes)
    field = scene.density_field()
    if field is not None:
        return density_chamfer(field, shape, options, notes)
    notes.append(f"{type(scene).__name__} has neither a mesh nor a density field: Chamfer distance skipped")
    return None


def mesh_chamfer(mesh: Mesh, shape: Shape, options: EvalOptions, notes: list[str]) -> dict[str, float] | None:
    generator = torch.Generator().manual_seed(options.seed)
    surface = mesh_surface_points(mesh.vertices, mesh.faces, options.chamfer_points, generator=generator)
    if surface.points.shape[0] == 0:
        notes.append("the mesh has no area (degenerate faces only): Chamfer distance skipped")
        return None
    return chamfer_to_ground_truth(shape, surface.points, options, "mesh", surface_area=surface.area,
                                   n_vertices=surface.n_vertices, n_faces=surface.n_faces)


def density_chamfer(field: DensityField, shape: Shape, options: EvalOptions,
                    notes: list[str]) -> dict[str, float] | None:
    generator = torch.Generator().manual_seed(options.seed)
    surface = density_surface_points(field.density, field.radius, options.chamfer_resolution,
                                     options.chamfer_points, device=field.device, generator=generator)
    if surface.level is None:
        notes.append(
            f"nothing in the scene is opaque (largest optical depth from outside {surface.max_optical_depth:.3g} "
            f"< ln 2 on a {options.chamfer_resolution}^3 grid): no visible surface, Chamfer distance skipped"
        )
        return None
    return chamfer_to_ground_truth(shape, surface.points, options, "density", density_level=surface.level,
                                   occupied_fraction=surface.occupied_fraction, voxel_size=surface.voxel_size)


def chamfer_to_ground_truth(
    shape: Shape, points: Float[Tensor, "P 3"], options: EvalOptions, source: str, **details: float
) -> dict[str, float]:
    gt_points = surface_points(shape, options.chamfer_points, torch.Generator().manual_seed(options.seed))
    result = chamfer_distance(gt_points, points)
    return {"distance": result.distance, "gt_to_pred": result.gt_to_pred, "pred_to_gt": result.pred_to_gt,
            "source": source, **details, "n_points": int(points.shape[0])}
