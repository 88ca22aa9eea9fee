"""Multi-stage runner: a recipe is an ordered list of stages, each run in its own process.

Run folder layout: ``runs/<recipe>/<prompt-slug>-<time>/<stage>/`` holding ``config.yaml``
(resolved), ``checkpoints/`` (last + periodic), ``logs/`` (metrics CSV, per attempt),
``wandb/``, ``val/`` and ``train/`` images, ``turntable.mp4`` and ``DONE.json``.
Running again on an existing run folder continues each unfinished stage from its last
checkpoint; finished stages (``DONE.json``) are skipped. ``run.json`` records how the run was
started (recipe, prompt, edit prompt, base run, seed, profile, overrides).

Prompts per stage: a recipe stage runs on the run's prompt, or with ``prompt: edit`` on its
edit prompt (``edit=`` / ``--edit``), e.g. prompt-based editing (§6): coarse on "a red cube",
then the edit and fine stages on "a blue cube". A base run (``base=RUN`` / ``--base``) supplies
every stage on the base prompt from its own finished stages: they are read from there (never
copied or changed), and only the stages on the edit prompt run in the new folder.

Subject and outputs of earlier stages (DreamBooth, §6): a recipe stage with ``with_subject: true``
gets the run's ``subject=`` folder as ``model.subject``; ``uses: {config.key: stage/path}`` sets a
config key to a file or folder an earlier stage writes, e.g. the coarse stage's
``model.guidance.lora: personalise_pixel/lora``. ``start: from`` wires checkpoints the same way.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from magic3d.config import (
    ConfigError,
    apply_override,
    apply_overrides,
    deep_merge,
    dump_yaml,
    load_composed,
    load_yaml,
    recipes_dir,
)
from magic3d.checkpoints import START_MODES
from magic3d.child_process import run_child
from magic3d.stage import SEED_RANGE, with_default_classes

DEFAULT_RECIPE = "coarse_to_fine"

STAGE_PROMPTS = ("base", "edit")  # a recipe stage's `prompt:`: the run's prompt, or its edit prompt

RUN_SETTINGS = "run.json"


@dataclass
class RecipeStart:
    """How a recipe starts a stage from an earlier one (``from_stage`` None: from scratch)."""

    from_stage: str | None = None
    mode: str = "warm_start"
    converter: str | None = None  # import path "package.module.function", for mode convert


@dataclass
class StageSpec:
    name: str
    config: Path
    cpu_profile: Path | None
    start: RecipeStart = field(default_factory=RecipeStart)
    prompt: str = "base"  # one of STAGE_PROMPTS
    with_subject: bool = False  # model.subject = the run's subject= folder
    uses: dict[str, str] = field(default_factory=dict)  # config key -> "<earlier stage>/<path in its folder>"


@dataclass
class Recipe:
    name: str
    description: str
    default_prompt: str
    stages: list[StageSpec]

    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]

    @property
    def edit_stage_names(self) -> list[str]:
        """Stages that run on the edit prompt (``prompt: edit``)."""
        return [s.name for s in self.stages if s.prompt == "edit"]

    @property
    def subject_stage_names(self) -> list[str]:
        """Stages that learn from the run's subject images (``with_subject: true``)."""
        return [s.name for s in self.stages if s.with_subject]


