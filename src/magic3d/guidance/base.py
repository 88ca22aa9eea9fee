"""The ``Guidance`` protocol, and the Score Distillation Sampling shared by every SDS guidance.

The math knows nothing about pixels, VAEs or text: a guidance maps its input to the model's
sample space ``x`` (B, C, H, W) and hands ``ScoreDistillation.distill`` a callable that
predicts the conditional and unconditional noise for ``x_t``. The rest — timestep sampling,
noising, classifier-free guidance, weighting, NaN guard, clipping and the surrogate loss —
is identical for DreamFusion-style pixel SDS and Magic3D's latent SDS, and so is the step
around it (``ScoreDistillation.step``): subclasses differ only where the models differ.

Conventions (DreamFusion / Magic3D, REFERENCE.md):

- ``x_t = sqrt(alpha_bar_t) x + sqrt(1 - alpha_bar_t) eps``, t sampled per batch element.
- Classifier-free guidance ``eps_hat = eps_u + s (eps_c - eps_u)``. Some codebases (e.g.
  threestudio) write ``eps_c + s (eps_c - eps_u)``: their ``s`` equals ``s + 1`` here.
- SDS gradient w.r.t. ``x``: ``w(t) (eps_hat - eps)``, no backward through the UNet.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol, get_args, runtime_checkable

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from magic3d.data.cameras import view_index
from magic3d.guidance.frozen import FrozenPipeline, InMemoryParts, PipelineLayout
from magic3d.guidance.loading import cfg_unet_outputs
from magic3d.guidance.perp_neg import PerpNegPrompts, perp_neg_noise, perp_neg_prompts
from magic3d.guidance.prediction import PREDICTION_TYPES, eps_from_prediction
from magic3d.guidance.prompts import PromptEmbeddings
from magic3d.types import CameraBatch, GuidanceOutput

Weighting = Literal["sds", "uniform", "sqrt_alpha_one_minus"]
WEIGHTINGS: tuple[str, ...] = get_args(Weighting)

# (x_t, t) -> (eps_cond, eps_uncond), each shaped like x_t; called under torch.no_grad().
NoisePredictor = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class TimestepSchedule:
    """Range of diffusion timesteps to sample, as fractions of ``num_train_timesteps``.

    With ``anneal_to = (min_end, max_end)`` the range moves linearly from
    ``(min_step_percent, max_step_percent)`` at progress 0 to ``anneal_to`` at progress 1
    (progress is the fraction of training done, supplied by the caller).
    """

    min_step_percent: float = 0.02
    max_step_percent: float = 0.98
    anneal_to: tuple[float, float] | None = None
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        _check_range("(min_step_percent, max_step_percent)", self.min_step_percent, self.max_step_percent)
        if self.anneal_to is not None:
            _check_range("anneal_to", *self.anneal_to)

    def bounds(self, progress: float) -> tuple[int, int]:
        """Inclusive integer timestep range ``[t_min, t_max]`` at this training progress."""
        lo, hi = self.min_step_percent, self.max_step_percent
        if self.anneal_to is not None:
            p = min(max(float(progress), 0.0), 1.0)
            lo = lo + p * (self.anneal_to[0] - lo)
            hi = hi + p * (self.anneal_to[1] - hi)
        last = self.num_train_timesteps - 1
        # int() truncation matches the common implementations (threestudio, stable-dreamfusion).
        t_min = min(max(int(lo * self.num_train_timesteps), 0), last)
        t_max = min(max(int(hi * self.num_train_timesteps), t_min), last)
        return t_min, t_max

    def sample(
        self,
        batch_size: int,
        progress: float,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> Int[Tensor, "B"]:
        """One timestep per batch element, uniform over the inclusive range."""
        t_min, t_max = self.bounds(progress)
        return torch.randint(
            t_min, t_max + 1, (batch_size,), device=device, dtype=torch.long, generator=generator
        )


def _check_range(name: str, lo: float, hi: float) -> None:
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"{name}=({lo}, {hi}) is invalid: need 0 <= min <= max <= 1 (fractions of T).")


def sds_weight(alpha_bar_t: Float[Tensor, "B"], weighting: str) -> Float[Tensor, "B"]:
    """``w(t)`` from ``alpha_bar_t``: "sds" 1-ab, "uniform" 1, "sqrt_alpha_one_minus" sqrt(ab)(1-ab)."""
    if weighting == "sds":
        return 1.0 - alpha_bar_t
    if weighting == "uniform":
        return torch.ones_like(alpha_bar_t)
    if weighting == "sqrt_alpha_one_minus":
        return alpha_bar_t.sqrt() * (1.0 - alpha_bar_t)
    raise ValueError(f"weighting={weighting!r} is unknown: use one of {WEIGHTINGS}.")


def add_noise(
    x: Float[Tensor, "B ..."], noise: Float[Tensor, "B ..."], alpha_bar_t: Float[Tensor, "B"]
) -> Float[Tensor, "B ..."]:
    """Forward diffusion ``x_t = sqrt(ab) x + sqrt(1 - ab) eps`` with per-sample ``ab``."""
    ab = _per_sample(alpha_bar_t, x)
    return ab.sqrt() * x + (1.0 - ab).sqrt() * noise


def classifier_free_guidance(
    eps_cond: Float[Tensor, "B ..."], eps_uncond: Float[Tensor, "B ..."], guidance_scale: float
) -> Float[Tensor, "B ..."]:
    """``eps_u + s (eps_c - eps_u)`` (DreamFusion convention; threestudio's s is s + 1 here)."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def sds_gradient(
    eps_hat: Float[Tensor, "B ..."], noise: Float[Tensor, "B ..."], w: Float[Tensor, "B"]
) -> Float[Tensor, "B ..."]:
    """Per-sample SDS gradient w.r.t. the model-space sample: ``w(t) (eps_hat - eps)``."""
    return _per_sample(w, eps_hat) * (eps_hat - noise)


