"""Camera sampling for text-to-3D stages: random training views, orbits, view labels, projections.

Pure functions only (no module state): every random draw comes from the ``torch.Generator``
passed in, so a batch is reproducible from its generator alone. Conventions follow
``magic3d.types``: world +z up, OpenGL camera axes, azimuth 0 on the +x axis ("front"),
azimuth counter-clockwise seen from +z and wrapped to (-pi, pi], angles in radians in code and
degrees in ``CameraRanges`` (which mirrors the YAML configs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from magic3d.types import CameraBatch

VIEW_NAMES: tuple[str, ...] = ("front", "side", "back", "overhead")

# Below this |forward x up| the look-at frame is numerically undefined (camera looking along
# `up`); 1e-4 rad keeps the float32 cross product accurate to ~1e-3 in direction.
_DEGENERATE_SIN = 1e-4


def wrap_angle(angle: Float[Tensor, "*shape"]) -> Float[Tensor, "*shape"]:
    """Wrap radians to (-pi, pi]; pi stays pi and -pi maps to pi."""
    two_pi = 2.0 * math.pi
    return angle - two_pi * torch.ceil((angle - math.pi) / two_pi)


def _fallback_up(up: Float[Tensor, "B 3"], forward: Float[Tensor, "B 3"]) -> Float[Tensor, "B 3"]:
    """An up vector for cameras looking (anti-)parallel to ``up``.

    For the default ``up = +z`` this gives the limit of the azimuth-0 camera as its elevation
    goes to +-90 deg: looking straight down, image-up points to -x (the far side of the orbit).
    """
    e_y = torch.tensor([0.0, 1.0, 0.0], dtype=up.dtype, device=up.device).expand_as(up)
    e_x = torch.tensor([1.0, 0.0, 0.0], dtype=up.dtype, device=up.device).expand_as(up)
    perp = torch.linalg.cross(up, e_y)
    # `up` along y has no perpendicular from e_y; any other perpendicular will do.
    use_x = perp.norm(dim=-1, keepdim=True) < 1e-6
    perp = torch.where(use_x, torch.linalg.cross(up, e_x), perp)
    looking_down = (forward * up).sum(-1, keepdim=True) < 0
    return torch.where(looking_down, perp, -perp)


def look_at_c2w(
    eye: Float[Tensor, "B 3"],
    target: Float[Tensor, "B 3"] | Float[Tensor, "3"] | None = None,
    up: Float[Tensor, "B 3"] | Float[Tensor, "3"] | None = None,
) -> Float[Tensor, "B 4 4"]:
    """OpenGL camera-to-world matrices for cameras at ``eye`` looking at ``target``.

    Columns of the rotation are the camera's +x (right), +y (image up) and +z (backwards: the
    camera looks down its -z). ``target`` defaults to the origin and ``up`` to world +z. When a
    camera looks along ``up`` (elevation +-90 deg) a fixed fallback up is used instead, so the
    result stays finite and orthonormal.
    """
    if eye.ndim != 2 or eye.shape[-1] != 3:
        raise ValueError(f"eye must have shape (B, 3), got {tuple(eye.shape)}")
    b = eye.shape[0]
    if target is None:
        target = torch.zeros(3, dtype=eye.dtype, device=eye.device)
    if up is None:
        up = torch.tensor([0.0, 0.0, 1.0], dtype=eye.dtype, device=eye.device)
    target = target.to(eye).expand(b, 3)
    up = F.normalize(up.to(eye).expand(b, 3), dim=-1)

    forward = target - eye
    if bool((forward.norm(dim=-1) < 1e-8).any()):
        raise ValueError("look_at_c2w: eye coincides with target; move the camera off the target")
    forward = F.normalize(forward, dim=-1)
    right = torch.linalg.cross(forward, up)
    degenerate = right.norm(dim=-1, keepdim=True) < _DEGENERATE_SIN
    right = torch.where(degenerate, torch.linalg.cross(forward, _fallback_up(up, forward)), right)
    right = F.normalize(right, dim=-1)
    cam_up = torch.linalg.cross(right, forward)  # unit: right and forward are orthonormal

    c2w = torch.zeros(b, 4, 4, dtype=eye.dtype, device=eye.device)
    c2w[:, :3, 0] = right
    c2w[:, :3, 1] = cam_up
    c2w[:, :3, 2] = -forward
    c2w[:, :3, 3] = eye
    c2w[:, 3, 3] = 1.0
    return c2w


def spherical_to_cartesian(
    elevation: Float[Tensor, "B"], azimuth: Float[Tensor, "B"], distance: Float[Tensor, "B"]
) -> Float[Tensor, "B 3"]:
    """Point at ``distance`` from the origin; elevation above the xy plane, azimuth from +x."""
    return torch.stack(
        [
            distance * torch.cos(elevation) * torch.cos(azimuth),
            distance * torch.cos(elevation) * torch.sin(azimuth),
            distance * torch.sin(elevation),
        ],
        dim=-1,
    )


def _check_range(name: str, value: tuple[float, float], low: float, high: float) -> None:
    lo, hi = value
    if not (low <= lo <= hi <= high):
        raise ValueError(
            f"{name}={value!r} is invalid: need {low} <= min <= max <= {high} (give (min, max))"
        )


@dataclass
class CameraRanges:
    """Where random training cameras and their point lights may be.

    Distances in scene units, angles in degrees. Defaults follow threestudio's Magic3D coarse
    setup (distance 1.5-2.0, elevation -10-90, fovy 40-70, light 0.8-1.5 around the camera).
    """

    distance: tuple[float, float] = (1.5, 2.0)
    elevation_deg: tuple[float, float] = (-10.0, 90.0)
    azimuth_deg: tuple[float, float] = (-180.0, 180.0)
    fovy_deg: tuple[float, float] = (40.0, 70.0)
    # "uniform_angle" spends as many views near the pole as near the horizon; "uniform_area"
    # samples the sphere's surface evenly (fewer views near the pole).
    elevation_sampling: Literal["uniform_angle", "uniform_area"] = "uniform_angle"
    camera_perturb: float = 0.0  # std of Gaussian noise on the camera position
    center_perturb: float = 0.0  # std of Gaussian noise on the look-at target
    up_perturb: float = 0.0  # std of Gaussian noise on the up vector (camera roll)
    # "magic3d": light direction within a cone around the camera direction, at
    # `light_elevation_deg` above the plane orthogonal to it (90 = exactly behind the camera).
    # "dreamfusion": camera direction plus Gaussian noise of std `light_position_perturb`.
    light_sample_strategy: Literal["magic3d", "dreamfusion"] = "magic3d"
    light_distance: tuple[float, float] = (0.8, 1.5)
    light_elevation_deg: tuple[float, float] = (30.0, 90.0)
    light_position_perturb: float = 1.0

    def __post_init__(self) -> None:
        # jsonargparse / YAML may hand in lists; keep tuples so ranges compare and print cleanly.
        for name in ("distance", "elevation_deg", "azimuth_deg", "fovy_deg", "light_distance",
                     "light_elevation_deg"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 2:
                raise ValueError(f"{name}={value!r} must be a (min, max) pair")
            setattr(self, name, value)
        _check_range("distance", self.distance, 1e-6, math.inf)
        _check_range("elevation_deg", self.elevation_deg, -90.0, 90.0)
        lo, hi = self.azimuth_deg
        if not (lo <= hi <= lo + 360.0):
            raise ValueError(
                f"azimuth_deg={self.azimuth_deg!r} is invalid: need min <= max <= min + 360"
            )
        if not (0.0 < self.fovy_deg[0] <= self.fovy_deg[1] < 180.0):
            raise ValueError(f"fovy_deg={self.fovy_deg!r} is invalid: need 0 < min <= max < 180")
        _check_range("light_distance", self.light_distance, 1e-6, math.inf)
        _check_range("light_elevation_deg", self.light_elevation_deg, -90.0, 90.0)
        for name in ("camera_perturb", "center_perturb", "up_perturb", "light_position_perturb"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0 (it is a std)")
        if self.elevation_sampling not in ("uniform_angle", "uniform_area"):
            raise ValueError(
                f"elevation_sampling={self.elevation_sampling!r}: "
                "use 'uniform_angle' or 'uniform_area'"
            )
        if self.light_sample_strategy not in ("magic3d", "dreamfusion"):
            raise ValueError(
                f"light_sample_strategy={self.light_sample_strategy!r}: "
                "use 'magic3d' or 'dreamfusion'"
            )


def _uniform(
    n: int, low: float, high: float, generator: torch.Generator | None
) -> Float[Tensor, "n"]:
    return low + (high - low) * torch.rand(n, generator=generator)


def stratified_azimuth(
    batch_size: int,
    azimuth_range: tuple[float, float],
    generator: torch.Generator | None = None,
) -> Float[Tensor, "B"]:
    """Azimuths (radians, wrapped) with one uniform sample in each of B equal bins of the range.

    On a full circle the bin grid is also rotated by a random offset, so no direction is
    favoured by the bin edges; a partial arc is not periodic and keeps its bins fixed.
    """
    lo, hi = azimuth_range
    width = hi - lo
    jitter = torch.rand(batch_size, generator=generator)
    phase = (torch.arange(batch_size, dtype=torch.float32) + jitter) / batch_size * width
    if width >= 2.0 * math.pi - 1e-6:
        offset = torch.rand(1, generator=generator) * width / batch_size
        phase = torch.remainder(phase + offset, width)
    return wrap_angle(lo + phase)


def _orthonormal_frame(
    axis: Float[Tensor, "B 3"],
) -> tuple[Float[Tensor, "B 3"], Float[Tensor, "B 3"]]:
    """Two unit vectors orthogonal to the unit ``axis`` and to each other (any pole is fine)."""
    z = torch.tensor([0.0, 0.0, 1.0], dtype=axis.dtype, device=axis.device).expand_as(axis)
    x = torch.tensor([1.0, 0.0, 0.0], dtype=axis.dtype, device=axis.device).expand_as(axis)
    helper = torch.where((axis * z).sum(-1, keepdim=True).abs() > 0.9, x, z)
    u = F.normalize(torch.linalg.cross(helper, axis), dim=-1)
    v = torch.linalg.cross(axis, u)
    return u, v


def sample_lights(
    camera_positions: Float[Tensor, "B 3"],
    ranges: CameraRanges,
    generator: torch.Generator | None = None,
) -> Float[Tensor, "B 3"]:
    """Point-light positions near each camera's direction (see ``CameraRanges``)."""
    b = camera_positions.shape[0]
    distance = _uniform(b, *ranges.light_distance, generator)
    axis = F.normalize(camera_positions, dim=-1)
    if ranges.light_sample_strategy == "dreamfusion":
        noise = torch.randn(b, 3, generator=generator) * ranges.light_position_perturb
        direction = F.normalize(camera_positions + noise, dim=-1)
    else:
        # The light stays on the camera's side of the object (within 90 - min elevation deg of
        # the view axis), so the visible surface is lit and shading is informative for SDS.
        el_lo, el_hi = (math.radians(v) for v in ranges.light_elevation_deg)
        elevation = _uniform(b, el_lo, el_hi, generator)
        around = _uniform(b, -math.pi, math.pi, generator)
        u, v = _orthonormal_frame(axis)
        sideways = torch.cos(around)[:, None] * u + torch.sin(around)[:, None] * v
        direction = torch.cos(elevation)[:, None] * sideways + torch.sin(elevation)[:, None] * axis
    return direction * distance[:, None]


