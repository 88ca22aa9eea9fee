"""What an ablation runs: variants (a recipe plus overrides) x prompts x seeds.

A spec file (``ablations/*.yaml``)::

    name: paper                 # optional: the file's stem; names runs/ablations/<name>/
    baseline: coarse_to_fine    # the variant every other is compared with (default: the first)
    prompts: toy12.txt          # a file next to this one (one prompt a line), or a list
    seeds: 1                    # N: seeds 0..N-1; or a list of seeds
    overrides: []               # key=value for every variant (before the variant's own)
    profile: auto               # auto | cpu | full, as `make profile=`
    eval: {views: 16}           # magic3d.eval.options.EvalOptions fields
    variants:
      - coarse_only                               # a recipe as it is
      - name: coarse_to_fine+perpneg              # a recipe with overrides
        recipe: coarse_to_fine
        overrides: [model.guidance.perp_neg=true]

:func:`resolve_spec` combines a spec file, command-line values and what a stored ablation of
the same name was started with; :func:`check_spec` proves every variant composes before any
run starts.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from magic3d.config import ConfigError, load_yaml
from magic3d.eval.options import EvalOptions

# Variant and ablation names become folder names and W&B group names: keep them portable.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
DEFAULT_SPEC = "paper.yaml"
DEFAULT_PROMPTS = "toy12.txt"


def ablations_dir() -> Path:
    """Where the shipped spec and prompt files live (``MAGIC3D_ABLATIONS`` overrides it)."""
    override = os.environ.get("MAGIC3D_ABLATIONS")
    return Path(override) if override else Path(__file__).resolve().parents[3] / "ablations"


@dataclass(frozen=True)
class Variant:
    """One arm of the comparison: ``recipe`` run with ``overrides`` (``stage:key=value`` allowed)."""

    name: str
    recipe: str
    overrides: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "recipe": self.recipe, "overrides": list(self.overrides)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Variant:
        return cls(str(data["name"]), str(data["recipe"]), tuple(str(o) for o in data.get("overrides") or ()))


@dataclass
class AblationSpec:
    name: str
    variants: list[Variant]
    baseline: str
    prompts: list[str]
    seeds: list[int]
    overrides: list[str] = field(default_factory=list)  # every variant's, before its own
    profile: str | None = None  # None: auto (the recipe runner decides)
    eval_options: EvalOptions = field(default_factory=EvalOptions)

    def variant(self, name: str) -> Variant:
        for variant in self.variants:
            if variant.name == name:
                return variant
        raise KeyError(name)

    def eval_json(self) -> dict[str, Any]:
        return asdict(self.eval_options)


def check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ConfigError(f"{what} {name!r} is not a usable name: use letters, digits and _ . + - "
                          "(it names a folder), e.g. coarse_to_fine+perpneg.")
    return name


def read_prompts(path: Path) -> list[str]:
    """One prompt a line; blank lines and lines starting with ``#`` are skipped."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Prompt file not found: {path} (one prompt a line, e.g. ablations/{DEFAULT_PROMPTS}).")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ConfigError(f"Prompt file {path} holds no prompt (one a line; # starts a comment).")
    return prompts


def check_prompts(prompts: list[str]) -> list[str]:
    """Distinct prompts whose folder names (slugs) differ too."""
    from magic3d.recipe import slugify

    seen: dict[str, str] = {}
    for prompt in prompts:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(f"Prompt {prompt!r} is empty: every prompt must describe an object.")
        slug = slugify(prompt)
        if slug in seen:
            raise ConfigError(f"Prompts {seen[slug]!r} and {prompt!r} share the folder name {slug!r}: "
                              "list each prompt once, worded apart.")
        seen[slug] = prompt
    return list(prompts)


def seed_list(seeds: int | list[int]) -> list[int]:
    """``N`` -> seeds 0..N-1; a list is kept (each checked, no repeats)."""
    from magic3d.recipe import check_seed

    if isinstance(seeds, bool) or not isinstance(seeds, (int, list, tuple)):
        raise ConfigError(f"seeds={seeds!r}: give a count N (seeds 0..N-1) or a list of seeds.")
    if isinstance(seeds, int):
        if seeds < 1:
            raise ConfigError(f"seeds={seeds} must be at least 1 (the number of seeds per prompt).")
        return list(range(seeds))
    values = [check_seed(s) for s in seeds]
    if not values or len(set(values)) != len(values):
        raise ConfigError(f"seeds={list(seeds)} must be a non-empty list without repeats.")
    return values


