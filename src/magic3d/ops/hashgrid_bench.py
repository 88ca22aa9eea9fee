"""Hash-grid encode timing: forward + backward w.r.t. the table, as a training step pays it.

Run ``python -m magic3d.ops.hashgrid_bench`` for every backend available on this machine
(torch; on CUDA also compiled, triton when it imports, tcnn when it imports);
``--points-grad`` also takes the gradient w.r.t. the points (normals, eikonal terms).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Literal

import torch

from magic3d.ops.hashgrid import HashGrid, tcnn_available
from magic3d.ops.hashgrid_triton import triton_importable


@dataclass
class HashGridBenchmark:
    backend: str  # the backend that actually ran (auto resolved)
    device: str  # device name, e.g. "NVIDIA H100 80GB HBM3" or "cpu"
    n_points: int
    n_params: int
    points_grad: bool  # whether the timed backward also took d out / d x
    iters: int
    ms: float  # mean milliseconds per forward + backward
    points_per_s: float

    def __str__(self) -> str:
        grads = "table+points" if self.points_grad else "table"
        return (f"hashgrid {self.backend:8s} on {self.device}: {self.n_points} points, "
                f"{self.ms:.3f} ms fwd+bwd ({grads}), {self.points_per_s / 1e6:.1f} M points/s "
                f"({self.n_params} params, mean of {self.iters})")


def benchmark_hashgrid(
    n_points: int = 2**20,
    device: str = "cuda",
    backend: Literal["auto", "torch", "compiled", "triton", "tcnn"] = "auto",
    iters: int = 20,
    warmup: int = 5,
    n_levels: int = 16,
    n_features_per_level: int = 2,
    log2_hashmap_size: int = 19,
    base_resolution: int = 16,
    per_level_scale: float = 1.4473,
    seed: int = 0,
    points_grad: bool = False,
) -> HashGridBenchmark:
    """Mean time of ``grid(x)`` followed by the table gradient for a random cotangent.

    Warm-up iterations absorb ``torch.compile`` and allocator start-up; CUDA timings use
    events around the whole timed loop after a synchronise.
    """
    torch_device = torch.device(device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    grid = HashGrid(n_levels, n_features_per_level, log2_hashmap_size, base_resolution,
                    per_level_scale, backend=backend).to(torch_device)
    x = torch.rand(n_points, 3, generator=generator).to(torch_device).requires_grad_(points_grad)
    cotangent = torch.randn(n_points, grid.n_output_dims, generator=generator).to(torch_device)
    inputs = (grid.params, x) if points_grad else (grid.params,)

    def step() -> None:
        out = grid(x)
        torch.autograd.grad(out, inputs, cotangent)

    for _ in range(warmup):
        step()
    if torch_device.type == "cuda":
        torch.cuda.synchronize(torch_device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        torch.cuda.synchronize(torch_device)
        total_ms = start.elapsed_time(end)
        device_name = torch.cuda.get_device_name(torch_device)
    else:
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        total_ms = (time.perf_counter() - t0) * 1e3
        device_name = "cpu"
    ms = total_ms / iters
    return HashGridBenchmark(
        backend=grid.resolve_backend(torch_device), device=device_name, n_points=n_points,
        n_params=grid.spec.n_params, points_grad=points_grad, iters=iters, ms=ms,
        points_per_s=n_points / (ms / 1e3),
    )


def default_backends(device: str) -> list[str]:
    """The backends worth timing on ``device``: torch, and on CUDA the fast paths that import."""
    backends = ["torch"]
    if device.startswith("cuda"):
        backends.append("compiled")
        if triton_importable():
            backends.append("triton")
        if tcnn_available():
            backends.append("tcnn")
    return backends


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-points", type=int, default=2**20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--backends", nargs="*", default=None,
                        help="default: torch, and on CUDA compiled, triton and tcnn (the last two if importable)")
    parser.add_argument("--points-grad", action="store_true", help="also the gradient w.r.t. the points")
    args = parser.parse_args()
    backends = args.backends if args.backends is not None else default_backends(args.device)
    for backend in backends:
        print(benchmark_hashgrid(args.n_points, args.device, backend, args.iters, points_grad=args.points_grad))


if __name__ == "__main__":
    main()
