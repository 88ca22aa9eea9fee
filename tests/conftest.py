"""Shared fixtures: offline hub, isolated caches, a tiny IF-style pipeline, a smoke run."""

from __future__ import annotations

import os

# Must precede any diffusers/transformers import: huggingface_hub reads these at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pixel_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight tiny IF stage-I pipeline folder, built once per test session."""
    from magic3d.testing.random_pipelines import build_pixel_pipeline

    return build_pixel_pipeline(tmp_path_factory.mktemp("tiny_if"), "tiny", seed=0)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache_for_shared_fixtures(tmp_path_factory: pytest.TempPathFactory):
    """Session and module fixtures are set up before the per-test cache below is in place: they
    get a cache of the session's own, not the user's ~/.cache/magic3d."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MAGIC3D_CACHE", str(tmp_path_factory.mktemp("session_cache")))
        yield


@pytest.fixture(autouse=True)
def _offline_and_isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the network or write to the user's ~/.cache."""
    monkeypatch.setenv("MAGIC3D_CACHE", str(tmp_path / "magic3d_cache"))
    try:  # huggingface_hub may have been imported before this conftest set the env var
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    except ImportError:
        pass


def run_cli(*args: str, env: dict | None = None, timeout: float = 600, cwd: Path | None = None):
    """Run ``python -m magic3d ...`` as a user would; returns the CompletedProcess. ``env`` entries
    are added to this process's environment; one whose value is None is removed from it."""
    import subprocess
    import sys

    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env = {k: v for k, v in full_env.items() if v is not None}
    return subprocess.run([sys.executable, "-m", "magic3d", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd)


def run_main(capfd: pytest.CaptureFixture[str], *args: str):
    """``python -m magic3d ...`` in this process (``magic3d.cli.main``, the code the command runs),
    as a CompletedProcess like :func:`run_cli`'s. For error paths: a fresh interpreter spends ~5 s
    importing Lightning before it reads the arguments. ``capfd`` also holds what a stage process
    (started by the runner, writing to this process's file descriptors) printed. Each feature
    keeps at least one test through :func:`run_cli`, the command exactly as a user types it."""
    import subprocess

    from magic3d.cli import main

    capfd.readouterr()  # what earlier code printed is not this command's
    code = main(list(args))
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(["magic3d", *args], code, out, err)


def run_in_process(*args: str):
    """:func:`run_main` for a module or session fixture, which cannot take ``capfd``: file
    descriptors 1 and 2 (where the stage processes write) and ``sys.stdout``/``sys.stderr`` go
    to files for the command's duration. For a fixture that needs a finished run of a recipe,
    not the command line: the smoke run (and each command's error paths) keep that."""
    import subprocess
    import sys
    import tempfile

    from magic3d.cli import main

    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        saved_fds, saved_streams = (os.dup(1), os.dup(2)), (sys.stdout, sys.stderr)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.stdout, sys.stderr = (open(fd, "w", encoding="utf-8", errors="replace", buffering=1, closefd=False)
                                  for fd in (1, 2))
        try:
            code = main(list(args))
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            sys.stdout, sys.stderr = saved_streams
            for fd, saved in zip((1, 2), saved_fds):
                os.dup2(saved, fd)
                os.close(saved)
        text = []
        for handle in (out, err):
            handle.seek(0)
            text.append(handle.read().decode("utf-8", errors="replace"))
    return subprocess.CompletedProcess(["magic3d", *args], code, *text)


def stages_in_this_process(patch: pytest.MonkeyPatch) -> None:
    """Make the recipe runner run each stage (``python -m magic3d stage ...``) as
    ``magic3d.cli.main`` in this process, until ``patch`` is undone. For tests of what a run
    folder holds, not of the stage as a process of its own: a fresh interpreter spends ~4 s of
    each stage importing Lightning. Each kind of stage still runs as a process in some test:
    the coarse NeRF in the smoke run (conftest), the DMTet fine stage in test_coarse_to_fine, the
    latent-SDS NeRF in test_single_stage_ldm, a personalisation stage in tests/dreambooth/test_resume (DDP)."""

    def run_stage_here(cmd: list[str], env: dict[str, str] | None = None):
        from magic3d.child_process import ChildResult
        from magic3d.cli import main

        assert cmd[1:4] == ["-m", "magic3d", "stage"] and env is None, cmd
        try:
            code = main(cmd[3:])
        except SystemExit as stop:  # a stage that stopped (signal, unfinished) exits this way
            code = stop.code if isinstance(stop.code, int) else 1
        return ChildResult(code, None)

    patch.setattr("magic3d.recipe.run_child", run_stage_here)
    for key in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):  # the stages' seed_everything sets them: not after
        patch.setenv(key, "0")


