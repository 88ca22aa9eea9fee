"""The ablation runner end to end on CPU (tiny random priors, a few steps): interrupted after
its first run and resumed, it skips what is done, continues the interrupted run from its own
folder and writes the table, charts and contact sheets. Plus its refusals of bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from conftest import TinyAblation
from magic3d.ablation.spec import AblationSpec, Variant, load_spec_file, read_prompts, resolve_spec
from magic3d.ablation.state import AblationState, merge_state
from magic3d.cli import main
from magic3d.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_interrupted_ablation_resumes_without_redoing_finished_runs(tiny_ablation: TinyAblation) -> None:
    first, second, calls = tiny_ablation.first, tiny_ablation.second, tiny_ablation.calls
    assert first.interrupted == "SIGINT" and first.exit_code == 130
    runs = {(r["variant"], r["prompt"]): r for r in tiny_ablation.state_after_interrupt["runs"]}
    assert runs[("coarse_only", "a red car")]["status"] == "done"
    interrupted = runs[("coarse_to_fine", "a red car")]
    assert interrupted["status"] == "interrupted" and interrupted["run_dir"]  # its folder is on record
    assert runs[("coarse_only", "a blue sphere")]["status"] == "pending"

    # The resumed call trained neither finished run again: the first is not called at all, the
    # interrupted one is continued in its recorded folder, where every stage is already done.
    assert second.interrupted is None and second.exit_code == 0
    assert [(c[0], c[1]) for c in calls] == [
        ("coarse_only", "a red car"), ("coarse_to_fine", "a red car"),
        ("coarse_to_fine", "a red car"), ("coarse_only", "a blue sphere"), ("coarse_to_fine", "a blue sphere")]
    assert calls[2][3] == calls[1][3] == tiny_ablation.folder / interrupted["run_dir"]
    for done_file, mtime in tiny_ablation.done_mtimes_before_resume.items():
        assert (tiny_ablation.folder / done_file).stat().st_mtime_ns == mtime, f"{done_file} was redone"

    state = json.loads((tiny_ablation.folder / "ablation.json").read_text())
    assert {k: state[k] for k in ("name", "baseline", "seeds")} == {"name": "tiny", "baseline": "coarse_to_fine",
                                                                   "seeds": [0]}
    assert [v["name"] for v in state["variants"]] == ["coarse_only", "coarse_to_fine"]
    assert len(state["runs"]) == 4 and all(r["status"] == "done" for r in state["runs"])
    for record in state["runs"]:
        run_dir = tiny_ablation.folder / record["run_dir"]
        assert not Path(record["run_dir"]).is_absolute() and (run_dir / "run.json").is_file()
        assert record["wall_s"] > 0 and record["gpu_minutes"] == 0.0  # CPU: no GPU held
        stages = ["coarse"] if record["variant"] == "coarse_only" else ["coarse", "fine"]
        assert list(record["metrics"]) == stages and record["final_stage"] == stages[-1]
        assert 0.0 <= record["metrics"][stages[-1]]["silhouette_iou"] <= 1.0
        assert (tiny_ablation.folder / record["views"]).is_file()
        # W&B grouping reaches every stage's config as run.* keys.
        settings = json.loads((run_dir / "run.json").read_text())
        assert 'run.wandb_group="tiny"' in settings["overrides"]
        assert f'run.wandb_job_type="{record["variant"]}"' in settings["overrides"]
    car = next(r for r in state["runs"] if r["prompt"] == "a red car" and r["variant"] == "coarse_to_fine")
    assert car["metrics"]["fine"]["janus_rate"] is not None  # a car has a front
    sphere = next(r for r in state["runs"] if r["prompt"] == "a blue sphere" and r["variant"] == "coarse_to_fine")
    assert sphere["metrics"]["fine"]["janus_rate"] is None  # a sphere has none


@pytest.mark.slow
def test_report_files(tiny_ablation: TinyAblation, capsys: pytest.CaptureFixture) -> None:
    folder = tiny_ablation.folder
    table = (folder / "table.md").read_text()
    assert "baseline **coarse_to_fine**" in table and "| coarse_only | coarse |" in table
    assert "## Paired difference against coarse_to_fine" in table and "## Stage by stage" in table

    with open(folder / "table.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    final = {r["variant"]: r for r in rows if r["final"] == "True"}
    assert set(final) == {"coarse_only", "coarse_to_fine"}
    assert final["coarse_to_fine"]["runs"] == "2" and final["coarse_to_fine"]["failed"] == "0"
    # Two runs per variant; the Janus rate exists for the car only.
    assert final["coarse_only"]["silhouette_iou_n"] == "2" and final["coarse_only"]["janus_rate_n"] == "1"
    assert final["coarse_to_fine"]["silhouette_iou_diff_mean"] == ""  # the baseline is not compared with itself
    assert final["coarse_only"]["silhouette_iou_diff_n"] == "2"
    # The coarse stages of both variants ran the same config with the same seed on CPU
    # (bit-reproducible), so their paired difference is exactly zero.
    coarse = next(r for r in rows if r["variant"] == "coarse_only" and r["stage"] == "coarse" and r["final"] == "False")
    assert float(coarse["silhouette_iou_diff_mean"]) == 0.0 and float(coarse["chamfer_diff_high"]) == 0.0

    data = json.loads((folder / "table.json").read_text())
    assert data["baseline"] == "coarse_to_fine" and data["n_resamples"] == 500
    assert "silhouette_iou" in data["quantities"] and "wall_s" in data["quantities"]

    charts = {p.stem for p in (folder / "charts").glob("*.png")}
    assert {"silhouette_iou", "r_precision", "wall_s"} <= charts and "gpu_minutes" not in charts  # CPU only
    assert sorted(p.name for p in (folder / "sheets").glob("*.png")) == ["a-blue-sphere.png", "a-red-car.png"]

    capsys.readouterr()
    assert main(["ablation", "--report-only", "--name", "tiny", "--root", str(folder.parent)]) == 0
    assert capsys.readouterr().out.startswith("# Ablation `tiny`")
    assert json.loads((folder / "table.json").read_text())["n_resamples"] == 10_000  # remade, with the default


def _spec(**changes) -> AblationSpec:
    base = dict(name="t", variants=[Variant("coarse_only", "coarse_only")], baseline="coarse_only",
                prompts=["a red cube"], seeds=[0])
    return AblationSpec(**{**base, **changes})


def test_bad_inputs_fail_in_one_line_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # In process (magic3d.cli.main, as `python -m magic3d` calls it): a subprocess per case
    # cost ~13 s of imports each on 2 cores and tests nothing more.
    def ablation(*args: str) -> tuple[int, list[str]]:
        code = main(["ablation", *args, "--root", str(tmp_path)])
        return code, capsys.readouterr().err.strip().splitlines()

    code, err = ablation("--name", "x", "--recipes", "coarse_only coarse_to_fien")
    assert code == 2 and err == [
        "[magic3d] error: Variant coarse_to_fien: unknown recipe 'coarse_to_fien' (recipes: "
        + ", ".join(sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))) + ")."]
    code, err = ablation("--recipes", "coarse_only", "--prompts", str(tmp_path / "none.txt"))
    assert code == 2 and len(err) == 1 and f"Prompt file not found: {tmp_path / 'none.txt'}" in err[0]
    code, err = ablation("--recipes", "coarse_only", "trainer.max_stepz=3")
    assert code == 2 and len(err) == 1 and "Variant coarse_only: Invalid config" in err[0] and "max_stepz" in err[0]
    bad_spec = tmp_path / "bad.yaml"
    bad_spec.write_text("variants: [coarse_only]\nbasline: coarse_only\n")
    code, err = ablation("--variants", str(bad_spec))
    assert code == 2 and len(err) == 1 and "unknown keys ['basline']" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"], "nothing may be written before the checks pass"


def test_spec_resolution_and_shipped_specs(tmp_path: Path) -> None:
    paper = load_spec_file(ROOT / "ablations" / "paper.yaml")
    assert paper.name == "paper" and paper.baseline == "coarse_to_fine" and paper.seeds == [0]
    assert [v.name for v in paper.variants] == ["coarse_only", "single_stage_ldm", "coarse_to_fine_nerf",
                                               "coarse_to_fine", "coarse_to_fine+perpneg"]
    assert paper.variants[-1] == Variant("coarse_to_fine+perpneg", "coarse_to_fine", ("model.guidance.perp_neg=true",))
    prompts = read_prompts(ROOT / "ablations" / "toy12.txt")
    assert paper.prompts == prompts and len(prompts) == 12 and len(set(prompts)) == 12
    from magic3d.eval.metrics import parse_prompt
    from magic3d.priors.heldout import HELD_OUT_PAIRS
    from magic3d.toyworld.shapes import get_shape

    parsed = [parse_prompt(p) for p in prompts]  # every prompt is in the toy world
    assert {p.shape for p in parsed} >= {"car", "chair", "duck", "house", "mug", "arrow", "snowman"}
    assert sum(not get_shape(p.shape).asymmetric for p in parsed) >= 4
    assert not {(p.shape, p.colour) for p in parsed} & set(HELD_OUT_PAIRS)  # trained pairs only
    tiny = load_spec_file(ROOT / "ablations" / "tiny.yaml")
    assert tiny.eval_options.views == 8 and [v.recipe for v in tiny.variants] == ["coarse_only", "coarse_to_fine"]

    # With no variants and no stored ablation: the paper's set; recipes: plain variants.
    assert resolve_spec().name == "paper"
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("# a comment\na red cube\n\nan orange arrow\n")
    spec = resolve_spec(name="mine", recipes=["coarse_only", "coarse_to_fine"], prompts_file=prompt_file, seeds=3)
    assert (spec.baseline, spec.prompts, spec.seeds) == ("coarse_only", ["a red cube", "an orange arrow"], [0, 1, 2])
    # A continue with only the name takes what the stored ablation was run with.
    again = resolve_spec(name="mine", stored_for=lambda name: spec if name == "mine" else None)
    assert again.variants == spec.variants and again.prompts == spec.prompts and again.seeds == spec.seeds

    for bad, message in ((dict(seeds=0), "seeds=0"), (dict(baseline="nope", recipes=["coarse_only"]), "Baseline"),
                         (dict(name="a b", recipes=["coarse_only"]), "not a usable name")):
        with pytest.raises(ConfigError, match=message):
            resolve_spec(**{"recipes": ["coarse_only"], **bad})
    duplicate = tmp_path / "dup.txt"
    duplicate.write_text("a red cube\nA red cube!\n")
    with pytest.raises(ConfigError, match="share the folder name"):
        resolve_spec(recipes=["coarse_only"], prompts_file=duplicate)


def test_state_merge_extends_and_refuses_redefinitions(tmp_path: Path) -> None:
    state = merge_state(None, _spec())
    state.runs[0].status, state.runs[0].run_dir = "done", "runs/coarse_only/a-red-cube-seed0"
    state.save(tmp_path)
    stored = AblationState.load(tmp_path)
    assert stored.runs == state.runs and stored.spec == state.spec

    more = merge_state(stored, _spec(seeds=[0, 1], variants=[Variant("coarse_only", "coarse_only"),
                                                             Variant("c2f", "coarse_to_fine")]))
    assert sorted((r.variant, r.seed, r.status) for r in more.runs) == [
        ("c2f", 0, "pending"), ("c2f", 1, "pending"), ("coarse_only", 0, "done"), ("coarse_only", 1, "pending")]
    assert more.runs[0].status == "done"  # the stored record is kept, not replaced
    with pytest.raises(ConfigError, match="variant coarse_only was run as recipe coarse_only"):
        merge_state(stored, _spec(variants=[Variant("coarse_only", "coarse_only", ("trainer.max_steps=9",))]))
    with pytest.raises(ConfigError, match="with overrides"):
        merge_state(stored, _spec(overrides=["trainer.max_steps=9"]))
    (tmp_path / "ablation.json").write_text("{not json")
    with pytest.raises(ConfigError, match="ablation.json is unreadable"):
        AblationState.load(tmp_path)


def test_shipped_paper_ablation_composes() -> None:
    """`make ablation` with no arguments: every variant of ablations/paper.yaml composes and
    validates (its recipes and the Perp-Neg override exist), so it cannot fail on a typo."""
    from magic3d.ablation.spec import check_spec
    from magic3d.recipe import available_recipes

    spec = resolve_spec()
    missing = sorted({v.recipe for v in spec.variants} - set(available_recipes()))
    if missing:
        pytest.skip(f"recipes {missing} are on branch recipes (merged into main): this test runs once merged")
    check_spec(spec)
