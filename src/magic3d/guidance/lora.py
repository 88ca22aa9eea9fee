"""LoRA adapters on a frozen prior, in diffusers' LoRA format: add, save, read, check, load.

The personalisation stage (``magic3d.dreambooth``) writes adapters and the SDS guidances load
them, both through this one file, so the two always agree on the format. An adapter folder:

  pytorch_lora_weights.safetensors  diffusers' LoRA file, as
                                    ``StableDiffusionLoraLoaderMixin.save_lora_weights`` writes it:
                                    ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (and
                                    ``text_encoder.<module>...`` when the text encoder was tuned),
                                    the peft ``LoraConfig`` of each part in the file's metadata
  magic3d_lora.json                 the card (:class:`LoraCard`): base model and its fingerprint,
                                    subject, identifier, steps, losses
  README.md                         the card for people (written by the stage)

Two choices, each for a measured reason:

- The UNet keys keep peft's names (``to_q.lora_A``); they are not passed through
  ``convert_state_dict_to_diffusers``. That function renames ``to_q``/``to_k``/``to_v``/``to_out``
  keys (``to_q.lora.down``) but not IF's ``add_k_proj``/``add_v_proj``, and diffusers 0.42's
  ``load_lora_adapter`` decides from the *first* key alone whether to convert back: with IF's
  targets it then silently dropped 32 of 48 tensors of a tiny IF UNet. peft names load whole in
  diffusers (``unet.load_lora_adapter``, ``pipeline.load_lora_weights``) and here.
- Adapters are injected with peft itself (``inject_adapter_in_model``), not through
  ``add_adapter`` of diffusers/transformers: transformers 5 refuses peft < 0.22, the newest on
  PyPI at the time of writing is 0.21.2, and one code path for both parts is simpler.

The weights are float32 safetensors, so a reload reproduces the tuned model bit for bit.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from magic3d.config import ConfigError

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
LORA_CARD = "magic3d_lora.json"
ADAPTER_NAME = "dreambooth"
PARTS = ("unet", "text_encoder")  # the prefixes of diffusers' Stable Diffusion / IF LoRA files
_CARD_FORMAT = "magic3d-lora-v1"
# Config keys that change between saves of identical weights; they must not change the fingerprint.
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "_diffusers_version", "transformers_version", "_commit_hash",
                         "dtype", "torch_dtype")


@dataclass(frozen=True)
class LoraSettings:
    """Shape of the adapters a personalisation stage adds.

    Args:
        rank: LoRA rank r of every adapted linear layer.
        alpha: LoRA alpha; the update is scaled by alpha / rank (None: alpha = rank, scale 1).
        targets: module-name suffixes to adapt (peft ``target_modules``).
    """

    rank: int = 4
    alpha: float | None = None
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank={self.rank} must be >= 1.")
        if not self.targets:
            raise ValueError("LoRA targets are empty: name the linear layers to adapt (e.g. to_q, to_k, to_v).")

    def config(self):
        from peft import LoraConfig

        # gaussian A and zero B: the adapted model starts exactly at the frozen one.
        return LoraConfig(r=self.rank, lora_alpha=self.alpha if self.alpha is not None else self.rank,
                          init_lora_weights="gaussian", target_modules=list(self.targets))


def add_lora(module: nn.Module, settings: LoraSettings, part: str) -> list[nn.Parameter]:
    """Inject fresh adapters into ``module`` (in place); freeze everything else; return the
    adapter parameters (trainable). ``part`` ("unet" / "text_encoder") names it in errors."""
    from peft import inject_adapter_in_model

    module.requires_grad_(False)
    try:
        inject_adapter_in_model(settings.config(), module, adapter_name=ADAPTER_NAME)
    except ValueError as err:
        if "not found in the base model" not in str(err) and "Target modules" not in str(err):
            raise
        names = sorted({name.rpartition(".")[2] for name, m in module.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(f"LoRA targets {list(settings.targets)} match no linear layer of the {part} "
                          f"({type(module).__name__}); its linear layers end in {names[:12]}.") from None
    params = [p for name, p in module.named_parameters() if f".{ADAPTER_NAME}." in name and "lora_" in name]
    for param in params:
        param.requires_grad_(True)
    return params


def adapter_state(module: nn.Module) -> dict[str, Tensor]:
    """The adapter's tensors under peft's names without the adapter name (``...to_q.lora_A.weight``)."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().float().cpu().contiguous()
            for k, v in get_peft_model_state_dict(module, adapter_name=ADAPTER_NAME).items()}