SMOKE_OVERRIDES = (
    "trainer.max_steps=6",
    "data.steps_per_epoch=3",
    "run.checkpoint_every=3",
    "run.video_views=4",
    "model.preview_every=3",
    "trainer.log_every_n_steps=1",
)


@dataclass
class SmokeRun:
    folder: Path  # the run folder
    output: list[str]  # what the command printed (stdout, then stderr), line by line


@pytest.fixture(scope="session")
def smoke_cli(tmp_path_factory: pytest.TempPathFactory, tiny_pixel_pipeline: Path) -> SmokeRun:
    """One finished CPU run of the coarse recipe (tiny random prior) through the command line,
    with W&B offline as a user gets it: no WANDB_* variable set (the suite's WANDB_MODE=disabled
    removed, no WANDB_SILENT), so that test_quiet can check its output for library banners; only
    wandb's own folders are moved into the test's. Shared by several tests."""
    root = tmp_path_factory.mktemp("runs")
    run_dir = root / "smoke"
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("WANDB_")}
    env.update(MAGIC3D_CACHE=str(tmp_path_factory.mktemp("embedding_cache")), HF_HUB_OFFLINE="1",
               **{key: str(root / key.lower()) for key in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR")})
    result = run_cli("run", "coarse_only", "--prompt", "a red cube", "--run", str(run_dir),
                     f"model.guidance.pretrained={tiny_pixel_pipeline}", "run.wandb=offline",
                     *SMOKE_OVERRIDES, env=env, cwd=root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return SmokeRun(run_dir, (result.stdout + result.stderr).splitlines())


@pytest.fixture(scope="session")
def smoke_run(smoke_cli: SmokeRun) -> Path:
    """The smoke run's folder."""
    return smoke_cli.folder


@pytest.fixture(scope="session")
def tiny_latent_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight tiny Stable-Diffusion-style pipeline folder, built once per session."""
    from magic3d.testing.random_pipelines import build_latent_pipeline

    return build_latent_pipeline(tmp_path_factory.mktemp("tiny_sd"), "tiny", seed=0)


@pytest.fixture(scope="session")
def smoke_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An evaluator classifier folder from the smoke training (a few steps on tiny data)."""
    from magic3d.eval.train_classifier import train_classifier

    out = tmp_path_factory.mktemp("evaluator") / "evaluator"
    result = train_classifier(out, minutes=1.0, smoke=True, device="cpu", log=lambda *_: None)
    assert result.steps == 4
    return out


@pytest.fixture(scope="session")
def random_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained evaluator classifier folder: for tests of the mechanics, not its accuracy."""
    import torch

    from magic3d.eval.classifier import ToyWorldClassifier

    torch.manual_seed(0)
    return ToyWorldClassifier().save(tmp_path_factory.mktemp("evaluator") / "evaluator")


# --- ablation (issue 11) ---
@dataclass
class TinyAblation:
    """A tiny ablation run as a user would: interrupted during its second run, then resumed."""

    folder: Path
    first: Any  # magic3d.ablation.runner.AblationOutcome of the interrupted call
    second: Any  # ... of the resumed call
    calls: list[tuple[str, str, int, Path]]  # (recipe, prompt, seed, run_dir) of every training call
    state_after_interrupt: dict  # ablation.json as the interrupted call left it
    done_mtimes_before_resume: dict[str, int]  # DONE.json files (relative) -> mtime_ns


@pytest.fixture(scope="session")
def tiny_ablation(tmp_path_factory: pytest.TempPathFactory, tiny_pixel_pipeline: Path, tiny_latent_pipeline: Path,
                  random_classifier: Path) -> TinyAblation:
    """coarse_only and coarse_to_fine x two prompts x one seed with tiny random priors and a few
    steps. The first call is stopped by SIGINT right after its second run finished training (as
    a Ctrl-C during that run's evaluation would); the second call continues it."""
    import json
    import signal

    from magic3d.ablation.runner import run_ablation
    from magic3d.ablation.spec import AblationSpec, Variant
    from magic3d.eval.options import EvalOptions
    from magic3d.recipe import run_recipe

    root = tmp_path_factory.mktemp("ablations")
    spec = AblationSpec(
        name="tiny",
        variants=[Variant("coarse_only", "coarse_only", (f"model.guidance.pretrained={tiny_pixel_pipeline}",)),
                  Variant("coarse_to_fine", "coarse_to_fine", (
                      f"coarse:model.guidance.pretrained={tiny_pixel_pipeline}",
                      f"fine:model.guidance.pretrained={tiny_latent_pipeline}",
                      # The coarsest fine stage that still converts and renders a mesh: conversion
                      # on the CPU profile's 64^3 grid with 50 texture steps took ~40 s of each run.
                      "fine:start.converter_args.resolution=32", "fine:start.converter_args.texture_steps=5",
                      "fine:model.scene.tet_resolution=8", "fine:data.height=32", "fine:data.width=32"))],
        baseline="coarse_to_fine",
        prompts=["a red car", "a blue sphere"],
        seeds=[0],
        # A dense blob, so that the 4-step coarse stage holds an opaque object to convert and score.
        # Two steps a stage, one validation view at 32^2: the runner is under test, not training.
        overrides=["coarse:model.scene.blob_density=30", "trainer.max_steps=2", "data.steps_per_epoch=2",
                   "run.checkpoint_every=2", "run.video_views=2", "model.preview_every=2", "data.n_val_views=1",
                   "data.eval_height=32", "data.eval_width=32"],
        profile="cpu",
        eval_options=EvalOptions(views=4, iou_size=32, chamfer_resolution=32, chamfer_points=500),
    )
    calls: list[tuple[str, str, int, Path]] = []

    def interrupt_after_second_run(recipe, **kwargs):
        calls.append((recipe, kwargs["prompt"], kwargs["seed"], Path(kwargs["run_dir"])))
        run_dir = run_recipe(recipe, **kwargs)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)  # the ablation's handler turns it into a stop
        return run_dir

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MAGIC3D_CACHE", str(tmp_path_factory.mktemp("ablation_cache")))
        # The ablation runner is under test, not the stage as a process (the recipe tests run that).
        stages_in_this_process(patch)
        first = run_ablation(spec, root=root, classifier=random_classifier, device="cpu",
                             train=interrupt_after_second_run, n_resamples=500)
        folder = root / "tiny"
        state_after = json.loads((folder / "ablation.json").read_text())
        mtimes = {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("DONE.json")}
        second = run_ablation(spec, root=root, classifier=random_classifier, device="cpu",
                              train=interrupt_after_second_run, n_resamples=500)
    return TinyAblation(folder, first, second, calls, state_after, mtimes)
# --- end ablation ---


# --- DreamBooth personalisation (issue 12, branch dreambooth) ---
def personalise(prior, subject: Path, steps: int, root: Path | None = None, **kwargs):
    """A DreamBooth module fitted for ``steps`` steps on CPU (no runner, no checkpoints)."""
    import lightning as L

    from magic3d.dreambooth.data import PersonalisationSteps
    from magic3d.dreambooth.module import DreamBooth

    model = DreamBooth(prior, prompt="a sks duck", subject=str(subject), **{**DREAMBOOTH_FAST, "lr": 1e-2, **kwargs})
    model.output_dir = root
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        num_sanity_val_steps=0, enable_model_summary=False, default_root_dir=root)
    trainer.fit(model, datamodule=PersonalisationSteps(batch_size=1, steps_per_epoch=steps))
    return model


DREAMBOOTH_FAST = dict(n_class_images=2, class_sample_steps=2, preview_every=0, n_preview=1, preview_steps=2)


@pytest.fixture(scope="session")
def pink_duck(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four 48 px renders of the held-out pink duck (RGBA), as a user's subject folder."""
    from magic3d.toyworld.subject import render_subject_photos

    folder = tmp_path_factory.mktemp("subject") / "pink_duck"
    render_subject_photos(folder, n_views=4, size=48)
    return folder


@pytest.fixture(scope="session")
def tuned_pixel(tmp_path_factory: pytest.TempPathFactory, tiny_pixel_pipeline: Path, pink_duck: Path):
    """The tiny IF prior personalised for 3 steps (UNet and text encoder) and its saved adapters."""
    from magic3d.dreambooth.prior import PixelPrior

    root = tmp_path_factory.mktemp("tuned_pixel")
    model = personalise(PixelPrior(str(tiny_pixel_pipeline)), pink_duck, 3, root, train_text_encoder=True)
    model.finish_stage(None, 1, 1)
    return model, root / "lora"


@pytest.fixture(scope="session")
def tuned_latent(tmp_path_factory: pytest.TempPathFactory, tiny_latent_pipeline: Path, pink_duck: Path):
    """The tiny SD prior personalised for 3 steps in latent space (UNet only) and its saved adapters."""
    from magic3d.dreambooth.prior import LatentPrior

    root = tmp_path_factory.mktemp("tuned_latent")
    model = personalise(LatentPrior(str(tiny_latent_pipeline)), pink_duck, 3, root)
    model.finish_stage(None, 1, 1)
    return model, root / "lora"
# --- end DreamBooth personalisation ---
