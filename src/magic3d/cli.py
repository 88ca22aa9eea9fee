"""Command line: ``python -m magic3d run RECIPE --prompt "..." [key.path=value ...]``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="magic3d", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run (or continue) a recipe")
    run.add_argument("recipe", nargs="?", default=None,
                     help="recipe name (default: coarse_to_fine, or the run's own with --run)")
    run.add_argument("--prompt", default=None, help="text prompt (default: the recipe's, or the run's)")
    run.add_argument("--seed", type=int, default=None, help="integer in [0, 2^32 - 1] (default 0, or the run's)")
    run.add_argument("--run", type=Path, default=None, help="existing run folder to continue")
    run.add_argument("--runs-root", type=Path, default=Path("runs"))
    run.add_argument("--profile", default=None, help="auto | cpu | full (default auto, or the run's)")
    run.add_argument("--edit", default=None,
                     help="edited prompt for the recipe's `prompt: edit` stages (recipe edit; default: the run's)")
    run.add_argument("--base", type=Path, default=None,
                     help="finished run whose stages on the base prompt are used instead of running them again")
    run.add_argument("--subject", type=Path, default=None,
                     help="folder of 2+ photos of the subject for the recipe's personalisation stages (recipe dreambooth)")
    run.add_argument("overrides", nargs="*", help="key.path=value, or stage:key.path=value")

    stage = sub.add_parser("stage", help="run one stage from a resolved config (used by run)")
    stage.add_argument("--config", type=Path, required=True)
    stage.add_argument("--stage-dir", type=Path, required=True)

    export = sub.add_parser("export", help="write GLB + OBJ/MTL/PNG of a finished stage")
    export.add_argument("stage_dir", type=Path,
                        help="runs/<recipe>/<name>/<stage>, or a run folder (its last finished stage)")
    export.add_argument("--texture-resolution", type=int, default=1024)
    export.add_argument("--mesh-resolution", type=int, default=128,
                        help="grid cubes per axis for the surface of a NeRF (default 128)")

    view = sub.add_parser("view", help="write an offline HTML page of a run's meshes, turntables and metrics")
    view.add_argument("folder", type=Path,
                      help="a run folder (runs/<recipe>/<name>), or a folder of runs (runs/ablations/<name>)")
    view.add_argument("--no-export", action="store_true",
                      help="do not export the meshes of finished stages that lack export/mesh.glb")
    view.add_argument("--texture-resolution", type=int, default=1024, help="for the meshes it exports")
    view.add_argument("--mesh-resolution", type=int, default=128, help="for the meshes it exports (NeRF grid)")

    ablation = sub.add_parser(
        "ablation", help="run (or continue) an ablation: variants x prompts x seeds, evaluated and tabulated",
        description="Every variant (a recipe plus overrides) x prompt x seed through the recipe runner, "
                    "each run evaluated on the toy world; resumable. Writes runs/ablations/NAME/: ablation.json, "
                    "table.md/.csv/.json, charts/, sheets/. With no variants it continues the stored ablation "
                    "NAME, or runs ablations/paper.yaml.")
    ablation.add_argument("--name", default=None, help="names runs/ablations/NAME (default: the spec's name)")
    ablation.add_argument("--variants", type=Path, default=None, help="spec YAML (see ablations/paper.yaml)")
    ablation.add_argument("--recipes", default=None,
                          help="recipes to compare as they are, separated by spaces or commas")
    ablation.add_argument("--prompts", type=Path, default=None, help="prompt file, one a line")
    ablation.add_argument("--seeds", type=int, default=None, help="seeds per prompt: 0..N-1 (default 1)")
    ablation.add_argument("--baseline", default=None, help="the variant the others are compared with")
    ablation.add_argument("--profile", default=None, help="auto | cpu | full, for every run")
    ablation.add_argument("--root", type=Path, default=Path("runs/ablations"))
    ablation.add_argument("--classifier", default="priors/evaluator", help="toy-world evaluator folder")
    ablation.add_argument("--device", default="auto", help="evaluation device: auto, cuda or cpu")
    ablation.add_argument("--report-only", action="store_true", help="remake the report from ablation.json")
    ablation.add_argument("overrides", nargs="*", help="key.path=value for every variant (stage:key=value too)")

    sub.add_parser("recipes", help="list recipes")
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from magic3d.quiet import quiet_libraries

    quiet_libraries()  # before Lightning, diffusers and wandb are imported: their banners are not ours
    parser = _parser()
    # Overrides may come after options (argparse cannot interleave them with nargs="*").
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command not in ("run", "ablation") or any(item.startswith("-") for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    if args.command == "run" and args.recipe is not None and "=" in args.recipe:
        args.overrides = [args.recipe, *args.overrides]  # `run key=value` with no recipe name
        args.recipe = None
    from magic3d.config import ConfigError

    try:
        if args.command == "recipes":
            from magic3d.recipe import available_recipes, load_recipe

            for name in available_recipes():
                recipe = load_recipe(name)
                print(f"{name:24s} {recipe.description}")
            return 0
        if args.command == "run":
            from magic3d.recipe import StageFailed, StageInterrupted, run_recipe

            try:
                run_recipe(args.recipe, prompt=args.prompt, seed=args.seed, overrides=args.overrides or None,
                           run_dir=args.run, runs_root=args.runs_root, profile=args.profile, edit=args.edit,
                           base=args.base, subject=args.subject)
            except StageInterrupted as err:
                print(f"[magic3d] {err}", file=sys.stderr)
                return err.code
            except StageFailed as err:
                print(f"[magic3d] error: {err}", file=sys.stderr)
                return err.code or 1
            return 0
        if args.command == "ablation":
            return _ablation(args)
        if args.command == "export":
            from magic3d.export import export_stage

            for path in export_stage(args.stage_dir, texture_resolution=args.texture_resolution,
                                     mesh_resolution=args.mesh_resolution):
                print(path)
            return 0
        if args.command == "view":
            from magic3d.viewer.page import view

            page = view(args.folder, export_missing=not args.no_export,
                        texture_resolution=args.texture_resolution, mesh_resolution=args.mesh_resolution)
            cards = [card for run in page.runs for card in run.stages]
            for run in page.runs:
                for card in run.stages:
                    if card.mesh_error:
                        print(f"[magic3d] {run.title}/{card.name}: {card.mesh_error}", file=sys.stderr)
            print(f"[magic3d] wrote {page.index} ({len(page.runs)} run(s), "
                  f"{sum(c.mesh_id is not None for c in cards)} of {len(cards)} stage(s) with a mesh); "
                  f"open {page.index.resolve().as_uri()}")
            return 0
        if args.command == "stage":
            from magic3d.stage import run_stage

            run_stage(args.config, args.stage_dir)
            return 0
    except (ConfigError, FileNotFoundError, ValueError) as err:
        if isinstance(err, ValueError) and not _raised_by_magic3d(err):
            raise  # a library's ValueError is a bug to report with its traceback, not a user error
        print(f"[magic3d] error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        from magic3d.checkpoints import NonFiniteStateError
        from magic3d.export import ExportError
        from magic3d.system import NonFiniteLossError

        if not isinstance(err, (NonFiniteLossError, NonFiniteStateError, ExportError)):
            raise
        print(f"[magic3d] error: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("[magic3d] interrupted; the last checkpoint is kept, rerun to continue", file=sys.stderr)
        return 130
    return 1


def _ablation(args: argparse.Namespace) -> int:
    from magic3d.ablation.runner import ablation_folder, run_ablation, stored_spec
    from magic3d.ablation.spec import resolve_spec
    from magic3d.ablation.state import AblationState
    from magic3d.config import ConfigError

    if args.report_only:
        from magic3d.ablation.report import write_report

        name = args.name or (resolve_spec(variants_file=args.variants).name if args.variants else "paper")
        folder = ablation_folder(args.root, name)
        state = AblationState.load(folder)
        if state is None:
            raise ConfigError(f"No ablation at {folder} (no ablation.json): run it first, or pass --name.")
        print(write_report(folder, state).table_md.read_text())
        return 0
    recipes = args.recipes.replace(",", " ").split() if args.recipes else None
    spec = resolve_spec(name=args.name, variants_file=args.variants, recipes=recipes, prompts_file=args.prompts,
                        seeds=args.seeds, baseline=args.baseline, overrides=args.overrides or None,
                        profile=args.profile, stored_for=stored_spec(args.root))
    outcome = run_ablation(spec, root=args.root, classifier=args.classifier, device=args.device)
    return outcome.exit_code


def _raised_by_magic3d(err: BaseException) -> bool:
    """Whether the innermost frame of ``err`` is this package's code (our messages name the fix)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE_DIR)
