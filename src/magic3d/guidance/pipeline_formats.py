"""The on-disk formats of the two diffusers pipeline families the guidance loads: their noise
schedules and ``model_index.json``, as DeepFloyd IF stage I and Stable Diffusion 2.1-base
store them. Shared by the embedded priors' export and the random test pipelines, so both
write folders the guidance reads exactly like the real models'.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# DeepFloyd/IF-I-XL-v1.0 scheduler/scheduler_config.json.
IF_SCHEDULER: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    beta_start=0.0001,
    beta_end=0.02,
    clip_sample=True,
    clip_sample_range=1.0,
    thresholding=True,
    dynamic_thresholding_ratio=0.95,
    sample_max_value=1.5,
    prediction_type="epsilon",
    variance_type="learned_range",
)

# stabilityai/stable-diffusion-2-1-base scheduler/scheduler_config.json.
SD_SCHEDULER: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    clip_sample=False,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    prediction_type="epsilon",
)


def pipeline_model_index(kind: str) -> dict:
    """model_index.json of a pixel (DeepFloyd IF stage-I) or latent (Stable Diffusion) folder."""
    import diffusers

    common = {
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "unet": ["diffusers", "UNet2DConditionModel"],
    }
    if kind == "pixel":
        return {"_class_name": "IFPipeline", **common, "scheduler": ["diffusers", "DDPMScheduler"],
                "text_encoder": ["transformers", "T5EncoderModel"], "watermarker": [None, None]}
    if kind == "latent":
        return {"_class_name": "StableDiffusionPipeline", **common, "image_encoder": [None, None],
                "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
                "vae": ["diffusers", "AutoencoderKL"]}
    raise ValueError(f"kind={kind!r} is unknown: use 'pixel' or 'latent'.")


def write_model_index(path: Path, kind: str) -> None:
    (Path(path) / "model_index.json").write_text(json.dumps(pipeline_model_index(kind), indent=2) + "\n")
