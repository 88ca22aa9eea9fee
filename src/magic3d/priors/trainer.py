"""``PriorTrainer``: owns one prior's modules, data and phases; ``fit`` trains within a time
budget, ``state_dict``/``save_state`` make it resumable, ``export`` writes the pipeline folder.

Text encoder: trained jointly with the UNet at ``text_lr_scale`` x the UNet's learning rate,
from random init. A frozen random encoder would already give distinct embeddings per caption,
but ones that are not organised by meaning: "red" contributes a different, arbitrary vector
at each position it can occupy (T5's relative attention mixes neighbours), so the UNet must
learn every (colour, shape, view) combination separately. Training it costs little (0.5 M
parameters, 77 tokens) and the guidance re-encodes prompts with the saved (EMA) encoder, so
train and test embeddings are the same function. The reduced learning rate keeps the
embedding space from drifting faster than the UNet's cross-attention can follow.

Latent prior: the VAE phase runs first; then every image is encoded once (latent mean and std
kept on the device), ``scaling_factor`` = 1 / std of sampled latents is stored in the VAE
config, and the latent UNet trains on freshly sampled, scaled latents.

Checkpoints (``train_state.pt``, loaded with ``weights_only=True``): config, tokenizer, every
phase's model/EMA/optimiser state, step, seconds, loss history, RNG states, data seed and
image count. Written every ``checkpoint_minutes``, at the end, and on Ctrl-C.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from magic3d.priors.captions import CaptionTable
from magic3d.priors.card import CardInfo, save_contact_sheet, write_model_card
from magic3d.priors.configs import (
    PriorConfig,
    build_text_encoder,
    build_train_scheduler,
    build_unet,
    build_vae,
    count_parameters,
    tokenizer_from_json,
    train_tokenizer_json,
)
from magic3d.priors.data import ToyImages, render_toy_images, to_model_range
from magic3d.priors.export import (
    check_size,
    replace_folder,
    save_pipeline,
    verify_latent_pipeline,
    verify_pixel_pipeline,
)
from magic3d.priors.heldout import HELD_OUT_PAIRS
from magic3d.priors.logs import Log, print_line
from magic3d.priors.loop import Phase, make_phase, run_phase
from magic3d.priors.losses import NoiseSchedule
from magic3d.priors.objective import (
    DenoiserObjective,
    VaeObjective,
    autocast_for,
    maybe_compile,
)
from magic3d.priors.sampling import ddim_sample, sample_prompts
from magic3d.priors.warm_start import WarmStart, load_exported_module, phase_of

STATE_FORMAT = "magic3d-prior-state-v1"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def load_state(path: Path) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a prior training state ({STATE_FORMAT}); delete it or pass another --state.")
    return state


def counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {c / 1e6:.2f} M" for n, c in counts.items()) + f", total {sum(counts.values()) / 1e6:.2f} M"


class PriorTrainer:
    """One prior's training: modules, data, phases, RNG; resumable from ``state``."""

    def __init__(
        self,
        config: PriorConfig,
        device: torch.device,
        seed: int,
        state: dict[str, Any] | None = None,
        log: Log = print_line,
        warm: WarmStart | None = None,
    ) -> None:
        if state is not None and warm is not None:
            raise ValueError("pass a train state or a warm start, not both")
        self.config = config
        self.device = device
        self.log = log
        if warm is not None:
            state_like: dict[str, Any] | None = {
                "seed": warm.seed, "tokenizer_json": warm.tokenizer_json, "n_images": warm.n_images,
                "render": warm.render, "runs": warm.runs, "scaling_factor": warm.scaling_factor,
            }
        else:
            state_like = state
        self.seed = int(state_like["seed"]) if state_like else seed
        self.tokenizer_json = state_like["tokenizer_json"] if state_like else train_tokenizer_json()
        self.tokenizer = tokenizer_from_json(self.tokenizer_json)
        self.table = CaptionTable(self.tokenizer, device)
        self.n_images = int(state_like["n_images"]) if state_like and state_like.get("n_images") else None
        self.render_info: dict[str, float] = dict(state_like.get("render", {})) if state_like else {}
        self.runs: list[dict[str, Any]] = list(state_like.get("runs", [])) if state_like else []
        self.scaling_factor: float | None = state_like.get("scaling_factor") if state_like else None
        self.data: ToyImages | None = None
        self.latents: tuple[Tensor, Tensor] | None = None

        torch.manual_seed(self.seed)  # seeds CUDA too: batch draws use the device's generator
        text_encoder = build_text_encoder(config.text, len(self.tokenizer)).to(device)
        unet = build_unet(config).to(device)
        if device.type == "cuda":
            unet = unet.to(memory_format=torch.channels_last)
        self.phases: dict[str, Phase] = {}
        if config.kind == "latent":
            vae = build_vae(config).to(device)
            self.phases["vae"] = make_phase("vae", {"vae": vae}, config.vae_lr, {}, 0.0, config.ema_decay, device)
        self.phases["unet"] = make_phase(
            "unet",
            {"unet": unet, "text_encoder": text_encoder},
            config.lr,
            {"text_encoder": config.text_lr_scale},
            config.weight_decay,
            config.ema_decay,
            device,
        )
        self.train_scheduler = build_train_scheduler(config)
        self.schedule = NoiseSchedule(torch.as_tensor(self.train_scheduler.betas), device)
        if state:
            for name, phase in self.phases.items():
                phase.load_state_dict(state["phases"][name])
            self._load_rng(state["rng"])
        if warm is not None:
            self._warm_start(warm)

    def _warm_start(self, warm: WarmStart) -> None:
        """Exported weights -> live and EMA weights; step counts and seconds carried over."""
        for name, module in self.export_modules.items():
            weights = load_exported_module(warm.folder, name, module)
            module.load_state_dict(weights)
            phase = self.phases[phase_of(name)]
            for key, param in module.named_parameters():
                phase.ema.shadow[name][key].copy_(param.detach())
        for name, phase in self.phases.items():
            record = warm.phases.get(name)
            if record is None:
                raise ValueError(f"--init-from {warm.folder}: training.json has no {name!r} phase.")
            phase.step, phase.seconds = record["steps"], record["seconds"]
            phase.history = [list(h) for h in record["history"]]
            phase.warmup_from = phase.step
        # New draws, not a replay of the first run's noise and timesteps.
        torch.manual_seed(self.seed + 1 + sum(p.step for p in self.phases.values()))
        steps = ", ".join(f"{n} step {p.step}" for n, p in self.phases.items())
        self.log(f"[state] warm start from {warm.folder} ({steps}; optimiser moments reset)")

    # ---------------------------------------------------------------- bookkeeping

    @property
    def export_modules(self) -> dict[str, nn.Module]:
        """The modules saved in the pipeline, by subfolder name (live weights)."""
        modules = dict(self.phases["unet"].modules)
        if "vae" in self.phases:
            modules["vae"] = self.phases["vae"].modules["vae"]
        return modules

    def param_counts(self) -> dict[str, int]:
        return {name: count_parameters(m) for name, m in self.export_modules.items()}

    def _rng_state(self) -> dict[str, Any]:
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        }

    def _load_rng(self, rng: dict[str, Any]) -> None:
        # States written before batch draws moved to the device also hold a "data" generator
        # state; it has no reader any more.
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "kind": self.config.kind,
            "config": self.config.to_dict(),
            "seed": self.seed,
            "tokenizer_json": self.tokenizer_json,
            "n_images": self.n_images,
            "render": self.render_info,
            "scaling_factor": self.scaling_factor,
            "runs": self.runs,
            "phases": {name: phase.state_dict() for name, phase in self.phases.items()},
            "rng": self._rng_state(),
        }

    def save_state(self, path: Path) -> None:
        """Atomic write (temp file + rename): a crash never leaves a torn checkpoint."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)
        self.log(f"[state] saved {path} ({', '.join(f'{n} step {p.step}' for n, p in self.phases.items())})")

    def finished(self, budget_s: float, max_steps: int | None) -> bool:
        return all(p.done(b, max_steps) for p, b in zip(self.phases.values(), self._budgets(budget_s)))

    def _budgets(self, budget_s: float) -> list[float]:
        """Per-phase time budgets: the VAE gets ``vae_fraction``, the UNet the rest."""
        if "vae" not in self.phases:
            return [budget_s]
        vae, unet = self.phases["vae"], self.phases["unet"]
        # Once the UNet has started, the VAE is frozen: training it further (a resumed run with
        # a larger budget) would move the latents under the UNet.
        vae_budget = vae.seconds if unet.step > 0 else budget_s * self.config.vae_fraction
        used = vae.seconds if vae.done(vae_budget, None) else vae_budget
        return [vae_budget, max(budget_s - used, 0.0)]

    @property
    def train_seconds(self) -> float:
        return sum(p.seconds for p in self.phases.values())

    # ---------------------------------------------------------------- data

    def ensure_data(self) -> ToyImages:
        # Empty images: the latent phase freed the pixels; render again (same seed and count).
        if self.data is None or self.data.images.shape[0] == 0:
            first = self.n_images is None
            n = self.config.n_images if first else self.n_images
            cap = self.config.max_render_minutes * 60 if first else None
            self.data = render_toy_images(self.config, n, self.seed, self.device, cap, self.log)
            self.n_images = len(self.data)
            if first:
                self.render_info = {
                    "seconds": self.data.render_seconds,
                    "images_per_s": len(self.data) / max(self.data.render_seconds, 1e-9),
                    "device": device_name(self.device),
                }
        return self.data

    # ---------------------------------------------------------------- training

    def fit(self, budget_s: float, max_steps: int | None, state_path: Path) -> None:
        run = {
            "device": device_name(self.device),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "steps_before": {n: p.step for n, p in self.phases.items()},
        }
        seconds_before = self.train_seconds
        if self.finished(budget_s, max_steps):
            return
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.runs.append(run)
        checkpoint = lambda: self.save_state(state_path)  # noqa: E731
        if "vae" in self.phases:
            self._fit_vae(self._budgets(budget_s)[0], max_steps, checkpoint)
        self._fit_unet(self._budgets(budget_s)[-1], max_steps, checkpoint)
        run["steps_after"] = {n: p.step for n, p in self.phases.items()}
        run["seconds"] = self.train_seconds - seconds_before
        self.save_state(state_path)

    def objective(self, phase_name: str) -> nn.Module:
        """The phase's loss as one module (``[total, parts...]`` per call), compiled on CUDA
        when ``config.compile``. Built once per ``fit`` call; ``bench`` times it directly."""
        config = self.config
        if phase_name == "vae":
            vae = VaeObjective(self.phases["vae"].modules["vae"].train(), self.ensure_data(), config)
            return maybe_compile(vae, config, self.device, mode="default")
        modules = self.phases["unet"].modules
        data = self.ensure_data()
        if config.kind == "latent":
            if self.latents is None:
                self.latents = self._encode_latents()
            data.images = data.images[:0]  # pixels are no longer needed on the device
        objective = DenoiserObjective(
            modules["unet"].train(), modules["text_encoder"].train(), self.table, self.schedule, data, config,
            self.latents if config.kind == "latent" else None, self.scaling_factor,
        )
        return maybe_compile(objective, config, self.device)

    def _fit_vae(self, budget_s: float, max_steps: int | None, checkpoint: Callable[[], None]) -> None:
        phase = self.phases["vae"]
        if phase.done(budget_s, max_steps):
            return
        before = phase.step
        run_phase(phase, self.objective("vae"), budget_s, max_steps, self.config, checkpoint,
                  f"{self.config.kind}/vae", self.log)
        if phase.step != before:  # the encoder changed: latents and their scale must be recomputed
            self.latents = None
            self.scaling_factor = None

    @torch.no_grad()
    def _encode_latents(self) -> tuple[Tensor, Tensor]:
        """Latent mean and std of every image from the EMA VAE; sets ``scaling_factor``."""
        data = self.ensure_data()
        vae = self.phases["vae"].ema.copy_to("vae", build_vae(self.config).to(self.device)).eval()
        means, stds = [], []
        chunk = max(1, 4 * self.config.vae_batch_size)
        for first in range(0, len(data), chunk):
            with autocast_for(self.device):
                dist = vae.encode(to_model_range(data.images[first : first + chunk])).latent_dist
            means.append(dist.mean.to(torch.float16))
            stds.append(dist.std.to(torch.float16))
        mean, std = torch.cat(means), torch.cat(stds)
        if self.scaling_factor is None:
            count = min(len(mean), self.config.scaling_sample_count)
            generator = torch.Generator().manual_seed(self.seed + 2)
            noise = torch.randn(mean[:count].shape, generator=generator).to(self.device)
            sample = mean[:count].float() + std[:count].float() * noise
            self.scaling_factor = float(1.0 / sample.std())
            self.log(f"[latent] latent std {sample.std().item():.4f} -> scaling_factor {self.scaling_factor:.5f}")
        return mean, std

    def _fit_unet(self, budget_s: float, max_steps: int | None, checkpoint: Callable[[], None]) -> None:
        phase = self.phases["unet"]
        if phase.done(budget_s, max_steps):
            return
        run_phase(phase, self.objective("unet"), budget_s, max_steps, self.config, checkpoint,
                  f"{self.config.kind}/unet", self.log)

    # ---------------------------------------------------------------- export

    def ema_modules(self) -> dict[str, nn.Module]:
        """Fresh fp32 copies of the exported modules holding the EMA weights, on the device."""
        modules: dict[str, nn.Module] = {}
        for name, live in self.export_modules.items():
            phase = self.phases["vae" if name == "vae" else "unet"]
            if name == "vae":
                fresh = build_vae(self.config)
            elif name == "unet":
                fresh = build_unet(self.config)
            else:
                fresh = build_text_encoder(self.config.text, len(self.tokenizer))
            fresh.load_state_dict(live.state_dict())  # buffers; parameters are overwritten next
            modules[name] = phase.ema.copy_to(name, fresh.to(self.device)).eval()
        if "vae" in modules:
            if self.scaling_factor is None:
                self.latents = self._encode_latents()
            modules["vae"].register_to_config(scaling_factor=self.scaling_factor)
        return modules

    def export(self, out: Path, max_mb: float, command: str = "") -> float:
        """Write the diffusers folder (fp16), its model card and sample sheet; returns MB."""
        config = self.config
        modules = self.ema_modules()
        size = check_size(modules, max_mb)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            views = (0, 1, 2, 3) if config.kind == "pixel" else (0, 1, 2)
            # Half as many held-out rows as trained ones (all four for the pixel prior's 8).
            held_out_rows = min(len(HELD_OUT_PAIRS), (config.sample_rows + 1) // 2)
            prompts = sample_prompts(config.sample_rows, views, held_out_rows)
            images = ddim_sample(
                modules["unet"], modules["text_encoder"], self.tokenizer, dict(self.train_scheduler.config),
                prompts, config.sample_steps, config.sample_guidance, seed=self.seed,
                vae=modules.get("vae"), scaling_factor=self.scaling_factor or 1.0,
            )
            save_contact_sheet(tmp / "samples.png", images, cols=len(views) + 1, scale=2 if config.kind == "pixel" else 1)
            save_pipeline(tmp, modules, self.tokenizer, self.train_scheduler, config.kind)
            if config.kind == "pixel":
                check = f"PixelSDS on CPU (fp32): finite SDS gradient, mean |grad| {verify_pixel_pipeline(tmp):.3e}"
            else:
                check = f"CPU (fp32) load: VAE latents {verify_latent_pipeline(tmp)}, UNet output finite"
            self.log(f"[export] verified: {check}")
            info = CardInfo(
                kind=config.kind,
                param_counts=self.param_counts(),
                fp16_mb=size,
                max_mb=max_mb,
                phases=[p.summary() for p in self.phases.values()],
                runs=self.runs,
                n_images=self.n_images or 0,
                image_size=config.image_size,
                render=self.render_info,
                seed=self.seed,
                config=config.to_dict(),
                sample_prompts=prompts,
                sample_cols=len(views) + 1,
                scaling_factor=self.scaling_factor,
                verification=check,
                command=command,
            )
            write_model_card(tmp, info)
            replace_folder(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.log(f"[export] wrote {out} ({size:.2f} MB fp16; {counts_text(self.param_counts())})")
        return size