def zero_non_finite(grad: Float[Tensor, "B ..."]) -> tuple[Float[Tensor, "B ..."], bool]:
    """Replace every sample whose gradient holds a NaN/Inf by zeros.

    Per sample rather than per batch, so one diverged view does not waste the others.
    Returns the cleaned gradient and whether anything was replaced (one host sync).
    """
    finite = torch.isfinite(grad).flatten(1).all(dim=1)
    cleaned = torch.where(_per_sample(finite, grad), grad, torch.zeros_like(grad))
    return cleaned, not bool(finite.all())


def clip_gradient_norm(grad: Float[Tensor, "B ..."], max_norm: float) -> Float[Tensor, "B ..."]:
    """Rescale each sample's gradient so its L2 norm is at most ``max_norm``.

    Norm clipping (not value clamping) keeps the gradient's direction. The norm grows as
    sqrt(C*H*W): a 64x64 RGB sample with unit entries has norm ~111, so pick ``max_norm``
    for the resolution at hand.
    """
    norms = grad.flatten(1).norm(dim=1)
    scale = (max_norm / norms.clamp_min(1e-12)).clamp(max=1.0)
    return grad * _per_sample(scale, grad)


def sds_surrogate_loss(
    x: Float[Tensor, "B ..."], grad: Float[Tensor, "B ..."]
) -> Float[Tensor, ""]:
    """``0.5 * sum((x - target)^2) / B`` with ``target = (x - grad).detach()``.

    Its gradient w.r.t. ``x`` is ``grad / B``: the batch mean of the per-sample SDS
    gradients, so the learning rate does not need to change with the batch size.
    """
    target = (x - grad).detach()
    return 0.5 * (x - target).pow(2).sum() / x.shape[0]


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """Reshape a (B,) tensor to broadcast against ``like`` (B, ...)."""
    return values.reshape(values.shape[0], *([1] * (like.ndim - 1)))


