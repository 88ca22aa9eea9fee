"""`make bench`: GPU benchmarks printed as a table and appended to BENCHMARKS.md.

Coarse iteration time at 64x64 for several batch sizes with a random-weight UNet of DeepFloyd
IF-I-XL's size (built from its config; compute equals the real model's), split into
render (forward + backward through the scene), guidance (UNet with CFG) and optimiser step,
plus hash-grid encode throughput. With ``--fine``: the fine stage's components and iteration
(DMTet + latent SDS at 512x512) and the fine-NeRF ablation's iteration (the coarse hash-grid NeRF
rendered at 256x256, upsampled to 512x512 for latent SDS, recomputed in camera chunks) at batch 8
and 32. Timings use CUDA events after warm-up; every measurement needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from magic3d.ops.raster import RasterTiming


@dataclass
class CoarseTiming:
    batch_size: int
    iteration_ms: float
    render_fwd_ms: float
    guidance_ms: float
    backward_ms: float
    optimizer_ms: float
    peak_gib: float
    samples_per_ray: float


def _cuda_ms(fn, device) -> tuple[float, object]:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end), out


_PARTS = ("render", "guidance", "backward", "optim", "iter")


def _timed_iteration(scene, guidance, optimizer, cams, shading, device) -> tuple[dict[str, float], object]:
    """One optimisation step split into its parts (ms) and the render output."""
    t0 = time.perf_counter()
    ms_render, render = _cuda_ms(lambda: scene.render(cams, shading), device)
    ms_guid, out = _cuda_ms(lambda: guidance.step(render.rgb, cams, 0.5), device)
    ms_back, _ = _cuda_ms(lambda: out.loss.backward(), device)
    ms_opt, _ = _cuda_ms(lambda: (optimizer.step(), optimizer.zero_grad(set_to_none=True)), device)
    wall = (time.perf_counter() - t0) * 1000
    return dict(zip(_PARTS, (ms_render, ms_guid, ms_back, ms_opt, wall))), render


def coarse_iteration(batch_sizes=(1, 8, 32), iters: int = 10, warmup: int = 3,
                     unet_size: str = "if-i-xl", n_samples_per_ray: int = 512,
                     grid_resolution: int = 128) -> list[CoarseTiming]:
    from magic3d.data.cameras import CameraRanges, sample_random_cameras
    from magic3d.testing.random_pipelines import build_pixel_unet, build_scheduler
    from magic3d.guidance.pixel_sds import PixelSDS
    from magic3d.guidance.prompts import PromptEmbeddings
    from magic3d.scenes.hash_nerf import HashGridNeRF
    from magic3d.types import Shading

    device = torch.device("cuda")
    unet = build_pixel_unet(unet_size, device=device, dtype=torch.bfloat16)
    dim = unet.config.encoder_hid_dim or unet.config.cross_attention_dim
    length = 77
    embeddings = PromptEmbeddings(base=torch.randn(length, dim), views=torch.randn(4, length, dim),
                                  uncond=torch.randn(length, dim))
    guidance = PixelSDS.from_modules(unet, build_scheduler(), text_embeddings=embeddings,
                                     guidance_scale=20.0)
    guidance.setup("benchmark", device)
    results = []
    for batch in batch_sizes:
        torch.manual_seed(0)
        scene = HashGridNeRF(n_samples_per_ray=n_samples_per_ray, grid_resolution=grid_resolution).to(device)
        optimizer = torch.optim.Adam(scene.parameters(), lr=1e-2, eps=1e-15)
        generator = torch.Generator().manual_seed(0)
        for step in range(20):  # let the occupancy grid leave its all-occupied warm-up
            scene.update_step(step * scene.grid_update_every)
        torch.cuda.reset_peak_memory_stats(device)
        totals = {"render": 0.0, "guidance": 0.0, "backward": 0.0, "optim": 0.0, "iter": 0.0, "spr": 0.0}
        for i in range(warmup + iters):
            cams = sample_random_cameras(CameraRanges(), batch, 64, 64, generator).to(device)
            shading = Shading(mode="lambertian", ambient=torch.full((batch,), 0.3, device=device))
            parts, render = _timed_iteration(scene, guidance, optimizer, cams, shading, device)
            if i >= warmup:
                for key, value in parts.items():
                    totals[key] += value / iters
                totals["spr"] += float(render.samples_per_ray or 0) / iters
        results.append(CoarseTiming(
            batch_size=batch, iteration_ms=totals["iter"], render_fwd_ms=totals["render"],
            guidance_ms=totals["guidance"], backward_ms=totals["backward"], optimizer_ms=totals["optim"],
            peak_gib=torch.cuda.max_memory_allocated(device) / 2**30, samples_per_ray=totals["spr"]))
        del scene, optimizer
        torch.cuda.empty_cache()
    return results


def _random_sd_guidance(device: torch.device):
    """Latent SDS with a random-weight SD-2.1-base-sized VAE and UNet (bf16), set up."""
    from magic3d.testing.random_pipelines import build_latent_scheduler, build_latent_unet, build_vae
    from magic3d.guidance.latent_sds import LatentSDS
    from magic3d.guidance.prompts import PromptEmbeddings

    unet = build_latent_unet("sd-2.1-base", device=device, dtype=torch.bfloat16)
    vae = build_vae("sd-2.1-base", device=device, dtype=torch.bfloat16)
    dim = unet.config.cross_attention_dim
    embeddings = PromptEmbeddings(base=torch.randn(77, dim), views=torch.randn(4, 77, dim),
                                  uncond=torch.randn(77, dim))
    guidance = LatentSDS.from_modules(unet, vae, build_latent_scheduler(), text_embeddings=embeddings)
    guidance.setup("benchmark", device)
    return guidance


@dataclass
class LatentGuidanceTiming:
    batch_size: int
    step_ms: float  # VAE encode (with grad) + 2B UNet forwards + SDS, then backward to the image
    peak_gib: float


def latent_guidance(batch_sizes=(1, 8, 32), iters: int = 5, warmup: int = 2,
                    guidance=None) -> list[LatentGuidanceTiming]:
    """Latent SDS at 512x512 with random SD-2.1-base-sized VAE + UNet (bf16)."""
    from magic3d.data.cameras import CameraRanges, sample_random_cameras

    device = torch.device("cuda")
    guidance = guidance if guidance is not None else _random_sd_guidance(device)
    generator = torch.Generator().manual_seed(0)
    results = []
    for batch in batch_sizes:
        torch.cuda.reset_peak_memory_stats(device)
        total = 0.0
        for i in range(warmup + iters):
            cams = sample_random_cameras(CameraRanges(), batch, 512, 512, generator).to(device)
            rgb = torch.rand(batch, 512, 512, 3, device=device, requires_grad=True)
            ms, _ = _cuda_ms(lambda: guidance.step(rgb, cams, 0.5).loss.backward(), device)
            if i >= warmup:
                total += ms / iters
        results.append(LatentGuidanceTiming(batch, total, torch.cuda.max_memory_allocated(device) / 2**30))
    return results


@dataclass
class FineTiming:
    batch_size: int
    iteration_ms: float
    render_fwd_ms: float  # marching tets + rasterise + texture + antialias
    guidance_ms: float  # VAE encode with grad + UNet with CFG + SDS target
    backward_ms: float  # through the VAE encoder, the rasteriser and the tet grid
    optimizer_ms: float
    peak_gib: float
    faces: int
    error: str = ""  # e.g. out of memory at this batch size


def fine_iteration(batch_sizes=(1, 8, 32), iters: int = 5, warmup: int = 2,
                   tet_resolution: int = 51, resolution: int = 512, guidance=None) -> list[FineTiming]:
    """Fine-stage iteration: DMTet (BCC n=51 ~ the "128" grid) rendered at 512² + latent SDS
    with a random SD-2.1-base-sized VAE and UNet (bf16), backward, Adam step."""
    from magic3d.data.cameras import CameraRanges, sample_random_cameras
    from magic3d.scenes.dmtet import DMTetScene
    from magic3d.types import Shading

    device = torch.device("cuda")
    guidance = guidance if guidance is not None else _random_sd_guidance(device)
    ranges = CameraRanges(elevation_deg=(-10.0, 45.0), fovy_deg=(30.0, 45.0))  # the fine stage's
    results = []
    for batch in batch_sizes:
        torch.manual_seed(0)
        scene = DMTetScene(tet_resolution=tet_resolution, sphere_radius=0.5).to(device)
        optimizer = torch.optim.Adam(scene.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(0)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        totals = dict.fromkeys(_PARTS, 0.0)
        faces, error = 0, ""
        try:
            for i in range(warmup + iters):
                cams = sample_random_cameras(ranges, batch, resolution, resolution, generator).to(device)
                shading = Shading(mode="lambertian", ambient=torch.full((batch,), 0.3, device=device))
                parts, _ = _timed_iteration(scene, guidance, optimizer, cams, shading, device)
                if i >= warmup:
                    for key, value in parts.items():
                        totals[key] += value / iters
            faces = int(scene.extract_mesh().faces.shape[0])
        except torch.OutOfMemoryError:
            error = "out of memory"
        except Exception as exc:  # noqa: BLE001 - one failing row must not lose the other rows' numbers
            error = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
        results.append(FineTiming(
            batch_size=batch, iteration_ms=totals["iter"], render_fwd_ms=totals["render"],
            guidance_ms=totals["guidance"], backward_ms=totals["backward"], optimizer_ms=totals["optim"],
            peak_gib=torch.cuda.max_memory_allocated(device) / 2**30, faces=faces, error=error))
        del scene, optimizer
        torch.cuda.empty_cache()
    return results


def fine_markdown(rows: list[FineTiming]) -> str:
    from magic3d.ops.raster import Rasterizer

    raster = Rasterizer("auto").resolve_backend(torch.device("cuda"), torch.float32)
    lines = ["", f"Fine iteration at 512×512: DMTet (BCC n=51 tet grid, sphere init) through the {raster} "
             "rasteriser + latent SDS with a random-weight SD-2.1-base-sized VAE and UNet (bf16).", "",
             *_iteration_table(rows, "faces", lambda r: f"{r.faces}")]
    return "\n".join(lines) + "\n"


def _iteration_table(rows: list, last_name: str, last_value) -> list[str]:
    """Markdown rows of per-batch iteration timings (FineTiming / FineNerfTiming), with one
    stage-specific last column; a failed batch shows its error in place of the timings."""
    lines = [f"| batch | iteration ms | render fwd ms | guidance ms | backward ms | optimiser ms | peak GiB | {last_name} |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.batch_size} | {r.error} | | | | | {r.peak_gib:.1f} | |")
        else:
            lines.append(f"| {r.batch_size} | {r.iteration_ms:.1f} | {r.render_fwd_ms:.1f} | {r.guidance_ms:.1f} | "
                         f"{r.backward_ms:.1f} | {r.optimizer_ms:.1f} | {r.peak_gib:.1f} | {last_value(r)} |")
    return lines


@dataclass
class FineComponents:
    raster: list[RasterTiming]  # per backend: torch, then triton / nvdiffrast where they run
    marching_tets_ms: float
    marching_tets_faces: int
    tets: int


def fine_components() -> FineComponents:
    """Rasteriser (100k triangles, 512^2, batch 8, fwd+bwd, each backend on the same scene) and
    marching tets (BCC n=51, about the size of the commonly used 128 grid) on the GPU, in ms."""
    from magic3d.ops.marching_tets import marching_tets
    from magic3d.ops.raster import benchmark_raster
    from magic3d.ops.tetgrid import make_tet_grid

    device = torch.device("cuda")
    raster = benchmark_raster(n_faces=100_000, resolution=512, batch=8, device=device)
    grid = make_tet_grid(51, "bcc").to(device)
    sdf = (grid.vertices.norm(dim=-1) - 0.3).requires_grad_(True)
    for _ in range(2):
        marching_tets(grid.vertices, sdf, grid.tets)
    ms, mesh = _cuda_ms(lambda: marching_tets(grid.vertices, sdf, grid.tets), device)
    return FineComponents(raster=raster, marching_tets_ms=ms,
                          marching_tets_faces=int(mesh.faces.shape[0]), tets=int(grid.tets.shape[0]))


def raster_times(rows: list[RasterTiming]) -> str:
    """'torch 33.0 ms, triton 8.0 ms (4.1x faster than torch)' from benchmark_raster's rows."""
    base = next((r for r in rows if r.backend == "torch"), None)
    out = []
    for r in rows:
        if r.error:
            out.append(f"{r.backend} failed ({r.error})")
            continue
        text = f"{r.backend} {r.ms_forward_backward:.1f} ms"
        if base is not None and r is not base and not base.error:
            text += f" ({base.ms_forward_backward / r.ms_forward_backward:.1f}x faster than torch)"
        out.append(text)
    return ", ".join(out)


