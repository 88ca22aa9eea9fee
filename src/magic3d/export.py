"""Textured mesh export: UV unwrap (xatlas), albedo bake, GLB and OBJ+MTL+PNG writers.

The output of Magic3D is a textured mesh usable in graphics software. The pipeline:

1. a triangle mesh: the DMTet scene's ``extract_mesh()``, or :func:`nerf_mesh` for the coarse
   NeRF (density sampled on a Kuhn tet grid, marching tets at the visible-surface level);
2. :func:`unwrap_uv`: xatlas charts and packs the mesh; it splits vertices along seams, so the
   result is re-indexed (vertices, faces, uvs aligned; ``vmapping`` points to the source vertex);
3. :func:`bake_texture`: the mesh is rasterised in UV space (UV coordinates used as clip
   positions), the 3D position of every covered texel is interpolated and the scene's albedo
   is queried there; seams are padded by dilation so bilinear filtering and mipmaps do not bleed
   the background into the charts;
4. :func:`write_glb` / :func:`write_obj`, both atomic (temporary file, then ``os.replace``).

Conventions:

- UVs follow OpenGL/OBJ: v = 0 is the BOTTOM row of the texture image. The rasteriser's row 0
  is NDC y = +1, so rasterising at clip (2u - 1, 2v - 1) produces an image whose row 0 is v = 1,
  i.e. an ordinary top-down image file for these UVs (trimesh flips v for glTF on export).
- Axes: our world is +z up; glTF is +y up (and OBJ importers such as Blender's default to +y up),
  so both writers rotate by -90 degrees about x: (x, y, z) -> (x, z, -y). The object then stands
  upright; our "front" (+x, azimuth 0) stays +x, so glTF viewers (default camera on +z) show its
  side first.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from magic3d.ops.marching_tets import Mesh, marching_tets
from magic3d.ops.raster import interpolate, rasterize
from magic3d.ops.tetgrid import make_tet_grid
from magic3d.ops.voxels import sample_density_grid, translucent_solid, visible_solid
from magic3d.scenes.base import DensityField, Scene
from magic3d.scenes.dmtet import vertex_normals

AlbedoFn = Callable[[Tensor], Tensor]

# World (+z up) -> glTF/OBJ (+y up): rotation of -90 degrees about x, (x, y, z) -> (x, z, -y).
WORLD_TO_Y_UP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
MATERIAL_NAME = "material_0"


class ExportError(RuntimeError):
    """Writing an export failed; any previous file at the destination is left untouched."""


@dataclass
class TexturedMesh:
    """A UV-mapped mesh: ``vertices``, ``faces``, ``uvs`` (and ``normals``) are aligned per vertex.

    xatlas splits vertices at UV seams, so one source vertex may appear several times;
    ``vmapping[i]`` is the index of vertex i in the source mesh. ``texture`` is the albedo image,
    row 0 at v = 1 (see the module docstring).
    """

    vertices: Float[Tensor, "V 3"]
    faces: Int[Tensor, "F 3"]
    uvs: Float[Tensor, "V 2"]
    texture: Float[Tensor, "H W 3"]
    normals: Float[Tensor, "V 3"] | None = None
    vmapping: Int[Tensor, "V"] | None = None


# ------------------------------------------------------------------------------------ unwrap


def unwrap_uv(
    vertices: Float[Tensor, "M 3"],
    faces: Int[Tensor, "F 3"],
    resolution: int = 1024,
    padding_px: int = 2,
) -> tuple[Int[Tensor, "V"], Int[Tensor, "F 3"], Float[Tensor, "V 2"]]:
    """xatlas UV atlas of a mesh: (vmapping, re-indexed faces, uvs in [0, 1]), on the CPU.

    Pack options: ``resolution`` is the texture size the atlas is packed for (xatlas estimates
    texels per unit to fill it); charts are ``padding_px`` texels apart, with ``bilinear`` on
    (room for the texels bilinear filtering reads) and ``blockAlign`` on (faster packing).
    Charts are rotated to improve packing (xatlas default). If the charts do not fit one atlas of
    that size, the texel density is lowered until they do. Chart options are xatlas defaults
    (tuning seam/cost weights did not speed it up). xatlas is CPU-only and superlinear: about
    25 s for 74k faces and 80 s for 166k faces on 2 CPU cores.
    """
    import xatlas

    if faces.ndim != 2 or faces.shape[-1] != 3 or faces.shape[0] == 0:
        raise ValueError(f"faces has shape {tuple(faces.shape)}; expected a non-empty (F, 3)")
    if resolution < 16:
        raise ValueError(f"resolution={resolution} is too small for a texture atlas; use >= 16")
    positions = vertices.detach().float().cpu().numpy()
    indices = faces.detach().cpu().numpy().astype(np.uint32)
    pack = xatlas.PackOptions()
    pack.resolution = int(resolution)
    pack.padding = int(padding_px)
    pack.bilinear = True
    pack.blockAlign = True
    texels_per_unit = 0.0  # 0: xatlas estimates it from the resolution
    for _ in range(8):
        pack.texels_per_unit = texels_per_unit
        atlas = xatlas.Atlas()
        atlas.add_mesh(positions, indices)
        atlas.generate(pack_options=pack)
        if atlas.atlas_count == 1:
            break
        # More than one page: the uvs would overlap. Pack again at a lower texel density.
        texels_per_unit = 0.8 * atlas.texels_per_unit
    else:
        raise ExportError(f"xatlas could not pack the {len(indices)} faces into one "
                          f"{resolution}x{resolution} atlas; raise the texture resolution")
    vmapping, new_faces, uvs = atlas[0]
    return (torch.from_numpy(vmapping.astype(np.int64)),
            torch.from_numpy(new_faces.astype(np.int64)),
            torch.from_numpy(np.ascontiguousarray(uvs, dtype=np.float32)))


# -------------------------------------------------------------------------------------- bake


@dataclass
class UVRaster:
    """3D position of each texel's surface point and which texels a face covers."""

    positions: Float[Tensor, "H W 3"]
    covered: Bool[Tensor, "H W"]
    face_id: Int[Tensor, "H W"]  # -1 where empty


