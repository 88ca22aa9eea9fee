"""The faults a new user hit (issue 9), each through the command line as the user met it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import run_cli, run_in_process, run_main, stages_in_this_process

pytestmark = pytest.mark.slow

FAST = ("trainer.max_steps=4", "data.steps_per_epoch=4", "run.checkpoint_every=2", "run.video_views=2",
        "model.preview_every=0", "trainer.log_every_n_steps=1")


def coarse(run_dir: Path, pipeline: Path, *extra: str, prompt: str | None = "a blue torus",
           capfd: pytest.CaptureFixture[str] | None = None, in_process: bool = False):
    """The coarse recipe through the command line; with ``capfd`` or ``in_process``, the same
    command in-process (its stage still a process of its own)."""
    args = ["run", "coarse_only", "--run", str(run_dir)]
    if prompt is not None:
        args += ["--prompt", prompt]
    args += [f"model.guidance.pretrained={pipeline}", *FAST, *extra]
    if capfd is not None:
        return run_main(capfd, *args)
    return run_in_process(*args) if in_process else run_cli(*args)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, tiny_pixel_pipeline: Path) -> Path:
    """One finished coarse run (4 steps, checkpoints at 2 and 4); tests work on copies."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    # In-process, its stage too (conftest stages_in_this_process): the faults below are met through
    # the command line and stage processes; this run is their material.
    with pytest.MonkeyPatch.context() as patch:
        stages_in_this_process(patch)
        result = coarse(run_dir, tiny_pixel_pipeline, in_process=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    """A copy (hard links become separate files: last.ckpt and step000004.ckpt no longer share one)."""
    import shutil

    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def one_line_error(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(lines) <= 2, result.stderr[-2000:]
    return result.stderr


def test_a_scribbled_checkpoint_is_skipped_for_the_previous_good_one(
        finished_run: Path, tmp_path: Path, tiny_pixel_pipeline: Path, capfd: pytest.CaptureFixture[str]) -> None:
    run_dir = copy_of(finished_run, tmp_path)
    ckpt_dir = run_dir / "coarse" / "checkpoints"
    (run_dir / "coarse" / "DONE.json").unlink()  # pretend the stage stopped after its last save
    # 4 KB of garbage in the middle of the two newest files, sizes unchanged.
    for damaged in (ckpt_dir / "last.ckpt", ckpt_dir / "step000004.ckpt"):
        size = damaged.stat().st_size
        with open(damaged, "r+b") as handle:
            handle.seek(size // 2)
            handle.write(os.urandom(4096))
    again = coarse(run_dir, tiny_pixel_pipeline, capfd=capfd)  # in-process runner, the stage a process
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "corrupt" in again.stdout and "step000002.ckpt" in again.stdout, again.stdout[-2000:]
    assert json.loads((run_dir / "coarse" / "DONE.json").read_text())["steps"] == 4
    names = {p.name for p in ckpt_dir.iterdir()}
    assert {"last.ckpt.corrupt", "step000004.ckpt.corrupt"} <= names, "damaged files are kept under another name"
    assert not [n for n in names if "-v" in n], f"no versioned copies: {sorted(names)}"
    assert len([n for n in names if n.endswith(".ckpt")]) <= 3, "last + keep_checkpoints (2)"


def test_run_folder_alone_continues_and_new_overrides_are_listed(finished_run: Path, tmp_path: Path,
                                                                 capfd: pytest.CaptureFixture[str]) -> None:
    run_dir = copy_of(finished_run, tmp_path)
    settings = json.loads((run_dir / "run.json").read_text())
    assert settings["prompt"] == "a blue torus" and settings["recipe"] == "coarse_only"

    alone = run_cli("run", "--run", str(run_dir))  # no recipe, no prompt, no overrides
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert "already finished" in alone.stdout

    changed = run_main(capfd, "run", "--run", str(run_dir), "trainer.max_steps=8")  # the refusal: in-process
    assert changed.returncode == 2
    assert "trainer.max_steps: 4 -> 8" in one_line_error(changed)


def test_an_unknown_stage_prefix_lists_the_stages(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    result = run_main(capfd, "run", "coarse_to_fine", "--run", str(tmp_path / "r"), "coarsee:trainer.max_stepz=5")
    assert result.returncode == 2
    err = one_line_error(result)
    assert "coarsee" in err and "coarse, fine" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(("argument", "key", "rule"), [
    (("--seed", "-1"), "seed=-1", "[0, 4294967295]"),
    (("data.batch_size=0",), "data.batch_size=0", "> 0"),
])
def test_out_of_range_values_get_one_line(tmp_path: Path, argument: tuple[str, ...], key: str, rule: str,
                                          capfd: pytest.CaptureFixture[str]) -> None:
    result = run_main(capfd, "run", "coarse_only", "--run", str(tmp_path / "r"), *argument)
    assert result.returncode == 2
    err = one_line_error(result)
    assert key in err and rule in err and "out of range" in err
    assert not (tmp_path / "r").exists()


def test_an_error_before_the_first_step_leaves_no_folder_and_the_fix_reuses_it(
        tmp_path: Path, tiny_pixel_pipeline: Path, capfd: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "run"
    missing = coarse(run_dir, tmp_path / "no_weights_here")  # the command line path of missing weights
    assert missing.returncode != 0
    assert "no_weights_here" in missing.stderr
    assert "checkpoints are kept" not in missing.stderr and "nothing of it was kept" in missing.stderr
    assert not run_dir.exists(), "nothing was trained, so nothing is left behind"
    stages_in_this_process(monkeypatch)  # the failure above was the stage process's; the fix is the runner's
    fixed = coarse(run_dir, tiny_pixel_pipeline, capfd=capfd)  # the corrected command, same folder (in-process)
    assert fixed.returncode == 0, fixed.stderr[-2000:]


def test_export_takes_a_run_folder(finished_run: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    run_dir = copy_of(finished_run, tmp_path)
    # In-process: test_coarse_to_fine exports through the command line.
    result = run_main(capfd, "export", str(run_dir), "--texture-resolution", "32", "--mesh-resolution", "24")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (run_dir / "coarse" / "export" / "mesh.glb").is_file()
