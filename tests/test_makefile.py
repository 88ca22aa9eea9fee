"""`make` hands the user's values to ``python -m magic3d`` byte for byte, and only those given.

``PY`` is replaced by a fake interpreter that records its argv as JSON, and ``SETUP_STAMP`` by a
fresh file so that setup does not run: what is checked is the exact argv make produced.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")

# What a user might type; each must arrive unchanged (no make or shell expansion). PWNED stands
# for a file in the test's folder that a command run by mistake would create.
PROMPTS = [
    'a "red" cube',
    "a cube's shadow",
    "a $HOME cube",
    "a $$ cube",
    "a `touch PWNED` cube",
    "a $(touch PWNED) cube",
    "a $(shell touch PWNED) cube",  # make's own command function
    "a 12\" cube",
    "two\nlines",
    "a trailing backslash\\",
    "ein Würfel — 立方体",
    "a # hash, a comma; a (paren & a | pipe > file",
    "quote ' and \" and \\' mixed",
]


def _make(tmp_path: Path, *assignments: str, target: str = "run") -> list[str]:
    out = tmp_path / "argv.json"
    fake = tmp_path / "fake-python"
    fake.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    "with open(os.environ['ARGV_OUT'], 'w', encoding='utf-8') as f:\n"
                    "    json.dump(sys.argv[1:], f)\n")
    fake.chmod(0o755)
    stamp = tmp_path / "setup-stamp"
    stamp.touch()  # newer than pyproject.toml and scripts/setup.sh: setup is not run
    env = {k: v for k, v in os.environ.items()
           if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "recipe", "prompt", "run", "seed", "profile",
                        "gpus", "overrides", "edit", "base", "subject"}}
    env["ARGV_OUT"] = str(out)
    result = subprocess.run(["make", "-s", "-C", str(ROOT), target, f"PY={fake}", f"SETUP_STAMP={stamp}",
                             *assignments],
                            check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "PWNED").exists(), "a value ran a command"
    return json.loads(out.read_text(encoding="utf-8"))


@pytest.mark.parametrize("prompt", PROMPTS)
def test_prompt_reaches_the_program_unchanged(tmp_path: Path, prompt: str) -> None:
    prompt = prompt.replace("PWNED", str(tmp_path / "PWNED"))
    assert _make(tmp_path, f"prompt={prompt}") == ["-m", "magic3d", "run", "coarse_to_fine", "--prompt", prompt]


def test_nothing_given_runs_the_default_recipe_with_the_cli_defaults(tmp_path: Path) -> None:
    assert _make(tmp_path) == ["-m", "magic3d", "run", "coarse_to_fine"]


def test_run_folder_alone_passes_no_recipe_prompt_or_seed(tmp_path: Path) -> None:
    folder = "runs/coarse_only/a $HOME 'cube'"
    assert _make(tmp_path, f"run={folder}") == ["-m", "magic3d", "run", "--run", folder]


def test_every_option_given_is_passed_verbatim(tmp_path: Path) -> None:
    argv = _make(tmp_path, "recipe=coarse_only", "prompt=a cube", "seed=0", "profile=cpu", "run=runs/x y",
                 "gpus=2", "overrides=trainer.max_steps=5  coarse:model.x=$HOME\tc='d'")
    assert argv == ["-m", "magic3d", "run", "coarse_only", "--prompt", "a cube", "--seed", "0", "--profile", "cpu",
                    "--run", "runs/x y", "trainer.devices=2", "trainer.strategy=ddp",
                    "trainer.max_steps=5", "coarse:model.x=$HOME", "c='d'"]


def test_edit_prompt_and_base_run_are_passed_verbatim(tmp_path: Path) -> None:
    edit = "a `touch PWNED` blue $HOME cube".replace("PWNED", str(tmp_path / "PWNED"))
    argv = _make(tmp_path, "recipe=edit", "prompt=a red cube", f"edit={edit}", "base=runs/coarse_only/a 'x'")
    assert argv == ["-m", "magic3d", "run", "edit", "--prompt", "a red cube", "--edit", edit,
                    "--base", "runs/coarse_only/a 'x'"]


def test_one_gpu_needs_no_ddp(tmp_path: Path) -> None:
    assert _make(tmp_path, "gpus=1") == ["-m", "magic3d", "run", "coarse_to_fine", "trainer.devices=1"]


def test_eval_run_folder_is_passed_verbatim(tmp_path: Path) -> None:
    folder = "runs/a `x` $HOME"
    assert _make(tmp_path, f"run={folder}", target="eval") == ["-m", "magic3d.eval", "run", folder]


def test_view_run_folder_is_passed_verbatim(tmp_path: Path) -> None:
    folder = "runs/a `x` $HOME"
    assert _make(tmp_path, f"run={folder}", target="view") == ["-m", "magic3d", "view", folder]


def test_mutate_runs_the_mutation_tool_without_arguments(tmp_path: Path) -> None:
    assert _make(tmp_path, target="mutate") == ["scripts/mutate.py"]


def test_help_lists_targets_and_recipes() -> None:
    result = subprocess.run(["make", "-s", "-C", str(ROOT), "help"], check=False, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0] == "Targets:"
    assert any(line.startswith("  run          Run a recipe: make recipe=NAME prompt=") for line in lines)
    assert "Recipes (make recipe=NAME):" in lines
    assert any(line.startswith("  coarse_to_fine ") for line in lines)


# --- ablation (issue 11) ---
def test_ablation_with_nothing_given_runs_the_paper_set(tmp_path: Path) -> None:
    assert _make(tmp_path, target="ablation") == ["-m", "magic3d", "ablation"]


def test_ablation_options_are_passed_verbatim(tmp_path: Path) -> None:
    argv = _make(tmp_path, "name=my study", "recipes=coarse_only coarse_to_fine", "prompts=p $HOME.txt", "seeds=3",
                 "variants=ablations/x.yaml", "baseline=coarse_to_fine", "profile=cpu",
                 "overrides=trainer.max_steps=5 fine:data.width=32", target="ablation")
    assert argv == ["-m", "magic3d", "ablation", "--name", "my study", "--recipes", "coarse_only coarse_to_fine",
                    "--variants", "ablations/x.yaml", "--prompts", "p $HOME.txt", "--seeds", "3",
                    "--baseline", "coarse_to_fine", "--profile", "cpu", "trainer.max_steps=5", "fine:data.width=32"]
# --- end ablation ---


def test_subject_folder_is_passed_verbatim(tmp_path: Path) -> None:
    folder = "photos of my $HOME 'duck'/"
    argv = _make(tmp_path, "recipe=dreambooth", "prompt=a sks duck", f"subject={folder}")
    assert argv == ["-m", "magic3d", "run", "dreambooth", "--prompt", "a sks duck", "--subject", folder]