def rasterize_uv(
    vertices: Float[Tensor, "V 3"],
    faces: Int[Tensor, "F 3"],
    uvs: Float[Tensor, "V 2"],
    resolution: int,
) -> UVRaster:
    """Rasterise the mesh in UV space (texel centres) and interpolate 3D positions there."""
    device = vertices.device
    uvs = uvs.to(device=device, dtype=torch.float32)
    clip = torch.cat([uvs * 2.0 - 1.0, torch.zeros_like(uvs[:, :1]), torch.ones_like(uvs[:, :1])], -1)
    faces = faces.to(device)
    with torch.no_grad():
        rast = rasterize(clip, faces, (resolution, resolution))
        positions = interpolate(vertices.detach().float(), rast, faces)[0]
    face_id = rast.face_id[0]
    return UVRaster(positions=positions, covered=face_id >= 0, face_id=face_id)


def dilate(
    image: Float[Tensor, "H W C"], filled: Tensor, iterations: int
) -> tuple[Float[Tensor, "H W C"], Tensor]:
    """Grow ``image`` into empty texels: each pass fills every empty texel that has a filled
    8-neighbour with the mean of its filled neighbours. Returns (image, filled mask)."""
    kernel = torch.ones(1, 1, 3, 3, device=image.device, dtype=image.dtype)
    c = image.shape[-1]
    img = image.permute(2, 0, 1)[:, None]  # (C, 1, H, W): one conv per channel
    mask = filled[None, None].to(image.dtype)
    for _ in range(iterations):
        total = F.conv2d(img * mask, kernel, padding=1)
        count = F.conv2d(mask, kernel, padding=1)
        grow = (mask == 0) & (count > 0)
        if not bool(grow.any()):
            break
        img = torch.where(grow, total / count.clamp_min(1.0), img)
        mask = torch.where(grow, torch.ones_like(mask), mask)
    return img[:, 0].permute(1, 2, 0).reshape(*image.shape[:2], c), mask[0, 0] > 0