@runtime_checkable
class Guidance(Protocol):
    """What ``TextTo3D`` needs from a guidance; stage configs are checked against it.

    ``setup`` loads whatever is heavy (frozen models, prompt embeddings) on the training
    device; ``step`` turns channel-last renders into a loss whose gradient is the guidance's
    signal; ``param_groups`` names the guidance's own trainable parameters (e.g. LoRA
    adapters), which reach the optimiser with their own learning rate (empty for frozen SDS).
    Members are unannotated on purpose (see ``magic3d.scenes.base.Scene``); the types are in
    the docstrings.
    """

    def setup(self, prompt, device):
        """(str, torch.device | str) -> None: load the frozen model and the prompt embeddings."""

    def step(self, rgb, cameras, progress):
        """(Float[Tensor, "B H W 3"], CameraBatch, float) -> GuidanceOutput: one step on
        channel-last renders in [0, 1]; ``progress`` is the fraction of training done."""

    def param_groups(self):
        """() -> dict[str, list[nn.Parameter]]: trainable parameters by named part; {} when frozen."""


class ScoreDistillation(nn.Module):
    """Base of the SDS guidances: shared hyper-parameters, frozen-pipeline lifecycle and step.

    A subclass names its pipeline family (``LAYOUT``) and says how renders become the model's
    sample space (``to_model_space``); a UNet that predicts v or x0 has its output converted
    to epsilon (``noise_from_output``, :mod:`magic3d.guidance.prediction`). The frozen models live in a :class:`FrozenPipeline`
    (composition): loaded in ``setup`` (never in ``__init__``), never in the state_dict.

    Args:
        pretrained: local diffusers pipeline folder or Hugging Face Hub id.
        guidance_scale: classifier-free guidance scale ``s`` in ``eps_u + s (eps_c - eps_u)``.
        min_step_percent, max_step_percent: timestep range as fractions of T.
        anneal_to: optional (min, max) range reached linearly at the end of training.
        weighting: ``w(t)``: "sds" (1 - alpha_bar), "uniform", "sqrt_alpha_one_minus".
        grad_clip: optional per-sample L2-norm bound on the SDS gradient (see
            ``clip_gradient_norm``); None disables clipping.
        view_dependent_prompting: append ", front view" etc. to the prompt per camera.
        half_precision: bfloat16 frozen models and embeddings on CUDA; CPU always runs float32.
        negative_prompt: text for the unconditional branch.
        cache_dir: text-embedding cache folder (default: ``$MAGIC3D_CACHE/text_embeddings``
            or ``~/.cache/magic3d/text_embeddings``).
        variant: weight-file variant to load, e.g. "fp16".
        max_batch_per_unet_call: split the 2B-sample CFG forward into chunks of at most this
            many samples to bound activation memory; None runs it in one call.
        enable_channels_last: channels-last frozen models on CUDA (faster convolutions).
        perp_neg: Perp-Neg (:mod:`magic3d.guidance.perp_neg`): the positive prompt interpolated
            by azimuth between the view prompts, the neighbouring views as negative prompts
            (their guidance perpendicular to the positive's, weighted by azimuth). Twice the
            UNet samples per step; needs ``view_dependent_prompting``.
        lora: a DreamBooth adapter folder (``<personalisation stage>/lora``, see
            :mod:`magic3d.guidance.lora`) loaded onto the frozen prior in ``setup``; one trained
            on another prior is refused. None: the prior as it is.
        lora_scale: strength of the adapter (0: the untuned prior, 1: as trained).
        prediction_type: what the UNet predicts: "auto" reads the scheduler config (absent:
            epsilon); or force "epsilon", "v_prediction" (SD 2.1 at 768 px, the embedded
            pixel prior when trained with v) or "sample".
    """

    LAYOUT: ClassVar[PipelineLayout]

    def __init__(
        self,
        pretrained: str,
        guidance_scale: float = 20.0,
        min_step_percent: float = 0.02,
        max_step_percent: float = 0.98,
        anneal_to: tuple[float, float] | None = None,
        weighting: Weighting = "sds",
        grad_clip: float | None = None,
        view_dependent_prompting: bool = True,
        half_precision: bool = True,
        negative_prompt: str = "",
        cache_dir: str | None = None,
        variant: str | None = None,
        max_batch_per_unet_call: int | None = None,
        enable_channels_last: bool = False,
        perp_neg: bool = False,
        lora: str | None = None,
        lora_scale: float = 1.0,
        prediction_type: str = "auto",
    ) -> None:
        super().__init__()
        if prediction_type != "auto" and prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type={prediction_type!r} is unknown: use 'auto' or one of {PREDICTION_TYPES}."
            )
        if perp_neg and not view_dependent_prompting:
            raise ValueError("perp_neg=True needs view_dependent_prompting=True: its prompts are the view prompts "
                             "(set model.guidance.view_dependent_prompting=true, or drop perp_neg).")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting={weighting!r} is unknown: use one of {WEIGHTINGS}.")
        if grad_clip is not None and grad_clip <= 0:
            raise ValueError(f"grad_clip={grad_clip} must be positive, or None to disable.")
        if max_batch_per_unet_call is not None and max_batch_per_unet_call < 1:
            raise ValueError(
                f"max_batch_per_unet_call={max_batch_per_unet_call} must be >= 1, or None for one call.")
        self.guidance_scale = float(guidance_scale)
        self.weighting = weighting
        self.grad_clip = grad_clip
        self.view_dependent_prompting = view_dependent_prompting
        self.max_batch_per_unet_call = max_batch_per_unet_call
        self.enable_channels_last = enable_channels_last
        self.perp_neg = perp_neg
        self.schedule = TimestepSchedule(
            min_step_percent, max_step_percent, tuple(anneal_to) if anneal_to else None
        )
        if not math.isfinite(lora_scale):
            raise ValueError(f"lora_scale={lora_scale} must be a finite number (1.0: the adapter as trained).")
        self.frozen = FrozenPipeline(self.LAYOUT, pretrained, half_precision, negative_prompt, cache_dir, variant,
                                     lora=lora, lora_scale=lora_scale)
        self.prediction_type = prediction_type
        self._resolved_prediction_type: str | None = None
        # Set in setup(); a plain tensor attribute, not a buffer, so it never enters the state_dict.
        self.alphas_cumprod: Tensor | None = None

    @classmethod
    def _from_parts(cls, models: dict[str, nn.Module], scheduler: Any, text_embeddings: PromptEmbeddings | None,
                    tokenizer: Any, text_encoder: nn.Module | None, kwargs: dict[str, Any]):
        guidance = cls(pretrained=kwargs.pop("pretrained", "<in-memory>"), **kwargs)
        guidance.frozen.use_in_memory(InMemoryParts(models, scheduler, text_embeddings, tokenizer, text_encoder))
        return guidance

    # ------------------------------------------------------------------ frozen parts

    @property
    def pretrained(self) -> str:
        return self.frozen.pretrained

    @property
    def negative_prompt(self) -> str:
        return self.frozen.negative_prompt

    @property
    def unet(self) -> nn.Module:
        return self.frozen.part("unet", type(self).__name__)

    @property
    def embeddings(self) -> PromptEmbeddings:
        return self.frozen.embeddings(type(self).__name__)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {}

    def setup(self, prompt: str, device: torch.device | str) -> None:
        """Load the frozen models and noise schedule, get the prompt embeddings, free the text
        encoder; again (Lightning runs setup per stage): re-place, new prompt's embeddings."""
        first = not self.frozen.loaded
        self.frozen.setup(prompt, device, self._prepare)
        if first:
            self.on_loaded(self.frozen.scheduler)
            self.set_alphas_cumprod(torch.as_tensor(self.frozen.scheduler.alphas_cumprod))
        self.alphas_cumprod = self.alphas_cumprod.to(device)

    def on_loaded(self, scheduler: Any) -> None:
        """Read what the UNet predicts from the scheduler (once, when the models load)."""
        self._resolved_prediction_type = self._resolve_prediction_type(scheduler)

    def _resolve_prediction_type(self, scheduler: Any) -> str:
        if self.prediction_type != "auto":
            return self.prediction_type
        config = getattr(scheduler, "config", None)
        found = getattr(config, "prediction_type", None) or "epsilon"
        if found not in PREDICTION_TYPES:
            raise ValueError(
                f"the scheduler's prediction_type={found!r} is not supported: "
                f"set {type(self).__name__}(prediction_type=...) to one of {PREDICTION_TYPES}."
            )
        return found

    @property
    def resolved_prediction_type(self) -> str:
        """What the UNet predicts, as used in ``noise_from_output`` (known after ``setup``)."""
        if self._resolved_prediction_type is None:
            raise RuntimeError(f"{type(self).__name__}.setup(prompt, device) must run before the prediction type is used.")
        return self._resolved_prediction_type

    def _prepare(self, name: str, module: nn.Module, device: torch.device) -> nn.Module:
        if self.enable_channels_last and device.type == "cuda":
            return module.to(memory_format=torch.channels_last)
        return module

    def _place(self, device: torch.device) -> None:
        self.frozen.place(device, self._prepare)
        self.alphas_cumprod = self.alphas_cumprod.to(device)

    def set_alphas_cumprod(self, alphas_cumprod: Float[Tensor, "T"]) -> None:
        """Install the noise schedule; T comes from its length."""
        self.alphas_cumprod = alphas_cumprod.detach().float()
        s = self.schedule
        self.schedule = TimestepSchedule(
            s.min_step_percent, s.max_step_percent, s.anneal_to, int(alphas_cumprod.shape[0])
        )

    # ------------------------------------------------------------------ the step

    def to_model_space(self, rgb: Float[Tensor, "B H W 3"]) -> Float[Tensor, "B C h w"]:
        """Channel-last [0, 1] renders -> the diffusion model's sample space, differentiably."""
        raise NotImplementedError(f"{type(self).__name__} must implement to_model_space()")

    def noise_from_output(self, output: Float[Tensor, "B C h w"], x_t: Float[Tensor, "B C h w"],
                          t: Int[Tensor, "B"]) -> Float[Tensor, "B C h w"]:
        """The UNet's raw output as an epsilon estimate (identity for epsilon models)."""
        if self.resolved_prediction_type == "epsilon":  # IF, SD 2.1-base: nothing to convert
            return output
        alpha_bar = self.alphas_cumprod.to(x_t.device)[t]
        return eps_from_prediction(output, x_t, alpha_bar, self.resolved_prediction_type)

    def step(self, rgb: Float[Tensor, "B H W 3"], cameras: CameraBatch, progress: float) -> GuidanceOutput:
        """SDS loss for a batch of renders; its gradient reaches ``rgb`` only."""
        if rgb.ndim != 4 or rgb.shape[-1] != 3:
            raise ValueError(f"rgb must be (B, H, W, 3) channel-last, got {tuple(rgb.shape)}.")
        if self.frozen.needs_placing(rgb.device):
            self._place(rgb.device)
        x = self.to_model_space(rgb)
        if self.perp_neg:
            prompts = perp_neg_prompts(self.embeddings, cameras.elevation, cameras.azimuth)
            uncond = self.embeddings.uncond.expand(x.shape[0], *self.embeddings.uncond.shape)
            return self.distill(x, lambda x_t, t: self.predict_noise_perp_neg(x_t, t, prompts, uncond), progress)
        views = view_index(cameras.elevation, cameras.azimuth)
        cond, uncond = self.embeddings.embeddings_for(views, self.view_dependent_prompting)
        return self.distill(x, lambda x_t, t: self.predict_noise(x_t, t, cond, uncond), progress)

    def predict_noise(
        self,
        x_t: Float[Tensor, "B C H W"],
        t: Int[Tensor, "B"],
        cond: Float[Tensor, "B L D"],
        uncond: Float[Tensor, "B L D"],
    ) -> tuple[Float[Tensor, "B C H W"], Float[Tensor, "B C H W"]]:
        """(eps_cond, eps_uncond) from one CFG batch of 2B through the frozen UNet.

        Extra output channels (IF's learned variance) are dropped: only epsilon is used.
        """
        output = cfg_unet_outputs(self.unet, x_t, t, cond, uncond, self.max_batch_per_unet_call,
                                  channels_last=self.enable_channels_last)
        with torch.no_grad():  # no gradient through the noise estimate (SDS)
            eps = self.noise_from_output(output, torch.cat([x_t, x_t]).float(), torch.cat([t, t]))
        eps_cond, eps_uncond = eps.chunk(2)
        return eps_cond, eps_uncond

    def predict_noise_perp_neg(
        self,
        x_t: Float[Tensor, "B C H W"],
        t: Int[Tensor, "B"],
        prompts: PerpNegPrompts,
        uncond: Float[Tensor, "B L D"],
    ) -> tuple[Float[Tensor, "B C H W"], Float[Tensor, "B C H W"]]:
        """(Perp-Neg's conditional noise, eps_uncond): classifier-free guidance of the pair is
        Perp-Neg's guidance (:func:`~magic3d.guidance.perp_neg.perp_neg_noise`).

        Two CFG batches of 2B through the UNet: [positive; uncond] and the two negative views.
        """
        eps_positive, eps_uncond = self.predict_noise(x_t, t, prompts.positive, uncond)
        eps_first, eps_second = self.predict_noise(x_t, t, prompts.negatives[:, 0], prompts.negatives[:, 1])
        eps_negatives = torch.stack([eps_first, eps_second], dim=1)
        return perp_neg_noise(eps_positive, eps_uncond, eps_negatives, prompts.weights.to(x_t.device)), eps_uncond

    def distill(
        self,
        x: Float[Tensor, "B C H W"],
        predict_noise: NoisePredictor,
        progress: float,
        timesteps: Int[Tensor, "B"] | None = None,
        noise: Float[Tensor, "B C H W"] | None = None,
    ) -> GuidanceOutput:
        """SDS on a model-space sample ``x`` (differentiable; the UNet is not).

        ``timesteps`` and ``noise`` default to fresh samples; tests pass them explicitly.
        ``grad_norm`` in the result is the batch mean of per-sample L2 norms after clipping.
        """
        if self.alphas_cumprod is None:
            raise RuntimeError(f"{type(self).__name__}.setup(prompt, device) was not called.")
        batch = x.shape[0]
        if timesteps is None:
            timesteps = self.schedule.sample(batch, progress, x.device)
        if noise is None:
            noise = torch.randn_like(x, dtype=torch.float32)
        alphas_cumprod = self.alphas_cumprod.to(x.device)
        alpha_bar = alphas_cumprod[timesteps]
        with torch.no_grad():
            x_t = add_noise(x.detach().float(), noise, alpha_bar)
            eps_cond, eps_uncond = predict_noise(x_t, timesteps)
            eps_hat = classifier_free_guidance(eps_cond.float(), eps_uncond.float(), self.guidance_scale)
            grad = sds_gradient(eps_hat, noise, sds_weight(alpha_bar, self.weighting))
            grad, skipped = zero_non_finite(grad)
            if self.grad_clip is not None:
                grad = clip_gradient_norm(grad, self.grad_clip)
            grad_norm = grad.flatten(1).norm(dim=1).mean()
        loss = sds_surrogate_loss(x, grad.to(x.dtype))
        return GuidanceOutput(loss=loss, grad_norm=grad_norm, timesteps=timesteps, skipped=skipped)