def available_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def load_recipe(name: str) -> Recipe:
    path = recipes_dir() / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"Unknown recipe '{name}'. Available: {', '.join(available_recipes())}")
    data = load_yaml(path)
    stages = []
    seen: set[str] = set()
    for i, entry in enumerate(data.get("stages") or []):
        if "name" not in entry or "config" not in entry:
            raise ConfigError(f"Recipe {name}: stage #{i} needs 'name' and 'config'")
        start_data = dict(entry.get("start") or {})
        start = RecipeStart(
            from_stage=start_data.pop("from", None),
            mode=start_data.pop("mode", "warm_start"),
            converter=start_data.pop("converter", None),
        )
        if start_data:
            raise ConfigError(f"Recipe {name}, stage {entry['name']}: unknown start keys {sorted(start_data)}")
        if start.mode not in START_MODES:
            raise ConfigError(f"Recipe {name}, stage {entry['name']}: start mode must be one of {START_MODES}")
        if start.from_stage is not None and start.from_stage not in seen:
            raise ConfigError(
                f"Recipe {name}, stage {entry['name']}: starts from '{start.from_stage}', "
                f"which is not an earlier stage ({sorted(seen) or 'none'})"
            )
        if start.mode == "convert" and start.from_stage and not start.converter:
            raise ConfigError(f"Recipe {name}, stage {entry['name']}: mode convert needs a converter")
        stage_prompt = entry.get("prompt", "base")
        if stage_prompt not in STAGE_PROMPTS:
            raise ConfigError(f"Recipe {name}, stage {entry['name']}: prompt must be one of {STAGE_PROMPTS} "
                              f"(the run's prompt or its edit prompt), got {stage_prompt!r}")
        unknown = sorted(set(entry) - {"name", "config", "cpu_profile", "start", "prompt", "with_subject", "uses"})
        if unknown:
            raise ConfigError(f"Recipe {name}, stage {entry['name']}: unknown keys {unknown}")
        uses = dict(entry.get("uses") or {})
        for key, source in uses.items():
            source_stage = str(source).split("/", 1)[0]
            if "/" not in str(source) or source_stage not in seen:
                raise ConfigError(f"Recipe {name}, stage {entry['name']}: uses {key}: {source!r}, which is not "
                                  f"'<earlier stage>/<path>' (earlier stages: {sorted(seen) or 'none'})")
        profile = entry.get("cpu_profile")
        stages.append(StageSpec(
            name=entry["name"],
            config=recipes_dir() / entry["config"],
            cpu_profile=recipes_dir() / profile if profile else None,
            start=start,
            prompt=stage_prompt,
            with_subject=bool(entry.get("with_subject", False)),
            uses={str(k): str(v) for k, v in uses.items()},
        ))
        seen.add(entry["name"])
    if not stages:
        raise ConfigError(f"Recipe {name} lists no stages")
    return Recipe(name=name, description=data.get("description", ""),
                  default_prompt=data.get("default_prompt", ""), stages=stages)


def slugify(prompt: str, max_len: int = 48) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return slug[:max_len].rstrip("-") or "prompt"


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_profile(profile: str) -> str:
    if profile not in ("auto", "cpu", "full"):
        raise ConfigError(f"profile must be auto, cpu or full, got '{profile}'")
    if profile == "auto":
        return "full" if cuda_available() else "cpu"
    return profile


def split_overrides(overrides: list[str], recipe: Recipe) -> dict[str | None, list[str]]:
    """Overrides by target: ``"coarse:trainer.max_steps=10"`` targets one stage (key "coarse"),
    a plain ``key=value`` every stage (key None). An unknown stage name is an error."""
    by_stage: dict[str | None, list[str]] = {None: []}
    for text in overrides:
        key = text.split("=", 1)[0]
        if ":" in key:
            stage_name, rest = text.split(":", 1)
            if stage_name not in recipe.stage_names:
                raise ConfigError(
                    f"Override '{text}' targets stage '{stage_name}', which recipe {recipe.name} does not "
                    f"have: its stages are {', '.join(recipe.stage_names)}.")
            by_stage.setdefault(stage_name, []).append(rest)
        else:
            by_stage[None].append(text)
    return by_stage


