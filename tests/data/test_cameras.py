"""Tests for magic3d.data.cameras: look-at frames, random sampling, orbits, view labels."""

from __future__ import annotations

import math

import pytest
import torch

from magic3d.data.cameras import (
    VIEW_NAMES,
    CameraRanges,
    look_at_c2w,
    mvp,
    orbit_cameras,
    projection_matrix,
    sample_random_cameras,
    spherical_to_cartesian,
    stratified_azimuth,
    view_index,
    view_suffix,
    world_to_camera,
)
from magic3d.data.rays import camera_rays
from magic3d.types import CameraBatch

# float32 rotations built from normalised cross products are orthonormal to a few ulps
# (eps ~1.2e-7); 1e-5 leaves room for the ~10 operations involved.
ORTHO_TOL = 1e-5


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_rigid(c2w: torch.Tensor) -> None:
    rot = c2w[:, :3, :3]
    eye = torch.eye(3).expand_as(rot)
    torch.testing.assert_close(rot.transpose(1, 2) @ rot, eye, atol=ORTHO_TOL, rtol=0)
    ones = torch.ones(rot.shape[0])
    torch.testing.assert_close(torch.linalg.det(rot), ones, atol=ORTHO_TOL, rtol=0)
    last_row = torch.tensor([0.0, 0.0, 0.0, 1.0]).expand(c2w.shape[0], 4)
    torch.testing.assert_close(c2w[:, 3], last_row)


def test_look_at_orthonormal_and_points_at_target():
    eye = torch.randn(64, 3, generator=_gen()) * 2
    target = torch.randn(64, 3, generator=_gen(1)) * 0.1
    c2w = look_at_c2w(eye, target)
    _assert_rigid(c2w)
    torch.testing.assert_close(c2w[:, :3, 3], eye)
    # The camera's -z axis is the unit direction to the target.
    expected = torch.nn.functional.normalize(target - eye, dim=-1)
    torch.testing.assert_close(-c2w[:, :3, 2], expected, atol=ORTHO_TOL, rtol=0)
    # Image-up leans towards world +z (no upside-down cameras away from the poles).
    assert (c2w[:, 2, 1] >= -ORTHO_TOL).all()


def test_look_at_known_frame_on_x_axis():
    # Camera at +x looking at the origin: right is +y, up is +z, back is +x.
    c2w = look_at_c2w(torch.tensor([[2.0, 0.0, 0.0]]))
    expected = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    torch.testing.assert_close(c2w[0, :3, :3], expected, atol=1e-6, rtol=0)  # exact up to rounding


@pytest.mark.parametrize("z", [2.0, -2.0])
def test_look_at_overhead_is_finite_and_continuous_with_azimuth_zero(z):
    c2w = look_at_c2w(torch.tensor([[0.0, 0.0, z]]))
    assert torch.isfinite(c2w).all()
    _assert_rigid(c2w)
    torch.testing.assert_close(-c2w[0, :3, 2], torch.tensor([0.0, 0.0, -math.copysign(1, z)]))
    # Fallback matches the limit of azimuth 0 cameras approaching the pole (1e-3 rad away, so
    # the frames differ by ~1e-3).
    near_pole = spherical_to_cartesian(
        torch.tensor([math.copysign(math.pi / 2 - 1e-3, z)]), torch.zeros(1), torch.full((1,), 2.0)
    )
    torch.testing.assert_close(look_at_c2w(near_pole)[:, :3, :3], c2w[:, :3, :3], atol=3e-3, rtol=0)


def test_look_at_rejects_eye_on_target():
    with pytest.raises(ValueError, match="coincides"):
        look_at_c2w(torch.zeros(1, 3))


def test_stratified_azimuth_partial_arc_one_per_bin():
    lo, hi, b = -math.pi / 2, math.pi / 2, 16
    for seed in range(5):
        az = stratified_azimuth(b, (lo, hi), _gen(seed))
        bins = torch.floor((az.sort().values - lo) / ((hi - lo) / b)).long()
        assert bins.tolist() == list(range(b))


def test_stratified_azimuth_full_circle_covers_evenly():
    b, width = 8, 2 * math.pi
    bin_width = width / b
    for seed in range(10):
        az = stratified_azimuth(b, (-math.pi, math.pi), _gen(seed))
        phase = torch.remainder(az + math.pi, width).sort().values
        # The bin grid is rotated by less than one bin: sample k lies in [k, k + 1) bins plus
        # the offset. Sorted, the i-th phase is in bin i or i + 1 unless the last sample
        # wrapped past 2 pi and became the smallest, in which case it is in bin i - 1 or i.
        idx = torch.floor(phase / bin_width).long().tolist()
        no_wrap = all(i <= k <= i + 1 for i, k in enumerate(idx))
        wrapped = all(i - 1 <= k <= i for i, k in enumerate(idx[1:], start=1)) and idx[0] == 0
        assert no_wrap or wrapped, idx
        gaps = torch.diff(torch.cat([phase, phase[:1] + width]))
        assert (gaps < 2 * bin_width).all()


