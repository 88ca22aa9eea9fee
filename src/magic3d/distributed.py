"""Running one stage on several processes (Lightning DDP): the few rules text-to-3D needs.

- ``data.batch_size`` is the global batch: each of the N processes renders batch_size / N
  cameras (``per_rank_batch_size``).
- The strategy is Lightning's DDP with two settings changed (``resolve_strategy``):
  ``find_unused_parameters=True`` because which parameters reach the loss changes from step
  to step and from rank to rank (textureless shading leaves the mesh's texture field out,
  albedo-only shading without an orientation loss leaves the NeRF's normal head out), and
  ``static_graph`` cannot express that; the price is one walk over the autograd graph per
  step on the host. Buffers are not re-broadcast before every forward: the occupancy grid is
  updated identically on every rank (seeded by the step), and re-sending it (84 MB at 256^3)
  and the tet grid every step would be pure waste.
- Work done once for everyone (the text-embedding cache) runs on rank 0 first
  (``rank_zero_first``); the other ranks then read its result.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def per_rank_batch_size(global_batch_size: int, world_size: int) -> int:
    """Cameras each process renders per step; the global batch must split evenly."""
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    if global_batch_size % world_size != 0:
        lower = max(world_size, global_batch_size // world_size * world_size)
        raise ValueError(
            f"data.batch_size={global_batch_size} is the global batch and must divide evenly over "
            f"{world_size} processes (trainer.devices x trainer.num_nodes): use {lower} or "
            f"{lower + world_size}."
        )
    return global_batch_size // world_size


@contextmanager
def rank_zero_first() -> Iterator[None]:
    """Rank 0 runs the body first; the others wait on a barrier, then run it (reading what
    rank 0 wrote, e.g. a cache file). Without a process group it is a plain block."""
    if not is_distributed():
        yield
        return
    if dist.get_rank() != 0:
        dist.barrier()
    try:
        yield
    finally:
        if dist.get_rank() == 0:
            dist.barrier()


def requested_devices(devices: Any, accelerator: str = "auto") -> int | None:
    """How many devices ``trainer.devices`` asks for, or None when Lightning alone can tell."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str):
        text = devices.strip()
        if "," in text:
            return len([d for d in text.split(",") if d.strip()])
        if text.lstrip("-").isdigit():
            devices = int(text)
        elif text != "auto":
            return None
    if isinstance(devices, int) and devices >= 1:
        return devices
    # -1 or "auto": every visible GPU, when a GPU is what the accelerator picks.
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.cuda.device_count()
    return None


def resolve_strategy(strategy: Any, devices: Any, accelerator: Any = "auto") -> Any:
    """``trainer.strategy`` as the Trainer gets it: "ddp" (or "auto" on several devices)
    becomes a ``DDPStrategy`` configured for text-to-3D; anything else is passed through."""
    if not isinstance(strategy, str):
        return strategy
    count = requested_devices(devices, accelerator if isinstance(accelerator, str) else "auto")
    if strategy == "ddp" or (strategy == "auto" and count is not None and count > 1):
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=True, **_no_per_step_buffer_sync())
    return strategy


def _no_per_step_buffer_sync() -> dict[str, bool]:
    # Newer torch splits broadcast_buffers: forward_sync_buffers=False still copies rank 0's
    # buffers once at wrap time (wanted: a checkpoint or a conversion may have filled them).
    from torch.nn.parallel import DistributedDataParallel

    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}