def compose_stage(
    spec: StageSpec, prompt: str, seed: int, overrides: list[str], profile: str, run_dir: Path,
    *, stage_dirs: dict[str, Path] | None = None, subject: str | None = None,
) -> dict:
    """The resolved config of one stage: stage file, CPU profile, prompt/seed, subject, the
    outputs of earlier stages it uses, overrides.

    ``prompt`` is this stage's (the run's, or its edit prompt: :meth:`RunSettings.prompt_for`).
    ``overrides`` are this stage's (already split by :func:`split_overrides`; a plain list
    may still hold ``stage:key=value`` entries for other stages, which are skipped).
    ``stage_dirs`` names the folders of earlier stages that are not ``run_dir / name`` (the
    stages a base run supplies); the stage starts from that folder's last checkpoint.
    ``subject`` is the run's subject folder, given to a ``with_subject`` stage as ``model.subject``.
    """
    config = with_default_classes(load_composed(spec.config))
    if profile == "cpu" and spec.cpu_profile is not None:
        config = deep_merge(config, with_init_args(load_composed(spec.cpu_profile)))
    config = deep_merge(config, {"seed": seed, "model": {"init_args": {"prompt": prompt}}})
    if spec.start.from_stage is not None:
        source_dir = (stage_dirs or {}).get(spec.start.from_stage, run_dir / spec.start.from_stage)
        source = source_dir / "checkpoints" / "last.ckpt"
        # The stage file (or its CPU profile) may set start.converter_args, e.g. a coarser
        # conversion grid on CPU; the recipe decides where the stage starts from.
        config["start"] = {**(config.get("start") or {}), "checkpoint": str(source),
                           "mode": spec.start.mode, "converter": spec.start.converter}
    if spec.with_subject and subject is not None:
        config = deep_merge(config, {"model": {"init_args": {"subject": subject}}})
    for key, source in spec.uses.items():
        source_stage, rest = source.split("/", 1)
        source_dir = (stage_dirs or {}).get(source_stage, run_dir / source_stage)
        apply_override(config, key.split("."), str(source_dir / rest))
    own = []
    for text in overrides:
        key = text.split("=", 1)[0]
        if ":" in key:
            stage_name, rest = text.split(":", 1)
            if stage_name == spec.name:
                own.append(rest)
        else:
            own.append(text)
    return apply_overrides(config, own)


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, as ``key: old -> new`` lines."""
    lines = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        name = f"{prefix}{key}".replace("init_args.", "")
        if isinstance(a, dict) and isinstance(b, dict):
            lines += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{name}: {a!r} -> {b!r}")
    return lines


def differences_summary(lines: list[str], overrides: list[str], limit: int = 8) -> str:
    """At most ``limit`` difference lines, those of keys the user overrode first (so a long
    list never hides the change the user just asked for), then how many were left out."""
    keys = [text.split("=", 1)[0].split(":", 1)[-1].replace("init_args.", "") for text in overrides]

    def named(line: str) -> bool:
        key = line.split(": ", 1)[0]
        return any(key == k or key.startswith(k + ".") for k in keys)

    ranked = [line for line in lines if named(line)] + [line for line in lines if not named(line)]
    shown = "; ".join(ranked[:limit])
    return shown if len(ranked) <= limit else f"{shown}; and {len(ranked) - limit} more"


def announce_cpu_profile(recipe: Recipe) -> None:
    names = [s.name for s in recipe.stages if s.cpu_profile is not None]
    print(
        "[magic3d] No CUDA GPU found: using the reduced CPU profile for "
        f"{', '.join(names) or 'no stage'} (smaller renders, grids and step counts; see the "
        "profiles/ files named by the recipe). Pass profile=full to run the paper settings.",
        flush=True,
    )


@dataclass
class RunSettings:
    """What a run was started with (``run.json``), so ``run=FOLDER`` alone continues it.

    ``edit``: the prompt of the recipe's ``prompt: edit`` stages; ``base``: the run folder that
    supplies its stages on the base prompt (None: they run in this folder); ``subject``: the
    folder of subject photos of the recipe's ``with_subject`` stages (absolute).
    """

    recipe: str
    prompt: str
    seed: int
    profile: str
    overrides: list[str] = field(default_factory=list)
    edit: str | None = None
    base: str | None = None
    subject: str | None = None

    def prompt_for(self, spec: StageSpec) -> str:
        """The prompt a stage runs on."""
        if spec.prompt == "edit":
            if not self.edit:
                raise ConfigError(f"Stage {spec.name} runs on the edit prompt, which this run has none of: "
                                  'pass edit="the edited prompt".')
            return self.edit
        return self.prompt

    @classmethod
    def load(cls, run_dir: Path) -> RunSettings | None:
        path = run_dir / RUN_SETTINGS
        if path.is_file():
            try:
                return cls(**json.loads(path.read_text()))
            except (json.JSONDecodeError, TypeError) as err:
                raise ConfigError(f"{path} is unreadable ({err}); it records how the run was started.") from None
        return cls._from_stage_configs(run_dir)

    @classmethod
    def _from_stage_configs(cls, run_dir: Path) -> RunSettings | None:
        """Runs started before run.json existed: prompt and seed from a stage's config.yaml."""
        configs = sorted(run_dir.glob("*/config.yaml"))
        if not configs:
            return None
        config = with_default_classes(load_yaml(configs[0]))
        prompt = config["model"].get("init_args", {}).get("prompt", "")
        return cls(recipe="", prompt=prompt, seed=int(config.get("seed", 0)), profile="", overrides=[])

    def save(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / f".{RUN_SETTINGS}.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n")
        tmp.replace(run_dir / RUN_SETTINGS)


