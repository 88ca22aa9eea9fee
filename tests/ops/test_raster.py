"""Pure-torch rasteriser: coverage, barycentrics, depth, interpolation, antialiasing gradients."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from magic3d.data.cameras import mvp, orbit_cameras
from magic3d.data.rays import camera_rays
from magic3d.ops.raster import (
    Rasterizer,
    antialias,
    edge_opposites,
    interpolate,
    rasterize,
)

GOLDEN_DIR = Path(__file__).parent / "golden"
UPDATE_GOLDEN = os.environ.get("MAGIC3D_UPDATE_GOLDEN") == "1"


def _homogeneous(points: torch.Tensor) -> torch.Tensor:
    return torch.cat([points, torch.ones_like(points[..., :1])], dim=-1)


def _two_triangles(dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """A far red-ish triangle and a nearer one overlapping it, with varied w (perspective)."""
    pos = torch.tensor(
        [
            [-0.8, -0.7, 0.5, 1.0], [0.75, -0.55, 0.4, 1.0], [0.05, 0.85, 0.6, 1.0],
            [-0.6, 0.5, 0.1, 1.3], [1.1, 0.65, 0.0, 1.2], [0.3, -1.0, -0.2, 1.4],
        ],
        dtype=dtype,
    )
    return pos, torch.tensor([[0, 1, 2], [3, 4, 5]])


# ----------------------------------------------------------------------------- brute force


def _brute_force(pos: torch.Tensor, faces: torch.Tensor, h: int, w: int):
    """Readable per-pixel reference (vertices in front of the camera only).

    Screen-space barycentrics of the projected triangle, corrected for perspective by 1/w;
    depth z/w is linear in screen space. Nearest fragment wins, ties to the lower face id.
    """
    uv = np.zeros((h, w, 2))
    depth = np.zeros((h, w))
    face_id = -np.ones((h, w), dtype=np.int64)
    p = pos.double().numpy()
    for row in range(h):
        for col in range(w):
            x = (col + 0.5) / w * 2 - 1
            y = 1 - (row + 0.5) / h * 2  # row 0 is the top (NDC y = +1)
            best = math.inf
            for f, (i0, i1, i2) in enumerate(faces.tolist()):
                a, b, c = p[i0], p[i1], p[i2]
                (ax, ay), (bx, by), (cx, cy) = a[:2] / a[3], b[:2] / b[3], c[:2] / c[3]
                area = (bx - ax) * (cy - ay) - (cx - ax) * (by - ay)
                if area == 0:
                    continue
                l0 = ((bx - x) * (cy - y) - (cx - x) * (by - y)) / area
                l1 = ((cx - x) * (ay - y) - (ax - x) * (cy - y)) / area
                l2 = 1 - l0 - l1
                if min(l0, l1, l2) < 0:
                    continue
                z = l0 * a[2] / a[3] + l1 * b[2] / b[3] + l2 * c[2] / c[3]
                if not -1 <= z <= 1 or z >= best:
                    continue
                persp = np.array([l0 / a[3], l1 / b[3], l2 / c[3]])
                persp /= persp.sum()
                best = z
                uv[row, col] = persp[:2]
                depth[row, col] = z
                face_id[row, col] = f
    return uv, depth, face_id


def test_matches_brute_force_reference():
    pos, faces = _two_triangles(torch.float64)
    rast = rasterize(pos, faces, (8, 8))
    uv, depth, face_id = _brute_force(pos, faces, 8, 8)
    assert rast.face_id.shape == (1, 8, 8)
    assert rast.face_id[0].tolist() == face_id.tolist()
    # float64 on both sides, different formulas (homogeneous vs projected): rounding only.
    np.testing.assert_allclose(rast.uv[0].numpy(), uv, atol=1e-10)
    np.testing.assert_allclose(rast.depth[0].numpy(), depth, atol=1e-10)
    assert (rast.face_id == 0).any() and (rast.face_id == 1).any() and (rast.face_id < 0).any()


def test_occlusion_nearer_triangle_wins_whatever_the_order():
    pos, faces = _two_triangles()
    for order in (faces, faces.flip(0)):
        rast = rasterize(pos, order, (16, 16))
        ids = order[rast.face_id.clamp(min=0)][..., 0]  # first vertex identifies the triangle
        both = _coverage(pos, torch.tensor([[0, 1, 2]]), 16) & _coverage(pos, torch.tensor([[3, 4, 5]]), 16)
        assert both.any()
        assert (ids[both] == 3).all()  # the second triangle (z/w <= 0.1) is in front


def _coverage(pos, faces, res):
    return rasterize(pos, faces, (res, res)).face_id >= 0


def test_chunking_batching_and_dtype_do_not_change_the_result():
    pos, faces = _two_triangles()
    ref = rasterize(pos, faces, (16, 16))
    small = rasterize(pos, faces, (16, 16), chunk_pairs=1)  # one face per chunk at least
    batched = rasterize(torch.stack([pos, pos]), faces, (16, 16))
    assert torch.equal(small.face_id, ref.face_id) and torch.equal(small.uv, ref.uv)
    assert torch.equal(batched.face_id[1], ref.face_id[0])
    assert torch.equal(batched.uv[1], ref.uv[0])


def test_vertices_behind_the_camera_are_clipped_not_mirrored():
    # A large floor triangle passing under and behind the camera: one vertex has w < 0.
    cams = orbit_cameras(1, 10.0, 2.0, 60.0, 12, 12)
    world = torch.tensor([[-1.0, -3.0, -0.3], [-1.0, 3.0, -0.3], [6.0, 0.0, -0.3]])
    clip = _homogeneous(world) @ mvp(cams)[0].T
    assert (clip[:, 3] < 0).any() and (clip[:, 3] > 0).any()
    rast = rasterize(clip, torch.tensor([[0, 1, 2]]), (12, 12))
    rays = camera_rays(cams)
    t = (-0.3 - rays.origins[..., 2]) / rays.directions[..., 2]
    hit = rays.origins + t[..., None] * rays.directions
    # Ray/plane hits in front of the camera inside the triangle (x <= 6 - 7|y|/3 and x >= -1).
    inside = (t > 0) & (hit[..., 0] >= -1) & (hit[..., 0] <= 6 - 7 * hit[..., 1].abs() / 3)
    assert torch.equal(rast.face_id >= 0, inside)


# ----------------------------------------------------------------------------- interpolate


def test_interpolate_constant_attributes():
    pos, faces = _two_triangles()
    rast = rasterize(pos, faces, (16, 16))
    attr = torch.tensor([0.25, -2.0]).expand(6, 2)
    out = interpolate(attr, rast, faces)
    covered = rast.face_id >= 0
    # u + v + (1 - u - v) = 1 up to float32 rounding of a few terms.
    torch.testing.assert_close(out[covered], attr[:1].expand(int(covered.sum()), 2), atol=1e-6, rtol=0)
    assert (out[~covered] == 0).all()


def test_perspective_correct_texture_coordinates_match_ray_plane_hits():
    # A floor quad z = 0 in [-0.5, 0.5]^2 seen from 35 deg above: its texture coordinate is
    # the world (x, y) of the surface point, which the camera's ray through the pixel gives.
    h = w = 24
    cams = orbit_cameras(1, 35.0, 1.6, 50.0, h, w)
    world = torch.tensor([[-0.5, -0.5, 0.0], [0.5, -0.5, 0.0], [0.5, 0.5, 0.0], [-0.5, 0.5, 0.0]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    clip = torch.einsum("bij,vj->bvi", mvp(cams), _homogeneous(world))
    rast = rasterize(clip, faces, (h, w))
    texcoord = interpolate(world[:, :2], rast, faces)

    rays = camera_rays(cams)
    t = -rays.origins[..., 2] / rays.directions[..., 2]
    hit = (rays.origins + t[..., None] * rays.directions)[..., :2]
    inside = (hit.abs() < 0.5).all(-1)
    covered = rast.face_id >= 0
    assert torch.equal(covered, inside)  # also checks row 0 = top, like camera_rays
    # float32 projection and ray arithmetic on O(1) coordinates: ~1e-6, allow 1e-5.
    torch.testing.assert_close(texcoord[covered], hit[covered], atol=1e-5, rtol=0)
    # Affine (screen-space) interpolation would be off by far more than the tolerance here.
    screen_affine_error = _affine_error(clip[0], faces, rast, world)
    assert screen_affine_error > 1e-2


def _affine_error(clip, faces, rast, world):
    """Max texcoord error if barycentrics were not perspective-corrected."""
    w = clip[:, 3]
    persp = torch.cat([rast.uv, 1 - rast.uv.sum(-1, keepdim=True)], -1)
    verts_w = w[faces[rast.face_id.clamp(min=0)]]
    affine = persp * verts_w  # screen-space barycentrics are proportional to persp * w
    affine = affine / affine.sum(-1, keepdim=True)
    a = world[:, :2][faces[rast.face_id.clamp(min=0)]]
    tc_affine = (affine[..., None] * a).sum(-2)
    tc_persp = (persp[..., None] * a).sum(-2)
    covered = rast.face_id >= 0
    return float((tc_affine - tc_persp)[covered].abs().max())


def test_gradcheck_interpolate_through_positions_and_attributes():
    pos, faces = _two_triangles(torch.float64)
    pos = pos.clone().requires_grad_(True)
    attr = torch.rand(6, 2, dtype=torch.float64, requires_grad=True)

    def f(p, a):
        return interpolate(a, rasterize(p, faces, (8, 8)), faces)

    # Perturbations of 1e-6 move no pixel centre across an edge of this scene.
    assert torch.autograd.gradcheck(f, (pos, attr), eps=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- antialias


def _single_triangle(dtype=torch.float64):
    pos = torch.tensor([[-0.61, -0.57, 0.2, 1.0], [0.53, -0.43, 0.2, 1.0], [-0.07, 0.66, 0.2, 1.0]],
                       dtype=dtype)
    return pos, torch.tensor([[0, 1, 2]])


def _aa_mask_sum(pos, faces, res=32):
    rast = rasterize(pos, faces, (res, res))
    return antialias(rast.mask, rast, pos, faces).sum(), rast


def test_antialiased_mask_approximates_the_true_area():
    pos, faces = _single_triangle()
    total, rast = _aa_mask_sum(pos, faces)
    p = pos[:, :2] * 16  # NDC -> pixels at 32x32
    area = 0.5 * abs(float((p[1, 0] - p[0, 0]) * (p[2, 1] - p[0, 1]) - (p[2, 0] - p[0, 0]) * (p[1, 1] - p[0, 1])))
    hard = float(rast.mask.sum())
    # The per-pair 1-D coverage estimate is not exact area, but much closer than hard coverage
    # on this 300-pixel triangle: within 2 %.
    assert abs(float(total) - area) < 0.02 * area
    assert abs(float(total) - area) < abs(hard - area)


def test_silhouette_gradient_matches_finite_difference():
    pos, faces = _single_triangle()
    pos = pos.clone().requires_grad_(True)
    total, rast = _aa_mask_sum(pos, faces)
    total.backward()
    grad = pos.grad[1, 0].item()  # d(mask sum) / d(x of the right-most vertex)
    step = 1e-6  # NDC units = 1.6e-5 px: no pixel centre changes side
    plus, minus = pos.detach().clone(), pos.detach().clone()
    plus[1, 0] += step
    minus[1, 0] -= step
    s_plus, r_plus = _aa_mask_sum(plus, faces)
    s_minus, r_minus = _aa_mask_sum(minus, faces)
    assert torch.equal(r_plus.face_id, rast.face_id) and torch.equal(r_minus.face_id, rast.face_id)
    fd = (s_plus - s_minus).item() / (2 * step)
    # The sum is a smooth rational function of the vertex between coverage changes; float64
    # central differences are accurate to ~1e-8 relative here, 1e-6 leaves margin.
    assert grad > 0
    assert fd == pytest.approx(grad, rel=1e-6)


def test_moving_an_edge_outward_grows_the_antialiased_mask():
    pos, faces = _single_triangle()
    before, _ = _aa_mask_sum(pos, faces)
    moved = pos.clone()
    moved[1, 0] += 0.03  # half a pixel to the right, away from the triangle
    after, _ = _aa_mask_sum(moved, faces)
    assert after > before
    # The exact area grows by 0.5 * base * shift (in pixels); the estimate follows within 20%.
    p = pos[:, :2] * 16
    growth = 0.5 * abs(float(p[2, 1] - p[0, 1])) * 0.03 * 16
    assert float(after - before) == pytest.approx(growth, rel=0.2)


def test_gradients_reach_positions_through_interpolate_and_antialias():
    pos, faces = _two_triangles()
    pos = pos.clone().requires_grad_(True)
    colours = torch.tensor([[1.0, 0, 0]] * 3 + [[0, 1.0, 0]] * 3)
    rast = rasterize(pos, faces, (16, 16))
    rgb = antialias(interpolate(colours, rast, faces), rast, pos, faces)
    mask = antialias(rast.mask, rast, pos, faces)
    weights = torch.rand(1, 16, 16, 4, generator=torch.Generator().manual_seed(0))
    (torch.cat([rgb, mask], -1) * weights).sum().backward()
    assert torch.isfinite(pos.grad).all()
    assert (pos.grad[:, [0, 1, 3]].abs().sum(-1) > 0).all()  # every vertex moves in x, y or w
    assert (pos.grad[:, 2] == 0).all()  # depth carries no gradient, as in nvdiffrast


def test_antialias_leaves_interior_pixels_alone():
    pos, faces = _two_triangles()
    rast = rasterize(pos, faces, (16, 16))
    colour = torch.rand(1, 16, 16, 3, generator=torch.Generator().manual_seed(1))
    out = antialias(colour, rast, pos, faces)
    fid = rast.face_id[0]
    same = torch.ones_like(fid, dtype=torch.bool)
    same[:, :-1] &= fid[:, :-1] == fid[:, 1:]
    same[:, 1:] &= fid[:, 1:] == fid[:, :-1]
    same[:-1] &= fid[:-1] == fid[1:]
    same[1:] &= fid[1:] == fid[:-1]
    assert torch.equal(out[0][same], colour[0][same])
    assert not torch.equal(out, colour)


def test_shared_edges_are_not_silhouettes():
    # Two coplanar triangles forming a square: the diagonal is interior, nothing blends there.
    pos = torch.tensor([[-0.5, -0.5, 0, 1], [0.5, -0.5, 0, 1], [0.5, 0.5, 0, 1], [-0.5, 0.5, 0, 1.0]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    assert edge_opposites(faces).tolist() == [[-1, 3, -1], [-1, -1, 1]]
    rast = rasterize(pos, faces, (16, 16))
    colour = torch.ones(1, 16, 16, 1)
    colour[rast.face_id == 1] = 2.0  # different colour per face: a blend would show
    out = antialias(colour, rast, pos, faces)
    # The square covers pixels 4..11; rows/columns 5..10 are away from its outer boundary.
    assert torch.equal(out[0, 5:11, 5:11], colour[0, 5:11, 5:11])
    assert (rast.face_id[0, 5:11, 5:11] == 0).any() and (rast.face_id[0, 5:11, 5:11] == 1).any()


# ----------------------------------------------------------------------------- golden + backends


def test_golden_two_triangles():
    pos, faces = _two_triangles()
    colours = torch.tensor([[1.0, 0, 0], [1.0, 0.5, 0], [1.0, 0, 0.5], [0, 0, 1.0], [0, 1.0, 1.0], [0, 0.5, 1.0]])
    rast = rasterize(pos, faces, (32, 32))
    image = antialias(interpolate(colours, rast, faces), rast, pos, faces)[0].numpy()
    path = GOLDEN_DIR / "two_triangles_32.npy"
    if UPDATE_GOLDEN or not path.exists():
        if not UPDATE_GOLDEN:
            pytest.fail(f"{path} missing: run with MAGIC3D_UPDATE_GOLDEN=1 to create it")
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, image.astype(np.float32))
    golden = np.load(path)
    # float32 arithmetic whose order may differ across torch builds: a few ulps of O(1) values.
    np.testing.assert_allclose(image, golden, atol=1e-5, rtol=0)


def test_backend_switch():
    assert Rasterizer("torch").rasterize(*_two_triangles(), (8, 8)).face_id.shape == (1, 8, 8)
    with pytest.raises(ValueError, match="backend"):
        Rasterizer("opengl")  # type: ignore[arg-type]
    try:
        import nvdiffrast.torch  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="nvdiffrast"):
            Rasterizer("nvdiffrast")
    # auto never needs nvdiffrast on CPU
    auto = Rasterizer("auto")
    pos, faces = _two_triangles()
    assert torch.equal(auto.rasterize(pos, faces, (8, 8)).face_id, rasterize(pos, faces, (8, 8)).face_id)


def test_bad_inputs_raise_clear_errors():
    pos, faces = _two_triangles()
    with pytest.raises(ValueError, match="clip_pos"):
        rasterize(pos[:, :3], faces, (8, 8))
    with pytest.raises(ValueError, match="faces"):
        rasterize(pos, faces + 10, (8, 8))
    with pytest.raises(ValueError, match="resolution"):
        rasterize(pos, faces, (0, 8))


@pytest.mark.gpu
def test_cuda_matches_cpu():
    cams = orbit_cameras(4, 20.0, 1.6, 45.0, 64, 64)
    from magic3d.ops.raster import _uv_sphere

    verts, sphere = _uv_sphere(2000, torch.device("cpu"))
    clip = torch.einsum("bij,vj->bvi", mvp(cams), _homogeneous(verts)).requires_grad_(True)
    colours = torch.rand(verts.shape[0], 3)

    def run(device):
        c = clip.detach().to(device).requires_grad_(True)
        f = sphere.to(device)
        rast = rasterize(c, f, (64, 64))
        rgb = antialias(interpolate(colours.to(device), rast, f), rast, c, f)
        rgb.sum().backward()
        return rast.face_id.cpu(), rgb.detach().cpu(), c.grad.cpu()

    ids_cpu, rgb_cpu, grad_cpu = run("cpu")
    ids_gpu, rgb_gpu, grad_gpu = run("cuda")
    # Same float32 formulas; fused multiply-adds on the GPU may flip a pixel centre that lies
    # within rounding of an edge, so allow a handful of differing pixels.
    assert (ids_cpu != ids_gpu).sum() <= 4
    same = (ids_cpu == ids_gpu).all(-1).all(-1)
    assert same.any()
    torch.testing.assert_close(rgb_gpu[same], rgb_cpu[same], atol=1e-4, rtol=0)


def test_rasterizer_reuses_topology_only_for_the_same_faces():
    pos, faces = _two_triangles()
    raster = Rasterizer("torch")
    rast = raster.rasterize(pos, faces, (16, 16))
    colour = torch.rand(1, 16, 16, 3, generator=torch.Generator().manual_seed(2))
    first = raster.antialias(colour, rast, pos, faces)
    again = raster.antialias(colour, rast, pos, faces)
    assert torch.equal(first, again) and torch.equal(first, antialias(colour, rast, pos, faces))
    flipped = faces.flip(0)  # a different tensor: topology recomputed
    rast2 = raster.rasterize(pos, flipped, (16, 16))
    torch.testing.assert_close(raster.antialias(colour, rast2, pos, flipped),
                               antialias(colour, rast2, pos, flipped), atol=0, rtol=0)