FINE_NERF_BATCH_SIZES = (8, 32)  # the fine stage's batch (§4.3) and a quarter of it


@dataclass
class FineNerfTiming:
    batch_size: int
    iteration_ms: float
    render_fwd_ms: float  # chunked NeRF render at 256^2 (checkpointed: activations of one chunk kept)
    guidance_ms: float  # upsample to 512^2 + VAE encode with grad + UNet with CFG + SDS target
    backward_ms: float  # through the VAE encoder, then each chunk re-rendered and back-propagated
    optimizer_ms: float
    peak_gib: float
    samples_per_ray: float
    error: str = ""  # e.g. out of memory at this batch size


def fine_nerf_iteration(batch_sizes=FINE_NERF_BATCH_SIZES, iters: int = 5, warmup: int = 2,
                        resolution: int = 256, n_samples_per_ray: int = 512, grid_resolution: int = 256,
                        recompute_chunk_cameras: int = 4, guidance=None) -> list[FineNerfTiming]:
    """The fine-NeRF ablation's iteration (recipes/stages/fine_nerf.yaml): the paper-size hash-grid
    NeRF rendered at ``resolution``, latent SDS with a random SD-2.1-base-sized VAE and UNet
    (bf16; the renders are upsampled to its 512^2), backward, Adam step.

    The occupancy grid is refreshed from the blob start before timing, as a warm-started fine
    stage finds it already pruned; a coarse-trained object would be smaller than the blob, so
    these times are an upper bound for the samples per ray printed beside them.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("fine_nerf_iteration needs a CUDA GPU; none was found.")
    from magic3d.data.cameras import CameraRanges, sample_random_cameras
    from magic3d.scenes.hash_nerf import HashGridNeRF
    from magic3d.types import Shading

    device = torch.device("cuda")
    guidance = guidance if guidance is not None else _random_sd_guidance(device)
    ranges = CameraRanges(elevation_deg=(-10.0, 45.0), fovy_deg=(30.0, 45.0))  # the fine stage's
    results = []
    for batch in batch_sizes:
        torch.manual_seed(0)
        scene = HashGridNeRF(n_samples_per_ray=n_samples_per_ray, grid_resolution=grid_resolution,
                             recompute_chunk_cameras=recompute_chunk_cameras).to(device)
        optimizer = torch.optim.Adam(scene.parameters(), lr=1e-2, eps=1e-15)
        generator = torch.Generator().manual_seed(0)
        for step in range(20):  # leave the all-occupied warm-up, as the coarse stage has
            scene.update_step(step * scene.grid_update_every)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        totals = dict.fromkeys((*_PARTS, "spr"), 0.0)
        error = ""
        try:
            for i in range(warmup + iters):
                cams = sample_random_cameras(ranges, batch, resolution, resolution, generator).to(device)
                shading = Shading(mode="lambertian", ambient=torch.full((batch,), 0.3, device=device))
                parts, render = _timed_iteration(scene, guidance, optimizer, cams, shading, device)
                if i >= warmup:
                    for key, value in parts.items():
                        totals[key] += value / iters
                    totals["spr"] += float(render.samples_per_ray or 0) / iters
        except torch.OutOfMemoryError:
            error = "out of memory"
        except Exception as exc:  # noqa: BLE001 - one failing row must not lose the other rows' numbers
            error = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
        results.append(FineNerfTiming(
            batch_size=batch, iteration_ms=totals["iter"], render_fwd_ms=totals["render"],
            guidance_ms=totals["guidance"], backward_ms=totals["backward"], optimizer_ms=totals["optim"],
            peak_gib=torch.cuda.max_memory_allocated(device) / 2**30, samples_per_ray=totals["spr"], error=error))
        del scene, optimizer
        torch.cuda.empty_cache()
    return results


def fine_nerf_markdown(rows: list[FineNerfTiming], resolution: int = 256) -> str:
    lines = ["", f"Fine-NeRF ablation iteration (recipes/stages/fine_nerf.yaml): paper-size hash-grid NeRF "
             f"rendered at {resolution}² in chunks of 4 cameras under activation checkpointing, 512 samples "
             "per ray, 256³ occupancy grid, upsampled to 512² for latent SDS with a random-weight "
             "SD-2.1-base-sized VAE and UNet (bf16).", "",
             *_iteration_table(rows, "samples/ray", lambda r: f"{r.samples_per_ray:.0f}")]
    return "\n".join(lines) + "\n"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def markdown_report(coarse: list[CoarseTiming], grid_rows: list) -> str:
    gpu = torch.cuda.get_device_name()
    lines = [
        f"### {time.strftime('%Y-%m-%d')} · {gpu} · torch {torch.__version__} · commit {_commit()}",
        "",
        "Coarse iteration at 64×64, random-weight IF-I-XL-sized UNet (bf16, CFG batch 2B), "
        "hash-grid NeRF (fp32). Render = scene forward; backward = through the scene.",
        "",
        "| batch | iteration ms | render fwd ms | guidance ms | backward ms | optimiser ms | peak GiB | samples/ray |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in coarse:
        lines.append(f"| {r.batch_size} | {r.iteration_ms:.1f} | {r.render_fwd_ms:.1f} | {r.guidance_ms:.1f} | "
                     f"{r.backward_ms:.1f} | {r.optimizer_ms:.1f} | {r.peak_gib:.1f} | {r.samples_per_ray:.0f} |")
    lines += ["", "Hash-grid encode forward + backward, 16 levels × 2 features, 2^19 table:",
              "", "| backend | gradients | points | ms | M points/s |", "|---|---|---|---|---|"]
    for g in grid_rows:
        grads = "table + points" if g.points_grad else "table"
        lines.append(f"| {g.backend} | {grads} | {g.n_points} | {g.ms:.2f} | {g.points_per_s / 1e6:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--append", type=Path, default=None, help="append the table to this markdown file")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--fine", action="store_true",
                        help="also the fine stage (components, DMTet iteration) and the fine-NeRF ablation")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("make bench needs a CUDA GPU; none was found.")
        return 2
    from magic3d.ops.hashgrid_bench import benchmark_hashgrid, default_backends

    # torch, compiled, and triton / tcnn when they import; the triton row also with d/dx,
    # the gradient normals and eikonal terms take.
    grid_rows = [benchmark_hashgrid(n_points=2**20, device="cuda", backend=b) for b in default_backends("cuda")]
    if "triton" in default_backends("cuda"):
        grid_rows.append(benchmark_hashgrid(n_points=2**20, device="cuda", backend="triton", points_grad=True))
    coarse = coarse_iteration(tuple(args.batch_sizes), iters=args.iters)
    report = markdown_report(coarse, grid_rows)
    if args.fine:
        parts = fine_components()
        sd = _random_sd_guidance(torch.device("cuda"))  # ~1 B parameters: build once for both tables
        latent = latent_guidance(tuple(args.batch_sizes), guidance=sd)
        report += ("\nFine-stage components: rasteriser fwd+bwd (100k triangles, 512², batch 8) "
                   f"{raster_times(parts.raster)}; marching tets on {parts.tets} tets "
                   f"{parts.marching_tets_ms:.1f} ms.\n\n| batch | latent SDS step ms (512², SD-2.1-base size) | peak GiB |\n|---|---|---|\n")
        report += "".join(f"| {r.batch_size} | {r.step_ms:.1f} | {r.peak_gib:.1f} |\n" for r in latent)
        report += fine_markdown(fine_iteration(tuple(args.batch_sizes), guidance=sd))
        report += fine_nerf_markdown(fine_nerf_iteration(guidance=sd))
    print(report)
    if args.append is not None:
        with open(args.append, "a") as handle:
            handle.write("\n" + report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
