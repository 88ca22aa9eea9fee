"""DreamBooth: the one training loop of a personalisation stage (Magic3D §6).

LoRA adapters (peft) on the UNet of a frozen prior, optionally on its text encoder, learn a
subject from a few photos under an identifier ("a sks duck"), with DreamBooth's prior
preservation on class images the frozen prior made ("a duck"). It is a stage like the text-to-3D
ones: the stage runner gives it checkpoints (the adapters and their optimiser state only; the
frozen weights never enter them), resume, signals, W&B and DDP; at the end it writes the adapters
in diffusers' LoRA format with a card (``<stage>/lora``), which ``PixelSDS``/``LatentSDS`` load
with ``lora: <stage>/lora``.

Every step's draws (subject and class images, timesteps, noise) come from a generator keyed by
the run's seed, the rank and the global step, so a resumed stage continues exactly as one that
never stopped.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from jaxtyping import Float, Int
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor, nn

from magic3d.checkpoints import FoundCheckpoint, StageStart
from magic3d.config import ConfigError
from magic3d.data.datamodule import step_generator
from magic3d.dreambooth.card import write_card_readme
from magic3d.dreambooth.class_images import make_class_images
from magic3d.dreambooth.identifier import InstancePrompt, check_identifier_is_rare, parse_instance_prompt
from magic3d.dreambooth.losses import DreamBoothLoss, dreambooth_loss
from magic3d.dreambooth.prior import PersonalisedPrior
from magic3d.dreambooth.sampling import sample_images
from magic3d.dreambooth.subject import find_subject_images, load_subject_images
from magic3d.guidance.base import add_noise
from magic3d.guidance.lora import (
    LoraCard,
    LoraSettings,
    add_lora,
    base_model_name,
    prior_fingerprint,
    save_lora,
)
from magic3d.tracking import log_image_file, wandb_logger_of
from magic3d.visuals import save_png, to_uint8

LORA_FOLDER = "lora"
CLASS_IMAGES_FOLDER = "class_images"
_LOSS_EMA = 0.9  # smoothing of the losses the card reports (about the last 10 steps)


class DreamBooth(L.LightningModule):
    """Personalise a prior on a subject with LoRA adapters and prior preservation.

    Args:
        prior: the prior to tune (``magic3d.dreambooth.prior.PixelPrior`` / ``LatentPrior``).
        prompt: the instance prompt, identifier before the class noun ("a sks duck").
        subject: folder of 2 or more PNG/JPEG photos of the subject (any size).
        identifier: the rare word that names the subject in ``prompt``.
        class_prompt: the prompt of the class images (default: ``prompt`` without the identifier).
        class_prompts: several class prompts instead, ``{class}`` standing for the class noun
            ("a red {class}" -> "a red duck"); the class images are shared among them round-robin
            and each trains under its own prompt. None: ``class_prompt`` alone.
        allow_vocabulary_identifier: accept an identifier the tokenizer knows as one whole word
            (refused by default: tuning would overwrite its meaning).
        background: RGB in [0, 1] that transparent parts of the photos are composited over.
        rank, lora_alpha: LoRA rank and alpha (None: alpha = rank).
        train_text_encoder: also adapt the text encoder (its attention projections).
        lr, text_encoder_lr: AdamW learning rates of the UNet and text-encoder adapters.
        betas, weight_decay, eps: AdamW settings.
        n_class_images: class images for prior preservation (0 turns it off).
        prior_loss_weight: lambda, the weight of the prior-preservation loss.
        class_sample_steps, class_guidance_scale: DDIM steps and CFG scale of the class images.
        preview_every: sample the prompt every N steps into ``train/`` (0 disables).
        n_preview, preview_steps, preview_guidance_scale: previews' count, DDIM steps, CFG scale.
    """

    def __init__(
        self,
        prior: PersonalisedPrior,
        prompt: str = "",
        subject: str = "",
        identifier: str = "sks",
        class_prompt: str | None = None,
        class_prompts: list[str] | None = None,
        allow_vocabulary_identifier: bool = False,
        background: tuple[float, float, float] = (1.0, 1.0, 1.0),
        rank: int = 4,
        lora_alpha: float | None = None,
        train_text_encoder: bool = False,
        lr: float = 1e-4,
        text_encoder_lr: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        n_class_images: int = 8,
        prior_loss_weight: float = 1.0,
        class_sample_steps: int = 25,
        class_guidance_scale: float = 5.0,
        preview_every: int = 100,
        n_preview: int = 4,
        preview_steps: int = 25,
        preview_guidance_scale: float = 5.0,
    ) -> None:
        super().__init__()
        if n_class_images < 0 or prior_loss_weight < 0:
            raise ConfigError(f"n_class_images={n_class_images} and prior_loss_weight={prior_loss_weight} must be >= 0 "
                             "(0 turns prior preservation off).")
        if not all(0.0 <= c <= 1.0 for c in background) or len(background) != 3:
            raise ConfigError(f"background={tuple(background)} must be three numbers in [0, 1] (RGB).")
        # Fail before the prior loads: these cost nothing to check.
        self.instance = parse_instance_prompt(prompt, identifier, class_prompt, class_prompts)
        self.subject = str(Path(subject).expanduser()) if subject else ""
        self.subject_files = find_subject_images(subject)
        self.prior = prior
        self.allow_vocabulary_identifier = allow_vocabulary_identifier
        self.background = tuple(float(c) for c in background)
        self.lora = LoraSettings(rank=rank, alpha=lora_alpha, targets=prior.unet_targets)
        self.text_encoder_lora = (LoraSettings(rank=rank, alpha=lora_alpha, targets=prior.text_encoder_targets)
                                  if train_text_encoder else None)
        self.lr = lr
        self.text_encoder_lr = text_encoder_lr if text_encoder_lr is not None else lr
        self.betas = tuple(betas)
        self.weight_decay = weight_decay
        self.eps = eps
        self.n_class_images = n_class_images if prior_loss_weight > 0 else 0
        n_prompts = len(self.instance.preserved_prompts)
        if 0 < self.n_class_images < n_prompts:
            rank_zero_warn(f"n_class_images={self.n_class_images} is fewer than the {n_prompts} class_prompts: the "
                           f"last {n_prompts - self.n_class_images} get no class images (raise n_class_images).")
        self.prior_loss_weight = prior_loss_weight
        self.class_sample_steps = class_sample_steps
        self.class_guidance_scale = class_guidance_scale
        self.preview_every = preview_every
        self.n_preview = n_preview
        self.preview_steps = preview_steps
        self.preview_guidance_scale = preview_guidance_scale
        # Set by the stage runner (magic3d.stage.StageModule).
        self.stage_config: dict | None = None
        self.output_dir: Path | None = None
        # The adapters: the same Parameter objects peft put into the UNet / text encoder, so the
        # state_dict (and every checkpoint) holds them and nothing of the frozen prior.
        self.adapters = nn.ParameterDict()
        self.adapter_names: dict[str, str] = {}  # ParameterDict key -> "<part>.<peft name>"
        # Buffers, so a resumed stage's card still knows the first step's losses (instance, prior).
        self.register_buffer("loss_first", torch.zeros(2))
        self.register_buffer("loss_ema", torch.zeros(2))
        self.register_buffer("loss_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("train_seconds", torch.zeros((), dtype=torch.float64))
        self._seed = 0
        self._last_time: float | None = None
        self.subject_x0: Tensor | None = None  # plain attributes: data, not state
        self.class_x0: Tensor | None = None
        self.class_prompt_index: Tensor | None = None  # each class image's row of the class embeddings
        self._embeddings: dict[str, Tensor] = {}

    # ----------------------------------------------------------------------------- lifecycle
    def setup(self, stage: str) -> None:
        device = self.trainer.strategy.root_device if self._trainer is not None else self.device
        self._seed = torch.initial_seed() % (2**63)
        if self.prior.loaded:
            self.prior.place(device)
            return
        self.prior.load(device)
        if not self.allow_vocabulary_identifier:
            check_identifier_is_rare(self.prior.tokenizer, self.instance.identifier, self.prior.pretrained)
        size = self.prior.image_size
        subject = load_subject_images(self.subject, size, self.background).images.to(device)
        self.subject_x0 = self.prior.encode_images(subject).detach()
        with torch.no_grad():
            texts = [self.instance.prompt, *self.instance.preserved_prompts, ""]
            embeddings = self.prior.encode_text(texts)
        # "class" holds one row per class prompt (a single row for today's class_prompt).
        self._embeddings = {"instance": embeddings[0], "class": embeddings[1:-1], "uncond": embeddings[-1]}
        if self.n_class_images > 0:
            folder = self.output_dir / CLASS_IMAGES_FOLDER if self.output_dir is not None else None
            # A single class_prompt keeps the manifest's "prompt" key, so earlier stage folders still match.
            prompts = ({"prompts": list(self.instance.class_prompts)} if self.instance.class_prompts is not None
                       else {"prompt": self.instance.class_prompt})
            settings = {**prompts, "base_model": base_model_name(self.prior.pretrained),
                        "base_fingerprint": prior_fingerprint(self.prior.pretrained), "size": size}
            made = make_class_images(self.prior, self._embeddings["class"], self._embeddings["uncond"],
                                     self.n_class_images, self.class_sample_steps, self.class_guidance_scale,
                                     seed=int(self._seed), settings=settings, folder=folder)
            self.class_x0 = self.prior.encode_images(made.images.to(device)).detach()
            self.class_prompt_index = made.prompt_index
        # Adapters after the class images: those are the frozen prior's own samples.
        self._add_adapter("unet", self.prior.unet, self.lora)
        if self.text_encoder_lora is not None:
            self._add_adapter("text_encoder", self.prior.text_encoder, self.text_encoder_lora)
        else:
            self.prior.release_text_encoder()

    def _add_adapter(self, part: str, module: nn.Module, settings: LoraSettings) -> None:
        for param in add_lora(module, settings, part):
            param.data = param.data.float()  # float32 adapters on a bfloat16 prior
        for name, param in module.named_parameters():
            if param.requires_grad:
                key = f"{part}:{name}".replace(".", ":")  # a ParameterDict key may not hold "."
                self.adapters[key] = param
                self.adapter_names[key] = f"{part}.{name}"

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = []
        for part, lr in (("unet", self.lr), ("text_encoder", self.text_encoder_lr)):
            params = [p for k, p in self.adapters.items() if k.startswith(part + ":")]
            if params:
                groups.append({"params": params, "lr": lr, "name": part})
        if not groups:
            raise RuntimeError("DreamBooth.setup() must run before configure_optimizers(): it adds the adapters.")
        return torch.optim.AdamW(groups, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["magic3d"] = {"stage_config": self.stage_config, "prompt": self.instance.prompt,
                                 "personalisation": self._identity()}

    def _identity(self) -> dict[str, Any]:
        """What a checkpoint of this stage must match to be resumed by it."""
        return {"prior": base_model_name(self.prior.pretrained), "layout": self.prior.LAYOUT.name,
                "rank": self.lora.rank, "alpha": self.lora.alpha, "unet_targets": list(self.lora.targets),
                "text_encoder": self.text_encoder_lora is not None, "prompt": self.instance.prompt}

    # ------------------------------------------------------------------------- stage hooks
    def check_resumable(self, found: FoundCheckpoint) -> None:
        """Before the prior loads (its adapters do not exist yet), compare what the checkpoint was
        trained with; Lightning checks the tensors themselves when it restores them."""
        saved = (found.checkpoint.get("magic3d") or {}).get("personalisation")
        if saved is None:
            raise ConfigError(f"Checkpoint {found.path} is not a personalisation stage's: start a new run folder.")
        mine = self._identity()
        changed = [f"{k}: {saved.get(k)!r} -> {mine[k]!r}" for k in mine if saved.get(k) != mine[k]]
        if changed:
            raise ConfigError(f"Checkpoint {found.path} was trained with other settings ({'; '.join(changed[:3])}): "
                              "continue with the settings it was started with, or start a new run folder.")

    def start_from(self, checkpoint: dict, start: StageStart) -> None:
        raise ConfigError("A personalisation stage starts from its prior, not from another stage's checkpoint: "
                          "drop start: from the recipe stage (resume works as for every stage).")

    def finish_stage(self, datamodule: Any, video_fps: int, video_views: int) -> dict[str, Any]:
        """After the last step (rank 0): the adapters + card in ``lora/``, a last sample sheet."""
        folder = self.output_dir / LORA_FOLDER
        losses = {"instance_first": float(self.loss_first[0]), "instance_final": float(self.loss_ema[0])}
        if self.n_class_images > 0:
            losses.update(prior_first=float(self.loss_first[1]), prior_final=float(self.loss_ema[1]))
        card = LoraCard(
            base_model=base_model_name(self.prior.pretrained),
            base_fingerprint=prior_fingerprint(self.prior.pretrained),
            layout=self.prior.LAYOUT.name,
            identifier=self.instance.identifier,
            class_noun=self.instance.class_noun,
            instance_prompt=self.instance.prompt,
            class_prompt=self.instance.class_prompt if self.instance.class_prompts is None else "",
            class_prompts=list(self.instance.preserved_prompts),
            subject=self.subject,
            n_subject_images=len(self.subject_files),
            n_class_images=self.n_class_images,
            prior_loss_weight=self.prior_loss_weight,
            rank=self.lora.rank,
            alpha=float(self.lora.alpha if self.lora.alpha is not None else self.lora.rank),
            text_encoder=self.text_encoder_lora is not None,
            steps=int(self.global_step),
            seconds=round(float(self.train_seconds), 1),
            losses={k: round(v, 6) for k, v in losses.items()},
        )
        save_lora(folder, card, self.prior.unet,
                  self.prior.text_encoder if self.text_encoder_lora is not None else None)
        samples = self.output_dir / "samples.png"
        self._write_samples(samples, key="samples")
        write_card_readme(folder, card, samples)
        return {"lora": str(folder), "prompt": self.instance.prompt, "class_prompt": card.class_prompt,
                "class_prompts": card.class_prompts, "lora_mb": card.size_mb, "losses": card.losses,
                "samples": str(samples)}

    # ------------------------------------------------------------------------------ training
    def _embedding(self, name: str) -> Tensor:
        if self.text_encoder_lora is None:
            return self._embeddings[name]
        text = {"instance": self.instance.prompt, "uncond": ""}[name]
        return self.prior.encode_text([text])[0]

    def _class_context(self, prompt_index: Int[Tensor, "K"]) -> Float[Tensor, "K L D"]:
        """Each class image's own prompt's embedding; through the text encoder (with its adapters)
        when it trains, encoding only the prompts this step uses."""
        if self.text_encoder_lora is None:
            return self._embeddings["class"][prompt_index.to(self._embeddings["class"].device)]
        used, inverse = torch.unique(prompt_index, return_inverse=True)
        prompts = self.instance.preserved_prompts
        return self.prior.encode_text([prompts[int(i)] for i in used])[inverse.to(self.subject_x0.device)]

    def step_loss(self, batch_size: int, step: int) -> DreamBoothLoss:
        """The loss of one step of ``batch_size`` subject images (and as many class images)."""
        generator = step_generator(int(self._seed), self.global_rank, 0, step)
        device = self.subject_x0.device
        subject = torch.randint(len(self.subject_x0), (batch_size,), generator=generator)
        x0 = [self.subject_x0[subject.to(device)]]
        context = [self._embedding("instance").expand(batch_size, -1, -1)]
        if self.class_x0 is not None:
            chosen = torch.randint(len(self.class_x0), (batch_size,), generator=generator)
            x0.append(self.class_x0[chosen.to(device)])
            context.append(self._class_context(self.class_prompt_index[chosen]))
        x0 = torch.cat(x0)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        t = torch.randint(0, self.prior.num_train_timesteps, (x0.shape[0],), generator=generator).to(device)
        x_t = add_noise(x0, noise, self.prior.alphas_cumprod[t])
        prediction = self.prior.unet_output(x_t, t, torch.cat(context))
        target = self.prior.training_target(x0, noise, t)
        if self.class_x0 is None:
            return dreambooth_loss(prediction, target)
        return dreambooth_loss(prediction[:batch_size], target[:batch_size], prediction[batch_size:],
                               target[batch_size:], self.prior_loss_weight)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        batch_size = int(batch)
        loss = self.step_loss(batch_size, self.global_step)
        if not bool(torch.isfinite(loss.total)):
            from magic3d.system import NonFiniteLossError

            raise NonFiniteLossError(f"Step {self.global_step} of the personalisation had a non-finite loss; stopping. "
                                     "The last good checkpoint is kept: lower the learning rate, then resume.")
        values = torch.stack([loss.instance.detach(),
                              loss.prior.detach() if loss.prior is not None else torch.zeros_like(loss.instance)])
        with torch.no_grad():
            if int(self.loss_steps) == 0:
                self.loss_first.copy_(values)
                self.loss_ema.copy_(values)
            else:
                self.loss_ema.mul_(_LOSS_EMA).add_((1 - _LOSS_EMA) * values)
            self.loss_steps += 1
        log = {"train/loss": loss.total, "train/loss_instance": loss.instance}
        if loss.prior is not None:
            log["train/loss_prior"] = loss.prior
        self.log_dict(log, on_step=True, batch_size=batch_size)
        self.log("loss", loss.total, prog_bar=True, logger=False, batch_size=batch_size)
        if self.preview_every > 0 and self.global_step % self.preview_every == 0:
            self._write_samples(self.output_dir / "train" / f"step_{self.global_step:06d}.png"
                                if self.output_dir is not None else None, key="train/preview")
        return loss.total

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._last_time is None:
            self._last_time = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        self.train_seconds += now - self._last_time
        self._last_time = now

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad.detach().norm() for p in self.adapters.values() if p.grad is not None]
        if grads:
            self.log("train/param_grad_norm", torch.linalg.vector_norm(torch.stack(grads)), on_step=True, batch_size=1)

    # ------------------------------------------------------------------------------ samples
    def sample(self, n: int, seed: int = 0) -> Tensor:
        """``n`` samples of the instance prompt by the prior as tuned so far, channel-last in [0, 1]."""
        with torch.no_grad():
            cond = self._embedding("instance").expand(n, -1, -1)
            return sample_images(self.prior, cond, self._embedding("uncond"), self.preview_steps,
                                 self.preview_guidance_scale, seed=seed)

    @rank_zero_only
    def _write_samples(self, path: Path | None, key: str) -> None:
        if self.n_preview < 1:
            return
        images = self.sample(self.n_preview, seed=0).cpu()  # the same noise every time: progress is visible
        sheet = torch.cat(list(images), dim=1)
        if path is not None:
            save_png(sheet, path)
        wandb_run = self._wandb_logger()
        if wandb_run is not None:
            log_image_file(wandb_run, key, path if path is not None else to_uint8(sheet), self.global_step)

    def _wandb_logger(self) -> WandbLogger | None:
        return wandb_logger_of(self.trainer.loggers) if self._trainer is not None else None
