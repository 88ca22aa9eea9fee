"""Toy-world objects as signed distance functions, plus their colours and captions.

Every object is data: a :class:`Shape` is a union of :class:`Part` s (each a distance
function with a material region) plus :class:`Decal` s that recolour a box of space (a door
painted on a wall). Parts are modelled inside a sphere of radius ~0.55 and the whole world is
scaled by :data:`WORLD_SCALE`, so objects sit centred at the origin inside a sphere of radius
~0.72 and cover about a quarter of a text-to-3D training view (camera distance 1.5-2.0,
fovy 40-70 deg), as a generated object should. World axes follow ``magic3d.types``: +z up, +x is the front
(azimuth 0). Asymmetric objects put a distinguishing feature on +x (a door, a face, a beak)
and usually another on -x (a handle, a backrest), so front and back views differ.

Material regions (:data:`REGION_PALETTE`): 0 = the object's caption colour, 4 = a darker
shade of it, the others fixed accent colours shared by every caption colour, so "a red house"
and "a blue house" share a dark door.

Distance functions take points ``(P, 3)`` and return ``(P,)``. Primitives are exact SDFs
(|grad| = 1); composites are unions/intersections of exact pieces, which are 1-Lipschitz
lower bounds (safe for sphere tracing) but not exact distances everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

SdfFn = Callable[[Tensor], Tensor]

# Every part below is modelled at unit scale and the world is scaled by this factor when
# queried (SDFs scale as s * f(p / s)). At scale 1 the objects covered 13 % of a training
# view on average (median 12 %): the diffusion prior's loss was dominated by backgrounds and
# it learned the caption's colour and shape too weakly. 1.3 gives 23 % (median 21 %).
WORLD_SCALE = 1.3

# Radius of a sphere that contains every object (with a margin for sphere tracing to start
# outside the surface), in world units. Checked by the tests.
BOUNDING_RADIUS = 0.6 * WORLD_SCALE

# ---------------------------------------------------------------------------------------------
# Exact primitive distance functions (Inigo Quilez's formulas), batched over points (P, 3).
# ---------------------------------------------------------------------------------------------


def _length2(x: Tensor, y: Tensor) -> Tensor:
    return torch.sqrt(x * x + y * y)


@lru_cache(maxsize=1024)
def _const(values: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A cached constant tensor: SDFs run every tracing step, and building small constants
    afresh each time costs a host-to-device copy per call on GPU."""
    return torch.tensor(values, dtype=dtype, device=device)


def _offset(p: Tensor, centre: tuple[float, float, float]) -> Tensor:
    if not any(centre):
        return p
    return p - _const(tuple(centre), p.dtype, p.device)


def _along(p: Tensor, axis: Literal["x", "y", "z"]) -> Tensor:
    """Cyclic permutation of coordinates so that ``axis`` becomes the local z axis."""
    if axis == "z":
        return p
    if axis == "x":
        return p[:, [1, 2, 0]]
    return p[:, [2, 0, 1]]


