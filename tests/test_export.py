"""Textured mesh export: unwrap, bake, padding, GLB / OBJ round trips, NeRF meshing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import trimesh

from magic3d import export as E
from magic3d.ops.marching_tets import Mesh, marching_tets
from magic3d.ops.tetgrid import make_tet_grid
from magic3d.scenes.base import SceneModule
from magic3d.scenes.hash_nerf import HashGridNeRF

RED, BLUE = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0])


def sphere_mesh(radius: float = 0.3, resolution: int = 16, centre=(0.0, 0.0, 0.0)) -> Mesh:
    grid = make_tet_grid(resolution, "kuhn", use_cache=False)
    sdf = (grid.vertices - torch.tensor(centre)).norm(dim=-1) - radius
    return marching_tets(grid.vertices, sdf, grid.tets)


def red_blue(points: torch.Tensor) -> torch.Tensor:
    """Red where x > 0, blue where x <= 0."""
    return torch.where(points[:, :1] > 0, RED, BLUE)


@pytest.fixture(scope="module")
def sphere() -> Mesh:
    return sphere_mesh()


@pytest.fixture(scope="module")
def textured(sphere: Mesh) -> E.TexturedMesh:
    return E.texture_mesh(sphere, red_blue, resolution=128)


def uv_triangle_areas(uvs: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    a, b, c = uvs[faces].unbind(-2)
    d1, d2 = b - a, c - a
    return 0.5 * (d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0])


def expected_side_colour(x: np.ndarray) -> np.ndarray:
    return np.where(x[:, None] > 0, [1.0, 0.0, 0.0], [0.0, 0.0, 1.0])


# ----------------------------------------------------------------------------------- unwrap


def test_unwrap_uvs_in_unit_square_non_degenerate_and_consistent(sphere: Mesh) -> None:
    vmapping, faces, uvs = E.unwrap_uv(sphere.vertices, sphere.faces, resolution=256)
    assert uvs.shape == (vmapping.shape[0], 2) and faces.shape == sphere.faces.shape
    assert bool((uvs >= 0).all() and (uvs <= 1).all())
    # Seams split vertices: never fewer than the source, every source vertex still present.
    assert vmapping.shape[0] >= sphere.vertices.shape[0]
    assert set(vmapping.tolist()) == set(range(sphere.vertices.shape[0]))
    # Same faces in the same order, re-indexed: mapping back gives the source faces.
    assert torch.equal(vmapping[faces], sphere.faces)
    # Non-degenerate: a UV triangle smaller than 1e-4 texel^2 at 256^2 would be unbakeable.
    areas = uv_triangle_areas(uvs, faces).abs()
    assert float(areas.min()) > 1e-4 / 256**2


def test_texture_mesh_aligns_attributes(sphere: Mesh, textured: E.TexturedMesh) -> None:
    v = textured.vertices.shape[0]
    assert textured.uvs.shape == (v, 2) and textured.normals.shape == (v, 3)
    assert textured.vertices.dtype == torch.float32 and textured.faces.dtype == torch.int64
    assert torch.equal(textured.vertices, sphere.vertices[textured.vmapping])
    assert textured.texture.shape == (128, 128, 3)
    assert float(textured.texture.min()) >= 0 and float(textured.texture.max()) <= 1
    # Smooth normals of a sphere point outwards: along the position (1e-1: the 16^3 tet mesh
    # is faceted, its area-weighted normals deviate from radial by a few degrees).
    radial = F.normalize(textured.vertices, dim=-1)
    assert float((textured.normals * radial).sum(-1).min()) > 0.9


# ------------------------------------------------------------------------------------- bake


def test_bake_puts_face_colours_at_their_texels(textured: E.TexturedMesh) -> None:
    res = textured.texture.shape[0]
    raster = E.rasterize_uv(textured.vertices, textured.faces, textured.uvs, res)
    face_x = textured.vertices[textured.faces][..., 0]  # (F, 3)
    tex = textured.texture
    for side, colour in ((face_x.min(-1).values > 0, RED), (face_x.max(-1).values < 0, BLUE)):
        texels = raster.covered & side[raster.face_id.clamp_min(0)]
        assert int(texels.sum()) > 100
        assert torch.equal(tex[texels], colour.expand(int(texels.sum()), 3))
    # Independent of the rasteriser: the texel under each face's UV centroid, located with the
    # image convention (row 0 at v = 1), has the face's side colour. Faces smaller than a texel
    # may own no texel there, so count agreement (>= 99 %).
    centroid = textured.uvs[textured.faces].mean(1)
    col = (centroid[:, 0] * res).long().clamp(0, res - 1)
    row = ((1 - centroid[:, 1]) * res).long().clamp(0, res - 1)
    whole = (face_x.min(-1).values > 0) | (face_x.max(-1).values < 0)
    expected = torch.where((face_x[:, 0] > 0)[:, None], RED, BLUE)
    agree = (tex[row, col] == expected).all(-1)[whole]
    assert float(agree.float().mean()) > 0.99


def test_seam_padding_fills_neighbours_of_covered_texels() -> None:
    res, pad = 32, 3
    vertices = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]])
    faces = torch.tensor([[0, 1, 2]])
    uvs = torch.tensor([[0.3, 0.3], [0.7, 0.3], [0.3, 0.7]])
    green = lambda p: torch.tensor([0.0, 1.0, 0.0]).expand(p.shape[0], 3)  # noqa: E731
    tex = E.bake_texture(vertices, faces, uvs, green, res, padding_px=pad, background=(0, 0, 0))
    covered = E.rasterize_uv(vertices, faces, uvs, res).covered.float()[None, None]
    # Texels within Chebyshev distance `pad` of coverage are filled; the rest are background.
    reach = F.max_pool2d(covered, 2 * pad + 1, stride=1, padding=pad)[0, 0] > 0
    ring = reach & ~(covered[0, 0] > 0)
    assert int(ring.sum()) > 0
    assert torch.equal(tex[reach], torch.tensor([0.0, 1.0, 0.0]).expand(int(reach.sum()), 3))
    assert torch.equal(tex[~reach], torch.zeros(int((~reach).sum()), 3))
    # Default background: the mean baked colour everywhere else.
    tex_default = E.bake_texture(vertices, faces, uvs, green, res, padding_px=pad)
    assert torch.equal(tex_default, torch.tensor([0.0, 1.0, 0.0]).expand(res, res, 3))


def test_dilation_takes_mean_of_covered_neighbours() -> None:
    image = torch.zeros(3, 3, 1)
    filled = torch.zeros(3, 3, dtype=torch.bool)
    image[0, 0], image[0, 2] = 1.0, 3.0
    filled[0, 0] = filled[0, 2] = True
    out, mask = E.dilate(image, filled, 1)
    assert float(out[0, 1]) == 2.0 and float(out[1, 1]) == 2.0 and float(out[1, 0]) == 1.0
    assert not bool(mask[2].any())  # two rows away: not reached in one pass


# ----------------------------------------------------------------------------------- writers


def test_glb_round_trip(textured: E.TexturedMesh, tmp_path: Path) -> None:
    path = E.write_glb(textured, tmp_path / "mesh.glb")
    loaded = trimesh.load(path, process=False)
    geometry = list(loaded.geometry.values())[0] if isinstance(loaded, trimesh.Scene) else loaded
    assert geometry.vertices.shape == tuple(textured.vertices.shape)
    assert geometry.faces.shape == tuple(textured.faces.shape)
    image = geometry.visual.material.baseColorTexture
    assert image.size == (128, 128)
    # +z up -> +y up: bounds (x, z, -y). 1e-6: float32 storage of coordinates <= 0.3.
    lo, hi = textured.vertices.min(0).values.numpy(), textured.vertices.max(0).values.numpy()
    expected = np.array([[lo[0], lo[2], -hi[1]], [hi[0], hi[2], -lo[1]]])
    np.testing.assert_allclose(geometry.bounds, expected, atol=1e-6)
    # End to end through trimesh's own uv convention: vertex colours sampled from the texture
    # match the side colour (skip |x| < 0.05, where a vertex's faces straddle the boundary).
    colours = geometry.visual.to_color().vertex_colors[:, :3] / 255.0
    x = geometry.vertices[:, 0]
    far = np.abs(x) > 0.05
    np.testing.assert_allclose(colours[far], expected_side_colour(x[far]), atol=1 / 255)


def test_obj_mtl_png_round_trip(textured: E.TexturedMesh, tmp_path: Path) -> None:
    paths = E.write_obj(textured, tmp_path / "out", "thing")
    assert [p.name for p in paths] == ["thing.obj", "thing.mtl", "thing_albedo.png"]
    assert all(p.is_file() for p in paths)
    assert all(p.stat().st_mode & 0o444 == 0o444 for p in paths)  # readable, not mkstemp's 0600
    assert "map_Kd thing_albedo.png" in paths[1].read_text()
    loaded = trimesh.load(paths[0], process=False)
    assert loaded.faces.shape == tuple(textured.faces.shape)
    assert loaded.visual.material.image.size == (128, 128)
    colours = loaded.visual.to_color().vertex_colors[:, :3] / 255.0
    x = loaded.vertices[:, 0]
    far = np.abs(x) > 0.05
    np.testing.assert_allclose(colours[far], expected_side_colour(x[far]), atol=1 / 255)
    # Bounds after +z -> +y up; 1e-5: OBJ stores 6 decimals.
    hi = textured.vertices.max(0).values.numpy()
    np.testing.assert_allclose(loaded.bounds[1], [hi[0], hi[2], -textured.vertices[:, 1].min()], atol=1e-5)


def test_failed_write_leaves_existing_export_untouched(
    textured: E.TexturedMesh, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = E.write_obj(textured, tmp_path, "mesh")
    glb = E.write_glb(textured, tmp_path / "mesh.glb")
    before = {p: p.read_bytes() for p in [*paths, glb]}
    # Fail on the third file (the .obj), after the png and mtl temporaries were written.
    calls = {"n": 0}
    real_fsync = E.os.fsync

    def flaky_fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(E.os, "fsync", flaky_fsync)
    other = E.texture_mesh(sphere_mesh(0.2, 12), red_blue, resolution=64)
    with pytest.raises(E.ExportError, match="left untouched"):
        E.write_obj(other, tmp_path, "mesh")
    calls["n"] = 2
    with pytest.raises(E.ExportError, match="No space left"):
        E.write_glb(other, glb)
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in before)  # no temps
    # A parent that is a regular file cannot hold an export: clear error, nothing written.
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    with pytest.raises(E.ExportError, match="does not exist"):
        E.write_glb(other, blocker / "mesh.glb")
    with pytest.raises(E.ExportError, match="could not create"):
        E.write_obj(other, blocker / "sub", "mesh")


# -------------------------------------------------------------------------------- NeRF mesh


def tiny_nerf(blob_density: float) -> HashGridNeRF:
    torch.manual_seed(0)
    return HashGridNeRF(radius=1.0, n_levels=2, log2_hashmap_size=10, base_resolution=4,
                        hidden_dim=8, grid_backend="torch", grid_resolution=0,
                        density_bias="blob", blob_density=blob_density, blob_radius=0.5)


def is_closed(faces: torch.Tensor) -> bool:
    edges = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    keys = torch.unique(edges.sort(-1).values, dim=0, return_counts=True)[1]
    return bool((keys == 2).all())


def test_nerf_mesh_of_blob_is_closed_ball() -> None:
    scene = tiny_nerf(blob_density=50.0).eval()
    mesh = E.nerf_mesh(scene.density_field(), resolution=32)
    assert not mesh.is_empty and is_closed(mesh.faces)
    # Half-opacity threshold at h = 2/32: ln2 / 0.0625 = 11.09; softplus(50 (1 - 2r)) = 11.09
    # at r ~ 0.389. 0.05: the small random head output shifts the level set by a few hundredths.
    r = mesh.vertices.norm(dim=-1)
    assert abs(float(r.mean()) - 0.389) < 0.05 and float(r.std()) < 0.03


def test_nerf_mesh_soft_blob_and_empty_cases() -> None:
    # Default blob (10) peaks at softplus(10) ~ 10, below one voxel's half opacity (11.09 at
    # 32^3), yet renders opaque through its thickness: the visible-surface rule still finds it.
    soft = E.nerf_mesh(tiny_nerf(blob_density=10.0).eval().density_field(), resolution=32)
    assert soft.faces.shape[0] > 0
    with pytest.raises(ValueError, match=r"threshold 1000:.*ranges over"):
        E.nerf_mesh(tiny_nerf(blob_density=10.0).eval().density_field(), resolution=32, threshold=1000.0)
    faint = tiny_nerf(blob_density=10.0).eval()
    faint.density = lambda points: torch.full((points.shape[0],), 0.01)  # optical depth <= 0.02
    with pytest.raises(ValueError, match="no part of the scene is opaque.*nearly empty"):
        E.nerf_mesh(faint.density_field(), resolution=32)


def test_nerf_mesh_of_a_translucent_scene_uses_the_conversions_fallback(capsys: pytest.CaptureFixture[str]) -> None:
    ball = tiny_nerf(blob_density=10.0).eval()
    # Density 0.6 in a 0.5-radius ball: optical depth 0.6 at most (opacity 45 %), nothing opaque.
    ball.density = lambda points: 0.6 * (points.norm(dim=-1) < 0.5).float()
    mesh = E.nerf_mesh(ball.density_field(), resolution=32)
    assert "translucent" in capsys.readouterr().err
    # Export marches the density level where the fallback solid meets the outside; for a
    # uniform ball that level is the density step itself, so the mesh sits at the ball's edge
    # (0.5) less up to a voxel (1/16) of marching-tet discretisation.
    assert 0.42 < float(mesh.vertices.norm(dim=-1).mean()) < 0.51
    haze = tiny_nerf(blob_density=10.0).eval()
    haze.density = lambda points: torch.full((points.shape[0],), 0.5)
    with pytest.raises(ValueError, match="haze without an object"):
        E.nerf_mesh(haze.density_field(), resolution=32)


def test_largest_component_drops_floaters() -> None:
    big, small = sphere_mesh(0.2, 20, (-0.2, 0, 0)), sphere_mesh(0.08, 20, (0.3, 0, 0))
    both = Mesh(torch.cat([big.vertices, small.vertices]),
                torch.cat([big.faces, small.faces + big.vertices.shape[0]]))
    kept = E.largest_component(both)
    assert kept.faces.shape == big.faces.shape and kept.vertices.shape == big.vertices.shape
    assert float(kept.vertices[:, 0].max()) < 0.05


# ------------------------------------------------------------------------------ scene export


class FakeMeshScene(SceneModule):
    """The part of the Scene protocol export relies on for mesh scenes: extract_mesh(), albedo(points)."""

    def extract_mesh(self) -> Mesh:
        return sphere_mesh(0.25, 12)

    def albedo(self, points: torch.Tensor) -> torch.Tensor:
        return red_blue(points)


@pytest.mark.parametrize("scene", [FakeMeshScene(), tiny_nerf(50.0).eval()], ids=["dmtet", "nerf"])
def test_export_scene_writes_all_files(scene, tmp_path: Path) -> None:
    paths = E.export_scene(scene, tmp_path / "export", name="asset", texture_resolution=64,
                           mesh_resolution=24)
    assert [p.name for p in paths] == ["asset.glb", "asset.obj", "asset.mtl", "asset_albedo.png"]
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    assert len(trimesh.load(paths[0]).geometry) == 1


def test_export_stage_writes_into_stage_export_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import magic3d.runs

    loaded = []
    monkeypatch.setattr(magic3d.runs, "load_stage_scene",
                        lambda stage_dir, device="cpu": loaded.append(Path(stage_dir)) or FakeMeshScene())
    (tmp_path / "stage").mkdir()
    (tmp_path / "stage" / "config.yaml").write_text("seed: 0\n")
    paths = E.export_stage(tmp_path / "stage", texture_resolution=64)
    assert loaded == [tmp_path / "stage"]
    assert all(p.parent == tmp_path / "stage" / "export" and p.is_file() for p in paths)