def bake_texture(
    vertices: Float[Tensor, "V 3"],
    faces: Int[Tensor, "F 3"],
    uvs: Float[Tensor, "V 2"],
    albedo_fn: AlbedoFn,
    resolution: int = 1024,
    padding_px: int = 4,
    background: tuple[float, float, float] | None = None,
    chunk: int = 1 << 16,
) -> Float[Tensor, "H W 3"]:
    """Albedo texture of a UV-mapped mesh (row 0 at v = 1), on the vertices' device.

    ``albedo_fn`` is queried (no grad, in chunks of ``chunk`` points) at the 3D point of every
    covered texel centre; seams are then padded by ``padding_px`` dilation passes (see
    :func:`dilate`). Texels still empty get ``background``, by default the mean baked colour
    (so coarse mipmap levels do not darken towards black).
    """
    if padding_px < 0:
        raise ValueError(f"padding_px={padding_px} must be >= 0")
    uv_raster = rasterize_uv(vertices, faces, uvs, resolution)
    texture = torch.zeros(resolution, resolution, 3, device=vertices.device)
    points = uv_raster.positions[uv_raster.covered]
    if points.shape[0] == 0:
        raise ValueError("bake_texture: no texel is covered; are the uvs in [0, 1]?")
    with torch.no_grad():
        colours = torch.cat([albedo_fn(points[i : i + chunk]).float().reshape(-1, 3)
                             for i in range(0, points.shape[0], chunk)])
    texture[uv_raster.covered] = colours.clamp(0.0, 1.0).to(texture.device)
    texture, filled = dilate(texture, uv_raster.covered, padding_px)
    fill = colours.mean(0) if background is None else torch.tensor(background)
    return torch.where(filled[..., None], texture, fill.to(texture)[None, None])


def texture_mesh(mesh: Mesh, albedo_fn: AlbedoFn, resolution: int = 1024, padding_px: int = 4) -> TexturedMesh:
    """Unwrap ``mesh`` and bake ``albedo_fn`` into a ``resolution``^2 texture.

    Normals are smooth normals of the source mesh (computed before the seam split, so seams do
    not show in shading).
    """
    if mesh.is_empty:
        raise ValueError("texture_mesh: the mesh has no faces")
    device = mesh.vertices.device
    source = mesh.vertices.detach().float()
    normals = vertex_normals(source, mesh.faces.long())
    vmapping, faces, uvs = unwrap_uv(source, mesh.faces, resolution, padding_px=min(padding_px, 2))
    vmapping, faces = vmapping.to(device), faces.to(device)
    vertices = source[vmapping]
    texture = bake_texture(vertices, faces, uvs, albedo_fn, resolution, padding_px)
    return TexturedMesh(vertices=vertices, faces=faces, uvs=uvs.to(device), texture=texture,
                        normals=normals[vmapping], vmapping=vmapping)


# ------------------------------------------------------------------------------------ writers


def _y_up(points: np.ndarray) -> np.ndarray:
    return points @ WORLD_TO_Y_UP.T