def sd_sphere(p: Tensor, radius: float, centre: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> Tensor:
    return _offset(p, centre).norm(dim=-1) - radius


def sd_box(
    p: Tensor,
    half: tuple[float, float, float],
    centre: tuple[float, float, float] = (0.0, 0.0, 0.0),
    rounding: float = 0.0,
) -> Tensor:
    """Box of half extents ``half`` whose edges are rounded by ``rounding`` (outer size kept)."""
    h = _const(tuple(v - rounding for v in half), p.dtype, p.device)
    q = _offset(p, centre).abs() - h
    outside = q.clamp_min(0.0).norm(dim=-1)
    inside = q.max(dim=-1).values.clamp_max(0.0)
    return outside + inside - rounding


def sd_cylinder(
    p: Tensor,
    radius: float,
    half_height: float,
    centre: tuple[float, float, float] = (0.0, 0.0, 0.0),
    axis: Literal["x", "y", "z"] = "z",
) -> Tensor:
    q = _along(_offset(p, centre), axis)
    dx = _length2(q[:, 0], q[:, 1]) - radius
    dz = q[:, 2].abs() - half_height
    return torch.clamp_max(torch.maximum(dx, dz), 0.0) + _length2(dx.clamp_min(0.0), dz.clamp_min(0.0))


def sd_capped_cone(
    p: Tensor,
    half_height: float,
    bottom_radius: float,
    top_radius: float,
    centre: tuple[float, float, float] = (0.0, 0.0, 0.0),
    axis: Literal["x", "y", "z"] = "z",
) -> Tensor:
    """Frustum along ``axis`` from -half_height (bottom_radius) to +half_height (top_radius)."""
    q = _along(_offset(p, centre), axis)
    qx = _length2(q[:, 0], q[:, 1])
    qy = q[:, 2]
    h, r1, r2 = half_height, bottom_radius, top_radius
    k2x, k2y = r2 - r1, 2.0 * h
    rad = torch.where(qy < 0.0, torch.full_like(qy, r1), torch.full_like(qy, r2))
    cax = qx - torch.minimum(qx, rad)
    cay = qy.abs() - h
    t = (((r2 - qx) * k2x + (h - qy) * k2y) / (k2x * k2x + k2y * k2y)).clamp(0.0, 1.0)
    cbx = qx - r2 + k2x * t
    cby = qy - h + k2y * t
    inside = (cbx < 0.0) & (cay < 0.0)
    dist = torch.sqrt(torch.minimum(cax * cax + cay * cay, cbx * cbx + cby * cby))
    return torch.where(inside, -dist, dist)


def sd_torus(
    p: Tensor,
    major: float,
    minor: float,
    centre: tuple[float, float, float] = (0.0, 0.0, 0.0),
    axis: Literal["x", "y", "z"] = "z",
) -> Tensor:
    """Torus around ``axis`` (its hole looks along the axis)."""
    q = _along(_offset(p, centre), axis)
    return _length2(_length2(q[:, 0], q[:, 1]) - major, q[:, 2]) - minor


def sd_capsule(
    p: Tensor,
    a: tuple[float, float, float],
    b: tuple[float, float, float],
    radius: float,
) -> Tensor:
    pa = _offset(p, a)
    ba = _const(tuple(bi - ai for ai, bi in zip(a, b)), p.dtype, p.device)
    t = ((pa @ ba) / (ba @ ba)).clamp(0.0, 1.0)
    return (pa - t[:, None] * ba).norm(dim=-1) - radius


def sd_pyramid(
    p: Tensor, base: float, height: float, centre: tuple[float, float, float] = (0.0, 0.0, 0.0)
) -> Tensor:
    """Square pyramid: base of side ``base`` centred at ``centre``, apex ``height`` above it.

    Quilez's exact unit-base pyramid, scaled by ``base`` (SDFs scale as s * f(p / s)).
    """
    q = _offset(p, centre) / base
    h = height / base
    m2 = h * h + 0.25
    ax, ay = q[:, 0].abs(), q[:, 1].abs()
    px = torch.maximum(ax, ay) - 0.5  # the formula's "x/z" are the two horizontal axes,
    pz = torch.minimum(ax, ay) - 0.5  # sorted so that x >= z
    py = q[:, 2]
    qx = pz
    qy = h * py - 0.5 * px
    qz = h * px + 0.5 * py
    s = (-qx).clamp_min(0.0)
    t = ((qy - 0.5 * pz) / (m2 + 0.25)).clamp(0.0, 1.0)
    a = m2 * (qx + s) ** 2 + qy * qy
    b = m2 * (qx + 0.5 * t) ** 2 + (qy - m2 * t) ** 2
    d2 = torch.where(torch.minimum(qy, -qx * m2 - qy * 0.5) > 0.0, torch.zeros_like(a), torch.minimum(a, b))
    dist = torch.sqrt((d2 + qz * qz) / m2) * torch.sign(torch.maximum(qz, -py))
    return dist * base


def sd_gable_roof(
    p: Tensor, half_x: float, half_y: float, bottom: float, height: float
) -> Tensor:
    """Triangular prism with its ridge along y: a roof over [-half_x, half_x] from z=bottom.

    An intersection of half-spaces (max of plane distances) is a 1-Lipschitz lower bound of
    the distance; intersecting with the exact bounding-box distance keeps it tight far away
    (which is where sphere tracing takes its long steps).
    """
    x, y, z = p[:, 0].abs(), p[:, 1].abs(), p[:, 2]
    slope_norm = math.hypot(height, half_x)
    slope = (height * x + half_x * (z - bottom) - height * half_x) / slope_norm
    box = sd_box(p, (half_x, half_y, 0.5 * height), (0.0, 0.0, bottom + 0.5 * height))
    return torch.maximum(torch.maximum(slope, box), torch.maximum(bottom - z, y - half_y))


def _subtract(p: Tensor, keep: SdfFn, remove: SdfFn) -> Tensor:
    return torch.maximum(keep(p), -remove(p))


def _intersect(p: Tensor, a: SdfFn, b: SdfFn) -> Tensor:
    return torch.maximum(a(p), b(p))


def _half_space_below_x(p: Tensor, x_max: float) -> Tensor:
    return p[:, 0] - x_max


# ---------------------------------------------------------------------------------------------
# Shapes as data
# ---------------------------------------------------------------------------------------------

REGION_MAIN, REGION_DARK, REGION_LIGHT, REGION_WARM, REGION_DEEP = 0, 1, 2, 3, 4
# Albedo of each material region as (weight of the caption colour, added RGB): region 0 is
# the caption colour, "deep" a darker shade of it (a roof), the others fixed accents shared by
# every caption colour (a dark door, light windows, an orange beak).
REGION_PALETTE: tuple[tuple[float, tuple[float, float, float]], ...] = (
    (1.0, (0.0, 0.0, 0.0)),  # main
    (0.0, (0.12, 0.1, 0.1)),  # dark
    (0.0, (0.95, 0.95, 0.9)),  # light
    (0.0, (1.0, 0.5, 0.05)),  # warm
    (0.6, (0.0, 0.0, 0.0)),  # deep
)
N_REGIONS = len(REGION_PALETTE)


@dataclass(frozen=True)
class Part:
    """One solid piece of an object and the material region its surface gets."""

    sdf: SdfFn
    region: int = REGION_MAIN


@dataclass(frozen=True)
class Decal:
    """Recolours the object's surface inside an axis-aligned box (doors, logos, windows)."""

    centre: tuple[float, float, float]
    half: tuple[float, float, float]
    region: int


@dataclass(frozen=True)
class Shape:
    """A toy object: union of parts (optionally smooth), decals, and a caption noun."""

    name: str
    parts: tuple[Part, ...]
    decals: tuple[Decal, ...] = ()
    asymmetric: bool = False  # front (+x) view differs from the back (-x) view
    kind: Literal["primitive", "composite"] = "composite"
    smooth: float = 0.0  # blend radius of the smooth union; 0 = plain min

    def sdf(self, points: Float[Tensor, "P 3"]) -> Float[Tensor, "P"]:
        """Signed distance in world units (the modelled object scaled by WORLD_SCALE)."""
        points = points / WORLD_SCALE
        dist = self.parts[0].sdf(points)
        for part in self.parts[1:]:
            dist = _smooth_min(dist, part.sdf(points), self.smooth)
        return dist * WORLD_SCALE

    def material(self, points: Float[Tensor, "P 3"]) -> Int[Tensor, "P"]:
        """Region id per point: the region of the nearest part, overridden by decals."""
        points = points / WORLD_SCALE
        regions = torch.zeros(points.shape[0], dtype=torch.long, device=points.device)
        if any(part.region != REGION_MAIN for part in self.parts):
            dists = torch.stack([part.sdf(points) for part in self.parts], dim=-1)
            part_region = _const(tuple(part.region for part in self.parts), torch.long, points.device)
            regions = part_region[dists.argmin(dim=-1)]
        for decal in self.decals:
            inside = (_offset(points, decal.centre).abs() <= _const(decal.half, points.dtype, points.device)).all(-1)
            regions = torch.where(inside, torch.full_like(regions, decal.region), regions)
        return regions


def _smooth_min(a: Tensor, b: Tensor, k: float) -> Tensor:
    """Polynomial smooth minimum (blend radius k); plain min for k = 0."""
    if k <= 0.0:
        return torch.minimum(a, b)
    h = (k - (a - b).abs()).clamp_min(0.0) / k
    return torch.minimum(a, b) - h * h * k * 0.25


def _primitive(name: str, sdf: SdfFn) -> Shape:
    return Shape(name=name, parts=(Part(sdf),), kind="primitive")


PRIMITIVES: tuple[Shape, ...] = (
    _primitive("sphere", partial(sd_sphere, radius=0.45)),
    _primitive("cube", partial(sd_box, half=(0.3, 0.3, 0.3), rounding=0.02)),
    _primitive("cylinder", partial(sd_cylinder, radius=0.32, half_height=0.35)),
    _primitive(
        "cone", partial(sd_capped_cone, half_height=0.375, bottom_radius=0.38, top_radius=0.0, centre=(0, 0, 0.025))
    ),
    _primitive("torus", partial(sd_torus, major=0.3, minor=0.13)),
    _primitive("capsule", partial(sd_capsule, a=(0.0, 0.0, -0.22), b=(0.0, 0.0, 0.22), radius=0.22)),
    _primitive("pyramid", partial(sd_pyramid, base=0.64, height=0.6, centre=(0.0, 0.0, -0.3))),
)


def _house() -> Shape:
    # Walls z in [-0.32, 0.06], gable roof with the ridge along y, chimney at the back-left,
    # door and two windows painted on the front (+x) wall.
    walls = Part(partial(sd_box, half=(0.27, 0.3, 0.19), centre=(0.0, 0.0, -0.13)))
    roof = Part(partial(sd_gable_roof, half_x=0.35, half_y=0.35, bottom=0.06, height=0.3), REGION_DEEP)
    chimney = Part(partial(sd_box, half=(0.05, 0.05, 0.1), centre=(-0.16, 0.18, 0.27)), REGION_DARK)
    door = Decal(centre=(0.27, 0.0, -0.21), half=(0.02, 0.07, 0.12), region=REGION_DARK)
    window_l = Decal(centre=(0.27, 0.18, -0.09), half=(0.02, 0.06, 0.06), region=REGION_LIGHT)
    window_r = Decal(centre=(0.27, -0.18, -0.09), half=(0.02, 0.06, 0.06), region=REGION_LIGHT)
    return Shape("house", (walls, roof, chimney), (door, window_l, window_r), asymmetric=True)


def _mug() -> Shape:
    # Open cylinder shell with a bottom, handle at the back (-x), logo on the front (+x).
    outer = partial(sd_cylinder, radius=0.27, half_height=0.28, centre=(0.0, 0.0, -0.03))
    inner = partial(sd_cylinder, radius=0.22, half_height=0.3, centre=(0.0, 0.0, 0.03))
    body = Part(partial(_subtract, keep=outer, remove=inner))
    ring = partial(sd_torus, major=0.14, minor=0.045, centre=(-0.27, 0.0, -0.03), axis="y")
    handle = Part(partial(_intersect, a=ring, b=partial(_half_space_below_x, x_max=-0.24)))
    logo = Decal(centre=(0.27, 0.0, -0.03), half=(0.03, 0.1, 0.1), region=REGION_LIGHT)
    return Shape("mug", (body, handle), (logo,), asymmetric=True)


def _chair() -> Shape:
    # Seat, four legs, and the backrest on the back (-x) edge.
    seat = Part(partial(sd_box, half=(0.22, 0.22, 0.035), centre=(0.0, 0.0, -0.03), rounding=0.01))
    legs = tuple(
        Part(partial(sd_cylinder, radius=0.035, half_height=0.18, centre=(sx * 0.18, sy * 0.18, -0.23)))
        for sx in (-1.0, 1.0)
        for sy in (-1.0, 1.0)
    )
    back = Part(partial(sd_box, half=(0.035, 0.22, 0.2), centre=(-0.185, 0.0, 0.2), rounding=0.01))
    cushion = Decal(centre=(0.02, 0.0, 0.005), half=(0.18, 0.18, 0.01), region=REGION_DARK)
    return Shape("chair", (seat, *legs, back), (cushion,), asymmetric=True)


def _car() -> Shape:
    # Long body, cabin set back towards -x (bonnet at the front), dark wheels, light
    # headlights on the front face.
    body = Part(partial(sd_box, half=(0.44, 0.21, 0.1), centre=(0.0, 0.0, -0.1), rounding=0.05))
    cabin = Part(partial(sd_box, half=(0.2, 0.18, 0.1), centre=(-0.08, 0.0, 0.07), rounding=0.06), REGION_LIGHT)
    wheels = tuple(
        Part(partial(sd_cylinder, radius=0.11, half_height=0.045, centre=(sx * 0.26, sy * 0.2, -0.2), axis="y"),
             REGION_DARK)
        for sx in (-1.0, 1.0)
        for sy in (-1.0, 1.0)
    )
    lights = tuple(
        Decal(centre=(0.44, sy * 0.13, -0.08), half=(0.03, 0.05, 0.035), region=REGION_WARM) for sy in (-1.0, 1.0)
    )
    return Shape("car", (body, cabin, *wheels), lights, asymmetric=True)


def _duck() -> Shape:
    # Rubber-duck: body, raised tail at the back, head at the front with an orange beak
    # pointing +x and two dark eyes. Smooth union merges head and body.
    body = Part(partial(sd_capsule, a=(-0.13, 0.0, -0.14), b=(0.1, 0.0, -0.14), radius=0.21))
    tail = Part(partial(sd_capsule, a=(-0.22, 0.0, -0.08), b=(-0.38, 0.0, 0.04), radius=0.07))
    head = Part(partial(sd_sphere, radius=0.16, centre=(0.16, 0.0, 0.16)))
    beak = Part(partial(sd_box, half=(0.08, 0.07, 0.03), centre=(0.34, 0.0, 0.13), rounding=0.025), REGION_WARM)
    eyes = tuple(
        Part(partial(sd_sphere, radius=0.032, centre=(0.27, sy * 0.08, 0.22)), REGION_DARK) for sy in (-1.0, 1.0)
    )
    return Shape("duck", (body, tail, head, beak, *eyes), asymmetric=True, smooth=0.03)


def _arrow() -> Shape:
    # Horizontal arrow pointing +x: shaft, cone head, light fins at the back.
    shaft = Part(partial(sd_cylinder, radius=0.06, half_height=0.27, centre=(-0.13, 0.0, 0.0), axis="x"))
    head = Part(
        partial(sd_capped_cone, half_height=0.15, bottom_radius=0.2, top_radius=0.0, centre=(0.29, 0.0, 0.0), axis="x")
    )
    fin_v = Part(partial(sd_box, half=(0.09, 0.015, 0.15), centre=(-0.3, 0.0, 0.0), rounding=0.01), REGION_LIGHT)
    fin_h = Part(partial(sd_box, half=(0.09, 0.15, 0.015), centre=(-0.3, 0.0, 0.0), rounding=0.01), REGION_LIGHT)
    return Shape("arrow", (shaft, head, fin_v, fin_h), asymmetric=True)


def _snowman() -> Shape:
    # Two stacked balls; the face (eyes, orange carrot nose) and buttons look +x.
    bottom = Part(partial(sd_sphere, radius=0.26, centre=(0.0, 0.0, -0.24)))
    top = Part(partial(sd_sphere, radius=0.18, centre=(0.0, 0.0, 0.14)))
    nose = Part(
        partial(sd_capped_cone, half_height=0.08, bottom_radius=0.045, top_radius=0.0, centre=(0.24, 0.0, 0.14),
                axis="x"),
        REGION_WARM,
    )
    eyes = tuple(
        Part(partial(sd_sphere, radius=0.03, centre=(0.155, sy * 0.07, 0.2)), REGION_DARK) for sy in (-1.0, 1.0)
    )
    buttons = tuple(
        Part(partial(sd_sphere, radius=0.035, centre=(0.25 * math.cos(a), 0.0, -0.24 + 0.25 * math.sin(a))),
             REGION_DARK)
        for a in (0.25, 0.65)
    )
    hat = Part(partial(sd_cylinder, radius=0.11, half_height=0.08, centre=(0.0, 0.0, 0.36)), REGION_DARK)
    brim = Part(partial(sd_cylinder, radius=0.16, half_height=0.015, centre=(0.0, 0.0, 0.29)), REGION_DARK)
    return Shape("snowman", (bottom, top, nose, *eyes, *buttons, hat, brim), asymmetric=True, smooth=0.02)


COMPOSITES: tuple[Shape, ...] = (_house(), _mug(), _chair(), _car(), _duck(), _arrow(), _snowman())

# The registry: ids are positions in this tuple and are stable (append new shapes at the end).
SHAPES: tuple[Shape, ...] = PRIMITIVES + COMPOSITES
SHAPE_NAMES: tuple[str, ...] = tuple(s.name for s in SHAPES)


@dataclass(frozen=True)
class Colour:
    name: str
    rgb: tuple[float, float, float]


# Ids are positions in this tuple (stable; append new colours at the end). Saturated and
# mutually distinct so a 64x64 prior can tell them apart under shading.
COLOURS: tuple[Colour, ...] = (
    Colour("red", (0.85, 0.12, 0.1)),
    Colour("green", (0.15, 0.7, 0.2)),
    Colour("blue", (0.15, 0.3, 0.9)),
    Colour("yellow", (0.95, 0.85, 0.15)),
    Colour("purple", (0.55, 0.2, 0.75)),
    Colour("orange", (0.98, 0.55, 0.1)),
    Colour("white", (0.92, 0.92, 0.92)),
    Colour("pink", (0.98, 0.55, 0.75)),
    Colour("cyan", (0.1, 0.8, 0.85)),
    Colour("brown", (0.5, 0.3, 0.15)),
)
COLOUR_NAMES: tuple[str, ...] = tuple(c.name for c in COLOURS)


def get_shape(name: str) -> Shape:
    if name not in SHAPE_NAMES:
        raise ValueError(f"unknown shape {name!r}; choose one of {SHAPE_NAMES}")
    return SHAPES[SHAPE_NAMES.index(name)]


def get_colour(name: str) -> Colour:
    if name not in COLOUR_NAMES:
        raise ValueError(f"unknown colour {name!r}; choose one of {COLOUR_NAMES}")
    return COLOURS[COLOUR_NAMES.index(name)]


def caption(shape: str, colour: str, view_suffix: str = "") -> str:
    """``"a red cube"`` / ``"an orange duck, front view"`` (article follows English)."""
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {shape}{view_suffix}"


# ---------------------------------------------------------------------------------------------
# Geometry queries for evaluation (occupancy, surface samples for Chamfer distance)
# ---------------------------------------------------------------------------------------------


def occupancy(shape: Shape, points: Float[Tensor, "P 3"]) -> Bool[Tensor, "P"]:
    """True inside the object (sdf < 0)."""
    return shape.sdf(points) < 0.0


def sdf_gradient(shape: Shape, points: Float[Tensor, "P 3"], eps: float = 1e-3) -> Float[Tensor, "P 3"]:
    """Central-difference gradient of the SDF (6 evaluations; error O(eps^2) on smooth parts)."""
    offsets = torch.eye(3, dtype=points.dtype, device=points.device) * eps
    shifted = torch.cat([points[:, None] + offsets, points[:, None] - offsets], dim=1)  # (P,6,3)
    d = shape.sdf(shifted.reshape(-1, 3)).reshape(-1, 6)
    return (d[:, :3] - d[:, 3:]) / (2.0 * eps)


def surface_points(
    shape: Shape,
    n: int,
    generator: torch.Generator | None = None,
    band: float = 0.04,
    tolerance: float = 1e-3,
    max_rounds: int = 50,
) -> Float[Tensor, "n 3"]:
    """``n`` points on the surface, roughly uniform by area (for Chamfer distances).

    Uniform points in the bounding box are kept when within ``band`` of the surface (a thin
    shell, so their density is ~proportional to surface area), then projected onto the surface
    by Newton steps x <- x - sdf * grad / |grad|^2, and kept when |sdf| < ``tolerance``.
    Deterministic given ``generator``; runs on CPU.
    """
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    found: list[Tensor] = []
    count = 0
    batch = max(4 * n, 4096)
    for _ in range(max_rounds):
        cand = (torch.rand(batch, 3, generator=generator) * 2.0 - 1.0) * BOUNDING_RADIUS
        cand = cand[shape.sdf(cand).abs() < band]
        for _ in range(8):
            d = shape.sdf(cand)
            g = sdf_gradient(shape, cand)
            cand = cand - (d / g.pow(2).sum(-1).clamp_min(1e-8))[:, None] * g
        cand = cand[shape.sdf(cand).abs() < tolerance]
        found.append(cand)
        count += cand.shape[0]
        if count >= n:
            break
    points = torch.cat(found)
    if points.shape[0] < n:
        raise RuntimeError(f"surface_points found only {points.shape[0]} of {n} points on {shape.name!r}")
    return points[:n]


__all__ = [
    "BOUNDING_RADIUS",
    "COLOURS",
    "COLOUR_NAMES",
    "COMPOSITES",
    "Colour",
    "Decal",
    "N_REGIONS",
    "PRIMITIVES",
    "REGION_PALETTE",
    "Part",
    "SHAPES",
    "SHAPE_NAMES",
    "Shape",
    "WORLD_SCALE",
    "caption",
    "get_colour",
    "get_shape",
    "occupancy",
    "sdf_gradient",
    "surface_points",
]
