"""Stubs and builders shared by the evaluator's tests: a fixed-answer classifier, the ground
truth as a scene, a DMTet scene with the toy shape's exact SDF, and run folders laid out as
the recipe runner leaves them (config.yaml, checkpoints/last.ckpt, DONE.json)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from magic3d.data.cameras import VIEW_NAMES
from magic3d.eval.classifier import Prediction
from magic3d.scenes.base import DensityField, SceneModule
from magic3d.scenes.dmtet import DMTetScene
from magic3d.scenes.hash_nerf import HashGridNeRF
from magic3d.toyworld.render import render_shape, solid_background
from magic3d.toyworld.shapes import BOUNDING_RADIUS, COLOUR_NAMES, SHAPE_NAMES, get_colour, get_shape
from magic3d.types import RenderOutput

TEXTURE_ARGS = dict(n_levels=2, log2_hashmap_size=10, base_resolution=4, per_level_scale=2.0, hidden_dim=16,
                    grid_backend="torch")
DMTET_ARGS = dict(tet_resolution=16, bbox_radius=BOUNDING_RADIUS, raster_backend="torch", **TEXTURE_ARGS)
NERF_ARGS = dict(n_levels=2, log2_hashmap_size=10, base_resolution=4, per_level_scale=2.0, hidden_dim=16,
                 n_samples_per_ray=24, grid_resolution=0, blob_density=60.0, grid_backend="torch")
NERF_CLASS = "magic3d.scenes.hash_nerf.HashGridNeRF"
DMTET_CLASS = "magic3d.scenes.dmtet.DMTetScene"


class StubClassifier:
    """Answers one fixed caption and view for every image: "perfect" for that object."""

    shape_names, colour_names, view_names = SHAPE_NAMES, COLOUR_NAMES, VIEW_NAMES

    def __init__(self, shape: str, colour: str, view: str = "front") -> None:
        self.answer = (SHAPE_NAMES.index(shape), COLOUR_NAMES.index(colour), VIEW_NAMES.index(view))

    def predict(self, images: torch.Tensor) -> Prediction:
        b = images.shape[0]
        s, c, v = (torch.nn.functional.one_hot(torch.full((b,), i), n).float() * 10.0
                   for i, n in zip(self.answer, (len(SHAPE_NAMES), len(COLOUR_NAMES), len(VIEW_NAMES))))
        return Prediction(s, c, v)


class ToyScene(SceneModule):
    """The ground-truth object itself as a scene, over a coloured learned-looking background."""

    def __init__(self, shape: str, colour: str, background=(0.2, 0.7, 0.3)) -> None:
        super().__init__()
        self.shape, self.rgb, self.bg = get_shape(shape), get_colour(colour).rgb, background
        self.radius = 1.0

    def render(self, cameras, shading) -> RenderOutput:
        bg = solid_background(self.bg, cameras.batch_size, cameras.height, cameras.width)
        out = render_shape(self.shape, cameras, self.rgb, shading, bg, supersample=2)
        return RenderOutput(rgb=out.rgb, opacity=out.mask, depth=out.depth, background=bg)

    def density(self, points: torch.Tensor) -> torch.Tensor:
        # Opaque inside, empty outside, as the sphere tracer renders it: its visible surface is
        # the shape's surface (optical depth ln 2 is reached ln 2 / 1000 inside it).
        return torch.where(self.shape.sdf(points) < 0.0, 1000.0, 0.0)

    def density_field(self) -> DensityField:
        return DensityField(self.density, lambda p: torch.tensor(self.rgb).expand(p.shape[0], 3), self.radius,
                            torch.device("cpu"))


def toy_dmtet(shape_name: str) -> DMTetScene:
    """A DMTet scene whose grid SDF is the toy shape's exact SDF (its surface, up to chords)."""
    torch.manual_seed(0)
    scene = DMTetScene(**DMTET_ARGS)
    with torch.no_grad():
        scene.sdf.copy_(get_shape(shape_name).sdf(scene.grid_vertices()))
    return scene.eval()


def write_stage(run: Path, stage: str, scene: torch.nn.Module, class_path: str, init_args: dict, prompt: str,
                started_from: str | None = None, steps: int = 4) -> Path:
    """A finished stage as the recipe runner leaves it (config.yaml, last.ckpt, DONE.json)."""
    stage_dir = run / stage
    (stage_dir / "checkpoints").mkdir(parents=True)
    config: dict = {"seed": 0, "model": {"scene": {"class_path": class_path, "init_args": dict(init_args)},
                                         "prompt": prompt}}
    if started_from is not None:
        config["start"] = {"checkpoint": str(run / started_from / "checkpoints" / "last.ckpt"), "mode": "convert",
                           "converter": "magic3d.scenes.convert.nerf_to_dmtet"}
    (stage_dir / "config.yaml").write_text(yaml.safe_dump(config))
    torch.save({"state_dict": {f"scene.{k}": v for k, v in scene.state_dict().items()}, "global_step": steps,
                "magic3d": {"stage_config": config, "prompt": prompt}}, stage_dir / "checkpoints" / "last.ckpt")
    (stage_dir / "DONE.json").write_text(json.dumps({"steps": steps, "prompt": prompt}))
    return stage_dir


def make_finished_run(root: Path, prompt: str, stage: str = "coarse", steps: int = 6) -> Path:
    """A run with one finished coarse stage: the NeRF's blob start."""
    torch.manual_seed(0)
    write_stage(root, stage, HashGridNeRF(**NERF_ARGS), NERF_CLASS, NERF_ARGS, prompt, steps=steps)
    return root


def make_coarse_to_fine_run(run: Path, prompt: str, shape: str) -> Path:
    """A coarse NeRF blob and a fine DMTet of the exact shape that started from it."""
    torch.manual_seed(0)
    write_stage(run, "coarse", HashGridNeRF(**NERF_ARGS), NERF_CLASS, NERF_ARGS, prompt)
    write_stage(run, "fine", toy_dmtet(shape), DMTET_CLASS, DMTET_ARGS, prompt, started_from="coarse")
    return run
