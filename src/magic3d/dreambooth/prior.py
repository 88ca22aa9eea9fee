"""The prior a personalisation stage tunes: its frozen parts, its sample space, its text path.

Two kinds, swapped by ``class_path`` in the stage config, as the SDS guidances are:
:class:`PixelPrior` (DeepFloyd IF stage-I layout: the UNet denoises 64x64 RGB in [-1, 1]) and
:class:`LatentPrior` (Stable Diffusion layout: the UNet denoises scaled VAE latents, so images
are encoded once by the frozen VAE and training runs in latent space). Both load with the
guidance's own loader (:class:`~magic3d.guidance.loading.PipelineSource`) and layouts, so a folder
or Hub id that the guidance reads is one the stage reads.

The frozen models live in a plain dict, not as submodules: they never enter the stage's
``state_dict`` or its checkpoints (only the adapters the stage adds do).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from magic3d.guidance.frozen import TEXT_MAX_LENGTH, PipelineLayout
from magic3d.guidance.latent_sds import LatentSDS, vae_input_size
from magic3d.guidance.prediction import check_prediction_type, eps_from_prediction, prediction_target
from magic3d.guidance.loading import PipelineSource, half_dtype_for, module_dtype
from magic3d.guidance.pixel_sds import PixelSDS
from magic3d.guidance.prompts import release_text_encoder, uses_attention_mask


class PersonalisedPrior(nn.Module):
    """A diffusers prior to personalise (one base class; see the module doc).

    Args:
        pretrained: local pipeline folder or Hugging Face Hub id (the guidance's ``pretrained``).
        half_precision: bfloat16 frozen weights on CUDA (the adapters train in float32);
            CPU always runs float32.
        variant: weight-file variant to load, e.g. "fp16".
        unet_targets: UNet linear layers to adapt (None: the layout's attention projections).
        text_encoder_targets: text-encoder linear layers to adapt when the stage tunes it.
    """

    LAYOUT: ClassVar[PipelineLayout]
    UNET_TARGETS: ClassVar[tuple[str, ...]]
    TEXT_ENCODER_TARGETS: ClassVar[tuple[str, ...]]

    def __init__(
        self,
        pretrained: str,
        half_precision: bool = True,
        variant: str | None = None,
        unet_targets: tuple[str, ...] | None = None,
        text_encoder_targets: tuple[str, ...] | None = None,
    ) -> None:
        super().__init__()
        self.pretrained = pretrained
        self.half_precision = half_precision
        self.variant = variant
        self.unet_targets = tuple(unet_targets) if unet_targets else self.UNET_TARGETS
        self.text_encoder_targets = tuple(text_encoder_targets) if text_encoder_targets else self.TEXT_ENCODER_TARGETS
        self.models: dict[str, nn.Module] = {}  # a plain dict: never in state_dict()
        self.tokenizer: Any = None
        self.scheduler_config: dict[str, Any] = {}
        self.alphas_cumprod: Tensor | None = None
        self.prediction_type = "epsilon"

    # ------------------------------------------------------------------ loading

    def source(self) -> PipelineSource:
        layout = self.LAYOUT
        return PipelineSource(self.pretrained, layout.name, layout.folders, (*layout.parts, "scheduler"))

    @property
    def loaded(self) -> bool:
        return bool(self.models)

    def load(self, device: torch.device | str) -> None:
        """Load the frozen UNet (and VAE), text encoder, tokenizer and noise schedule on ``device``."""
        import diffusers
        import transformers

        device = torch.device(device)
        if self.loaded:
            self.place(device)
            return
        dtype = half_dtype_for(device, self.half_precision)
        source = self.source()
        classes = {"unet": diffusers.UNet2DConditionModel, "vae": diffusers.AutoencoderKL}
        labels = {"unet": "UNet (unet/)", "vae": "VAE (vae/)"}
        for part in self.LAYOUT.parts:
            module = source.load_model(classes[part], part, labels[part], torch_dtype=dtype, variant=self.variant)
            self.models[part] = module.requires_grad_(False).eval().to(device)
        encoder_class = getattr(transformers, self.LAYOUT.text_encoder_class)
        self.tokenizer, encoder = source.load_text_encoder(encoder_class, device, dtype, self.variant)
        self.models["text_encoder"] = encoder
        scheduler = source.load_scheduler()
        self.scheduler_config = dict(scheduler.config)
        self.alphas_cumprod = torch.as_tensor(scheduler.alphas_cumprod).float().to(device)
        self.prediction_type = getattr(scheduler.config, "prediction_type", None) or "epsilon"

    def place(self, device: torch.device) -> None:
        for name, module in self.models.items():
            self.models[name] = module.to(device)
        if self.alphas_cumprod is not None:
            self.alphas_cumprod = self.alphas_cumprod.to(device)

    def release_text_encoder(self) -> None:
        """Free the text encoder once its embeddings are computed (IF's T5-XXL is 4.8 B parameters)."""
        encoder = self.models.pop("text_encoder", None)
        if encoder is not None:
            device = next(encoder.parameters()).device
            del encoder
            release_text_encoder(device)

    def part(self, name: str) -> nn.Module:
        if name not in self.models:
            raise RuntimeError(f"{type(self).__name__}.load(device) must run before its {name} is used.")
        return self.models[name]

    @property
    def unet(self) -> nn.Module:
        return self.part("unet")

    @property
    def text_encoder(self) -> nn.Module:
        return self.part("text_encoder")

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def image_size(self) -> int:
        """Side of the square images the prior works on (what subject photos are resized to)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ text

    def encode_text(self, texts: list[str]) -> Float[Tensor, "N L D"]:
        """Token embeddings padded to 77 tokens, masked as the guidance's text path masks them
        (:func:`magic3d.guidance.prompts.encode_texts`), with gradients when the encoder has
        trainable adapters."""
        encoder = self.text_encoder
        tokens = self.tokenizer(texts, padding="max_length", max_length=TEXT_MAX_LENGTH, truncation=True,
                                add_special_tokens=True, return_tensors="pt")
        device = next(encoder.parameters()).device
        mask = tokens.attention_mask.to(device) if uses_attention_mask(encoder) else None
        return encoder(tokens.input_ids.to(device), attention_mask=mask)[0].float()

    # ------------------------------------------------------------------ sample space

    def encode_images(self, images: Float[Tensor, "B S S 3"]) -> Float[Tensor, "B C h w"]:
        """Channel-last [0, 1] images at ``image_size`` -> the UNet's sample space (no gradient)."""
        raise NotImplementedError

    def decode(self, x: Float[Tensor, "B C h w"]) -> Float[Tensor, "B S S 3"]:
        """The UNet's sample space -> channel-last images in [0, 1]."""
        raise NotImplementedError

    def unet_output(self, x_t: Float[Tensor, "B C h w"], t: Int[Tensor, "B"],
                    context: Float[Tensor, "B L D"]) -> Float[Tensor, "B C h w"]:
        """The UNet's prediction in float32, its first C channels only (IF's variance dropped)."""
        unet = self.unet
        dtype = module_dtype(unet)
        out = unet(x_t.to(dtype), t, encoder_hidden_states=context.to(dtype), return_dict=False)[0]
        return out[:, : x_t.shape[1]].float()

    def training_target(self, x0: Float[Tensor, "B C h w"], noise: Float[Tensor, "B C h w"],
                        t: Int[Tensor, "B"]) -> Float[Tensor, "B C h w"]:
        """What the UNet was trained to predict: epsilon, v = sqrt(ab) eps - sqrt(1-ab) x0, or x0."""
        check_prediction_type(self.prediction_type, "the scheduler")
        return prediction_target(x0, noise, self.alphas_cumprod[t], self.prediction_type)

    def noise_estimate(self, output: Float[Tensor, "B C h w"], x_t: Float[Tensor, "B C h w"],
                       t: Int[Tensor, "B"]) -> Float[Tensor, "B C h w"]:
        """Epsilon from the UNet's output, for sampling."""
        return eps_from_prediction(output, x_t, self.alphas_cumprod[t], self.prediction_type)


class PixelPrior(PersonalisedPrior):
    """A pixel-space prior (DeepFloyd IF stage-I layout)."""

    LAYOUT = PixelSDS.LAYOUT
    # IF's SimpleCrossAttn blocks project the text through add_k_proj/add_v_proj (diffusers'
    # DreamBooth LoRA script adapts them for IF too); the toy prior has only to_q..to_out.
    UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj")
    TEXT_ENCODER_TARGETS = ("q", "k", "v", "o")  # T5 attention

    @property
    def image_size(self) -> int:
        size = self.unet.config.sample_size
        return int(size if isinstance(size, int) else size[0])

    def encode_images(self, images: Float[Tensor, "B S S 3"]) -> Float[Tensor, "B 3 S S"]:
        return images.permute(0, 3, 1, 2).float() * 2.0 - 1.0

    def decode(self, x: Float[Tensor, "B 3 S S"]) -> Float[Tensor, "B S S 3"]:
        return ((x.float().clamp(-1.0, 1.0) + 1.0) / 2.0).permute(0, 2, 3, 1)


class LatentPrior(PersonalisedPrior):
    """A latent prior (Stable Diffusion layout): images become scaled VAE latents (the
    posterior mean, as ``LatentSDS`` encodes renders by default)."""

    LAYOUT = LatentSDS.LAYOUT
    UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
    TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIP attention

    @property
    def vae(self) -> nn.Module:
        return self.part("vae")

    @property
    def image_size(self) -> int:
        return int(vae_input_size(self.unet, self.vae)[0])

    def _shift_and_scale(self) -> tuple[float, float]:
        config = self.vae.config
        return float(getattr(config, "shift_factor", None) or 0.0), float(config.scaling_factor)

    @torch.no_grad()
    def encode_images(self, images: Float[Tensor, "B S S 3"]) -> Float[Tensor, "B 4 s s"]:
        vae = self.vae
        x = images.permute(0, 3, 1, 2).float() * 2.0 - 1.0
        shift, scale = self._shift_and_scale()
        mean = vae.encode(x.to(device=next(vae.parameters()).device, dtype=module_dtype(vae))).latent_dist.mean
        return (mean.float() - shift) * scale

    @torch.no_grad()
    def decode(self, x: Float[Tensor, "B 4 s s"]) -> Float[Tensor, "B S S 3"]:
        vae = self.vae
        shift, scale = self._shift_and_scale()
        images = vae.decode((x / scale + shift).to(module_dtype(vae))).sample.float()
        return ((images.clamp(-1.0, 1.0) + 1.0) / 2.0).permute(0, 2, 3, 1)
