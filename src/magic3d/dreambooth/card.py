"""The human half of a LoRA card: ``lora/README.md`` beside ``magic3d_lora.json``."""

from __future__ import annotations

import shutil
from pathlib import Path

from magic3d.guidance.lora import LORA_WEIGHTS, LoraCard


def write_card_readme(folder: Path, card: LoraCard, samples: Path | None = None) -> Path:
    """README.md (front matter as diffusers' DreamBooth LoRA cards have it) with the card's figures."""
    folder = Path(folder)
    lines = [
        "---",
        f"base_model: {card.base_model}",
        "library_name: diffusers",
        "tags: [magic3d, dreambooth, lora]",
        f"instance_prompt: {card.instance_prompt}",
        "---",
        "",
        f"# DreamBooth LoRA: {card.instance_prompt!r}",
        "",
        f"LoRA adapters (peft, rank {card.rank}, alpha {card.alpha:g}) on the UNet"
        f"{' and the text encoder' if card.text_encoder else ''} of `{card.base_model}` ({card.layout}), trained by "
        f"magic3d's personalisation stage on {card.n_subject_images} images of `{card.subject}`, identifier "
        f"`{card.identifier}`, class `{card.class_noun}`.",
        "",
        "| | |",
        "|---|---|",
        f"| instance prompt | {card.instance_prompt} |",
        (f"| class prompt (prior preservation) | {card.class_prompt} |" if card.class_prompt or not card.class_prompts
         else f"| class prompts (prior preservation) | {'; '.join(card.class_prompts)} |"),
        f"| class images / loss weight | {card.n_class_images} / {card.prior_loss_weight:g} |",
        f"| steps | {card.steps} |",
        f"| training time | {card.seconds} s |",
        f"| size | {card.size_mb} MB ({LORA_WEIGHTS}) |",
    ]
    for name, value in card.losses.items():
        lines.append(f"| loss {name.replace('_', ' ')} | {value:.5f} |")
    lines += [
        "",
        "Use it as a text-to-3D guidance (the base model must be the one above):",
        "",
        "```",
        f"model.guidance.pretrained={card.base_model} model.guidance.lora={folder}",
        "```",
        "",
        "or in diffusers: `pipeline.load_lora_weights(\"<this folder>\")` (UNet adapters; peft-named keys).",
    ]
    if samples is not None and Path(samples).is_file():
        shutil.copyfile(samples, folder / "samples.png")
        lines += ["", f"Samples of {card.instance_prompt!r} after tuning:", "", "![samples](samples.png)"]
    path = folder / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path