def check_seed(seed: int) -> int:
    low, high = SEED_RANGE
    if not isinstance(seed, int) or isinstance(seed, bool) or not low <= seed <= high:
        raise ConfigError(f"seed={seed} is out of range: use an integer in [{low}, {high}].")
    return seed


def stage_has_started(stage_dir: Path) -> bool:
    """A stage has state worth keeping once it wrote a checkpoint or finished."""
    return (stage_dir / "DONE.json").is_file() or any((stage_dir / "checkpoints").glob("*.ckpt*"))


def resolve_settings(
    name: str | None, prompt: str | None, seed: int | None, overrides: list[str] | None,
    profile: str | None, run_dir: Path | None, edit: str | None = None, base: Path | str | None = None,
    subject: Path | str | None = None,
) -> tuple[RunSettings, RunSettings | None]:
    """The settings to run with, and the ones the existing run folder was started with.

    On a continue, anything not given comes from the run; anything given that differs is
    checked later against the stages that have already started. With a base run, the prompt
    (and the profile, unless given) default to the base run's.
    """
    stored = RunSettings.load(run_dir) if run_dir is not None and run_dir.is_dir() else None
    if stored is not None and stored.recipe and name is not None and name != stored.recipe:
        raise ConfigError(f"{run_dir} is a run of recipe {stored.recipe}, not {name}: "
                          f"continue it with recipe={stored.recipe} (or leave recipe out).")
    name = name or (stored.recipe if stored is not None and stored.recipe else None) or DEFAULT_RECIPE
    recipe = load_recipe(name)
    if edit is None and stored is not None:
        edit = stored.edit
    if base is None and stored is not None and stored.base:
        base = stored.base
    base = None if base is None else str(base)
    edit = check_edit(recipe, edit)
    if subject is None and stored is not None:
        subject = stored.subject
    # Photos are only needed while a stage that learns from them has not finished.
    photos_needed = run_dir is None or any(not (Path(run_dir) / name / "DONE.json").is_file()
                                           for name in recipe.subject_stage_names)
    subject = check_subject(recipe, subject, check_photos=photos_needed)
    if base is not None and (stored is None or stored.base != base or base_still_needed(recipe, run_dir)):
        base_settings = check_base_run(recipe, Path(base), run_dir)
        if prompt is None and stored is None:
            prompt = base_settings.prompt
        elif prompt is not None and prompt != base_settings.prompt:
            raise ConfigError(f"prompt={prompt!r} is not the base run's prompt {base_settings.prompt!r}: its stages "
                              "were made with that one. Leave prompt= out (it is taken from base=) or drop base=.")
        if profile is None and stored is None and base_settings.profile:
            profile = base_settings.profile  # the warm start needs the base run's scene sizes
    if prompt is None:
        prompt = stored.prompt if stored is not None else recipe.default_prompt
    if not prompt or not prompt.strip():
        raise ConfigError('The prompt is empty: pass prompt="a description of the object".')
    if seed is None:
        seed = stored.seed if stored is not None else 0
    if profile is None:
        profile = stored.profile if stored is not None and stored.profile else "auto"
    if overrides is None:
        overrides = list(stored.overrides) if stored is not None else []
    settings = RunSettings(recipe=name, prompt=prompt, seed=check_seed(seed), profile=resolve_profile(profile),
                           overrides=list(overrides), edit=edit, base=base, subject=subject)
    split_overrides(settings.overrides, recipe)  # an unknown stage prefix fails here
    return settings, stored


