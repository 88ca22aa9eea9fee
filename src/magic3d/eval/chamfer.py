"""Chamfer distance between a scene's surface and the toy-world ground truth.

The surface depends on what the scene can do: points sampled by area on the extracted mesh
for mesh scenes (the DMTet fine stage), the visible surface of the density on a grid for
density scenes (the NeRF; the rule conversion and export use); other scenes are noted and
skipped.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from magic3d.devices import module_device
from magic3d.eval.abilities import can_extract_mesh, can_query_density, scene_radius
from magic3d.eval.metrics import chamfer_distance, density_surface_points, mesh_surface_points
from magic3d.eval.options import EvalOptions
from magic3d.ops.marching_tets import Mesh
from magic3d.toyworld.shapes import Shape, surface_points


def scene_chamfer(
    scene: Any, mesh: Mesh | None, shape: Shape, options: EvalOptions, notes: list[str]
) -> dict[str, float] | None:
    """The Chamfer detail of ``scene`` (``mesh``: its extracted surface, None when it is empty),
    or None with a note saying why there is none."""
    if can_extract_mesh(scene):
        return None if mesh is None else mesh_chamfer(mesh, shape, options, notes)
    if can_query_density(scene):
        return density_chamfer(scene, shape, options, notes)
    notes.append(f"{type(scene).__name__} has neither extract_mesh() nor density(points): Chamfer distance skipped")
    return None


def mesh_chamfer(mesh: Mesh, shape: Shape, options: EvalOptions, notes: list[str]) -> dict[str, float] | None:
    generator = torch.Generator().manual_seed(options.seed)
    surface = mesh_surface_points(mesh.vertices, mesh.faces, options.chamfer_points, generator=generator)
    if surface.points.shape[0] == 0:
        notes.append("the mesh has no area (degenerate faces only): Chamfer distance skipped")
        return None
    return chamfer_to_ground_truth(shape, surface.points, options, "mesh", surface_area=surface.area,
                                   n_vertices=surface.n_vertices, n_faces=surface.n_faces)


def density_chamfer(scene: Any, shape: Shape, options: EvalOptions, notes: list[str]) -> dict[str, float] | None:
    generator = torch.Generator().manual_seed(options.seed)
    surface = density_surface_points(scene.density, scene_radius(scene), options.chamfer_resolution,
                                     options.chamfer_points, device=module_device(scene), generator=generator)
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