def test_sample_random_cameras_shapes_ranges_and_determinism():
    ranges = CameraRanges()
    cams = sample_random_cameras(ranges, 32, 48, 64, _gen(3))
    assert isinstance(cams, CameraBatch)
    assert cams.c2w.shape == (32, 4, 4) and cams.light_position.shape == (32, 3)
    for t in (cams.fovy, cams.elevation, cams.azimuth, cams.distance):
        assert t.shape == (32,) and t.dtype == torch.float32
    assert (cams.height, cams.width) == (48, 64)
    _assert_rigid(cams.c2w)
    # Ranges are closed intervals; 1e-4 deg covers the float32 degree/radian round trip (~1e-5).
    deg = torch.rad2deg
    assert ((cams.distance >= 1.5) & (cams.distance <= 2.0)).all()
    assert ((deg(cams.elevation) >= -10 - 1e-4) & (deg(cams.elevation) <= 90 + 1e-4)).all()
    assert ((deg(cams.fovy) >= 40 - 1e-4) & (deg(cams.fovy) <= 70 + 1e-4)).all()
    assert ((cams.azimuth > -math.pi) & (cams.azimuth <= math.pi)).all()
    # Fields agree with the camera matrix; default float32 tolerances (atol 1e-5, rtol 1.3e-6)
    # suit values computed by the same trig formula.
    torch.testing.assert_close(
        cams.position, spherical_to_cartesian(cams.elevation, cams.azimuth, cams.distance)
    )
    light_dist = cams.light_position.norm(dim=-1)
    assert ((light_dist >= 0.8 - 1e-5) & (light_dist <= 1.5 + 1e-5)).all()  # float32 norm rounding

    # Every draw follows the generator: the same seed repeats each field bit for bit, another
    # seed changes every value of every drawn field (continuous draws: equal values would
    # mean a draw ignored the generator).
    again = sample_random_cameras(ranges, 32, 48, 64, _gen(3))
    other = sample_random_cameras(ranges, 32, 48, 64, _gen(4))
    for name in ("c2w", "fovy", "elevation", "azimuth", "distance", "light_position"):
        torch.testing.assert_close(getattr(again, name), getattr(cams, name), atol=0, rtol=0, msg=name)
    for name in ("position", "fovy", "elevation", "azimuth", "distance", "light_position"):
        assert (getattr(other, name) != getattr(cams, name)).all(), name