def check_edit(recipe: Recipe, edit: str | None) -> str | None:
    """The edit prompt, required by (and only by) a recipe with ``prompt: edit`` stages."""
    stages = recipe.edit_stage_names
    if edit is not None and not edit.strip():
        edit = None
    if stages and edit is None:
        raise ConfigError(f"Recipe {recipe.name} runs {', '.join(stages)} on an edited prompt: pass it with "
                          f'edit="..." (e.g. make recipe={recipe.name} prompt="a red cube" edit="a blue cube").')
    if edit is not None and not stages:
        raise ConfigError(f"Recipe {recipe.name} has no stage on an edited prompt (prompt: edit), so edit= has "
                          "nothing to do: drop it, or use a recipe that edits (e.g. recipe=edit).")
    return edit


def check_subject(recipe: Recipe, subject: Path | str | None, check_photos: bool = True) -> str | None:
    """The subject folder (absolute), required by (and only by) a recipe with ``with_subject``
    stages, and checked (2 or more readable photos) before anything runs."""
    from magic3d.dreambooth.subject import find_subject_images

    stages = recipe.subject_stage_names
    if subject is not None and not str(subject).strip():
        subject = None
    if stages and subject is None:
        raise ConfigError(f"Recipe {recipe.name} personalises its priors on photos of a subject ({', '.join(stages)}): "
                          f'pass them with subject=FOLDER (e.g. make recipe={recipe.name} subject=photos/ '
                          f'prompt="a sks duck").')
    if subject is not None and not stages:
        raise ConfigError(f"Recipe {recipe.name} has no stage that learns from subject images, so subject= has "
                          "nothing to do: drop it, or use a recipe that personalises (e.g. recipe=dreambooth).")
    if subject is None:
        return None
    if check_photos:
        find_subject_images(subject)
    return str(Path(subject).expanduser().resolve())


def base_stage_names(recipe: Recipe) -> list[str]:
    """Stages a base run supplies: every stage on the base prompt."""
    return [s.name for s in recipe.stages if s.prompt == "base"]


def base_still_needed(recipe: Recipe, run_dir: Path | None) -> bool:
    """Whether a stage that starts from the base run's stages has not started yet (so a
    continued run whose base run has since moved goes on from its own checkpoints)."""
    supplied = set(base_stage_names(recipe))
    return any(spec.start.from_stage in supplied and (run_dir is None or not stage_has_started(run_dir / spec.name))
               for spec in recipe.stages if spec.name not in supplied)


def check_base_run(recipe: Recipe, base: Path, run_dir: Path | None) -> RunSettings:
    """The base run's settings, once it is known to hold every stage it must supply, finished."""
    if not recipe.edit_stage_names:
        raise ConfigError(f"Recipe {recipe.name} has no stage on an edited prompt, so base= has nothing to start "
                          "from: drop it, or use a recipe that edits (e.g. recipe=edit).")
    if not base.is_dir():
        raise ConfigError(f"base={base} does not exist: pass the folder of a finished run (runs/<recipe>/<name>).")
    if (base / "config.yaml").is_file():
        raise ConfigError(f"base={base} is a stage folder: pass its run folder, base={base.parent}.")
    if run_dir is not None and base.resolve() == Path(run_dir).resolve():
        raise ConfigError(f"base={base} is the run folder itself: pass another run's folder, or drop base=.")
    for name in base_stage_names(recipe):
        stage_dir = base / name
        if not (stage_dir / "DONE.json").is_file() or not (stage_dir / "checkpoints" / "last.ckpt").is_file():
            state = "unfinished" if stage_dir.is_dir() else "missing"
            raise ConfigError(f"base={base} has no finished stage '{name}' ({state}): finish it first "
                              f"(make run={base}), or drop base= to run {name} here.")
    settings = RunSettings.load(base)
    if settings is None or not settings.prompt:
        raise ConfigError(f"base={base} records no prompt (no run.json, no stage config): it is not a run folder.")
    return settings


