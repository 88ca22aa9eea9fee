"""Magic3D's coarse scene (§4.2): a hash-grid NeRF with an occupancy grid and an environment map.

Field: Instant-NGP hash encoding of the point, then two single-hidden-layer heads -- one for
density and albedo, one for normals (the paper's design; the normal head only exists when
``normal_mode="predicted"``). Rendering marches rays through the box [-radius, radius]^3,
skips empty cells of the occupancy grid, composites albedo and normals, and shades per
pixel: the composited normal is normalised and lit at the expected surface point. Per-pixel
shading costs O(pixels) instead of O(samples) and shades exactly as the mesh scene of the
fine stage does, so the look does not jump at the NeRF -> mesh conversion; for a converged
(opaque, thin) surface it equals per-sample shading.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from magic3d.data.rays import camera_rays
from magic3d.ops.hashgrid import HashGrid, hashgrid_encode
from magic3d.ops.volume import (
    OccupancyGrid,
    composite,
    march_step_size,
    sample_along_rays,
)
from magic3d.scenes.background import EnvironmentMapBackground
from magic3d.scenes.base import DensityField, SceneModule, shade
from magic3d.types import CameraBatch, RenderOutput, Shading

DensityActivation = Literal["softplus", "exp", "trunc_exp"]
NormalMode = Literal["predicted", "analytic", "finite_difference"]

# Straight (un-premultiplied) albedo and the surface point divide by opacity; below this the
# pixel is empty and the product with opacity makes the exact value irrelevant.
_OPACITY_EPS = 1e-6


class _TruncExp(torch.autograd.Function):
    """exp whose gradient is capped at exp(15) (torch-ngp), so one large density cannot blow
    up the update. Its backward is plain torch, so double backward (analytic normals) works."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x.clamp(max=15.0))


def _activate(raw: Tensor, activation: str) -> Tensor:
    if activation == "softplus":
        return F.softplus(raw)
    if activation == "exp":
        return torch.exp(raw)
    return _TruncExp.apply(raw)


@dataclass
class FieldQuery:
    density: Float[Tensor, "P"]
    albedo: Float[Tensor, "P 3"]  # in [0, 1]
    normal: Float[Tensor, "P 3"] | None = None  # unit, pointing out of the object


def join_renders(parts: list[RenderOutput]) -> RenderOutput:
    """One output from renders of consecutive camera chunks of equal resolution.

    Images are concatenated along the batch. Every NeRF regulariser and ``samples_per_ray`` is
    a mean over rays, and each chunk has ``batch * H * W`` rays, so the joined value is the
    mean of the chunks' values weighted by their batch sizes: the value one render of the
    whole batch gives (up to float summation order).
    """
    sizes = [p.rgb.shape[0] for p in parts]
    total = float(sum(sizes))

    def cat(name: str) -> Tensor | None:
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else torch.cat(values)

    regularisers = {
        name: sum(p.regularisers[name] * (n / total) for p, n in zip(parts, sizes))
        for name in parts[0].regularisers
    }
    per_ray = [p.samples_per_ray for p in parts]
    samples_per_ray = None if per_ray[0] is None else sum(s * n for s, n in zip(per_ray, sizes)) / total
    return RenderOutput(rgb=cat("rgb"), opacity=cat("opacity"), depth=cat("depth"), normal=cat("normal"),
                        albedo=cat("albedo"), background=cat("background"), regularisers=regularisers,
                        samples_per_ray=samples_per_ray)