def test_azimuth_turns_counter_clockwise_from_x_to_y():
    # Azimuth 0 is the front (+x), +90 deg the +y side, 180 deg the back (-x), -90 deg -y;
    # elevation 90 deg is straight above. float32 cos(pi / 2) is -4.4e-8, so zeros are ~1e-7.
    deg = torch.tensor([0.0, 90.0, 180.0, -90.0, 0.0])
    elevation = torch.deg2rad(torch.tensor([0.0, 0.0, 0.0, 0.0, 90.0]))
    got = spherical_to_cartesian(elevation, torch.deg2rad(deg), torch.full((5,), 2.0))
    expected = torch.tensor([[2.0, 0, 0], [0, 2.0, 0], [-2.0, 0, 0], [0, -2.0, 0], [0, 0, 2.0]])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    # The sampler and the orbit agree: a camera drawn at azimuth +90 deg sits on +y looking at -y.
    ranges = CameraRanges(azimuth_deg=(90.0, 90.0), elevation_deg=(0.0, 0.0))
    cams = sample_random_cameras(ranges, 4, 8, 8, _gen())
    torch.testing.assert_close(cams.position / cams.distance[:, None], expected[1].expand(4, 3) / 2,
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(-cams.c2w[:, :3, 2], torch.tensor([0.0, -1.0, 0.0]).expand(4, 3),
                               atol=1e-6, rtol=0)
    orbit = orbit_cameras(4, elevation_deg=0.0, distance=2.0, fovy_deg=50.0, height=8, width=8)
    torch.testing.assert_close(orbit.position, expected[:4], atol=1e-6, rtol=0)


def test_custom_ranges_respected():
    ranges = CameraRanges(
        distance=(3.0, 3.5),
        elevation_deg=(10.0, 20.0),
        azimuth_deg=(0.0, 90.0),
        fovy_deg=(30.0, 30.0),
    )
    cams = sample_random_cameras(ranges, 64, 8, 8, _gen())
    tol = 1e-4  # degrees; float32 radian/degree conversion error is ~1e-5
    deg = torch.rad2deg
    assert ((cams.distance >= 3.0) & (cams.distance <= 3.5)).all()
    assert ((deg(cams.elevation) >= 10 - tol) & (deg(cams.elevation) <= 20 + tol)).all()
    assert ((deg(cams.azimuth) >= -tol) & (deg(cams.azimuth) <= 90 + tol)).all()
    torch.testing.assert_close(deg(cams.fovy), torch.full((64,), 30.0))


def test_uniform_area_elevation_puts_fewer_views_near_pole():
    n = 4000
    angle = sample_random_cameras(CameraRanges(elevation_deg=(0, 90)), n, 8, 8, _gen()).elevation
    area = sample_random_cameras(
        CameraRanges(elevation_deg=(0, 90), elevation_sampling="uniform_area"), n, 8, 8, _gen()
    ).elevation
    # Uniform area: P(el > 60 deg) = 1 - sin 60 = 0.134; uniform angle: 1/3. With n = 4000 the
    # standard error of each fraction is < 0.008, so 0.05 margins are > 6 sigma.
    assert abs((angle > math.radians(60)).float().mean().item() - 1 / 3) < 0.05
    expected_area = 1 - math.sin(math.radians(60))
    assert abs((area > math.radians(60)).float().mean().item() - expected_area) < 0.05


def test_perturbations_keep_frames_rigid_and_labels_consistent():
    ranges = CameraRanges(camera_perturb=0.1, center_perturb=0.05, up_perturb=0.05)
    cams = sample_random_cameras(ranges, 16, 8, 8, _gen())
    _assert_rigid(cams.c2w)
    # Labels are recomputed from the jittered position; 1e-5 is float32 trig round-trip error.
    from_labels = spherical_to_cartesian(cams.elevation, cams.azimuth, cams.distance)
    torch.testing.assert_close(cams.position, from_labels, atol=1e-5, rtol=0)
    # With center jitter the camera no longer looks exactly at the origin.
    dirs = -cams.c2w[:, :3, 2]
    to_origin = torch.nn.functional.normalize(-cams.position, dim=-1)
    assert ((dirs * to_origin).sum(-1) < 1 - 1e-6).any()


@pytest.mark.parametrize("strategy", ["magic3d", "dreamfusion"])
def test_lights_near_camera_within_distance(strategy):
    ranges = CameraRanges(light_sample_strategy=strategy, light_distance=(0.8, 1.5))
    cams = sample_random_cameras(ranges, 256, 8, 8, _gen())
    light_dist = cams.light_position.norm(dim=-1)
    assert ((light_dist >= 0.8 - 1e-5) & (light_dist <= 1.5 + 1e-5)).all()  # float32 norm rounding
    cos = (torch.nn.functional.normalize(cams.light_position, dim=-1)
           * torch.nn.functional.normalize(cams.position, dim=-1)).sum(-1)
    if strategy == "magic3d":
        # Elevation >= 30 deg above the plane orthogonal to the view axis: within 60 deg of it.
        assert (cos >= math.cos(math.radians(60)) - 1e-5).all()
    else:
        assert cos.mean() > 0.5  # noise of std 1 around a unit+ vector: mostly on the camera side


def test_magic3d_light_at_pole_is_finite():
    ranges = CameraRanges(elevation_deg=(90.0, 90.0))
    cams = sample_random_cameras(ranges, 4, 8, 8, _gen())
    assert torch.isfinite(cams.light_position).all() and torch.isfinite(cams.c2w).all()


def test_invalid_ranges_raise():
    with pytest.raises(ValueError, match="elevation_deg"):
        CameraRanges(elevation_deg=(0.0, 100.0))
    with pytest.raises(ValueError, match="distance"):
        CameraRanges(distance=(2.0, 1.0))
    with pytest.raises(ValueError, match="fovy_deg"):
        CameraRanges(fovy_deg=(0.0, 10.0))
    with pytest.raises(ValueError, match="elevation_sampling"):
        CameraRanges(elevation_sampling="bogus")  # type: ignore[arg-type]


def test_orbit_cameras_start_at_front_and_are_evenly_spaced():
    cams = orbit_cameras(8, elevation_deg=0.0, distance=2.0, fovy_deg=50.0, height=16, width=16)
    assert cams.batch_size == 8
    assert cams.azimuth[0].item() == 0.0
    # Default float32 tolerances: cos/sin of 0 are exact, the rest is single rounding.
    torch.testing.assert_close(cams.position[0], torch.tensor([2.0, 0.0, 0.0]))
    steps = torch.diff(torch.remainder(cams.azimuth, 2 * math.pi))
    torch.testing.assert_close(steps, torch.full((7,), 2 * math.pi / 8))
    _assert_rigid(cams.c2w)
    torch.testing.assert_close(cams.light_position, cams.position)
    assert (view_index(cams.elevation, cams.azimuth)[0] == 0).item()


def test_rays_through_image_centre_hit_origin():
    # Even sizes: the centre is a pixel corner, so average the 4 central rays' directions
    # (symmetric about the optical axis) to get the exact principal ray.
    cams = sample_random_cameras(CameraRanges(), 6, 16, 20, _gen(7))
    rays = camera_rays(cams)
    centre = rays.directions[:, 7:9, 9:11].mean(dim=(1, 2))
    centre = torch.nn.functional.normalize(centre, dim=-1)
    to_origin = torch.nn.functional.normalize(-cams.position, dim=-1)
    torch.testing.assert_close(centre, to_origin, atol=1e-5, rtol=0)  # float32 einsum + norms
    torch.testing.assert_close(rays.origins[:, 0, 0], cams.position)


def test_view_index_hand_picked_and_boundaries():
    cases = [  # (elevation deg, azimuth deg, expected)
        (0, 0, "front"),
        (0, 44.9, "front"),
        (0, 45, "side"),
        (0, -45, "side"),
        (0, 90, "side"),
        (0, 135, "side"),
        (0, 135.1, "back"),
        (0, -135.1, "back"),
        (0, 180, "back"),
        (0, -180, "back"),
        (60, 0, "front"),
        (60.1, 0, "overhead"),
        (89, 180, "overhead"),
        (-30, 170, "back"),
        (0, 360, "front"),
        (0, 315, "side"),
    ]
    el = torch.deg2rad(torch.tensor([c[0] for c in cases], dtype=torch.float32))
    az = torch.deg2rad(torch.tensor([c[1] for c in cases], dtype=torch.float32))
    # Feed boundary values exactly as the radians the thresholds use.
    az[2], az[3], az[5] = math.radians(45), -math.radians(45), math.radians(135)
    el[10] = math.radians(60)
    got = [VIEW_NAMES[i] for i in view_index(el, az).tolist()]
    assert got == [c[2] for c in cases]


def test_view_suffix():
    assert view_suffix(0) == ", front view"
    assert view_suffix(torch.tensor(3)) == ", overhead view"
    with pytest.raises(ValueError):
        view_suffix(4)


def test_mvp_projects_origin_to_image_centre_and_keeps_depth_order():
    cams = sample_random_cameras(CameraRanges(), 8, 32, 48, _gen(2))
    m = mvp(cams, near=0.1, far=10.0)
    clip = m @ torch.tensor([0.0, 0.0, 0.0, 1.0])
    ndc = clip[:, :3] / clip[:, 3:]
    torch.testing.assert_close(ndc[:, :2], torch.zeros(8, 2), atol=1e-5, rtol=0)  # float32 matmuls
    assert ((ndc[:, 2] > -1) & (ndc[:, 2] < 1)).all()
    # A point at the top edge of the view (along the camera's +y at the fovy/2 angle) maps to
    # NDC y = +1 and a point at the right edge to x = +1.
    dist = cams.distance
    up, right = cams.c2w[:, :3, 1], cams.c2w[:, :3, 0]
    top = dist[:, None] * torch.tan(cams.fovy / 2)[:, None] * up
    edge_right = dist[:, None] * torch.tan(cams.fovy / 2)[:, None] * (48 / 32) * right
    for point, axis in ((top, 1), (edge_right, 0)):
        clip = (m @ torch.cat([point, torch.ones(8, 1)], -1)[..., None])[..., 0]
        torch.testing.assert_close(clip[:, axis] / clip[:, 3], torch.ones(8), atol=1e-4, rtol=0)


def test_world_to_camera_inverts_c2w():
    cams = sample_random_cameras(CameraRanges(), 8, 8, 8, _gen())
    torch.testing.assert_close(world_to_camera(cams.c2w) @ cams.c2w, torch.eye(4).expand(8, 4, 4),
                               atol=1e-5, rtol=0)  # float32 rigid inverse, values of order 2
    proj = projection_matrix(cams.fovy, 1.0)
    assert proj.shape == (8, 4, 4)
    with pytest.raises(ValueError):
        projection_matrix(cams.fovy, 1.0, near=1.0, far=0.5)