def sample_random_cameras(
    ranges: CameraRanges,
    batch_size: int,
    height: int,
    width: int,
    generator: torch.Generator | None = None,
) -> CameraBatch:
    """Random training cameras (float32, CPU) with lights, deterministic in ``generator``.

    Azimuths are stratified over the batch (one per bin) so every batch sees the object from
    all around; elevation, distance and fovy are independent uniform draws.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    g = generator
    azimuth = stratified_azimuth(batch_size, tuple(math.radians(a) for a in ranges.azimuth_deg), g)
    el_lo, el_hi = (math.radians(e) for e in ranges.elevation_deg)
    if ranges.elevation_sampling == "uniform_area":
        # Area on the sphere between two latitudes is proportional to the difference of sines.
        sin_el = _uniform(batch_size, math.sin(el_lo), math.sin(el_hi), g)
        elevation = torch.asin(sin_el.clamp(-1.0, 1.0))
    else:
        elevation = _uniform(batch_size, el_lo, el_hi, g)
    distance = _uniform(batch_size, *ranges.distance, g)
    fovy = torch.deg2rad(_uniform(batch_size, *ranges.fovy_deg, g))

    position = spherical_to_cartesian(elevation, azimuth, distance)
    target = torch.zeros(batch_size, 3)
    up = torch.tensor([0.0, 0.0, 1.0]).expand(batch_size, 3)
    # Noise is drawn only when enabled, so configs without jitter keep the same random stream.
    if ranges.camera_perturb > 0:
        position = position + torch.randn(batch_size, 3, generator=g) * ranges.camera_perturb
        # Keep the labels true to the camera actually used (view prompts read them).
        distance = position.norm(dim=-1)
        elevation = torch.asin((position[:, 2] / distance).clamp(-1, 1))
        azimuth = wrap_angle(torch.atan2(position[:, 1], position[:, 0]))
    if ranges.center_perturb > 0:
        target = target + torch.randn(batch_size, 3, generator=g) * ranges.center_perturb
    if ranges.up_perturb > 0:
        up = up + torch.randn(batch_size, 3, generator=g) * ranges.up_perturb

    c2w = look_at_c2w(position, target, up)
    light = sample_lights(position, ranges, g)
    return CameraBatch(
        c2w=c2w,
        fovy=fovy,
        elevation=elevation,
        azimuth=azimuth,
        distance=distance,
        light_position=light,
        height=height,
        width=width,
    )


def orbit_cameras(
    n_views: int,
    elevation_deg: float,
    distance: float,
    fovy_deg: float,
    height: int,
    width: int,
) -> CameraBatch:
    """``n_views`` cameras evenly spaced in azimuth starting at the front (azimuth 0, +x).

    For validation images and turntable videos; the light sits at each camera (headlight), so
    every frame is lit the same way.
    """
    if n_views < 1:
        raise ValueError(f"n_views={n_views} must be >= 1")
    azimuth = wrap_angle(torch.arange(n_views, dtype=torch.float32) * (2.0 * math.pi / n_views))
    elevation = torch.full((n_views,), math.radians(elevation_deg))
    dist = torch.full((n_views,), float(distance))
    position = spherical_to_cartesian(elevation, azimuth, dist)
    return CameraBatch(
        c2w=look_at_c2w(position),
        fovy=torch.full((n_views,), math.radians(fovy_deg)),
        elevation=elevation,
        azimuth=azimuth,
        distance=dist,
        light_position=position.clone(),
        height=height,
        width=width,
    )


def view_index(
    elevation: Float[Tensor, "B"],
    azimuth: Float[Tensor, "B"],
    front_deg: float = 45.0,
    back_deg: float = 135.0,
    overhead_deg: float = 60.0,
) -> Int[Tensor, "B"]:
    """Index into ``VIEW_NAMES`` per camera (radians in; thresholds in degrees, strict).

    overhead if elevation > overhead_deg; else front if |azimuth| < front_deg; back if
    |azimuth| > back_deg; side otherwise (so the boundaries themselves count as side).
    """
    abs_az = wrap_angle(azimuth).abs()
    index = torch.ones_like(abs_az, dtype=torch.long)  # side
    index = torch.where(abs_az < math.radians(front_deg), 0, index)
    index = torch.where(abs_az > math.radians(back_deg), 2, index)
    index = torch.where(elevation > math.radians(overhead_deg), 3, index)
    return index


def view_suffix(index: int | Tensor) -> str:
    """Prompt suffix for a view index, e.g. ``", front view"``."""
    i = int(index)
    if not 0 <= i < len(VIEW_NAMES):
        raise ValueError(f"view index {i} out of range: expected 0..{len(VIEW_NAMES) - 1}")
    return f", {VIEW_NAMES[i]} view"


def projection_matrix(
    fovy: Float[Tensor, "B"], aspect: float, near: float = 0.1, far: float = 100.0
) -> Float[Tensor, "B 4 4"]:
    """OpenGL perspective projection (camera space -> clip space, NDC in [-1, 1]).

    ``aspect`` is width / height. Clip-space +y is image up, so a rasteriser whose row 0 is at
    NDC y = -1 (nvdiffrast) produces bottom-up images: flip rows to match ``camera_rays``.
    """
    if not 0 < near < far:
        raise ValueError(f"need 0 < near < far, got near={near}, far={far}")
    focal = 1.0 / torch.tan(0.5 * fovy)
    proj = torch.zeros(fovy.shape[0], 4, 4, dtype=fovy.dtype, device=fovy.device)
    proj[:, 0, 0] = focal / aspect
    proj[:, 1, 1] = focal
    proj[:, 2, 2] = -(far + near) / (far - near)
    proj[:, 2, 3] = -2.0 * far * near / (far - near)
    proj[:, 3, 2] = -1.0
    return proj


def world_to_camera(c2w: Float[Tensor, "B 4 4"]) -> Float[Tensor, "B 4 4"]:
    """Inverse of a rigid camera-to-world matrix (exact: transpose of the rotation)."""
    rot_t = c2w[:, :3, :3].transpose(1, 2)
    w2c = torch.zeros_like(c2w)
    w2c[:, :3, :3] = rot_t
    w2c[:, :3, 3] = -(rot_t @ c2w[:, :3, 3:4])[..., 0]
    w2c[:, 3, 3] = 1.0
    return w2c


def mvp(cameras: CameraBatch, near: float = 0.1, far: float = 100.0) -> Float[Tensor, "B 4 4"]:
    """World -> clip-space matrices (projection @ world-to-camera) for a rasteriser."""
    proj = projection_matrix(cameras.fovy, cameras.width / cameras.height, near, far)
    return proj @ world_to_camera(cameras.c2w)
