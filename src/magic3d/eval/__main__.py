"""CLI of the toy-world evaluator.

  python -m magic3d.eval train-classifier --out priors/evaluator --minutes 3 [--smoke]
  python -m magic3d.eval run RUN_FOLDER [--views 16] [--stage NAME] [--resolution 512] [--classifier priors/evaluator]
  python -m magic3d.eval edit BASE_RUN EDIT_RUN [--scratch RUN] [--views 16] [--resolution 512]
  python -m magic3d.eval prompts FOLDER_OF_RUNS [--resolution 512] [--reevaluate]
  python -m magic3d.eval prior PIPELINE_FOLDER [--n-per-caption 8] [--steps 50] [--guidance-scale 5]
  python -m magic3d.eval robustness [--n-images 2000] [--classifier priors/evaluator]
  python -m magic3d.eval dreambooth PIPELINE_FOLDER LORA_FOLDER [--n-images 32] [--out report.json]

A coarse_to_fine run is reported stage by stage and as "fine vs coarse" (per-metric fine - coarse);
--resolution 512 renders both stages at the fine stage's 512x512 (use a GPU: 16 views x 512^2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from magic3d.eval.classifier import DEFAULT_FOLDER


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--classifier", default=DEFAULT_FOLDER, help=f"evaluator folder (default {DEFAULT_FOLDER})")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cuda or cpu")


def _add_views(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--views", type=int, default=16, help="orbit views per stage (default 16)")
    parser.add_argument("--elevation", type=float, default=20.0, help="orbit elevation in degrees (default 20)")
    parser.add_argument("--chamfer-resolution", type=int, default=96,
                        help="density grid for Chamfer of density scenes (default 96; meshes are sampled directly)")
    parser.add_argument("--chamfer-points", type=int, default=5000, help="surface samples for Chamfer (default 5000)")
    parser.add_argument("--iou-size", type=int, default=None,
                        help="side of the silhouette-IoU renders (default 128; cheap on CPU)")
    parser.add_argument("--resolution", type=int, default=None,
                        help="render every view once at this size (e.g. 512, the fine stage's) for IoU and the "
                             "sheet; the classifier gets them area-averaged to 64px. Replaces --iou-size")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m magic3d.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train-classifier", help="train the evaluator classifier on toy-world renders")
    train.add_argument("--out", default=DEFAULT_FOLDER, help=f"folder to write (default {DEFAULT_FOLDER})")
    train.add_argument("--minutes", type=float, default=3.0, help="training time budget (default 3)")
    train.add_argument("--smoke", action="store_true", help="tiny data, a few steps (CPU tests)")
    train.add_argument("--max-steps", type=int, default=None)
    train.add_argument("--n-train", type=int, default=None, help="training images to render (default 80000)")
    train.add_argument("--device", default="auto")
    train.add_argument("--seed", type=int, default=0)

    run = commands.add_parser("run", help="evaluate the finished stages of one run")
    run.add_argument("run_dir", type=Path)
    run.add_argument("--stage", default=None, help="evaluate only this stage (even if unfinished)")
    run.add_argument("--as-prompt", default=None,
                     help='grade as this toy caption, e.g. "a pink duck" for a run of "a sks duck" (recipe dreambooth)')
    _add_views(run)
    _add_common(run)

    edit = commands.add_parser("edit", help="edit metrics of a prompt-based edit: the edited attribute, what "
                                             "was kept, and the edited prompt from scratch (writes edit.json/.md)")
    edit.add_argument("base_run", type=Path, help="the run (or stage folder) the edit started from; the edit "
                                                  "run itself when it made its own coarse stage")
    edit.add_argument("edit_run", type=Path, help="the edit run (its last finished stage is the edited result)")
    edit.add_argument("--scratch", type=Path, default=None, help="a run of the edited prompt from scratch")
    _add_views(edit)
    _add_common(edit)

    prompts = commands.add_parser("prompts", help="evaluate every run under a folder and average per stage")
    prompts.add_argument("folder", type=Path)
    prompts.add_argument("--reevaluate", action="store_true", help="ignore existing <run>/eval/eval.json")
    _add_views(prompts)
    _add_common(prompts)

    prior = commands.add_parser("prior", help="sample a pixel or latent prior on toy captions and classify the samples")
    prior.add_argument("pipeline", type=Path)
    prior.add_argument("--n-per-caption", type=int, default=8)
    prior.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    prior.add_argument("--guidance-scale", type=float, default=5.0)
    prior.add_argument("--shapes", nargs="*", default=(), help="subset of shapes (default all)")
    prior.add_argument("--colours", nargs="*", default=(), help="subset of colours (default all)")
    prior.add_argument("--sweep-guidance", type=float, nargs="+", default=(), metavar="SCALE",
                       help="also grade at these guidance scales (same seeds and captions): guidance_sweep.md/.json "
                            "next to the report, and a table in the card with --update-card")
    prior.add_argument("--batch-size", type=int, default=256)
    prior.add_argument("--update-card", action="store_true",
                       help="write the figures into the Quality section of <pipeline>/README.md")
    prior.add_argument("--seed", type=int, default=0)
    prior.add_argument("--out", type=Path, default=None, help="report folder (default <pipeline>/eval)")
    _add_common(prior)

    dreambooth = commands.add_parser("dreambooth", help="grade a personalised prior: samples of its instance prompt "
                                     "as the subject, against the untuned prior, and language drift")
    dreambooth.add_argument("pipeline", type=Path, help="the prior folder the LoRA was trained on")
    dreambooth.add_argument("lora", type=Path, help="<personalisation stage>/lora")
    dreambooth.add_argument("--prompt", default=None, help="default: the LoRA card's instance prompt")
    dreambooth.add_argument("--shape", default="duck", help="the subject's toy-world shape (default duck)")
    dreambooth.add_argument("--colour", default="pink", help="the subject's toy-world colour (default pink)")
    dreambooth.add_argument("--n-images", type=int, default=32, help="samples of the subject prompts")
    dreambooth.add_argument("--n-per-drift-caption", type=int, default=4)
    dreambooth.add_argument("--drift-shapes", nargs="*", default=(), help="default: every other shape")
    dreambooth.add_argument("--drift-colours", nargs="*", default=(), help="default: every other colour")
    dreambooth.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    dreambooth.add_argument("--guidance-scale", type=float, default=5.0)
    dreambooth.add_argument("--batch-size", type=int, default=256)
    dreambooth.add_argument("--seed", type=int, default=0)
    dreambooth.add_argument("--out", type=Path, default=None, help="JSON report (default <lora>/eval.json)")
    _add_common(dreambooth)

    robust = commands.add_parser("robustness", help="the evaluator's accuracy on ground truth degraded as "
                                                    "text-to-3D renders are (blur, translucency, floaters, noise)")
    robust.add_argument("--n-images", type=int, default=2000)
    robust.add_argument("--out", type=Path, default=None, help="report folder (default <classifier>/eval)")
    robust.add_argument("--seed", type=int, default=1234)
    _add_common(robust)
    return parser


def main(argv: list[str] | None = None) -> int:
    from magic3d.quiet import quiet_libraries

    quiet_libraries()  # before wandb is imported (an evaluation logs into the stages' W&B runs)
    args = _parser().parse_args(argv)
    from magic3d.config import ConfigError

    try:
        return _dispatch(args)
    except (FileNotFoundError, ValueError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "train-classifier":
        from magic3d.eval.train_classifier import ClassifierTrainConfig, train_classifier

        config = ClassifierTrainConfig.smoke() if args.smoke else ClassifierTrainConfig()
        if args.n_train is not None:
            config.n_train = args.n_train
        train_classifier(args.out, args.minutes, args.smoke, args.device, args.seed, args.max_steps, config)
        return 0

    if args.command == "robustness":
        from magic3d.eval.robustness import evaluate_robustness, write_robustness_report

        result = evaluate_robustness(args.n_images, args.classifier, args.device, args.seed)
        json_path, md_path = write_robustness_report(result, args.out or Path(args.classifier) / "eval")
        print(md_path.read_text())
        print(f"wrote {json_path}")
        return 0

    if args.command == "dreambooth":
        import json

        from magic3d.eval.dreambooth import evaluate_personalisation, personalisation_markdown

        result = evaluate_personalisation(args.pipeline, args.lora, args.prompt, args.shape, args.colour,
                                          args.n_images, args.n_per_drift_caption, tuple(args.drift_shapes),
                                          tuple(args.drift_colours), args.steps, args.guidance_scale,
                                          args.classifier, args.batch_size, args.device, args.seed)
        out = args.out or args.lora / "eval.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result.to_json(), indent=2) + "\n")
        print(personalisation_markdown([result]))
        print(f"wrote {out}")
        return 0

    from magic3d.eval.aggregate import aggregate_runs
    from magic3d.eval.options import EvalOptions
    from magic3d.eval.prior import evaluate_prior
    from magic3d.eval.prior_report import (
        guidance_sweep_markdown,
        prior_quality_markdown,
        write_guidance_sweep,
        write_prior_report,
    )
    from magic3d.eval.run import evaluate_run

    if args.command == "prior":
        result = evaluate_prior(args.pipeline, args.n_per_caption, args.steps, args.guidance_scale, args.classifier,
                                tuple(args.shapes), tuple(args.colours), args.batch_size, args.device, args.seed)
        report = args.out or args.pipeline / "eval"
        json_path, md_path, _ = write_prior_report(result, report)
        print(md_path.read_text())
        print(f"wrote {json_path}")
        sweep = [result]
        for scale in dict.fromkeys(args.sweep_guidance):  # in the order given, each once
            if scale != args.guidance_scale:
                sweep.append(evaluate_prior(args.pipeline, args.n_per_caption, args.steps, scale, args.classifier,
                                            tuple(args.shapes), tuple(args.colours), args.batch_size, args.device,
                                            args.seed))
        if len(sweep) > 1:
            sweep.sort(key=lambda r: r.settings["guidance_scale"])
            sweep_json, sweep_md = write_guidance_sweep(sweep, report)
            print(sweep_md.read_text())
            print(f"wrote {sweep_json}")
        card = args.pipeline / "README.md"
        if args.update_card and card.is_file():
            from magic3d.priors.card import fill_quality_section

            section = prior_quality_markdown(result, md_path)
            if len(sweep) > 1:
                section += "\n\n" + guidance_sweep_markdown(sweep)
            print(f"{'updated' if fill_quality_section(card, section) else 'no quality marker in'} {card}")
        return 0

    if args.resolution is not None and args.iou_size is not None and args.iou_size != args.resolution:
        raise ValueError(f"--iou-size {args.iou_size} and --resolution {args.resolution} disagree: "
                         "--resolution sets the IoU size too; pass one of them")
    options = EvalOptions(views=args.views, elevation_deg=args.elevation, chamfer_resolution=args.chamfer_resolution,
                          chamfer_points=args.chamfer_points, resolution=args.resolution,
                          **({} if args.iou_size is None else {"iou_size": args.iou_size}))
    if args.command == "edit":
        from magic3d.eval.edit_run import evaluate_edit

        _, json_path, md_path = evaluate_edit(args.base_run, args.edit_run, args.scratch, options, args.classifier,
                                              args.device)
        print(md_path.read_text())
        print(f"wrote {json_path}, {md_path}")
        return 0
    if args.command == "run":
        result = evaluate_run(args.run_dir, options, args.stage, args.classifier, args.device, args.as_prompt)
        print(result.markdown_path.read_text())
        print(f"wrote {result.json_path}, {result.markdown_path}, {result.sheet_path}")
        for record in result.wandb_runs:
            where = f"`wandb sync {Path(record.sync_dir).parent}/offline-run-*-{record.id}`" if record.mode == "offline" else "online"
            print(f"logged the evaluation into W&B run {record.name} ({record.id}; {where})")
        return 0
    aggregate = aggregate_runs(args.folder, options, args.classifier, args.device, args.reevaluate)
    print(aggregate.markdown_path.read_text())
    print(f"wrote {aggregate.json_path}, {aggregate.markdown_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