def settings_changed(settings: RunSettings, stored: RunSettings | None) -> bool:
    """Whether a continue asks for anything the run was not started with."""
    if stored is None:
        return True
    if not stored.recipe:  # a run from before run.json: only its prompt and seed are known
        return settings.prompt != stored.prompt or settings.seed != stored.seed or bool(settings.overrides)
    return asdict(settings) != asdict(stored)


def with_init_args(fragment: dict) -> dict:
    """A stage-file fragment whose ``model``/``data`` are bare init args, nested under
    ``init_args`` so it merges into whatever class the stage file names."""
    fragment = dict(fragment)
    for key in ("model", "data"):
        if isinstance(fragment.get(key), dict) and "class_path" not in fragment[key]:
            fragment[key] = {"init_args": fragment[key]}
    return fragment


def run_recipe(
    name: str | None = None,
    prompt: str | None = None,
    seed: int | None = None,
    overrides: list[str] | None = None,
    run_dir: Path | None = None,
    runs_root: Path = Path("runs"),
    profile: str | None = None,
    edit: str | None = None,
    base: Path | str | None = None,
    subject: Path | str | None = None,
) -> Path:
    """Run (or continue) every stage of a recipe; returns the run folder.

    Arguments left as None take the run folder's settings on a continue (``run.json``), or
    the defaults (recipe coarse_to_fine, its default prompt, seed 0, profile auto). ``edit`` is
    the prompt of the recipe's ``prompt: edit`` stages; ``base`` a run folder whose finished
    stages on the base prompt are used instead of running them here; ``subject`` the folder of
    subject photos of a personalising recipe (recipe dreambooth).
    """
    settings, stored = resolve_settings(name, prompt, seed, overrides, profile, run_dir, edit, base, subject)
    recipe = load_recipe(settings.recipe)
    if settings.profile == "cpu":
        announce_cpu_profile(recipe)
    if run_dir is None:
        title = settings.prompt if settings.edit is None else f"{settings.prompt} to {settings.edit}"
        run_dir = runs_root / recipe.name / f"{slugify(title)}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(run_dir)
    created_run_dir = not run_dir.exists()

    # Compose and validate every stage before running any, so a typo fails in seconds.
    from magic3d.stage import validate_stage_config

    # Stages a base run supplies are read from there: never composed, run or written here.
    supplied = {name: Path(settings.base) / name for name in base_stage_names(recipe)} if settings.base else {}
    resolved = {}
    for spec in recipe.stages:
        if spec.name in supplied:
            continue
        stage_dir = run_dir / spec.name
        config = compose_stage(spec, settings.prompt_for(spec), settings.seed, settings.overrides, settings.profile,
                               run_dir, stage_dirs=supplied, subject=settings.subject)
        existing = stage_dir / "config.yaml"
        if existing.is_file():
            previous = with_default_classes(load_yaml(existing))
            if previous != config:
                if not settings_changed(settings, stored):
                    config = previous  # e.g. recipe files edited since: keep what the run started with
                elif stage_has_started(stage_dir):
                    changes = differences_summary(config_differences(previous, config), settings.overrides)
                    raise ConfigError(
                        f"Stage {spec.name} of {run_dir} has already started with other settings, which a "
                        f"continue cannot change ({changes}). Continue with run={run_dir} alone, or start "
                        "a new run folder.")
        validate_stage_config(config, where=f"{recipe.name}/{spec.name}")
        resolved[spec.name] = config

    settings.save(run_dir)
    print(f"[magic3d] run folder: {run_dir}", flush=True)
    for spec in recipe.stages:
        stage_dir = run_dir / spec.name
        if spec.name in supplied:
            print(f"[magic3d] stage {spec.name}: taken from the base run ({supplied[spec.name]})", flush=True)
            continue
        if (stage_dir / "DONE.json").is_file():
            print(f"[magic3d] stage {spec.name}: already finished, skipping", flush=True)
            continue
        config_path = stage_dir / "config.yaml"
        dump_yaml(resolved[spec.name], config_path)
        print(f"[magic3d] stage {spec.name}: starting ({stage_dir})", flush=True)
        cmd = [sys.executable, "-m", "magic3d", "stage", "--config", str(config_path),
               "--stage-dir", str(stage_dir)]
        result = run_child(cmd)
        if result.signal_name is not None or result.returncode in (130, 143):
            name = result.signal_name or ("SIGINT" if result.returncode == 130 else "SIGTERM")
            raise StageInterrupted(spec.name, stage_dir, name, finished=(stage_dir / "DONE.json").is_file(),
                                   last=spec is recipe.stages[-1])
        if result.returncode != 0:
            kept = stage_has_started(stage_dir)
            if not kept:
                discard_unstarted_stage(stage_dir, run_dir if created_run_dir else None)
            raise StageFailed(spec.name, stage_dir, result.returncode, kept)
    return run_dir


