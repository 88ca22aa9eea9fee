"""Continue a prior's training from its exported pipeline folder (``--init-from priors/pixel``).

Why: the full trainer state (fp32 weights, EMA and AdamW moments: ~110 MB for the pixel
prior) is too large to carry to or bring back from a GPU machine between sessions (64 MiB in,
8 x 16 MB out), while the exported fp16 folder travels (and is committed) anyway. A warm
start rebuilds a trainer from that folder:

- configuration, seed, image count, scaling factor and run history come from its
  ``training.json``; the tokenizer from ``tokenizer/tokenizer.json`` (the text encoder's
  embedding rows follow its ids, so a new tokenizer would scramble them);
- the exported (EMA) weights become both the live weights and the EMA (fp16 -> fp32: the
  rounding, ~1e-3 relative, is far below what one optimiser step changes);
- each phase keeps its step count and training seconds, so ``--minutes`` stays the total
  budget across sessions; the AdamW moments start from zero, so the learning rate warms up
  again over ``warmup_steps`` (``Phase.warmup_from``): without it the first bias-corrected
  Adam steps move every weight by ~lr at once;
- the latent prior's VAE is frozen (its phase counts as done): training it further would
  move the latents under the UNet.

The RNG streams restart from the seed (offset by the steps done), so a warm-started run is
reproducible but not bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from magic3d.priors.configs import PriorConfig

# Exported subfolder -> (trainer phase, weights file written by save_pretrained).
_SUBFOLDERS = {"unet": "unet", "text_encoder": "unet", "vae": "vae"}


@dataclass
class WarmStart:
    """What a trainer needs from an exported prior folder."""

    folder: Path
    config: PriorConfig
    seed: int
    tokenizer_json: str
    n_images: int
    render: dict[str, Any]
    runs: list[dict[str, Any]]
    scaling_factor: float | None
    phases: dict[str, dict[str, Any]]  # phase name -> {"steps", "seconds", "history"}


def read_warm_start(folder: str | Path, kind: str) -> WarmStart:
    """Read an exported prior folder's training record and tokenizer; errors name the fix."""
    folder = Path(folder)
    record_path = folder / "training.json"
    tokenizer_path = folder / "tokenizer" / "tokenizer.json"
    for path in (record_path, tokenizer_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"--init-from {folder}: {path.name} is missing; pass a folder written by "
                f"`python -m magic3d.priors train` (e.g. priors/{kind})."
            )
    record = json.loads(record_path.read_text())
    if record.get("kind") != kind:
        raise ValueError(f"--init-from {folder} holds a {record.get('kind')!r} prior, not {kind!r}: pass the matching --kind.")
    config = PriorConfig.from_dict(record["config"])
    phases = {p["name"]: {"steps": int(p["steps"]), "seconds": float(p["seconds"]), "history": p.get("history", [])}
              for p in record["phases"]}
    return WarmStart(
        folder=folder,
        config=config,
        seed=int(record["seed"]),
        tokenizer_json=tokenizer_path.read_text(),
        n_images=int(record["n_images"]),
        render=dict(record.get("render", {})),
        runs=list(record.get("runs", [])),
        scaling_factor=record.get("scaling_factor"),
        phases=phases,
    )


def load_exported_module(folder: Path, name: str, template: nn.Module) -> dict[str, torch.Tensor]:
    """fp32 state dict of subfolder ``name``, loaded by the class of ``template`` (the
    libraries' own loaders resolve tied and renamed weights)."""
    sub = folder / name
    if not sub.is_dir():
        raise FileNotFoundError(f"--init-from {folder}: subfolder {name}/ is missing (an incomplete export?).")
    # No dtype argument: diffusers and transformers name it differently; cast below instead.
    state = type(template).from_pretrained(sub).state_dict()
    expected = template.state_dict()
    if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
        raise ValueError(
            f"--init-from {folder}: {name}/ does not match the configuration in its training.json "
            "(different architecture): train a new prior instead."
        )
    return {k: v.float() for k, v in state.items()}


def phase_of(module_name: str) -> str:
    return _SUBFOLDERS[module_name]
