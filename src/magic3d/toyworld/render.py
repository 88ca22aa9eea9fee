"""Sphere tracing of toy-world SDFs for a ``CameraBatch``, with the text-to-3D conventions.

Rays come from ``magic3d.data.rays.camera_rays`` (pixel centres, OpenGL axes, row 0 at the
top) and shading from ``magic3d.scenes.base.shade`` (colour x (ambient + (1 - ambient) x
max(0, n.l)), point light at ``cameras.light_position``), so a toy render and a NeRF render of
the same object under the same cameras and lights are directly comparable.

Everything is vectorised over all pixels of all cameras: rays are processed in chunks (to
bound memory), each chunk is marched for a fixed number of steps, and rays that have hit or
left the bounding sphere are dropped from the working set every few steps (ray compaction),
which is where most of the speed comes from on both CPU and GPU. The device follows the
cameras.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from magic3d.data.rays import camera_rays
from magic3d.scenes.base import shade
from magic3d.toyworld.shapes import BOUNDING_RADIUS, N_REGIONS, REGION_PALETTE, Shape
from magic3d.types import CameraBatch, Shading

BACKGROUND_MODES: tuple[str, ...] = ("white", "black", "grey", "solid", "varied")
# Resolution of the random colour grid that "varied" backgrounds are upsampled from: 4x4
# gives one or two smooth blobs/gradients across the image, like a learned environment map.
_VARIED_GRID = 4


@dataclass
class TraceOptions:
    """Sphere-tracing settings. Defaults suit 32-256 px renders of the toy objects."""

    n_steps: int = 64  # fixed budget per ray
    step_scale: float = 0.9  # < 1: safety against SDFs that are bounds, not exact distances
    hit_eps: float = 5e-4  # a ray has converged once the SDF is below this
    accept_eps: float = 2e-3  # after the last step, rays this close still count as hits
    compact_every: int = 4  # drop finished rays from the working set every k steps
    # Rays per chunk; 0 = auto: 2^16 on CPU (cache-sized), 2^23 on CUDA, where small chunks
    # leave the GPU waiting on kernel launches (~100 elementwise kernels per step).
    chunk_rays: int = 0
    normal_eps: float = 1e-3  # finite-difference step for normals
    bound_radius: float = BOUNDING_RADIUS + 0.05  # rays start where they enter this sphere


@dataclass
class ToyRender:
    """A composited toy render; channel-last, values in [0, 1]."""

    rgb: Float[Tensor, "B H W 3"]  # shaded object over the background
    mask: Float[Tensor, "B H W 1"]  # coverage (fractional at edges when supersampled)
    depth: Float[Tensor, "B H W 1"]  # ray distance to the surface, 0 where empty
    normal: Float[Tensor, "B H W 3"]  # world-space unit normals, 0 where empty
    albedo: Float[Tensor, "B H W 3"]  # unshaded colour, 0 where empty
    region: Int[Tensor, "B H W"]  # material region id (majority of sub-pixels), -1 = background
    background: Float[Tensor, "B H W 3"]


# ---------------------------------------------------------------------------------------------
# Backgrounds
# ---------------------------------------------------------------------------------------------


@dataclass
class BackgroundParams:
    """Per-image background draws (CPU), turned into images by :func:`background_images`."""

    mode: Int[Tensor, "B"]  # index into BACKGROUND_MODES
    grid: Float[Tensor, "B 3 G G"]  # colour grid; constant for the plain modes

    def __getitem__(self, index: slice | Tensor) -> "BackgroundParams":
        return BackgroundParams(mode=self.mode[index], grid=self.grid[index])


def sample_backgrounds(
    n: int,
    modes: tuple[str, ...] = BACKGROUND_MODES,
    weights: tuple[float, ...] | None = None,
    generator: torch.Generator | None = None,
) -> BackgroundParams:
    """Draw ``n`` backgrounds: mode by ``weights``; "solid" a random colour; "varied" either a
    linear gradient between two random colours (random direction) or low-frequency noise.

    Every random number is drawn for every image whatever its mode, so the stream (and thus
    all other draws from ``generator``) does not depend on which modes were picked.
    """
    unknown = [m for m in modes if m not in BACKGROUND_MODES]
    if unknown or not modes:
        raise ValueError(f"background modes {modes!r}: each must be one of {BACKGROUND_MODES}")
    w = torch.ones(len(modes)) if weights is None else torch.tensor(weights, dtype=torch.float32)
    if w.shape != (len(modes),) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"background weights {weights!r}: need {len(modes)} non-negative values, not all 0")
    g = generator
    pick = torch.multinomial(w, n, replacement=True, generator=g)
    mode = torch.tensor([BACKGROUND_MODES.index(m) for m in modes])[pick]
    solid = torch.rand(n, 3, generator=g)
    c0, c1 = torch.rand(n, 3, generator=g), torch.rand(n, 3, generator=g)
    angle = torch.rand(n, generator=g) * 2.0 * math.pi
    noise = torch.rand(n, 3, _VARIED_GRID, _VARIED_GRID, generator=g)
    use_gradient = torch.rand(n, generator=g) < 0.5

    coords = torch.linspace(-1.0, 1.0, _VARIED_GRID)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    s = (gx[None] * torch.cos(angle)[:, None, None] + gy[None] * torch.sin(angle)[:, None, None])
    s = (s / math.sqrt(2.0) + 1.0) * 0.5  # in [0, 1] across the grid
    gradient = c0[:, :, None, None] + (c1 - c0)[:, :, None, None] * s[:, None]
    varied = torch.where(use_gradient[:, None, None, None], gradient, noise)

    plain = torch.tensor([[1.0] * 3, [0.0] * 3, [0.5] * 3, [0.0] * 3, [0.0] * 3])[mode]
    plain = torch.where((mode == BACKGROUND_MODES.index("solid"))[:, None], solid, plain)
    grid = plain[:, :, None, None].expand(n, 3, _VARIED_GRID, _VARIED_GRID)
    grid = torch.where((mode == BACKGROUND_MODES.index("varied"))[:, None, None, None], varied, grid)
    return BackgroundParams(mode=mode, grid=grid.contiguous())


def background_images(
    params: BackgroundParams, height: int, width: int, device: torch.device | str = "cpu"
) -> Float[Tensor, "B H W 3"]:
    """Images for sampled backgrounds (bicubic upsampling of the colour grid, clamped)."""
    grid = params.grid.to(device)
    smooth = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=True).clamp(0.0, 1.0)
    # Plain modes skip the interpolation so their colour is exact (bicubic weights sum to 1
    # only up to rounding).
    flat = grid[:, :, :1, :1].expand_as(smooth)
    varied = (params.mode.to(device) == BACKGROUND_MODES.index("varied"))[:, None, None, None]
    return torch.where(varied, smooth, flat).permute(0, 2, 3, 1).contiguous()


def solid_background(
    colour: tuple[float, float, float], batch: int, height: int, width: int, device: torch.device | str = "cpu"
) -> Float[Tensor, "B H W 3"]:
    return torch.tensor(colour, dtype=torch.float32, device=device).expand(batch, height, width, 3).contiguous()


# ---------------------------------------------------------------------------------------------
# Sphere tracing
# ---------------------------------------------------------------------------------------------


def sphere_trace(
    shape: Shape,
    origins: Float[Tensor, "R 3"],
    directions: Float[Tensor, "R 3"],
    options: TraceOptions = TraceOptions(),
) -> tuple[Float[Tensor, "R"], Bool[Tensor, "R"]]:
    """Distance along each (unit) ray to the surface, and whether the ray hit it.

    Rays start where they enter the bounding sphere and stop when they leave it. Every
    ``compact_every`` steps converged and escaped rays are written back and dropped, so the
    work shrinks as rays finish (most converge within ~15 steps).
    """
    r2 = options.bound_radius**2
    b = -(origins * directions).sum(-1)
    disc = b * b - ((origins * origins).sum(-1) - r2)
    root = disc.clamp_min(0.0).sqrt()
    t = (b - root).clamp_min(0.0)
    t_far = b + root
    hit = torch.zeros_like(t, dtype=torch.bool)

    active = torch.nonzero((disc > 0) & (t_far > 0)).squeeze(1)
    t_act, o, d, far = t[active], origins[active], directions[active], t_far[active]
    for step in range(options.n_steps):
        if active.numel() == 0:
            break
        dist = shape.sdf(o + t_act[:, None] * d)
        converged = dist < options.hit_eps
        t_act = torch.where(converged, t_act, t_act + options.step_scale * dist)
        escaped = t_act > far
        last = step == options.n_steps - 1
        if last:
            # Grazing rays may still be creeping along the surface: accept near misses.
            converged = (dist < options.accept_eps) & ~escaped
        if last or (step + 1) % options.compact_every == 0:
            t[active] = t_act
            hit[active[converged & ~escaped]] = True
            keep = ~(converged | escaped)
            active, t_act, o, d, far = active[keep], t_act[keep], o[keep], d[keep], far[keep]
    return t, hit


# Tetrahedral finite differences: 4 SDF evaluations per normal instead of 6.
_TETRA = ((1.0, -1.0, -1.0), (-1.0, -1.0, 1.0), (-1.0, 1.0, -1.0), (1.0, 1.0, 1.0))


def sdf_normals(shape: Shape, points: Float[Tensor, "P 3"], eps: float = 1e-3) -> Float[Tensor, "P 3"]:
    """Unit outward normals from a tetrahedral finite difference of the SDF."""
    k = torch.tensor(_TETRA, dtype=points.dtype, device=points.device)
    d = shape.sdf((points[:, None] + eps * k).reshape(-1, 3)).reshape(-1, 4)
    return F.normalize((d[..., None] * k).sum(1), dim=-1)


def _as_colours(colour: Tensor | tuple[float, float, float], batch: int, device: torch.device) -> Tensor:
    c = torch.as_tensor(colour, dtype=torch.float32, device=device)
    if c.shape == (3,):
        c = c.expand(batch, 3)
    if c.shape != (batch, 3):
        raise ValueError(f"colour must have shape (3,) or ({batch}, 3), got {tuple(c.shape)}")
    return c


def _pool(x: Tensor, s: int) -> Tensor:
    """Average s x s blocks of a (B, sH, sW, C) tensor."""
    if s == 1:
        return x
    b, hs, ws, c = x.shape
    return x.reshape(b, hs // s, s, ws // s, s, c).mean(dim=(2, 4))


def render_shape(
    shape: Shape,
    cameras: CameraBatch,
    colour: Float[Tensor, "B 3"] | Float[Tensor, "3"] | tuple[float, float, float],
    shading: Shading | None = None,
    background: Float[Tensor, "B H W 3"] | None = None,
    supersample: int = 1,
    options: TraceOptions = TraceOptions(),
) -> ToyRender:
    """Render one shape for every camera (each camera may have its own colour and ambient).

    ``shading`` defaults to Lambertian with ambient 0.4; ``background`` (at the output
    resolution, on the cameras' device) defaults to white. ``supersample`` s renders at
    s x s the resolution and averages blocks, which anti-aliases silhouettes and region edges.
    """
    if supersample < 1:
        raise ValueError(f"supersample={supersample} must be >= 1")
    device = cameras.device
    batch, height, width = cameras.batch_size, cameras.height, cameras.width
    s = supersample
    colours = _as_colours(colour, batch, device)
    if shading is None:
        shading = Shading(mode="lambertian", ambient=torch.full((batch,), 0.4, device=device))
    ambient = torch.as_tensor(shading.ambient, dtype=torch.float32, device=device).expand(batch)
    if background is None:
        background = solid_background((1.0, 1.0, 1.0), batch, height, width, device)
    if background.shape != (batch, height, width, 3):
        raise ValueError(f"background must be ({batch}, {height}, {width}, 3), got {tuple(background.shape)}")

    rays = camera_rays(cameras.with_resolution(height * s, width * s))
    origins = rays.origins.reshape(-1, 3)
    directions = rays.directions.reshape(-1, 3)
    n_rays = origins.shape[0]
    per_camera = n_rays // batch

    # Region albedo = weight * camera colour + fixed RGB (see REGION_PALETTE).
    region_weight = torch.tensor([w for w, _ in REGION_PALETTE], device=device)
    region_rgb = torch.tensor([rgb for _, rgb in REGION_PALETTE], device=device)

    fg = torch.zeros(n_rays, 3, device=device)  # premultiplied by coverage (0 or 1 here)
    albedo = torch.zeros(n_rays, 3, device=device)
    normal = torch.zeros(n_rays, 3, device=device)
    depth = torch.zeros(n_rays, device=device)
    region = torch.full((n_rays,), -1, dtype=torch.long, device=device)
    mask = torch.zeros(n_rays, device=device)

    chunk = options.chunk_rays or (1 << 23 if device.type == "cuda" else 1 << 16)
    for start in range(0, n_rays, chunk):
        o, d = origins[start : start + chunk], directions[start : start + chunk]
        t, hit = sphere_trace(shape, o, d, options)
        idx = torch.nonzero(hit).squeeze(1)
        if idx.numel() == 0:
            continue
        points = o[idx] + t[idx, None] * d[idx]
        cam = torch.div(idx + start, per_camera, rounding_mode="floor")
        n = sdf_normals(shape, points, options.normal_eps)
        reg = shape.material(points)
        base = region_weight[reg, None] * colours[cam] + region_rgb[reg]
        lit = shade(base, n, cameras.light_position[cam] - points, Shading(mode=shading.mode, ambient=ambient[cam]))
        out = idx + start
        fg[out], albedo[out], normal[out], depth[out], region[out], mask[out] = lit, base, n, t[idx], reg, 1.0

    def grid(x: Tensor) -> Tensor:
        return x.reshape(batch, height * s, width * s, -1)

    mask_px = _pool(grid(mask), s)
    covered = mask_px.clamp_min(1e-6)
    fg_px = _pool(grid(fg), s)
    albedo_px = _pool(grid(albedo), s) / covered
    depth_px = _pool(grid(depth), s) / covered
    normal_px = F.normalize(_pool(grid(normal), s), dim=-1)
    one_hot = F.one_hot(grid(region + 1).squeeze(-1), N_REGIONS + 1).float()  # class 0 = background
    region_px = _pool(one_hot, s).argmax(dim=-1) - 1
    rgb = fg_px + background * (1.0 - mask_px)
    return ToyRender(
        rgb=rgb.clamp(0.0, 1.0),
        mask=mask_px,
        depth=depth_px,
        normal=normal_px,
        albedo=albedo_px,
        region=region_px,
        background=background,
    )