def adapter_config(module: nn.Module) -> dict[str, Any]:
    """The injected adapter's LoraConfig as the few JSON-safe keys that define it (diffusers
    stores them as the file's metadata; fewer keys keep it readable by other peft versions)."""
    config = getattr(module, "peft_config", {}).get(ADAPTER_NAME)
    if config is None:
        raise ValueError(f"{type(module).__name__} has no '{ADAPTER_NAME}' adapter: add_lora() it first.")
    return {"r": int(config.r), "lora_alpha": float(config.lora_alpha),
            "target_modules": sorted(config.target_modules), "init_lora_weights": "gaussian"}


# ------------------------------------------------------------------------------ base models


def _sampled_digest(path: Path, chunks: int = 16, chunk_bytes: int = 1 << 16) -> str:
    """sha256 of a file's size and ``chunks`` evenly spaced pieces of it (the whole file if small)."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        if size <= chunks * chunk_bytes:
            digest.update(handle.read())
        else:
            for k in range(chunks):
                handle.seek(k * (size - chunk_bytes) // (chunks - 1))
                digest.update(handle.read(chunk_bytes))
    return digest.hexdigest()


def prior_fingerprint(pretrained: str) -> str | None:
    """What identifies a local prior's UNet weights: its config (volatile keys dropped) and a
    digest of each weight file's size and 16 evenly spaced 64 KB pieces. None for a Hub id
    (compared by name).

    Pieces, not whole files: hashing IF-I-XL's 8.6 GB at every setup would cost a minute, while
    retrained weights differ in every piece (the toy priors are retrained with the same config
    and file sizes, which a size-only check would take for the same prior); a folder copied
    elsewhere keeps its fingerprint. A guard against mix-ups, not against tampering.
    """
    folder = Path(pretrained).expanduser()
    unet = folder / "unet"
    if not (unet / "config.json").is_file():
        return None
    config = {k: v for k, v in json.loads((unet / "config.json").read_text()).items() if k not in _VOLATILE_CONFIG_KEYS}
    weights = sorted((p.name, _sampled_digest(p)) for p in [*unet.glob("*.safetensors"), *unet.glob("*.bin")])
    blob = json.dumps({"config": config, "weights": weights}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def base_model_name(pretrained: str) -> str:
    """A local folder as its absolute path (so two spellings of one folder compare equal), a Hub id as is."""
    folder = Path(pretrained).expanduser()
    return str(folder.resolve()) if folder.is_dir() else pretrained


# ------------------------------------------------------------------------------ the card


@dataclass
class LoraCard:
    """What an adapter folder says about itself (``magic3d_lora.json``)."""

    base_model: str  # the prior's folder (absolute) or Hub id
    base_fingerprint: str | None  # prior_fingerprint of the base (None for a Hub id)
    layout: str  # e.g. "DeepFloyd IF stage-I", "Stable Diffusion"
    identifier: str = ""
    class_noun: str = ""
    instance_prompt: str = ""
    class_prompt: str = ""  # the single class prompt ("" when class_prompts were given instead)
    class_prompts: list[str] = field(default_factory=list)  # every prompt prior preservation kept
    subject: str = ""
    n_subject_images: int = 0
    n_class_images: int = 0
    prior_loss_weight: float = 0.0
    rank: int = 0
    alpha: float = 0.0
    text_encoder: bool = False
    steps: int = 0
    seconds: float | None = None
    losses: dict[str, float] = field(default_factory=dict)
    size_mb: float | None = None
    format: str = _CARD_FORMAT

    def save(self, folder: Path) -> Path:
        path = Path(folder) / LORA_CARD
        path.write_text(json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n")
        return path

    @classmethod
    def load(cls, folder: Path) -> "LoraCard":
        path = Path(folder) / LORA_CARD
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"LoRA folder {folder} has no readable {LORA_CARD} ({type(err).__name__}): it was "
                              "not written by a magic3d personalisation stage; point lora= at one that was.") from None
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def save_lora(folder: Path, card: LoraCard, unet: nn.Module, text_encoder: nn.Module | None = None) -> Path:
    """Write the adapters of ``unet`` (and ``text_encoder``) in diffusers' LoRA format plus the card."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        folder,
        unet_lora_layers=adapter_state(unet),
        text_encoder_lora_layers=adapter_state(text_encoder) if text_encoder is not None else None,
        unet_lora_adapter_metadata=adapter_config(unet),
        text_encoder_lora_adapter_metadata=adapter_config(text_encoder) if text_encoder is not None else None,
        safe_serialization=True,
    )
    card.size_mb = round((folder / LORA_WEIGHTS).stat().st_size / 1e6, 3)
    card.save(folder)
    return folder