def parse_variants(entries: Any, where: str) -> list[Variant]:
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where}: 'variants' must be a non-empty list (recipe names or name/recipe/overrides).")
    variants = []
    for entry in entries:
        if isinstance(entry, str):
            variants.append(Variant(check_name(entry, "Variant"), entry))
            continue
        if not isinstance(entry, dict) or "recipe" not in entry:
            raise ConfigError(f"{where}: variant {entry!r} needs at least 'recipe' (and 'name', 'overrides').")
        unknown = set(entry) - {"name", "recipe", "overrides"}
        if unknown:
            raise ConfigError(f"{where}: variant {entry.get('name', entry['recipe'])!r} has unknown keys "
                              f"{sorted(unknown)} (allowed: name, recipe, overrides).")
        overrides = entry.get("overrides") or []
        if isinstance(overrides, str) or not all(isinstance(o, str) for o in overrides):
            raise ConfigError(f"{where}: overrides of variant {entry.get('name', entry['recipe'])!r} must be a "
                              "list of key=value strings.")
        name = check_name(str(entry.get("name", entry["recipe"])), "Variant")
        variants.append(Variant(name, str(entry["recipe"]), tuple(overrides)))
    return variants


@dataclass
class SpecFile:
    """A spec file as written: every field optional."""

    path: Path
    name: str | None = None
    variants: list[Variant] | None = None
    baseline: str | None = None
    prompts: list[str] | None = None
    seeds: list[int] | None = None
    overrides: list[str] | None = None
    profile: str | None = None
    eval_options: EvalOptions | None = None


SPEC_KEYS = {"name", "description", "baseline", "prompts", "seeds", "overrides", "profile", "eval", "variants"}


def load_spec_file(path: Path) -> SpecFile:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Ablation spec not found: {path} (see ablations/{DEFAULT_SPEC} for the format).")
    data = load_yaml(path)
    unknown = set(data) - SPEC_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)} (allowed: {', '.join(sorted(SPEC_KEYS))}).")
    spec = SpecFile(path=path)
    spec.name = check_name(str(data["name"]), "Ablation name") if "name" in data else check_name(path.stem, "Ablation name")
    if "variants" in data:
        spec.variants = parse_variants(data["variants"], str(path))
    if "baseline" in data:
        spec.baseline = str(data["baseline"])
    prompts = data.get("prompts")
    if isinstance(prompts, str):
        spec.prompts = read_prompts(path.parent / prompts)
    elif isinstance(prompts, list):
        spec.prompts = [str(p) for p in prompts]
    elif prompts is not None:
        raise ConfigError(f"{path}: 'prompts' must name a prompt file or list prompts.")
    if "seeds" in data:
        spec.seeds = seed_list(data["seeds"])
    if "overrides" in data:
        overrides = data["overrides"] or []
        if isinstance(overrides, str) or not all(isinstance(o, str) for o in overrides):
            raise ConfigError(f"{path}: 'overrides' must be a list of key=value strings.")
        spec.overrides = list(overrides)
    spec.profile = data.get("profile")
    if "eval" in data:
        spec.eval_options = eval_options(data["eval"] or {}, str(path))
    return spec


def eval_options(data: dict[str, Any], where: str) -> EvalOptions:
    try:
        return EvalOptions(**data)
    except TypeError as err:
        raise ConfigError(f"{where}: 'eval' takes EvalOptions fields (views, iou_size, ...): {err}") from None
    except ValueError as err:
        raise ConfigError(f"{where}: eval: {err}") from None