class HashGridNeRF(SceneModule):
    """Hash-grid NeRF over [-radius, radius]^3 (Magic3D coarse stage).

    ``n_samples_per_ray`` is the marching budget of the longest chord (step = box diagonal /
    n_samples); the paper reports 1024. The hash-grid arguments mirror
    :class:`~magic3d.ops.hashgrid.HashGrid` (``grid_backend`` is its backend). The other
    ``grid_*`` arguments configure the occupancy grid: ``grid_resolution`` cells per axis (0
    disables empty-space skipping; the paper uses 256), updated every ``grid_update_every``
    steps, every cell probed during the first ``grid_warmup_steps``. A cell is empty when one
    marching step through it would be less opaque than ``grid_opacity_threshold``
    (Instant-NGP's rule: density * step < 0.01), which keeps the pruning meaningful whatever
    the sample count.

    ``density_bias="blob"`` adds ``blob_density * (1 - |x| / blob_radius)`` to the density
    before activation so training starts from a ball. ``normal_mode``: "predicted" (the
    paper's normal head), "analytic" (-grad density by autograd, differentiable; the
    encoding falls back to its torch path, since the compiled one has no double backward) or
    "finite_difference" (central differences with step ``normal_eps``: six more density
    evaluations per sample). Measured on one H100 (batch 8, 64x64, 1024 samples, 256^3 grid,
    blob start): render + backward 43 ms predicted, 196 ms analytic, 172 ms finite
    difference; peak memory 7, 30 and 42 GiB. ``background`` defaults to a fresh
    :class:`EnvironmentMapBackground`.

    ``recompute_chunk_cameras`` N > 0 bounds the memory of large training renders (the fine
    NeRF at 256^2, batch 32): the batch is rendered N cameras at a time under activation
    checkpointing, so forward keeps only each chunk's outputs and backward re-renders one
    chunk at a time (one extra render forward per step). The RNG state is saved per chunk, so
    the re-render draws the same stratified samples. 0 renders the batch in one graph.
    """

    def __init__(
        self,
        radius: float = 1.0,
        n_levels: int = 16,
        n_features_per_level: int = 2,
        log2_hashmap_size: int = 19,
        base_resolution: int = 16,
        per_level_scale: float = 1.4473,
        interpolation: Literal["linear", "smoothstep"] = "linear",
        grid_backend: Literal["auto", "torch", "compiled", "triton", "tcnn"] = "auto",
        hidden_dim: int = 64,
        density_activation: DensityActivation = "softplus",
        density_bias: Literal["blob", "none"] = "blob",
        blob_density: float = 10.0,
        blob_radius: float = 0.5,
        normal_mode: NormalMode = "predicted",
        normal_eps: float = 0.01,
        n_samples_per_ray: int = 64,
        grid_resolution: int = 64,
        grid_update_every: int = 10,
        grid_opacity_threshold: float = 0.01,
        grid_warmup_steps: int = 256,
        recompute_chunk_cameras: int = 0,
        background: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if density_activation not in ("softplus", "exp", "trunc_exp"):
            raise ValueError(f"density_activation={density_activation!r}; use softplus, exp or trunc_exp")
        if density_bias not in ("blob", "none"):
            raise ValueError(f"density_bias={density_bias!r}; use 'blob' or 'none'")
        if normal_mode not in ("predicted", "analytic", "finite_difference"):
            raise ValueError(f"normal_mode={normal_mode!r}; use predicted, analytic or finite_difference")
        if radius <= 0 or blob_radius <= 0:
            raise ValueError(f"radius={radius} and blob_radius={blob_radius} must be positive")
        if grid_update_every < 1:
            raise ValueError(f"grid_update_every={grid_update_every} must be >= 1")
        if recompute_chunk_cameras < 0:
            raise ValueError(f"recompute_chunk_cameras={recompute_chunk_cameras} must be >= 0 (0: no recompute)")
        self.recompute_chunk_cameras = recompute_chunk_cameras
        self.radius = float(radius)
        self.density_activation = density_activation
        self.density_bias = density_bias
        self.blob_density = float(blob_density)
        self.blob_radius = float(blob_radius)
        self.normal_mode = normal_mode
        self.normal_eps = float(normal_eps)
        self.n_samples_per_ray = n_samples_per_ray
        self.grid_update_every = grid_update_every

        self.encoding = HashGrid(
            n_levels=n_levels,
            n_features_per_level=n_features_per_level,
            log2_hashmap_size=log2_hashmap_size,
            base_resolution=base_resolution,
            per_level_scale=per_level_scale,
            interpolation=interpolation,
            backend=grid_backend,
        )
        features = self.encoding.n_output_dims
        self.density_albedo_head = nn.Sequential(
            nn.Linear(features, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 4)
        )
        self.normal_head = (
            nn.Sequential(nn.Linear(features, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 3))
            if normal_mode == "predicted"
            else None
        )
        step = march_step_size(self.radius, n_samples_per_ray)
        self.occupancy = (
            OccupancyGrid(
                resolution=grid_resolution,
                radius=self.radius,
                density_threshold=grid_opacity_threshold / step,
                warmup_steps=grid_warmup_steps,
            )
            if grid_resolution > 0
            else None
        )
        self.background = background if background is not None else EnvironmentMapBackground()

    # ----------------------------------------------------------------------------- field

    def _field(
        self, points: Float[Tensor, "P 3"], twice_differentiable: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Density, albedo and hash features at world-space points.

        ``twice_differentiable`` routes the encoding through the torch backend: the compiled,
        triton and tiny-cuda-nn paths do not support double backward, which analytic normals need.
        """
        unit = ((points / self.radius + 1.0) * 0.5).clamp(0.0, 1.0)
        if twice_differentiable and self.encoding.resolve_backend(unit.device) != "torch":
            features = hashgrid_encode(unit, self.encoding.params, self.encoding.spec, backend="torch")
        else:
            features = self.encoding(unit)
        out = self.density_albedo_head(features)
        raw = out[..., 0]
        if self.density_bias == "blob":
            raw = raw + self.blob_density * (1.0 - points.norm(dim=-1) / self.blob_radius)
        return _activate(raw, self.density_activation), torch.sigmoid(out[..., 1:4]), features

    def density(self, points: Float[Tensor, "P 3"]) -> Float[Tensor, "P"]:
        return self._field(points)[0]

    def albedo(self, points: Float[Tensor, "P 3"]) -> Float[Tensor, "P 3"]:
        return self._field(points)[1]

    def query(self, points: Float[Tensor, "P 3"], with_normal: bool = True) -> FieldQuery:
        """Density, albedo and (optionally) the outward unit normal at world-space points."""
        if not with_normal:
            density, albedo, _ = self._field(points)
            return FieldQuery(density, albedo)
        if self.normal_mode == "predicted":
            density, albedo, features = self._field(points)
            return FieldQuery(density, albedo, F.normalize(self.normal_head(features), dim=-1))
        if self.normal_mode == "finite_difference":
            density, albedo, _ = self._field(points)
            eps = self.normal_eps
            offsets = torch.eye(3, device=points.device, dtype=points.dtype) * eps
            shifted = torch.cat([points[:, None] + offsets, points[:, None] - offsets], dim=1)  # (P,6,3)
            sigma = self.density(shifted.reshape(-1, 3)).view(-1, 6)
            gradient = (sigma[:, :3] - sigma[:, 3:]) / (2.0 * eps)
            return FieldQuery(density, albedo, -F.normalize(gradient, dim=-1))
        # analytic: differentiate the density w.r.t. the point, keeping the graph when the
        # caller is training so the normal (and the orientation loss) trains the field.
        keep_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            x = points.detach().requires_grad_(True)
            density, albedo, _ = self._field(x, twice_differentiable=keep_graph)
            (gradient,) = torch.autograd.grad(density.sum(), x, create_graph=keep_graph)
        normal = -F.normalize(gradient, dim=-1)
        if not keep_graph:
            density, albedo, normal = density.detach(), albedo.detach(), normal.detach()
        return FieldQuery(density, albedo, normal)

    # ----------------------------------------------------------------------------- scene API

    def render(self, cameras: CameraBatch, shading: Shading) -> RenderOutput:
        chunk = self.recompute_chunk_cameras
        if chunk > 0 and cameras.batch_size > chunk and torch.is_grad_enabled():
            return self._render_recomputed(cameras, shading, chunk)
        return self._render_batch(cameras, shading)

    def _render_recomputed(self, cameras: CameraBatch, shading: Shading, chunk: int) -> RenderOutput:
        """:meth:`_render_batch` over chunks of ``chunk`` cameras, each under activation
        checkpointing, joined into one output (regularisers: ray-weighted means, as one call)."""
        parts = []
        for start in range(0, cameras.batch_size, chunk):
            part = cameras[start: start + chunk]

            # The camera tensors go in as arguments (not only inside the CameraBatch): checkpoint
            # saves the RNG state of the devices its tensor arguments live on, CUDA included.
            def render_part(c2w: Tensor, ambient: Tensor, part: CameraBatch = part) -> RenderOutput:
                return self._render_batch(replace(part, c2w=c2w), Shading(mode=shading.mode, ambient=ambient))

            parts.append(checkpoint(render_part, part.c2w, shading.ambient[start: start + chunk],
                                    use_reentrant=False))
        return join_renders(parts)

    def _render_batch(self, cameras: CameraBatch, shading: Shading) -> RenderOutput:
        b, h, w = cameras.batch_size, cameras.height, cameras.width
        rays = camera_rays(cameras)
        origins, dirs = rays.origins.reshape(-1, 3), rays.directions.reshape(-1, 3)
        n_rays = origins.shape[0]
        samples = sample_along_rays(
            origins, dirs, self.radius, self.n_samples_per_ray, grid=self.occupancy, stratified=self.training
        )
        field = self.query(samples.positions)
        sample_dirs = dirs[samples.ray_indices]
        result = composite(
            field.density,
            samples.deltas,
            samples.ray_indices,
            n_rays,
            values=(field.albedo, field.normal),
            t=samples.t,
        )
        opacity = result.opacity.view(b, h, w, 1)
        albedo = result.values[0].view(b, h, w, 3)  # premultiplied: over black
        normal = F.normalize(result.values[1].view(b, h, w, 3), dim=-1)
        depth = result.depth.view(b, h, w, 1)

        safe_opacity = opacity.clamp_min(_OPACITY_EPS)
        surface = rays.origins + rays.directions * (depth / safe_opacity)
        light_dir = cameras.light_position[:, None, None, :].to(surface) - surface
        colour = shade(albedo / safe_opacity, normal, light_dir, shading)
        background = self.background(rays.directions)
        rgb = colour * opacity + (1.0 - opacity) * background

        # DreamFusion's orientation loss: normals facing away from the camera on visible
        # samples (weights detached, as in DreamFusion), summed per ray, mean over rays.
        facing_away = (field.normal * sample_dirs).sum(-1).clamp_min(0.0)
        orientation = (result.weights.detach() * facing_away.square()).sum() / max(n_rays, 1)
        return RenderOutput(
            rgb=rgb,
            opacity=opacity,
            depth=depth,
            normal=normal,
            albedo=albedo,
            background=background,
            # sparsity: L1 on opacity, pushes empty space to be empty
            regularisers={"orientation": orientation, "sparsity": opacity.mean()},
            samples_per_ray=samples.n_samples / max(n_rays, 1),
        )

    @torch.no_grad()
    def update_step(self, step: int) -> None:
        if self.occupancy is not None and step % self.grid_update_every == 0:
            # Jitter and cell picks seeded by the step alone: DDP ranks hold the same weights,
            # so they compute the same grid without sending it (and a resumed run repeats it).
            generator = torch.Generator(self.occupancy.density.device).manual_seed(step)
            self.occupancy.update(self.density, step, generator=generator)

    def regulariser_names(self) -> tuple[str, ...]:
        return ("orientation", "sparsity")

    def density_field(self) -> DensityField:
        return DensityField(density=self.density, albedo=self.albedo, radius=self.radius,
                            device=self.encoding.params.device)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        network = list(self.density_albedo_head.parameters())
        if self.normal_head is not None:
            network += list(self.normal_head.parameters())
        groups = {
            "encoding": [self.encoding.params],
            "network": network,
            "background": [p for p in self.background.parameters() if p.requires_grad],
        }
        return {name: params for name, params in groups.items() if params}
