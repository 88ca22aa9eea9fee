"""TextTo3D: the one training loop for every 3D stage (coarse NeRF, fine mesh, fine NeRF).

A stage = a scene (what is optimised) + a guidance (where gradients come from) + regularisers.
Both parts are injected from the stage config (``class_path`` / ``init_args``), so an ablation
is a YAML edit. The frozen diffusion model inside the guidance is loaded in ``setup()`` and is
never part of the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from magic3d.checkpoints import StageStart, start_scene
from magic3d.guidance.base import Guidance
from magic3d.scenes.base import Scene
from magic3d.tracking import log_image_file, log_video_file, wandb_logger_of
from magic3d.types import CameraBatch, RenderOutput, Shading
from magic3d.visuals import preview_grid, save_png, to_uint8

GUIDANCE_GROUP_PREFIX = "guidance/"  # lr_overrides key of a guidance parameter group

SHADING_MODES = ("albedo", "lambertian", "textureless")


class NonFiniteLossError(RuntimeError):
    """Raised after too many consecutive non-finite steps; the last good checkpoint is kept."""


@dataclass
class LossTerms:
    total: Tensor
    sds: Tensor
    orientation: Tensor | None
    sparsity: Tensor | None
    opaque: Tensor | None
    scene: dict[str, Tensor] = field(default_factory=dict)  # the scene's own weighted terms


class TextTo3D(L.LightningModule):
    """Score-distillation optimisation of a 3D scene for one text prompt.

    Args:
        scene: the representation being optimised (``magic3d.scenes.*``).
        guidance: the score-distillation prior (``magic3d.guidance.*``).
        prompt: the text prompt; recipes fill it in from the command line.
        lr: learning rate of every parameter group not named in ``lr_overrides``.
        lr_overrides: per-part learning rates, keyed by the scene's ``param_groups()`` names
            (e.g. ``{"background": 0.1}``: Magic3D uses 10x for the environment map, §4.1) and
            by ``guidance/<name>`` for the guidance's own trainable groups (e.g. LoRA).
        betas, eps: Adam settings (eps 1e-15 is the Instant-NGP choice for hash tables).
        albedo_only_steps: render unshaded colour for the first N steps (stabilises geometry).
        textureless_probability: after that, share of batches shaded without texture; the rest
            are Lambertian with ambient ~ U(ambient_range) and diffuse = 1 - ambient.
        lambda_orientation: (start, end) weight of the orientation loss, ramped linearly over
            ``orientation_ramp_steps``.
            The term is the scene's "orientation" regulariser (NeRF scenes).
        lambda_sparsity: weight of the mean-opacity penalty (discourages floaters); the scene's
            "sparsity" regulariser when it renders one, else the mean opacity.
        lambda_opaque: weight of the binary-opacity penalty (pushes opacity to 0 or 1).
        regularisers: weights of the scene's other regulariser terms, by the names its
            ``regulariser_names()`` declares (e.g. ``{"normal_consistency": 1e4}`` for DMTet).
        max_consecutive_nonfinite: stop with an error after this many skipped steps in a row.
        preview_every: save a training-render preview every N steps (0 disables).
    """

    def __init__(
        self,
        scene: Scene,
        guidance: Guidance,
        prompt: str = "",
        lr: float = 0.01,
        lr_overrides: dict[str, float] | None = None,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-15,
        albedo_only_steps: int = 0,
        textureless_probability: float = 0.5,
        ambient_range: tuple[float, float] = (0.0, 1.0),
        lambda_orientation: tuple[float, float] = (0.0, 0.0),
        orientation_ramp_steps: int = 1,
        lambda_sparsity: float = 0.0,
        lambda_opaque: float = 0.0,
        regularisers: dict[str, float] | None = None,
        max_consecutive_nonfinite: int = 20,
        preview_every: int = 100,
    ) -> None:
        super().__init__()
        if not 0.0 <= textureless_probability <= 1.0:
            raise ValueError(f"textureless_probability must be in [0, 1], got {textureless_probability}")
        self.scene = scene
        self.guidance = guidance
        self.prompt = prompt
        self.lr = lr
        self.lr_overrides = dict(lr_overrides or {})
        self.betas = tuple(betas)
        self.eps = eps
        self.albedo_only_steps = albedo_only_steps
        self.textureless_probability = textureless_probability
        self.ambient_range = tuple(ambient_range)
        self.lambda_orientation = tuple(lambda_orientation)
        self.orientation_ramp_steps = max(1, orientation_ramp_steps)
        self.lambda_sparsity = lambda_sparsity
        self.lambda_opaque = lambda_opaque
        self.regularisers = dict(regularisers or {})
        reserved = sorted({"orientation", "sparsity"} & set(self.regularisers))
        if reserved:
            raise ValueError(f"regularisers={reserved}: these terms have their own weights, "
                             "lambda_orientation and lambda_sparsity; set those instead.")
        unknown = sorted(set(self.regularisers) - set(scene.regulariser_names()))
        if unknown:
            raise ValueError(f"regularisers names {unknown}, but {type(scene).__name__} renders "
                             f"{list(scene.regulariser_names()) or 'no regulariser terms'}.")
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.preview_every = preview_every
        # Set by the stage runner: the resolved stage config, stored in every checkpoint so a
        # later stage can rebuild this scene without reading this run's files.
        self.stage_config: dict | None = None
        self.output_dir: Path | None = None
        self.consecutive_nonfinite = 0
        self._skip_update = False
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
        self._shading_generator = torch.Generator()
        self._val_images: list[Tensor] = []

    # ----------------------------------------------------------------------------- lifecycle
    def setup(self, stage: str) -> None:
        if not self.prompt or not self.prompt.strip():
            raise ValueError("The prompt is empty: pass prompt=\"a description of the object\".")
        device = self.trainer.strategy.root_device if self._trainer is not None else self.device
        self.guidance.setup(self.prompt, device)
        seed = torch.initial_seed() % (2**63)  # the run's seed: Lightning seeds every rank alike
        if self._trainer is not None and self.trainer.world_size > 1:
            # Else every rank would draw the same SDS timesteps, noise and ray jitter for its
            # own cameras, and N GPUs would explore no more noise levels than one.
            torch.manual_seed(seed + self.global_rank)
        self._shading_generator.manual_seed(seed + self.global_rank)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = dict(self.scene.param_groups())
        for name, params in self.guidance.param_groups().items():
            groups[GUIDANCE_GROUP_PREFIX + name] = params
        unknown = set(self.lr_overrides) - set(groups)
        if unknown:
            raise ValueError(
                f"lr_overrides names unknown parameter groups {sorted(unknown)}; "
                f"this scene and guidance have {sorted(groups)}."
            )
        param_groups = [
            {"params": params, "lr": self.lr_overrides.get(name, self.lr), "name": name}
            for name, params in groups.items()
            if len(params) > 0
        ]
        return torch.optim.Adam(param_groups, betas=self.betas, eps=self.eps)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        model = (self.stage_config or {}).get("model", {})
        scene = model.get("init_args", model).get("scene")
        checkpoint["magic3d"] = {"stage_config": self.stage_config, "prompt": self.prompt, "scene": scene}

    # ------------------------------------------------------------------------- stage hooks
    def start_from(self, checkpoint: dict, start: StageStart) -> None:
        """Warm start or convert this stage's scene from another stage's checkpoint."""
        start_scene(self.scene, checkpoint, start)

    def finish_stage(self, datamodule: Any, video_fps: int, video_views: int) -> dict[str, Any]:
        """After the last step (rank 0): the turntable video; returns what DONE.json records."""
        from magic3d.video import render_turntable

        video = self.output_dir / "turntable.mp4"
        render_turntable(self, datamodule, video, fps=video_fps, n_views=video_views)
        log_video_file(self._wandb_logger(), "turntable", video, step=self.global_step)
        return {"video": str(video), "prompt": self.prompt, "skipped_steps": int(self.skipped_steps)}

    # ------------------------------------------------------------------------------ training
    def progress(self) -> float:
        max_steps = self.trainer.max_steps if self._trainer is not None else -1
        if max_steps is None or max_steps <= 0:
            return 0.0
        return min(1.0, self.global_step / max_steps)

    def sample_shading(self, batch_size: int, device: torch.device) -> Shading:
        if self.global_step < self.albedo_only_steps:
            return Shading(mode="albedo", ambient=torch.ones(batch_size, device=device))
        draw = torch.rand(1 + batch_size, generator=self._shading_generator)
        mode = "textureless" if draw[0] < self.textureless_probability else "lambertian"
        low, high = self.ambient_range
        ambient = low + (high - low) * draw[1:]
        return Shading(mode=mode, ambient=ambient.to(device))

    def orientation_weight(self) -> float:
        start, end = self.lambda_orientation
        ramp = min(1.0, self.global_step / self.orientation_ramp_steps)
        return start + (end - start) * ramp

    def loss_terms(self, render: RenderOutput, sds_loss: Tensor) -> LossTerms:
        total = sds_loss
        orientation = sparsity = opaque = None
        w_orient = self.orientation_weight()
        if w_orient > 0 and "orientation" in render.regularisers:
            orientation = render.regularisers["orientation"]
            total = total + w_orient * orientation
        if self.lambda_sparsity > 0:
            sparsity = render.regularisers.get("sparsity")
            sparsity = sparsity if sparsity is not None else render.opacity.mean()
            total = total + self.lambda_sparsity * sparsity
        if self.lambda_opaque > 0:
            alpha = render.opacity.clamp(1e-5, 1 - 1e-5)
            opaque = -(alpha * alpha.log() + (1 - alpha) * (1 - alpha).log()).mean()
            total = total + self.lambda_opaque * opaque
        scene_terms = {}
        for name, weight in self.regularisers.items():
            if weight > 0:
                scene_terms[name] = render.regularisers[name]
                total = total + weight * scene_terms[name]
        return LossTerms(total=total, sds=sds_loss, orientation=orientation, sparsity=sparsity,
                         opaque=opaque, scene=scene_terms)

    def on_train_batch_start(self, batch: CameraBatch, batch_idx: int) -> None:
        self.scene.update_step(self.global_step)

    def training_step(self, batch: CameraBatch, batch_idx: int) -> Tensor | None:
        shading = self.sample_shading(batch.batch_size, batch.device)
        render = self.scene.render(batch, shading)
        guided = self.guidance.step(render.rgb, batch, self.progress())
        terms = self.loss_terms(render, guided.loss)

        bad = guided.skipped or not bool(torch.isfinite(terms.total))
        if self._trainer is not None and self.trainer.world_size > 1:
            # Every rank must skip together: DDP averages gradients across all of them.
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            return self._skip_step()
        self.consecutive_nonfinite = 0
        self._skip_update = False

        log = {
            "train/loss": terms.total,
            "train/loss_sds": terms.sds,
            "train/sds_grad_norm": guided.grad_norm,
            "train/t_mean": guided.timesteps.float().mean(),
            "train/opacity_mean": render.opacity.mean(),
        }
        named = {"orientation": terms.orientation, "sparsity": terms.sparsity, "opaque": terms.opaque, **terms.scene}
        for name, value in named.items():
            if value is not None:
                log[f"train/loss_{name}"] = value
        if render.samples_per_ray is not None:
            log["train/samples_per_ray"] = float(render.samples_per_ray)
        self.log_dict(log, prog_bar=False, on_step=True, batch_size=batch.batch_size)
        self.log("loss", terms.total, prog_bar=True, logger=False, batch_size=batch.batch_size)

        if self.preview_every > 0 and self.global_step % self.preview_every == 0:
            self._save_preview(render, f"train/step_{self.global_step:06d}.png")
        return terms.total

    def _skip_step(self) -> Tensor:
        """A zero loss that still reaches every trainable parameter, and no optimiser update.

        Lightning refuses a ``None`` loss under DDP, and backward must run on every rank for
        DDP's gradient averaging; ``on_before_optimizer_step`` then drops the (zero)
        gradients, so Adam leaves the weights and its moments as they were.
        """
        self._skip_update = True
        self.consecutive_nonfinite += 1
        self.skipped_steps += 1
        self.log("train/skipped_steps", self.skipped_steps.float(), on_step=True, batch_size=1)
        if self.consecutive_nonfinite >= self.max_consecutive_nonfinite:
            raise NonFiniteLossError(
                f"{self.consecutive_nonfinite} consecutive steps had a non-finite loss (step "
                f"{self.global_step}); stopping. The last good checkpoint is kept; try a lower "
                "learning rate or guidance scale, then resume."
            )
        trainable = [p for p in self.parameters() if p.requires_grad]
        return torch.stack([p.sum() for p in trainable]).sum() * 0.0

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._skip_update:
            for group in optimizer.param_groups:
                for param in group["params"]:
                    param.grad = None  # Adam skips parameters without a gradient
            return
        # A tensor, not Lightning's grad_norm(): that one syncs the GPU once per parameter.
        grads = [p.grad.detach().norm() for p in self.parameters() if p.grad is not None]
        if grads:
            total = torch.linalg.vector_norm(torch.stack(grads))
            self.log("train/param_grad_norm", total, on_step=True, batch_size=1)
        for group in optimizer.param_groups:
            self.log(f"train/lr_{group['name']}", group["lr"], on_step=True, batch_size=1)

    # ---------------------------------------------------------------------------- validation
    def validation_step(self, batch: CameraBatch, batch_idx: int) -> None:
        if self._trainer is not None and not self.trainer.is_global_zero:
            return  # rank 0 alone writes the sheet; every rank still steps through the views
        shading = Shading(mode="lambertian", ambient=torch.full((batch.batch_size,), 0.3, device=batch.device))
        render = self.scene.render(batch, shading)
        self._val_images.append(preview_grid(render).cpu())

    def on_validation_epoch_end(self) -> None:
        if not self._val_images:
            return
        sheet = torch.cat(self._val_images, dim=0)  # views stacked vertically
        self._val_images.clear()
        self._write_image(sheet, f"val/step_{self.global_step:06d}.png", key="val/views")

    @rank_zero_only
    def _save_preview(self, render: RenderOutput, name: str) -> None:
        self._write_image(preview_grid(render).cpu(), name, key="train/preview")

    @rank_zero_only
    def _write_image(self, image: Tensor, name: str, key: str) -> None:
        """The PNG into the stage folder, and the same picture to W&B when the trainer logs there."""
        path = None if self.output_dir is None else self.output_dir / name
        if path is not None:
            save_png(image, path)
        wandb_run = self._wandb_logger()
        if wandb_run is not None:
            log_image_file(wandb_run, key, path if path is not None else to_uint8(image), self.global_step)

    def _wandb_logger(self) -> WandbLogger | None:
        """The trainer's W&B logger; None when W&B is off or no trainer is attached."""
        return wandb_logger_of(self.trainer.loggers) if self._trainer is not None else None