def _texture_png(texture: Tensor) -> bytes:
    from PIL import Image

    array = (texture.detach().float().clamp(0, 1).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _atomic_write_all(files: dict[Path, bytes]) -> None:
    """Write every file to a temporary sibling, then move them all into place.

    Nothing at the destinations changes unless every temporary file was written; a failure
    removes the temporary files and raises :class:`ExportError`.
    """
    temps: dict[Path, Path] = {}
    umask = os.umask(0)
    os.umask(umask)
    try:
        for path, data in files.items():
            if not path.parent.is_dir():
                raise FileNotFoundError(f"folder {path.parent} does not exist")
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            temps[path] = Path(tmp)
            # mkstemp creates 0600 files; give the export ordinary permissions (or keep the
            # permissions of the file it replaces).
            os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~umask)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        for path, tmp in temps.items():
            os.replace(tmp, path)
    except OSError as error:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        names = ", ".join(str(p) for p in files)
        raise ExportError(f"could not write {names}: {error}; existing files were left untouched") from error


def _numpy_mesh(textured: TexturedMesh) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    vertices = _y_up(textured.vertices.detach().float().cpu().numpy().astype(np.float64))
    faces = textured.faces.detach().cpu().numpy().astype(np.int64)
    uvs = textured.uvs.detach().float().cpu().numpy().astype(np.float64)
    normals = None
    if textured.normals is not None:
        normals = _y_up(textured.normals.detach().float().cpu().numpy().astype(np.float64))
    return vertices, faces, uvs, normals


def glb_bytes(textured: TexturedMesh) -> bytes:
    """The GLB file content: PBR material (baseColorTexture, embedded PNG; metallic 0,
    roughness 1: the albedo is unlit colour), +y up."""
    import trimesh
    from PIL import Image

    vertices, faces, uvs, normals = _numpy_mesh(textured)
    image = Image.open(io.BytesIO(_texture_png(textured.texture)))
    material = trimesh.visual.material.PBRMaterial(
        name=MATERIAL_NAME, baseColorTexture=image, metallicFactor=0.0, roughnessFactor=1.0
    )
    mesh = trimesh.Trimesh(
        vertices=vertices, faces=faces, vertex_normals=normals,
        visual=trimesh.visual.TextureVisuals(uv=uvs, material=material), process=False,
    )
    return mesh.export(file_type="glb", include_normals=normals is not None)


def write_glb(textured: TexturedMesh, path: Path | str) -> Path:
    """Write a binary glTF (see :func:`glb_bytes`) atomically; returns the path."""
    path = Path(path)
    try:
        data = glb_bytes(textured)
    except Exception as error:  # trimesh/PIL failures: report them as an export failure
        raise ExportError(f"could not encode {path} as GLB: {error}; nothing was written") from error
    _atomic_write_all({path: data})
    return path


def obj_text(textured: TexturedMesh, mtl_name: str) -> str:
    """Wavefront OBJ with positions, uvs, normals (when present) and one material, +y up."""
    vertices, faces, uvs, normals = _numpy_mesh(textured)
    lines = [f"# magic3d export: {len(vertices)} vertices, {len(faces)} faces, +y up",
             f"mtllib {mtl_name}", f"usemtl {MATERIAL_NAME}"]
    out = io.StringIO()
    out.write("\n".join(lines) + "\n")
    np.savetxt(out, vertices, fmt="v %.6f %.6f %.6f")
    np.savetxt(out, uvs, fmt="vt %.6f %.6f")
    idx = faces + 1  # OBJ indices are 1-based; vertices, uvs and normals share them
    if normals is not None:
        np.savetxt(out, normals, fmt="vn %.6f %.6f %.6f")
        np.savetxt(out, np.repeat(idx, 3, axis=1), fmt="f %d/%d/%d %d/%d/%d %d/%d/%d")
    else:
        np.savetxt(out, np.repeat(idx, 2, axis=1), fmt="f %d/%d %d/%d %d/%d")
    return out.getvalue()


def mtl_text(texture_name: str) -> str:
    return (f"newmtl {MATERIAL_NAME}\nKa 1.000 1.000 1.000\nKd 1.000 1.000 1.000\n"
            f"Ks 0.000 0.000 0.000\nd 1.0\nillum 1\nmap_Kd {texture_name}\n")


