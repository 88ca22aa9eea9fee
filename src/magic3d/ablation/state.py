"""The ablation's state file, ``runs/ablations/<name>/ablation.json``: the spec it runs and one
record per variant x prompt x seed, rewritten atomically after every change so that an
interrupted ablation continues where it stopped.

A run's ``status``:
  pending      not started;
  running      its run folder is recorded and training is under way (or the process was killed);
  interrupted  stopped by Ctrl-C / SIGTERM with its last checkpoint kept;
  trained      every stage finished, evaluation not yet done;
  done         trained and evaluated (``metrics`` filled);
  failed       training or evaluation failed (``error``: one line); retried on the next call.
Anything but ``done`` is picked up again by the next call, from its recorded run folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from magic3d.ablation.spec import AblationSpec, Variant, eval_options
from magic3d.config import ConfigError

STATE_FILE = "ablation.json"
STATE_VERSION = 1
STATUSES = ("pending", "running", "interrupted", "trained", "done", "failed")


@dataclass
class RunRecord:
    variant: str
    recipe: str
    prompt: str
    seed: int
    run_dir: str | None = None  # relative to the ablation folder
    status: str = "pending"
    error: str | None = None
    wall_s: float = 0.0  # training wall time over every attempt
    gpu_minutes: float = 0.0  # wall time x GPUs the run's stages were given (0 on CPU)
    metrics: dict[str, dict[str, float | None]] = field(default_factory=dict)  # stage -> metric -> value
    final_stage: str | None = None  # the stage whose metrics stand for the variant
    views: str | None = None  # relative path of the final stage's orbit strip (contact sheets)
    ground_truth: str | None = None  # relative path of the toy world's strip at the same cameras

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.variant, self.prompt, self.seed)

    def final_metrics(self) -> dict[str, float | None]:
        return dict(self.metrics.get(self.final_stage or "", {}))


@dataclass
class AblationState:
    spec: AblationSpec
    runs: list[RunRecord]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "name": self.spec.name,
            "baseline": self.spec.baseline,
            "variants": [v.to_json() for v in self.spec.variants],
            "prompts": list(self.spec.prompts),
            "seeds": list(self.spec.seeds),
            "overrides": list(self.spec.overrides),
            "profile": self.spec.profile,
            "eval": self.spec.eval_json(),
            "runs": [asdict(r) for r in self.runs],
        }

    def save(self, folder: Path) -> Path:
        """Write ``ablation.json`` atomically (a reader never sees half a file)."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / STATE_FILE
        tmp = folder / f".{STATE_FILE}.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, folder: Path) -> AblationState | None:
        path = Path(folder) / STATE_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            spec = AblationSpec(
                name=data["name"], variants=[Variant.from_json(v) for v in data["variants"]],
                baseline=data["baseline"], prompts=list(data["prompts"]), seeds=[int(s) for s in data["seeds"]],
                overrides=list(data.get("overrides") or []), profile=data.get("profile"),
                eval_options=eval_options(data.get("eval") or {}, str(path)),
            )
            runs = [RunRecord(**r) for r in data["runs"]]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ConfigError(f"{path} is unreadable ({type(err).__name__}: {err}); it records the ablation's "
                              "runs: restore it, or use another name=.") from None
        return cls(spec, runs)

    def record(self, variant: str, prompt: str, seed: int) -> RunRecord:
        for record in self.runs:
            if record.key == (variant, prompt, seed):
                return record
        raise KeyError((variant, prompt, seed))

    def selected(self, spec: AblationSpec) -> list[RunRecord]:
        """The records of ``spec``'s set, prompt by prompt (so paired comparisons fill in early)."""
        return [self.record(v.name, p, s) for p in spec.prompts for s in spec.seeds for v in spec.variants]


def merge_state(stored: AblationState | None, spec: AblationSpec) -> AblationState:
    """The state to run ``spec`` with: the stored one extended by what ``spec`` adds (variants,
    prompts, seeds), so nothing already run is lost. A variant of a stored name that now means
    another recipe or other overrides, or other settings shared by every run, is refused: its
    finished runs would be compared with runs of something else."""
    if stored is None:
        state = AblationState(spec, [])
    else:
        old = stored.spec
        started = any(r.status != "pending" for r in stored.runs)
        for variant in spec.variants:
            previous = next((v for v in old.variants if v.name == variant.name), None)
            if previous is not None and previous != variant and started:
                raise ConfigError(
                    f"Ablation {spec.name}: variant {variant.name} was run as recipe {previous.recipe} with "
                    f"overrides {list(previous.overrides)}, now asked as {variant.recipe} with "
                    f"{list(variant.overrides)}; give the new variant another name, or use another name=.")
        for label, then, now in (("overrides", old.overrides, spec.overrides), ("profile", old.profile, spec.profile),
                                 ("eval options", old.eval_json(), spec.eval_json())):
            if then != now and started:
                raise ConfigError(
                    f"Ablation {spec.name} was run with {label} {then!r}, now asked with {now!r}: runs made "
                    "otherwise would be compared with its finished ones; use another name= for new settings.")
        variants = list(old.variants) + [v for v in spec.variants if v.name not in {o.name for o in old.variants}]
        variants = [spec.variant(v.name) if v.name in {s.name for s in spec.variants} else v for v in variants]
        merged = AblationSpec(
            name=spec.name, variants=variants, baseline=spec.baseline,
            prompts=list(old.prompts) + [p for p in spec.prompts if p not in old.prompts],
            seeds=list(old.seeds) + [s for s in spec.seeds if s not in old.seeds],
            overrides=list(spec.overrides), profile=spec.profile, eval_options=spec.eval_options,
        )
        state = AblationState(merged, list(stored.runs))
        for record in state.runs:  # a not-yet-started variant may have been redefined
            if record.status == "pending":
                record.recipe = merged.variant(record.variant).recipe
    existing = {r.key for r in state.runs}
    for prompt in spec.prompts:
        for seed in spec.seeds:
            for variant in spec.variants:
                if (variant.name, prompt, seed) not in existing:
                    state.runs.append(RunRecord(variant.name, variant.recipe, prompt, seed))
    return state
