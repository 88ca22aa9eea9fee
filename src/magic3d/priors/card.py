"""Model card (README.md), machine-readable record (training.json) and sample contact sheet
written next to an exported prior. Quality figures are left to the evaluator, which fills the
section marked ``EVALUATOR_MARKER``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import UInt8
from torch import Tensor

from magic3d.priors.heldout import held_out_captions

EVALUATOR_MARKER = "<!-- magic3d:evaluator -->"
_LAYOUTS = {
    "pixel": ("DeepFloyd IF stage I", "magic3d.guidance.pixel_sds.PixelSDS"),
    "latent": ("Stable Diffusion", "the latent-space SDS guidance"),
}
_CLASSES = {
    "unet": "diffusers UNet2DConditionModel",
    "vae": "diffusers AutoencoderKL",
    "text_encoder_pixel": "transformers T5EncoderModel",
    "text_encoder_latent": "transformers CLIPTextModel",
}


@dataclass
class PhaseSummary:
    name: str
    steps: int
    seconds: float
    history: list[tuple[float, float, float]] = field(default_factory=list)  # (step, seconds, loss)


@dataclass
class CardInfo:
    kind: str
    param_counts: dict[str, int]
    fp16_mb: float
    max_mb: float
    phases: list[PhaseSummary]
    runs: list[dict[str, Any]]
    n_images: int
    image_size: int
    render: dict[str, Any]
    seed: int
    config: dict[str, Any]
    sample_prompts: list[str]
    sample_cols: int
    scaling_factor: float | None = None
    verification: str = ""
    command: str = ""



def _target(config: dict) -> str:
    """The UNet's prediction as the card names it (configs before 2026-12-04 have no key: epsilon)."""
    return "v" if config.get("prediction_type", "epsilon") == "v_prediction" else "epsilon"

def loss_milestones(history: list[tuple[float, float, float]]) -> list[tuple[int, int, float]]:
    """(percent of steps, step, loss) at 0, 10, 25, 50, 75 and 100 % of the logged curve."""
    if not history:
        return []
    last = history[-1][0]
    rows = []
    for percent in (0, 10, 25, 50, 75, 100):
        target = last * percent / 100.0
        entry = min(history, key=lambda h: abs(h[0] - target))
        rows.append((percent, int(entry[0]), float(entry[2])))
    return rows