def write_obj(textured: TexturedMesh, folder: Path | str, name: str = "mesh") -> list[Path]:
    """Write ``name.obj``, ``name.mtl`` and ``name_albedo.png`` (map_Kd) into ``folder``.

    All three are written to temporary files first and then moved into place, so a failure
    leaves any earlier export untouched. ``folder`` is created if missing.
    """
    folder = Path(folder)
    if not name or "/" in name or os.sep in name:
        raise ValueError(f"name={name!r} must be a plain file stem like 'mesh'")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ExportError(f"could not create the export folder {folder}: {error}") from error
    obj, mtl, png = folder / f"{name}.obj", folder / f"{name}.mtl", folder / f"{name}_albedo.png"
    files = {png: _texture_png(textured.texture),
             mtl: mtl_text(png.name).encode(),
             obj: obj_text(textured, mtl.name).encode()}
    _atomic_write_all(files)
    return [obj, mtl, png]


# ------------------------------------------------------------------------------ NeRF -> mesh


def largest_component(mesh: Mesh) -> Mesh:
    """The connected component (faces sharing vertices) with the most faces, compacted."""
    faces = mesh.faces.detach().cpu().numpy()
    n = mesh.vertices.shape[0]
    if len(faces) == 0:
        return mesh
    a = np.concatenate([faces[:, 0], faces[:, 1]])
    b = np.concatenate([faces[:, 1], faces[:, 2]])
    parent = np.arange(n)
    # Hook-and-jump union find, vectorised: parent[i] <= i always, so no cycles can form.
    while True:
        while True:  # pointer jumping until every entry points at a root
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
        pa, pb = parent[a], parent[b]
        differ = pa != pb
        if not differ.any():
            break
        np.minimum.at(parent, np.maximum(pa, pb)[differ], np.minimum(pa, pb)[differ])
    face_label = parent[faces[:, 0]]
    labels, counts = np.unique(face_label, return_counts=True)
    keep_faces = torch.from_numpy(face_label == labels[counts.argmax()]).to(mesh.faces.device)
    kept = mesh.faces[keep_faces]
    used, new_faces = torch.unique(kept, return_inverse=True)
    return Mesh(vertices=mesh.vertices[used], faces=new_faces.reshape(-1, 3),
                vertex_edge=None if mesh.vertex_edge is None else mesh.vertex_edge[used])


@torch.no_grad()
def visible_density_level(density_fn, radius: float, resolution: int, device) -> float:
    """Median density where the part that looks solid from outside (optical depth > ln 2 along
    the cheapest axis direction) meets the outside: robust to the density scale of a soft
    coarse NeRF and to a near-empty interior behind an opaque shell. A translucent scene (no
    depth reaches ln 2) takes the conversion's fallback, a quarter of its peak depth, with a
    warning on stderr; a nearly empty scene or a haze is refused."""
    grid = sample_density_grid(density_fn, radius, resolution, device)
    voxel = 2.0 * radius / resolution
    visible = visible_solid(grid, voxel)
    if visible.is_empty:
        try:
            visible = translucent_solid(grid, voxel, visible.max_optical_depth, "scene")
        except ValueError as err:
            raise ValueError(f"nerf_mesh: {err} (on a {resolution}^3 grid)") from None
        print(f"[magic3d] warning: the NeRF is translucent (peak optical depth {visible.max_optical_depth:.3g} "
              "< ln 2): its mesh is the surface where the optical depth reaches a quarter of its peak.",
              file=sys.stderr, flush=True)
    return visible.boundary_level