# ------------------------------------------------------------------------------ reading


@dataclass
class LoraAdapter:
    """An adapter folder, read and checked: its tensors and peft configs per part, and its card."""

    path: Path
    card: LoraCard
    states: dict[str, dict[str, Tensor]]  # part -> peft-named tensors
    configs: dict[str, dict[str, Any]]  # part -> LoraConfig kwargs
    file_sha256: str

    @property
    def adapts_text_encoder(self) -> bool:
        return "text_encoder" in self.states

    def text_encoder_fingerprint(self, scale: float) -> str:
        """What a text-embedding cache key needs to know of this adapter: its weights and scale."""
        return f"lora:{self.file_sha256}:{float(scale)!r}"

    def check_base(self, pretrained: str, layout: str) -> None:
        """Refuse an adapter trained on another prior, naming both."""
        name = base_model_name(pretrained)
        fingerprint = prior_fingerprint(pretrained)
        if fingerprint is not None and self.card.base_fingerprint is not None:
            same = fingerprint == self.card.base_fingerprint
        else:
            same = name == self.card.base_model
        if not same or layout != self.card.layout:
            raise ConfigError(
                f"LoRA {self.path} was trained on {self.card.base_model} ({self.card.layout}), but this guidance's "
                f"prior is {name} ({layout}): a LoRA fits only the weights it was trained on. Point "
                f"pretrained= at {self.card.base_model}, or personalise {name} and use that LoRA.")

    def apply(self, module: nn.Module, part: str, scale: float = 1.0) -> bool:
        """Load this adapter's ``part`` into ``module`` (frozen, at ``scale``); False if it has none."""
        from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
        from peft.tuners.lora import LoraLayer

        if part not in self.states:
            return False
        known = set(inspect.signature(LoraConfig).parameters)
        config = LoraConfig(**{k: v for k, v in self.configs[part].items() if k in known})
        inject_adapter_in_model(config, module, adapter_name=ADAPTER_NAME)
        result = set_peft_model_state_dict(module, self.states[part], adapter_name=ADAPTER_NAME)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        missing = [k for k in getattr(result, "missing_keys", []) or [] if "lora_" in k]
        if unexpected or missing:
            raise ConfigError(f"LoRA {self.path} does not fit the {part} of this prior ("
                              f"{'unexpected ' + str(unexpected[:2]) if unexpected else 'missing ' + str(missing[:2])}): "
                              "it was trained on another architecture.")
        for layer in module.modules():
            if isinstance(layer, LoraLayer):
                layer.set_scale(ADAPTER_NAME, float(scale))
        module.requires_grad_(False)
        return True


def read_lora(path: str | Path) -> LoraAdapter:
    """Read an adapter folder (or its safetensors file), with one-line errors naming the fix."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    folder = path.parent if path.is_file() else path
    weights = folder / LORA_WEIGHTS
    if not folder.is_dir():
        raise ConfigError(f"LoRA folder {folder} does not exist: pass lora= the lora/ folder of a finished "
                          "personalisation stage (runs/<recipe>/<name>/<stage>/lora).")
    if not weights.is_file():
        raise ConfigError(f"LoRA folder {folder} has no {LORA_WEIGHTS}: pass the lora/ folder a personalisation "
                          "stage wrote (its DONE.json names it).")
    card = LoraCard.load(folder)
    data = weights.read_bytes()
    tensors = load_file(str(weights))
    with safe_open(str(weights), "pt") as handle:
        metadata = handle.metadata() or {}
    configs: dict[str, dict[str, Any]] = {}
    raw = metadata.get("lora_adapter_metadata")
    if raw:
        packed = json.loads(raw)
        for part in PARTS:
            config = {k[len(part) + 1:]: v for k, v in packed.items() if k.startswith(part + ".")}
            if config:
                configs[part] = config
    states = {}
    for part in PARTS:
        state = {k[len(part) + 1:]: v for k, v in tensors.items() if k.startswith(part + ".")}
        if state:
            if part not in configs:
                raise ConfigError(f"LoRA {weights} holds {part} adapters without their LoraConfig metadata: "
                                  "it was not written by magic3d; re-save it with a personalisation stage.")
            states[part] = state
    if "unet" not in states:
        raise ConfigError(f"LoRA {weights} holds no unet adapters: pass the lora/ folder of a personalisation stage.")
    return LoraAdapter(folder, card, states, configs, hashlib.sha256(data).hexdigest())