def discard_unstarted_stage(stage_dir: Path, created_run_dir: Path | None) -> None:
    """A stage that failed before its first checkpoint leaves nothing to continue: remove its
    folder (config, logs of the failed attempt), and the run folder if this command made it
    and nothing else is in it, so the corrected command starts clean."""
    import shutil

    if stage_dir.is_dir() and not stage_has_started(stage_dir):
        shutil.rmtree(stage_dir)
    if created_run_dir is not None and created_run_dir.is_dir():
        left = [p for p in created_run_dir.iterdir() if p.name != RUN_SETTINGS]
        if not left:
            shutil.rmtree(created_run_dir)


class StageInterrupted(RuntimeError):
    """A stage stopped by SIGINT/SIGTERM at a step boundary, with last.ckpt saved; or, when the
    signal came after the stage had written DONE.json (while it closed its files), a finished
    stage, which the message must not call stopped."""

    def __init__(self, stage: str, stage_dir: Path, signal_name: str, finished: bool = False,
                 last: bool = False) -> None:
        if not finished:
            message = (f"{signal_name}: stage '{stage}' stopped at a step boundary; its last.ckpt is kept in "
                       f"{stage_dir / 'checkpoints'}. Continue with `make run={stage_dir.parent}`.")
        elif last:
            message = (f"{signal_name} arrived after the last stage '{stage}' had finished: the run in "
                       f"{stage_dir.parent} is complete.")
        else:
            message = (f"{signal_name} arrived after stage '{stage}' had finished (nothing of it is lost); the "
                       f"later stages did not start. Continue with `make run={stage_dir.parent}`.")
        super().__init__(message)
        self.code = 128 + signal.Signals[signal_name].value


class StageFailed(RuntimeError):
    def __init__(self, stage: str, stage_dir: Path, code: int, kept: bool = True) -> None:
        if kept:
            message = (f"Stage '{stage}' failed (exit code {code}). Its checkpoints are kept in "
                       f"{stage_dir / 'checkpoints'}; continue with `make run={stage_dir.parent}` "
                       f"(python -m magic3d run --run {stage_dir.parent}).")
        else:
            message = (f"Stage '{stage}' failed before its first checkpoint (exit code {code}); nothing of it "
                       "was kept. Fix the problem reported above and run the command again.")
        super().__init__(message)
        self.code = code
