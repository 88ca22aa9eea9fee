"""Magic3D's fine scene (§4.2-4.3): a textured mesh on a deformable tetrahedral grid (DMTet).

Geometry: one SDF value ``s_i`` and one offset ``Δv_i`` per grid vertex; the surface is the
zero level set extracted by differentiable marching tetrahedra on the deformed vertices.
Texture: a neural colour field (hash grid + small MLP, sigmoid albedo) queried at the
rasterised surface points. Rendering rasterises the mesh (nvdiffrast semantics), shades it
with the same soft Lambertian model as the coarse NeRF, composites it over the environment
map and antialiases colour and mask together: the antialias step is the only source of
silhouette gradients for the vertices (and through them the SDF).

The grid covers a box stored in the ``bbox`` buffer (so checkpoints restore it): the
converter from the coarse NeRF (:func:`magic3d.scenes.convert.nerf_to_dmtet`) tightens it
around the object, which gives the fixed tet budget to the object instead of empty space.
The texture field is addressed in the same box. Offsets are ``tanh(deformation) *
deformation_scale * spacing`` per axis, so a vertex never leaves its neighbourhood.

Without a conversion, the SDF starts as a sphere of radius ``sphere_radius``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from magic3d.data.cameras import mvp
from magic3d.data.rays import camera_rays
from magic3d.ops.hashgrid import HashGrid
from magic3d.ops.marching_tets import Mesh, marching_tets
from magic3d.ops.raster import Rasterizer
from magic3d.ops.tetgrid import make_tet_grid
from magic3d.scenes.background import EnvironmentMapBackground
from magic3d.scenes.base import SceneModule, shade
from magic3d.types import CameraBatch, RenderOutput, Shading

# Faces below this fraction of the mean face area are degenerate for normal consistency.
_DEGENERATE_AREA = 1e-3


def face_normals(vertices: Float[Tensor, "M 3"], faces: Tensor) -> Float[Tensor, "F 3"]:
    """Unnormalised face normals: their length is twice the face area (area weighting)."""
    p0, p1, p2 = vertices[faces].unbind(-2)
    return torch.linalg.cross(p1 - p0, p2 - p0)


def vertex_normals(vertices: Float[Tensor, "M 3"], faces: Tensor) -> Float[Tensor, "M 3"]:
    """Area-weighted average of the adjacent face normals, unit length (0 for lone vertices)."""
    fn = face_normals(vertices, faces)
    acc = torch.zeros_like(vertices)
    for corner in range(3):
        acc = acc.index_add(0, faces[:, corner], fn)
    return F.normalize(acc, dim=-1)


def _edge_face_pairs(faces: Tensor, n_vertices: int) -> tuple[Tensor, Tensor]:
    """Indices of the two faces sharing each interior edge (boundary edges are left out).

    An edge met by more than two faces (non-manifold) contributes its consecutive pairs in
    sorted order; marching tets meshes are manifold, so this is only a fallback.
    """
    faces = faces.long()
    n_faces = faces.shape[0]
    a = faces[:, [0, 1, 2]].reshape(-1)
    b = faces[:, [1, 2, 0]].reshape(-1)
    # The vertex count keys the edges: faces.max() would sync the GPU on every render.
    key = torch.minimum(a, b) * max(n_vertices, 1) + torch.maximum(a, b)
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    same = sorted_key[1:] == sorted_key[:-1]
    face = torch.arange(n_faces, device=faces.device).repeat_interleave(3)[order]
    return face[:-1][same], face[1:][same]


def normal_consistency(mesh: Mesh) -> Float[Tensor, ""]:
    """Mean over interior edges of 1 - cos(angle between the normals of its two faces).

    0 for a flat (or consistently oriented planar) mesh; grows with crumpling. Pairs with a
    (near-)degenerate face -- area below ``1e-3`` of the mean, which marching tets makes where
    an SDF value is (close to) zero -- are left out: such a face's normal is arbitrary and the
    gradient of normalising it scales with 1 / area, which blows up under the large weights
    this term gets (1e4 in threestudio).
    """
    if mesh.is_empty:
        return mesh.vertices.sum() * 0.0
    raw = face_normals(mesh.vertices, mesh.faces)
    area = raw.detach().norm(dim=-1)
    f0, f1 = _edge_face_pairs(mesh.faces, mesh.vertices.shape[0])
    keep = (area[f0] > _DEGENERATE_AREA * area.mean()) & (area[f1] > _DEGENERATE_AREA * area.mean())
    f0, f1 = f0[keep], f1[keep]
    if f0.numel() == 0:
        return mesh.vertices.sum() * 0.0
    normals = F.normalize(raw, dim=-1)  # kept faces have a well-defined normal
    return (1.0 - (normals[f0] * normals[f1]).sum(-1)).mean()


def laplacian_smoothness(mesh: Mesh) -> Float[Tensor, ""]:
    """Uniform Laplacian: mean over vertices of |mean(neighbours) - vertex|^2."""
    if mesh.is_empty:
        return mesh.vertices.sum() * 0.0
    faces = mesh.faces.long()
    a = faces[:, [0, 1, 2]].reshape(-1)
    b = faces[:, [1, 2, 0]].reshape(-1)
    edges = torch.unique(torch.stack([torch.minimum(a, b), torch.maximum(a, b)], -1), dim=0)
    src = torch.cat([edges[:, 0], edges[:, 1]])
    dst = torch.cat([edges[:, 1], edges[:, 0]])
    v = mesh.vertices
    neighbour_sum = torch.zeros_like(v).index_add(0, src, v[dst])
    degree = torch.zeros(v.shape[0], device=v.device, dtype=v.dtype).index_add(
        0, src, torch.ones_like(src, dtype=v.dtype))
    used = degree > 0
    offset = neighbour_sum[used] / degree[used, None] - v[used]
    return offset.square().sum(-1).mean()


class DMTetScene(SceneModule):
    """Textured DMTet mesh (Magic3D fine stage).

    ``tet_resolution`` counts grid cubes per axis (BCC n = 51 has about as many vertices as
    the "128" grid of DMTet/threestudio; see ``magic3d.ops.tetgrid``). The grid spans
    ``[-bbox_radius, bbox_radius]^3`` until a converter tightens it. ``deformation_scale`` is
    the largest vertex offset as a fraction of the grid spacing. The texture arguments mirror
    :class:`~magic3d.ops.hashgrid.HashGrid`. ``raster_backend``: "torch" (any device),
    "triton" (the z-buffer fill as a Triton kernel, CUDA), "nvdiffrast" (CUDA, when installed)
    or "auto" (nvdiffrast, else triton, else torch: :class:`~magic3d.ops.raster.Rasterizer`). ``background`` defaults to a fresh
    :class:`EnvironmentMapBackground`.

    The regularisers are exposed as :meth:`normal_consistency` / :meth:`laplacian_smoothness`
    and also returned on every render (``RenderOutput.regularisers``, names from
    :meth:`regulariser_names`);
    the stage weights them.
    """

    def __init__(
        self,
        tet_resolution: int = 16,
        tet_kind: Literal["bcc", "kuhn"] = "bcc",
        bbox_radius: float = 1.0,
        deformation_scale: float = 0.5,
        sphere_radius: float = 0.45,
        n_levels: int = 16,
        n_features_per_level: int = 2,
        log2_hashmap_size: int = 19,
        base_resolution: int = 16,
        per_level_scale: float = 1.4473,
        hidden_dim: int = 64,
        grid_backend: Literal["auto", "torch", "compiled", "triton", "tcnn"] = "auto",
        background: nn.Module | None = None,
        raster_backend: Literal["auto", "torch", "triton", "nvdiffrast"] = "auto",
    ) -> None:
        super().__init__()
        if bbox_radius <= 0:
            raise ValueError(f"bbox_radius={bbox_radius} must be positive")
        if not 0 <= deformation_scale <= 1:
            raise ValueError(f"deformation_scale={deformation_scale} must be in [0, 1] "
                             "(a fraction of the grid spacing; 0.5 is typical)")
        grid = make_tet_grid(tet_resolution, tet_kind)
        self.tet_resolution = tet_resolution
        self.deformation_scale = float(deformation_scale)
        # The unit grid and its tets come from the config; only the box is state.
        self.register_buffer("unit_vertices", grid.vertices, persistent=False)
        self.register_buffer("tets", grid.tets, persistent=False)
        lo = torch.full((3,), -float(bbox_radius))
        self.register_buffer("bbox", torch.stack([lo, -lo]))  # (2, 3): min and max corner
        vertices = self.grid_vertices()
        self.sdf = nn.Parameter(vertices.norm(dim=-1) - float(sphere_radius))
        self.deformation = nn.Parameter(torch.zeros_like(vertices))

        self.encoding = HashGrid(
            n_levels=n_levels,
            n_features_per_level=n_features_per_level,
            log2_hashmap_size=log2_hashmap_size,
            base_resolution=base_resolution,
            per_level_scale=per_level_scale,
            backend=grid_backend,
        )
        self.texture_mlp = nn.Sequential(
            nn.Linear(self.encoding.n_output_dims, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 3)
        )
        self.background = background if background is not None else EnvironmentMapBackground()
        self.rasterizer = Rasterizer(backend=raster_backend)

    # ----------------------------------------------------------------------------- geometry

    def set_bbox(self, lo: Float[Tensor, "3"], hi: Float[Tensor, "3"]) -> None:
        """Move the grid to the box [lo, hi] (the SDF values stay attached to their vertices)."""
        lo, hi = torch.as_tensor(lo).to(self.bbox), torch.as_tensor(hi).to(self.bbox)
        if lo.shape != (3,) or hi.shape != (3,) or not bool((hi > lo).all()):
            raise ValueError(f"bbox lo={lo.tolist()} hi={hi.tolist()} must be 3-vectors with hi > lo")
        self.bbox.copy_(torch.stack([lo, hi]))

    def grid_spacing(self) -> Float[Tensor, "3"]:
        return (self.bbox[1] - self.bbox[0]) / self.tet_resolution

    def grid_vertices(self) -> Float[Tensor, "V 3"]:
        """Undeformed grid vertices in world space."""
        lo, hi = self.bbox[0], self.bbox[1]
        return lo + (self.unit_vertices + 0.5) * (hi - lo)

    def deformed_vertices(self) -> Float[Tensor, "V 3"]:
        offset = torch.tanh(self.deformation) * (self.deformation_scale * self.grid_spacing())
        return self.grid_vertices() + offset

    def extract_mesh(self) -> Mesh:
        """The current surface (world space, outward winding); raises if it is empty."""
        mesh = marching_tets(self.deformed_vertices(), self.sdf, self.tets)
        if mesh.is_empty:
            lo, hi = float(self.sdf.min()), float(self.sdf.max())
            raise ValueError(
                f"DMTet surface is empty: the SDF never changes sign on the grid (range "
                f"[{lo:.4g}, {hi:.4g}]). Initialise it from the coarse NeRF with "
                "magic3d.scenes.convert.nerf_to_dmtet (or a lower density threshold there)."
            )
        return mesh

    normal_consistency = staticmethod(normal_consistency)
    laplacian_smoothness = staticmethod(laplacian_smoothness)

    # ----------------------------------------------------------------------------- texture

    def albedo(self, points: Float[Tensor, "P 3"]) -> Float[Tensor, "P 3"]:
        """Albedo in [0, 1] of the colour field at world-space points (clamped to the box)."""
        lo, hi = self.bbox[0], self.bbox[1]
        unit = ((points - lo) / (hi - lo)).clamp(0.0, 1.0)
        return torch.sigmoid(self.texture_mlp(self.encoding(unit)))

    def texture_parameters(self) -> list[nn.Parameter]:
        return [self.encoding.params, *self.texture_mlp.parameters()]

    # ----------------------------------------------------------------------------- scene API

    def render(self, cameras: CameraBatch, shading: Shading) -> RenderOutput:
        h, w = cameras.height, cameras.width
        mesh = self.extract_mesh()
        verts, faces = mesh.vertices, mesh.faces
        homogeneous = torch.cat([verts, torch.ones_like(verts[:, :1])], dim=-1)
        clip = torch.einsum("bij,vj->bvi", mvp(cameras).to(verts), homogeneous).contiguous()

        rast = self.rasterizer.rasterize(clip, faces, (h, w))
        normals = vertex_normals(verts, faces)
        attributes = self.rasterizer.interpolate(torch.cat([verts, normals], -1), rast, faces)
        position, normal = attributes[..., :3], F.normalize(attributes[..., 3:], dim=-1)
        mask = rast.mask  # hard; antialiased below
        covered = rast.face_id >= 0

        albedo = torch.zeros_like(position)
        albedo = albedo.index_put((covered,), self.albedo(position[covered]))
        light_dir = cameras.light_position[:, None, None, :].to(position) - position
        colour = shade(albedo, normal, light_dir, shading)

        rays = camera_rays(cameras)
        background = self.background(rays.directions)
        rgb = colour * mask + (1.0 - mask) * background
        # One antialias pass for colour and mask: both get silhouette gradients.
        blended = self.rasterizer.antialias(torch.cat([rgb, mask], -1), rast, clip, faces)
        rgb, opacity = blended[..., :3], blended[..., 3:]

        # Distance along the ray, premultiplied by coverage (as the NeRF's expected depth).
        depth = (position - rays.origins.to(position)).norm(dim=-1, keepdim=True) * mask
        return RenderOutput(
            rgb=rgb,
            opacity=opacity,
            depth=depth,
            normal=normal,
            albedo=albedo * mask,  # premultiplied over black, like the NeRF's
            background=background,
            regularisers={"normal_consistency": normal_consistency(mesh),
                          "laplacian": laplacian_smoothness(mesh)},
        )

    def regulariser_names(self) -> tuple[str, ...]:
        return ("normal_consistency", "laplacian")

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = {
            "geometry": [self.sdf, self.deformation],
            "texture": self.texture_parameters(),
            "background": [p for p in self.background.parameters() if p.requires_grad],
        }
        return {name: params for name, params in groups.items() if params}
