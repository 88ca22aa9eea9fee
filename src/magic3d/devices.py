"""Where things run: the device a user asked for, and the device a module lives on."""

from __future__ import annotations

import itertools

import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" -> CUDA when available, else CPU; an explicit CUDA device must exist."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} but CUDA is not available: use --device cpu or auto.")
    return resolved


def module_device(module: torch.nn.Module) -> torch.device:
    """Device of a module's first parameter or buffer (CPU for an empty module)."""
    tensors = itertools.chain(module.parameters(), module.buffers())
    return next((t.device for t in tensors), torch.device("cpu"))
