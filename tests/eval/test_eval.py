"""Toy-world evaluator: prompt parsing, metrics on known inputs, classifier training, run and prior evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from magic3d.data.cameras import VIEW_NAMES, orbit_cameras
from magic3d.eval.classifier import Prediction, ToyWorldClassifier
from magic3d.eval.evaluate import (
    EvalOptions,
    aggregate_runs,
    evaluate_prior,
    evaluate_run,
    evaluate_scene,
    render_object,
    write_prior_report,
)
from magic3d.eval.metrics import (
    PromptOutsideToyWorld,
    chamfer_distance,
    colour_accuracy,
    density_surface_points,
    half_opacity_density,
    iso_crossings,
    janus_rate,
    parse_prompt,
    r_precision,
    shape_accuracy,
    silhouette_iou,
    voxel_centres,
)
from magic3d.eval.train_classifier import augment, gaussian_blur, train_classifier
from magic3d.scenes.base import Scene
from magic3d.scenes.hash_nerf import HashGridNeRF
from magic3d.toyworld.dataset import ground_truth_views
from magic3d.toyworld.render import render_shape, solid_background
from magic3d.toyworld.shapes import COLOUR_NAMES, SHAPE_NAMES, get_colour, get_shape, surface_points
from magic3d.types import RenderOutput

# ---------------------------------------------------------------------------------------------
# Stubs and fixtures
# ---------------------------------------------------------------------------------------------


class StubClassifier:
    """Answers one fixed caption and view for every image: "perfect" for that object."""

    shape_names, colour_names, view_names = SHAPE_NAMES, COLOUR_NAMES, VIEW_NAMES

    def __init__(self, shape: str, colour: str, view: str = "front") -> None:
        self.answer = (SHAPE_NAMES.index(shape), COLOUR_NAMES.index(colour), VIEW_NAMES.index(view))

    def predict(self, images: torch.Tensor) -> Prediction:
        b = images.shape[0]

        def one_hot(index: int, n: int) -> torch.Tensor:
            return torch.nn.functional.one_hot(torch.full((b,), index), n).float() * 10.0

        s, c, v = self.answer
        return Prediction(one_hot(s, len(SHAPE_NAMES)), one_hot(c, len(COLOUR_NAMES)), one_hot(v, len(VIEW_NAMES)))


class ToyScene(Scene):
    """The ground-truth object itself as a scene, over a coloured learned-looking background."""

    def __init__(self, shape: str, colour: str, background=(0.2, 0.7, 0.3)) -> None:
        super().__init__()
        self.shape, self.rgb, self.bg = get_shape(shape), get_colour(colour).rgb, background
        self.radius = 1.0

    def render(self, cameras, shading) -> RenderOutput:
        bg = solid_background(self.bg, cameras.batch_size, cameras.height, cameras.width)
        out = render_shape(self.shape, cameras, self.rgb, shading, bg, supersample=2)
        return RenderOutput(rgb=out.rgb, opacity=out.mask, depth=out.depth, background=bg)

    def density(self, points: torch.Tensor) -> torch.Tensor:
        # Crosses the evaluator's iso-level (at SMALL_OPTIONS' 32^3 grid) exactly at sdf = 0.
        return half_opacity_density(2.0 / 32) * (1.0 - 10.0 * self.shape.sdf(points))


SMALL_OPTIONS = dict(views=4, iou_size=64, chamfer_resolution=32, chamfer_points=600)


@pytest.fixture(scope="module")
def smoke_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("evaluator") / "evaluator"
    result = train_classifier(out, minutes=1.0, smoke=True, device="cpu", log=lambda *_: None)
    assert result.steps == 4
    return out


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


def test_parse_prompt_articles_case_and_view_suffix() -> None:
    p = parse_prompt("a red cube")
    assert (p.shape, p.colour, p.view) == ("cube", "red", None)
    assert (p.shape_id, p.colour_id) == (SHAPE_NAMES.index("cube"), COLOUR_NAMES.index("red"))
    assert parse_prompt("an orange duck").caption == "an orange duck"
    q = parse_prompt("  A Blue Car, back view. ")
    assert (q.shape, q.colour, q.view, q.view_id) == ("car", "blue", "back", VIEW_NAMES.index("back"))
    assert parse_prompt("green torus,front view").view == "front"


@pytest.mark.parametrize("prompt", ["a red dragon", "a cube", "a shiny red cube", "a red cube, upside view", ""])
def test_parse_prompt_outside_toy_world_raises(prompt: str) -> None:
    with pytest.raises(PromptOutsideToyWorld, match="toy world|toy-world|not one of"):
        parse_prompt(prompt)
    assert issubclass(PromptOutsideToyWorld, ValueError)


# ---------------------------------------------------------------------------------------------
# Classifier metrics
# ---------------------------------------------------------------------------------------------


def test_perfect_stub_on_ground_truth_renders_scores_one_and_wrong_colour_zero() -> None:
    cams = orbit_cameras(4, 20.0, 2.0, 50.0, 32, 32)
    gt = ground_truth_views("duck", "red", cams)
    cube, red, blue = SHAPE_NAMES.index("duck"), COLOUR_NAMES.index("red"), COLOUR_NAMES.index("blue")
    right = StubClassifier("duck", "red").predict(gt.rgb)
    assert r_precision(right, cube, red) == 1.0
    assert shape_accuracy(right, cube) == 1.0 and colour_accuracy(right, red) == 1.0
    wrong = StubClassifier("duck", "blue").predict(gt.rgb)
    assert colour_accuracy(wrong, red) == 0.0 and colour_accuracy(wrong, blue) == 1.0
    assert r_precision(wrong, cube, red) == 0.0 and shape_accuracy(wrong, cube) == 1.0


def test_r_precision_uses_the_joint_caption_score() -> None:
    # View 0: shape and colour both right; view 1: shape right, colour wrong; view 2: a close
    # call where the joint score still picks the right caption.
    shape = torch.full((3, len(SHAPE_NAMES)), -5.0)
    colour = torch.full((3, len(COLOUR_NAMES)), -5.0)
    shape[:, 1] = 5.0
    colour[0, 0], colour[1, 2], colour[2, 0], colour[2, 3] = 5.0, 5.0, 1.0, 0.9
    pred = Prediction(shape, colour, torch.zeros(3, 4))
    assert r_precision(pred, 1, 0) == pytest.approx(2 / 3)


def test_janus_rate_on_hand_made_predictions() -> None:
    az_deg = torch.tensor([0.0, 90.0, 180.0, -160.0, 150.0, 170.0, 180.0])
    el_deg = torch.tensor([20.0, 20.0, 20.0, 20.0, 20.0, 20.0, 75.0])  # the last one is overhead
    front, back = VIEW_NAMES.index("front"), VIEW_NAMES.index("back")
    called = torch.tensor([front, front, front, back, front, back, front])
    logits = torch.nn.functional.one_hot(called, 4).float()
    pred = Prediction(torch.zeros(7, 2), torch.zeros(7, 2), logits)
    # Back views: 180, -160, 150, 170 (not the overhead one); two of them are called front.
    assert janus_rate(pred, torch.deg2rad(el_deg), torch.deg2rad(az_deg)) == pytest.approx(0.5)
    assert janus_rate(pred[:2], torch.deg2rad(el_deg[:2]), torch.deg2rad(az_deg[:2])) is None


# ---------------------------------------------------------------------------------------------
# Geometry metrics
# ---------------------------------------------------------------------------------------------


def test_silhouette_iou_identical_disjoint_and_partial() -> None:
    a = torch.zeros(3, 8, 8, 1)
    a[:, :4] = 1.0
    b = a.clone()
    b[1] = 1.0 - a[1]  # disjoint
    b[2, :, :] = 0.0
    b[2, :2] = 1.0  # half of a
    iou = silhouette_iou(a, b)
    assert iou.tolist() == [1.0, 0.0, 0.5]
    assert silhouette_iou(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4)).item() == 1.0  # both empty


def test_chamfer_identical_is_zero_and_shift_gives_the_shift() -> None:
    g = torch.arange(4.0)
    points = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)  # spacing 1
    assert chamfer_distance(points, points).distance == 0.0
    shifted = points + torch.tensor([0.1, 0.0, 0.0])
    result = chamfer_distance(points, shifted, chunk=7)  # odd chunk exercises the chunking
    # Each point's nearest neighbour is its own shifted copy (0.1 < spacing / 2); float32 rounding.
    assert result.distance == pytest.approx(0.1, abs=1e-6)
    assert result.gt_to_pred == pytest.approx(0.1, abs=1e-6) and result.pred_to_gt == pytest.approx(0.1, abs=1e-6)
    with pytest.raises(ValueError, match="non-empty"):
        chamfer_distance(points, points[:0])


def test_iso_crossings_of_a_linear_field_lie_on_its_plane() -> None:
    centres = voxel_centres(1.0, 16)
    values = 10.0 * (0.3 - centres[..., 0]) + 5.0  # crosses 5 at x = 0.3, linear along x
    points = iso_crossings(values, 5.0, 1.0)
    # One crossing per grid line through x = 0.3 (16 x 16), plus the grid's outer faces where
    # the occupied half meets the "outside is empty" padding.
    on_plane = (points[:, 0] - 0.3).abs() < 1e-5  # float32 interpolation
    assert int(on_plane.sum()) == 16 * 16
    assert iso_crossings(torch.zeros(4, 4, 4), 1.0, 1.0).shape == (0, 3)


def test_density_surface_of_a_sphere_is_close_to_its_surface_samples() -> None:
    sphere = get_shape("sphere")  # radius 0.45 * WORLD_SCALE = 0.585
    threshold = half_opacity_density(2.0 / 32)
    # A density that crosses the threshold exactly at the surface (sdf = 0).
    surface = density_surface_points(lambda p: threshold * (1.0 - 10.0 * sphere.sdf(p)), 1.0, 32, 4000,
                                     generator=torch.Generator().manual_seed(0))
    assert surface.threshold == pytest.approx(threshold)
    assert 1500 < surface.points.shape[0] < 4000  # ~3 axes x 2 x pi (0.585 / h)^2 grid lines: all kept
    h = surface.voxel_size
    # Linear interpolation along grid edges of a curved surface: error O(h^2 / radius) ~ 0.004.
    assert float(sphere.sdf(surface.points).abs().max()) < 0.01
    gt = surface_points(sphere, 4000, torch.Generator().manual_seed(0))
    # Two samplings of the same surface: only the gaps between samples remain (< a third of a voxel).
    assert chamfer_distance(gt, surface.points).distance < h / 3
    empty = density_surface_points(lambda p: torch.zeros(p.shape[0]), 1.0, 16, 100)
    assert empty.points.shape == (0, 3)


# ---------------------------------------------------------------------------------------------
# Scene evaluation with the ground truth as the scene
# ---------------------------------------------------------------------------------------------


def test_ground_truth_scene_scores_perfectly() -> None:
    options = EvalOptions(**SMALL_OPTIONS)
    scene = ToyScene("duck", "red")
    result = evaluate_scene(scene, "a red duck", StubClassifier("duck", "red", "side"), options)
    m = result.metrics
    assert m["r_precision"] == 1.0 and m["colour_accuracy"] == 1.0 and m["shape_accuracy"] == 1.0
    assert m["gt_r_precision"] == 1.0
    # Same sphere tracer, cameras and supersampling as the ground truth: identical masks.
    assert m["silhouette_iou"] == 1.0
    # Voxel quantisation only (one voxel is 2 / 32 = 0.0625).
    assert m["chamfer"] is not None and m["chamfer"] < 0.03
    # 4 views at azimuths 0, 90, 180, -90: one back view, called "side" -> no Janus.
    assert m["janus_rate"] == 0.0 and m["view_accuracy"] == pytest.approx(0.5)
    assert result.renders is not None and result.ground_truth is not None
    # The learned-looking background is removed: the object over white equals the GT render.
    torch.testing.assert_close(result.renders, result.ground_truth, atol=1e-5, rtol=0)

    wrong = evaluate_scene(scene, "a red duck", StubClassifier("duck", "blue"), options)
    assert wrong.metrics["colour_accuracy"] == 0.0 and wrong.metrics["r_precision"] == 0.0
    assert wrong.metrics["janus_rate"] == 1.0  # the stub calls the back view "front"


def test_prompt_outside_toy_world_reports_only_captions() -> None:
    options = EvalOptions(**SMALL_OPTIONS)
    result = evaluate_scene(ToyScene("cube", "red"), "a photo of a corgi", StubClassifier("cube", "red"), options)
    assert all(v is None for v in result.metrics.values())
    assert result.toy_world is None and "toy-world" in result.notes[0]
    assert [v.predicted_caption for v in result.views] == ["a red cube"] * 4


def test_render_object_composites_over_the_neutral_background() -> None:
    cams = orbit_cameras(2, 20.0, 2.0, 50.0, 16, 16)
    views = render_object(ToyScene("cube", "blue", background=(1.0, 0.0, 0.0)), cams, EvalOptions(background=(0.5, 0.5, 0.5)))
    corner = views.object_rgb[:, 0, 0]  # empty pixel: the neutral grey, not the red backdrop
    torch.testing.assert_close(corner, torch.full_like(corner, 0.5), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# Classifier: augmentation, training, persistence
# ---------------------------------------------------------------------------------------------


def test_blur_with_zero_sigma_is_identity_and_augment_stays_in_range() -> None:
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(gaussian_blur(x, torch.zeros(3)), x, atol=1e-6, rtol=0)  # kernel = delta
    blurred = gaussian_blur(x, torch.full((3,), 1.5))
    assert blurred.std() < x.std()
    y = augment(x, torch.Generator().manual_seed(1))
    assert y.shape == x.shape and float(y.min()) >= 0.0 and float(y.max()) <= 1.0


def test_classifier_shapes_and_parameter_budget() -> None:
    model = ToyWorldClassifier()
    n = sum(p.numel() for p in model.parameters())
    assert 0.3e6 <= n <= 1.0e6
    pred = model.predict(torch.rand(2, 32, 32, 3))  # resized to 64 inside
    assert pred.shape_logits.shape == (2, len(SHAPE_NAMES))
    assert pred.colour_logits.shape == (2, len(COLOUR_NAMES)) and pred.view_logits.shape == (2, 4)


def test_smoke_training_saves_and_reloads(smoke_classifier: Path) -> None:
    meta = json.loads((smoke_classifier / "classifier.json").read_text())
    assert meta["shape_names"] == list(SHAPE_NAMES) and meta["input_size"] == 64
    assert set(meta["heldout_accuracy"]) == {"shape", "colour", "caption", "view_asymmetric"}
    assert all(0.0 <= v <= 1.0 for v in meta["heldout_accuracy"].values())
    a = ToyWorldClassifier.load(smoke_classifier)
    b = ToyWorldClassifier.load(smoke_classifier)
    images = torch.rand(3, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.predict(images).shape_logits, b.predict(images).shape_logits)
    with pytest.raises(FileNotFoundError, match="train-classifier"):
        ToyWorldClassifier.load(smoke_classifier.parent / "missing")


# ---------------------------------------------------------------------------------------------
# Prior evaluation
# ---------------------------------------------------------------------------------------------


def test_evaluate_prior_mechanics_on_the_tiny_pipeline(
    tiny_pixel_pipeline: Path, smoke_classifier: Path, tmp_path: Path
) -> None:
    result = evaluate_prior(tiny_pixel_pipeline, n_per_caption=2, steps=2, classifier=smoke_classifier,
                            shapes=("cube", "duck"), colours=("red",), batch_size=3, device="cpu")
    assert result.n_images == 4
    assert result.samples is not None and result.samples.shape == (4, 32, 32, 3)  # the tiny UNet is 32x32
    for value in (result.shape_accuracy, result.colour_accuracy, result.caption_accuracy):
        assert 0.0 <= value <= 1.0
    assert result.view_accuracy_asymmetric is not None  # the duck is asymmetric
    paths = write_prior_report(result, tmp_path / "prior_eval")
    assert all(p.is_file() for p in paths)
    assert json.loads(paths[0].read_text())["n_images"] == 4


def test_prior_command_writes_its_figures_into_the_model_card(
    tiny_pixel_pipeline: Path, smoke_classifier: Path, tmp_path: Path
) -> None:
    import shutil

    from magic3d.eval.__main__ import main
    from magic3d.priors.card import EVALUATOR_MARKER

    folder = tmp_path / "prior"
    shutil.copytree(tiny_pixel_pipeline, folder)
    (folder / "README.md").write_text(f"# card\n\n## Quality\n\n{EVALUATOR_MARKER}\nTo be filled.\n\n## End\n")
    argv = ["prior", str(folder), "--n-per-caption", "1", "--steps", "2", "--shapes", "cube", "--colours", "red",
            "--classifier", str(smoke_classifier), "--device", "cpu", "--update-card"]
    assert main(argv) == 0
    card = (folder / "README.md").read_text()
    assert "| shape acc | colour acc |" in card and "To be filled" not in card
    assert card.endswith("## End\n") and (folder / "eval" / "prior_eval.json").is_file()


def test_evaluate_prior_decodes_latent_priors_through_their_vae(
    tiny_latent_pipeline: Path, smoke_classifier: Path
) -> None:
    result = evaluate_prior(tiny_latent_pipeline, n_per_caption=1, steps=2, classifier=smoke_classifier,
                            shapes=("cube",), colours=("red", "blue"), batch_size=2, device="cpu")
    vae_size = 8 * 8  # the tiny SD UNet's 8x8 latents through the 8x VAE: images, not latents
    assert result.samples is not None and result.samples.shape == (2, vae_size, vae_size, 3)
    assert bool(torch.isfinite(result.samples).all())


# ---------------------------------------------------------------------------------------------
# A tiny finished run
# ---------------------------------------------------------------------------------------------

NERF_ARGS = dict(n_levels=2, log2_hashmap_size=10, base_resolution=4, per_level_scale=2.0, hidden_dim=16,
                 n_samples_per_ray=24, grid_resolution=0, blob_density=60.0, grid_backend="torch")


def make_finished_run(root: Path, prompt: str, stage: str = "coarse", steps: int = 6) -> Path:
    """A run folder as the stage runner leaves it: config.yaml, checkpoints/last.ckpt, DONE.json."""
    stage_dir = root / stage
    (stage_dir / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    scene = HashGridNeRF(**NERF_ARGS)
    scene_spec = {"class_path": "magic3d.scenes.hash_nerf.HashGridNeRF", "init_args": dict(NERF_ARGS)}
    config = {"seed": 0, "model": {"scene": scene_spec, "prompt": prompt}}
    (stage_dir / "config.yaml").write_text(yaml.safe_dump(config))
    checkpoint = {
        "state_dict": {f"scene.{k}": v for k, v in scene.state_dict().items()},
        "global_step": steps,
        "magic3d": {"stage_config": config, "prompt": prompt},
    }
    torch.save(checkpoint, stage_dir / "checkpoints" / "last.ckpt")
    (stage_dir / "DONE.json").write_text(json.dumps({"steps": steps, "prompt": prompt}))
    return root


def test_evaluate_tiny_finished_run_and_aggregate(smoke_classifier: Path, tmp_path: Path) -> None:
    from magic3d.eval.__main__ import main

    runs = tmp_path / "runs"
    duck = make_finished_run(runs / "coarse_only" / "duck", "a red duck")
    make_finished_run(runs / "coarse_only" / "ball", "a blue sphere")
    options = EvalOptions(**SMALL_OPTIONS)

    result = evaluate_run(duck, options, classifier=smoke_classifier, device="cpu")
    for path in (result.json_path, result.markdown_path, result.sheet_path):
        assert path.is_file() and path.stat().st_size > 0
    report = json.loads(result.json_path.read_text())
    (stage,) = report["stages"]
    assert stage["stage"] == "coarse" and stage["steps"] == 6 and stage["toy_world"]["shape"] == "duck"
    m = stage["metrics"]
    for key in ("r_precision", "colour_accuracy", "shape_accuracy", "view_accuracy", "janus_rate", "silhouette_iou",
                "gt_r_precision"):
        assert 0.0 <= m[key] <= 1.0, key
    # The blob start (softplus(60 (1 - |x| / 0.5)) > 33 within |x| < 0.22) gives a surface.
    assert m["chamfer"] is not None and 0.0 < m["chamfer"] < 2.0
    assert len(stage["views"]) == 4
    assert "| coarse |" in result.markdown_path.read_text()

    # The CLI on the other run with the same options, then the aggregate over both (reusing
    # both eval.json files: reports made with other options would be remade).
    ball = runs / "coarse_only" / "ball"
    assert main(["run", str(ball), "--views", "4", "--iou-size", "64", "--chamfer-resolution", "32",
                 "--chamfer-points", "600", "--classifier", str(smoke_classifier), "--device", "cpu"]) == 0
    ball_report = (ball / "eval" / "eval.json").stat().st_mtime_ns
    sphere_metrics = json.loads((ball / "eval" / "eval.json").read_text())["stages"][0]["metrics"]
    assert sphere_metrics["janus_rate"] is None  # a sphere has no front
    summary = aggregate_runs(runs, options, classifier=smoke_classifier, device="cpu")
    assert len(summary.runs) == 2 and summary.per_stage["coarse"]["prompts"] == 2
    assert summary.per_stage["coarse"]["janus_rate_n"] == 1
    assert summary.json_path.is_file() and "coarse" in summary.markdown_path.read_text()
    assert (ball / "eval" / "eval.json").stat().st_mtime_ns == ball_report  # reused, not remade
    assert summary.per_comparison == {}  # single-stage runs: nothing to compare

    assert main(["run", str(tmp_path / "nope"), "--classifier", str(smoke_classifier)]) == 2


@pytest.mark.gpu
def test_cuda_paths_train_and_evaluate(tmp_path: Path) -> None:
    """bf16 / channels-last training, then a run evaluated with scene, GT and classifier on CUDA."""
    out = tmp_path / "evaluator"
    result = train_classifier(out, minutes=1.0, smoke=True, device="cuda", max_steps=20, log=lambda *_: None)
    assert result.steps == 20
    run = make_finished_run(tmp_path / "run", "a red duck")
    report = evaluate_run(run, EvalOptions(**SMALL_OPTIONS), classifier=out, device="cuda")
    metrics = json.loads(report.json_path.read_text())["stages"][0]["metrics"]
    assert 0.0 <= metrics["silhouette_iou"] <= 1.0 and metrics["chamfer"] is not None