def nerf_mesh(
    field: DensityField,
    resolution: int = 128,
    threshold: float | None = None,
    keep_largest_component: bool = True,
    chunk: int = 1 << 18,
) -> Mesh:
    """Surface of a density field (``field.density(points)``, box ``[-field.radius, radius]^3``).

    The density is sampled at the vertices of a Kuhn tet grid with ``resolution`` cubes per axis
    and the level set ``density = threshold`` is extracted by marching tets (sdf = threshold -
    density, negative inside). ``threshold`` defaults to the density level of the surface a
    viewer sees (:func:`visible_density_level`), the rule the NeRF -> DMTet conversion uses.
    Vertices on the box boundary are forced outside so the mesh is always closed. With
    ``keep_largest_component`` small floaters are dropped.
    """
    radius = float(field.radius)
    device = field.device
    grid = make_tet_grid(resolution, "kuhn", bbox=((-radius,) * 3, (radius,) * 3))
    vertices = grid.vertices.to(device)
    if threshold is None:
        threshold = visible_density_level(field.density, radius, resolution, vertices.device)
    density = torch.cat([field.density(vertices[i : i + chunk]).reshape(-1).float()
                         for i in range(0, vertices.shape[0], chunk)])
    sdf = threshold - density
    on_boundary = (vertices.abs() >= radius * (1.0 - 1e-6)).any(-1)
    sdf = torch.where(on_boundary, sdf.abs().clamp_min(1e-6), sdf)
    mesh = marching_tets(vertices, sdf, grid.tets.to(device))
    if mesh.is_empty:
        raise ValueError(
            f"nerf_mesh: no surface at density threshold {threshold:.4g}: the density on the "
            f"{resolution}^3 grid ranges over [{float(density.min()):.4g}, {float(density.max()):.4g}]; "
            "pass a threshold inside that range (or train the scene longer)")
    return largest_component(mesh) if keep_largest_component else mesh


# ------------------------------------------------------------------------------- scene export


def scene_mesh_and_albedo(scene: Scene, mesh_resolution: int = 128) -> tuple[Mesh, AlbedoFn]:
    """The scene's surface and albedo function: its own mesh (DMTet) or the surface of its
    density field (:func:`nerf_mesh`)."""
    mesh = scene.extract_mesh()
    if mesh is not None:
        return mesh, scene.albedo
    field = scene.density_field()
    if field is not None:
        return nerf_mesh(field, resolution=mesh_resolution), field.albedo
    raise TypeError(f"{type(scene).__name__} has neither a mesh (extract_mesh) nor a density field "
                    "(density_field); cannot export it as a mesh")


def export_scene(
    scene,
    out_dir: Path | str,
    name: str = "mesh",
    texture_resolution: int = 1024,
    mesh_resolution: int = 128,
) -> list[Path]:
    """Mesh, unwrap, bake and write ``name.glb`` plus ``name.obj/.mtl/_albedo.png`` in ``out_dir``."""
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = tqdm(total=4, desc="export", unit="step")
    try:
        steps.set_postfix_str("mesh")
        with torch.no_grad():
            mesh, albedo_fn = scene_mesh_and_albedo(scene, mesh_resolution)
        if mesh.is_empty:
            raise ValueError(f"{type(scene).__name__} produced an empty mesh; nothing to export")
        steps.update()
        steps.set_postfix_str(f"unwrap + bake {mesh.faces.shape[0]} faces")
        textured = texture_mesh(mesh, albedo_fn, texture_resolution)
        steps.update()
        steps.set_postfix_str("glb")
        glb = write_glb(textured, out_dir / f"{name}.glb")
        steps.update()
        steps.set_postfix_str("obj")
        obj_files = write_obj(textured, out_dir, name)
        steps.update()
    finally:
        steps.close()
    return [glb, *obj_files]


def export_stage(stage_dir: Path | str, texture_resolution: int = 1024, mesh_resolution: int = 128) -> list[Path]:
    """Export a finished stage's scene to ``<stage_dir>/export/`` (``python -m magic3d export``)."""
    from magic3d.runs import final_stage_dir, load_stage_scene

    stage_dir = final_stage_dir(stage_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scene = load_stage_scene(stage_dir, device=device)
    return export_scene(scene, stage_dir / "export", texture_resolution=texture_resolution,
                        mesh_resolution=mesh_resolution)