def contact_sheet(images: UInt8[Tensor, "N H W 3"], cols: int, scale: int = 1, pad: int = 2) -> np.ndarray:
    """Tile images row-major on a white canvas (``pad`` pixels apart), upscaled by ``scale``."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3) uint8, got {tuple(images.shape)}")
    array = images.cpu().numpy()
    if scale > 1:
        array = array.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, _ = array.shape
    rows = (n + cols - 1) // cols
    sheet = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        sheet[top : top + h, left : left + w] = array[i]
    return sheet


def save_contact_sheet(path: Path, images: UInt8[Tensor, "N H W 3"], cols: int, scale: int = 1) -> None:
    import imageio.v3 as iio

    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, contact_sheet(images, cols, scale))


def folder_megabytes(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors")) / 1e6


def _text_class(kind: str) -> str:
    return _CLASSES[f"text_encoder_{kind}"]


def render_card(info: CardInfo, weights_mb: float) -> str:
    layout, user = _LAYOUTS[info.kind]
    c = info.config
    total = sum(info.param_counts.values())
    lines = [
        "---",
        "library_name: diffusers",
        "pipeline_tag: text-to-image",
        "license: apache-2.0",
        "tags: [magic3d, toy-world, score-distillation]",
        "---",
        "",
        f"# magic3d toy-world {info.kind} prior ({layout} layout)",
        "",
        "A small text-to-image diffusion model trained from scratch by `python -m magic3d.priors` on",
        "magic3d's procedural toy world and embedded in the repository, so that score distillation runs",
        f"end to end with no download. It is loaded by {user} exactly like the real model it stands in",
        "for, and knows only toy-world captions (`a red cube`, `an orange duck, side view`, ...).",
        "",
        "## Model",
        "",
        "| part | class | parameters |",
        "|---|---|---|",
    ]
    for name, count in info.param_counts.items():
        cls = _text_class(info.kind) if name == "text_encoder" else _CLASSES[name]
        lines.append(f"| {name}/ | {cls} | {count / 1e6:.2f} M |")
    lines += [
        f"| total | | {total / 1e6:.2f} M |",
        "",
        f"Weights: fp16 safetensors, {weights_mb:.2f} MB on disk (limit {info.max_mb} MB); load them in fp32",
        "on CPU (`torch_dtype=torch.float32`) or bf16 on GPU. Tokenizer: byte-level BPE with one token per",
        "toy-world word (unknown words fall back to bytes), T5 ids (pad 0, eos 1), prompts padded to 77.",
    ]
    if info.kind == "pixel":
        size = c["unet"]["sample_size"]
        lines.append(
            f"UNet: Stable Diffusion's transformer cross-attention blocks on pixels at {size}x{size}, "
            f"6 output channels like IF ({_target(c)} + learned-range variance); IF's own block types did not "
            "learn the caption at this size (see magic3d.priors.configs)."
        )
    else:
        lines.append(
            f"VAE: 8x downsampling, 4 latent channels, {info.image_size} px -> {info.image_size // 8}x"
            f"{info.image_size // 8} latents, scaling_factor {info.scaling_factor:.5f} (1 / latent std)."
        )
    lines += [
        "",
        "## Data",
        "",
        f"- {info.n_images} toy-world images at {info.image_size} px (supersample {c['supersample']}), seed {info.seed},",
        "  rendered by `magic3d.toyworld` with the text-to-3D stage's random cameras, lights and backgrounds.",
    ]
    if info.render:
        lines.append(
            f"- Rendering: {info.render.get('seconds', 0):.1f} s ({info.render.get('images_per_s', 0):.0f} images/s)"
            f" on {info.render.get('device', '?')}."
        )
    lines += [
        f"- Captions `a {{colour}} {{shape}}`, with the guidance's view suffix (`, front view`, ...) in"
        f" {c['view_suffix_prob']:.0%} of draws, replaced by `\"\"` in {c['cond_drop_prob']:.0%}"
        " (classifier-free guidance; the guidance's negative prompt is `\"\"`).",
        "- Held out of the images, the captions and the tokenizer's corpus (never seen together in"
        f" training; the evaluator knows them): {', '.join(f'`{t}`' for t in held_out_captions())}.",
        "",
        "## Training",
        "",
    ]
    if info.kind == "pixel":
        variance = (
            f" + {c['variance_loss_weight']:g} x improved-DDPM KL term for the variance channels."
            if c.get("variance_loss_weight", 0) > 0
            else f"; the variance channels are not trained (SDS and DDIM use only the {_target(c)} channels)."
        )
        lines.append(f"- Objective: DDPM {_target(c)} MSE on IF's cosine schedule (1000 steps)" + variance)
    else:
        lines.append(
            f"- VAE: L1 + L2 reconstruction + {c['vae_kl_weight']:g} x KL, batch {c['vae_batch_size']},"
            f" lr {c['vae_lr']:g}. UNet: {_target(c)} MSE on SD's scaled-linear schedule on sampled latents."
        )
    if c.get("min_snr_gamma") is not None:
        denominator = "(SNR + 1)" if _target(c) == "v" else "SNR"
        lines.append(f"- {_target(c).capitalize()} MSE weighted by min(SNR, {c['min_snr_gamma']:g}) / {denominator}"
                     " per sample (Min-SNR, Hang et al. 2023).")
    lines += [
        f"- AdamW lr {c['lr']:g} (text encoder x{c['text_lr_scale']:g}), batch {c['batch_size']}, warm-up"
        f" {c['warmup_steps']} steps, cosine to {c['min_lr_fraction']:g} x over the time budget, EMA"
        f" {c['ema_decay']:g} (exported weights), bf16 autocast on CUDA"
        f"{', torch.compile' if c.get('compile') else ''}. The text encoder is trained jointly.",
        "",
        "| phase | steps | training time |",
        "|---|---|---|",
    ]
    for phase in info.phases:
        lines.append(f"| {phase.name} | {phase.steps} | {phase.seconds / 60:.1f} min |")
    lines += ["", "Runs (a run may resume an earlier one):", ""]
    for run in info.runs:
        lines.append(
            f"- {run.get('started', '?')} on {run.get('device', '?')}: {run.get('steps_before')} -> "
            f"{run.get('steps_after')} steps, {run.get('seconds', 0) / 60:.1f} min"
        )
    for phase in info.phases:
        milestones = loss_milestones(phase.history)
        if not milestones:
            continue
        lines += ["", f"Loss ({phase.name}, mean over each logging window):", "", "| progress | step | loss |", "|---|---|---|"]
        lines += [f"| {p}% | {s} | {loss:.4f} |" for p, s, loss in milestones]
    view_cols = ["bare prompt", "front", "side", "back", "overhead"][: info.sample_cols]
    rows = info.sample_prompts[:: info.sample_cols]
    lines += [
        "",
        "## Samples",
        "",
        "![samples](samples.png)",
        "",
        f"DDIM, {c['sample_steps']} steps, guidance scale {c['sample_guidance']:g}, EMA weights. Rows:"
        f" {'; '.join(f'`{r}`' + (' (held out)' if r in held_out_captions() else '') for r in rows)}."
        f" Columns: {', '.join(view_cols)}.",
        "",
        "## Quality",
        "",
        EVALUATOR_MARKER,
        "To be filled by the evaluator.",
        "",
        "## Verification and reproduction",
        "",
        f"- Export check: {info.verification}",
    ]
    if info.command:
        lines.append(f"- Command: `{info.command}`")
    lines.append("- Full configuration and loss history: `training.json`.")
    return "\n".join(lines) + "\n"


def write_model_card(folder: Path, info: CardInfo) -> None:
    """README.md and training.json in ``folder`` (after the weights are written)."""
    weights_mb = folder_megabytes(folder)
    (folder / "README.md").write_text(render_card(info, weights_mb))
    record = asdict(info)
    record["weights_mb"] = weights_mb
    record["steps"] = {p.name: p.steps for p in info.phases}
    (folder / "training.json").write_text(json.dumps(record, indent=2, default=str) + "\n")


def fill_quality_section(card: Path, markdown: str) -> bool:
    """Replace the text after ``EVALUATOR_MARKER`` (up to the next ``## `` heading) in a model
    card with ``markdown``. Returns False when the card has no marker (left untouched)."""
    text = card.read_text()
    start = text.find(EVALUATOR_MARKER)
    if start < 0:
        return False
    body = start + len(EVALUATOR_MARKER)
    end = text.find("\n## ", body)
    end = len(text) if end < 0 else end + 1
    card.write_text(text[:body] + "\n" + markdown.strip() + "\n\n" + text[end:])
    return True