def resolve_spec(
    name: str | None = None,
    variants_file: Path | None = None,
    recipes: list[str] | None = None,
    prompts_file: Path | None = None,
    seeds: int | None = None,
    baseline: str | None = None,
    overrides: list[str] | None = None,
    profile: str | None = None,
    stored_for: Callable[[str], AblationSpec | None] | None = None,
) -> AblationSpec:
    """The ablation to run, from (in order of precedence) the command line, a spec file, the
    stored ablation of the same name (a continue), and the defaults (``ablations/paper.yaml``
    with ``ablations/toy12.txt``, one seed).

    ``stored_for(name)`` returns the spec a stored ablation of that name was run with, or None
    (:func:`magic3d.ablation.runner.stored_spec`): with no variants given, it is continued.
    """
    file = load_spec_file(variants_file) if variants_file is not None else None
    if name is None:
        if file is not None:
            name = file.name
        elif recipes:
            name = "_vs_".join(recipes)
        else:
            name = Path(DEFAULT_SPEC).stem
    check_name(name, "Ablation name")
    stored = stored_for(name) if stored_for is not None else None
    if file is None and not recipes and stored is None:
        file = load_spec_file(ablations_dir() / DEFAULT_SPEC)

    variant_list = list(file.variants or []) if file is not None else []
    for recipe in recipes or []:
        if recipe not in {v.name for v in variant_list}:
            variant_list.append(Variant(check_name(recipe, "Recipe"), recipe))
    if not variant_list:
        if stored is None:
            raise ConfigError("No variants: pass recipes=\"a b\" or variants=FILE (see ablations/paper.yaml).")
        variant_list = list(stored.variants)
    names = [v.name for v in variant_list]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"Variant names repeat: {', '.join(duplicates)}; give each variant its own name.")

    if prompts_file is not None:
        prompt_list = read_prompts(prompts_file)
    elif file is not None and file.prompts is not None:
        prompt_list = file.prompts
    elif stored is not None:
        prompt_list = list(stored.prompts)
    else:
        prompt_list = read_prompts(ablations_dir() / DEFAULT_PROMPTS)

    if seeds is not None:
        seed_values = seed_list(seeds)
    elif file is not None and file.seeds is not None:
        seed_values = file.seeds
    elif stored is not None:
        seed_values = list(stored.seeds)
    else:
        seed_values = [0]

    chosen_baseline = baseline or (file.baseline if file is not None else None) \
        or (stored.baseline if stored is not None and stored.baseline in names else None) or names[0]
    if chosen_baseline not in names:
        raise ConfigError(f"Baseline {chosen_baseline!r} is not a variant of this ablation ({', '.join(names)}).")

    common = list(file.overrides or []) if file is not None else []
    if overrides:
        common += list(overrides)
    elif file is None and stored is not None:
        common = list(stored.overrides)
    chosen_profile = profile or (file.profile if file is not None else None) \
        or (stored.profile if stored is not None else None)
    if file is not None and file.eval_options is not None:
        options = file.eval_options
    elif stored is not None:
        options = stored.eval_options
    else:
        options = EvalOptions()
    return AblationSpec(name=name, variants=variant_list, baseline=chosen_baseline,
                        prompts=check_prompts(prompt_list), seeds=seed_values, overrides=common,
                        profile=chosen_profile, eval_options=options)


def check_spec(spec: AblationSpec) -> None:
    """Every variant's recipe exists and its stages compose and parse with its overrides
    (first prompt, first seed): a typo fails here, in one line, before any run starts."""
    from magic3d.recipe import available_recipes, compose_stage, load_recipe, resolve_profile, split_overrides
    from magic3d.stage import validate_stage_config

    known = available_recipes()
    for variant in spec.variants:
        if variant.recipe not in known:
            raise ConfigError(f"Variant {variant.name}: unknown recipe '{variant.recipe}' "
                              f"(recipes: {', '.join(known)}).")
    profile = resolve_profile(spec.profile or "auto")
    for variant in spec.variants:
        recipe = load_recipe(variant.recipe)
        overrides = [*spec.overrides, *variant.overrides]
        try:
            split_overrides(overrides, recipe)
            for stage in recipe.stages:
                config = compose_stage(stage, spec.prompts[0], spec.seeds[0], overrides, profile, Path("unused"))
                validate_stage_config(config, where=f"{variant.recipe}/{stage.name}")
        except ConfigError as err:
            raise ConfigError(f"Variant {variant.name}: {err}") from None
