"""Score Distillation Sampling math shared by every guidance (pixel or latent space).

Nothing here knows about pixels, VAEs or text: a guidance maps its input to the model's
sample space ``x`` (B, C, H, W) and hands ``ScoreDistillation.distill`` a callable that
predicts the conditional and unconditional noise for ``x_t``. The rest — timestep sampling,
noising, classifier-free guidance, weighting, NaN guard, clipping and the surrogate loss —
is identical for DreamFusion-style pixel SDS and Magic3D's latent SDS.

Conventions (DreamFusion / Magic3D, REFERENCE.md):

- ``x_t = sqrt(alpha_bar_t) x + sqrt(1 - alpha_bar_t) eps``, t sampled per batch element.
- Classifier-free guidance ``eps_hat = eps_u + s (eps_c - eps_u)``. Some codebases (e.g.
  threestudio) write ``eps_c + s (eps_c - eps_u)``: their ``s`` equals ``s + 1`` here.
- SDS gradient w.r.t. ``x``: ``w(t) (eps_hat - eps)``, no backward through the UNet.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

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


class ScoreDistillation(nn.Module):
    """Base of every SDS guidance: shared hyper-parameters and the distillation step.

    Subclasses load their frozen model in ``setup`` (never in ``__init__``, never into the
    state_dict) and implement ``step``, which maps renders to the model's sample space and
    calls ``distill``.

    Args:
        guidance_scale: classifier-free guidance scale ``s`` in ``eps_u + s (eps_c - eps_u)``.
        min_step_percent, max_step_percent: timestep range as fractions of T.
        anneal_to: optional (min, max) range reached linearly at the end of training.
        weighting: ``w(t)``: "sds" (1 - alpha_bar), "uniform", "sqrt_alpha_one_minus".
        grad_clip: optional per-sample L2-norm bound on the SDS gradient (see
            ``clip_gradient_norm``); None disables clipping.
        view_dependent_prompting: append ", front view" etc. to the prompt per camera.
    """

    def __init__(
        self,
        guidance_scale: float = 20.0,
        min_step_percent: float = 0.02,
        max_step_percent: float = 0.98,
        anneal_to: tuple[float, float] | None = None,
        weighting: Weighting = "sds",
        grad_clip: float | None = None,
        view_dependent_prompting: bool = True,
    ) -> None:
        super().__init__()
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting={weighting!r} is unknown: use one of {WEIGHTINGS}.")
        if grad_clip is not None and grad_clip <= 0:
            raise ValueError(f"grad_clip={grad_clip} must be positive, or None to disable.")
        self.guidance_scale = float(guidance_scale)
        self.weighting = weighting
        self.grad_clip = grad_clip
        self.view_dependent_prompting = view_dependent_prompting
        self.schedule = TimestepSchedule(
            min_step_percent, max_step_percent, tuple(anneal_to) if anneal_to else None
        )
        # Set by subclasses in setup(); a plain tensor attribute, not a buffer, so it never
        # enters the state_dict.
        self.alphas_cumprod: Tensor | None = None

    @abstractmethod
    def setup(self, prompt: str, device: torch.device | str) -> None:
        """Load the frozen model and the prompt embeddings onto ``device``."""
        raise NotImplementedError

    @abstractmethod
    def step(
        self, rgb: Float[Tensor, "B H W 3"], cameras: CameraBatch, progress: float
    ) -> GuidanceOutput:
        """One SDS step on channel-last renders in [0, 1]."""
        raise NotImplementedError

    def set_alphas_cumprod(self, alphas_cumprod: Float[Tensor, "T"]) -> None:
        """Install the noise schedule; T comes from its length."""
        self.alphas_cumprod = alphas_cumprod.detach().float()
        s = self.schedule
        self.schedule = TimestepSchedule(
            s.min_step_percent, s.max_step_percent, s.anneal_to, int(alphas_cumprod.shape[0])
        )

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
