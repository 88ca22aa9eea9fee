"""CLI: ``python -m magic3d.priors train --kind pixel --out priors/pixel --minutes 8 --resume``.

``--minutes`` is the TOTAL training budget of the prior across resumed runs: rerunning the
same command after it finished only re-exports if the folder is missing or stale. Raise it
(with ``--resume``) to train longer.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from magic3d.priors.configs import PRIOR_KINDS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m magic3d.priors", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train (or continue) a prior and export it as a diffusers folder")
    train.add_argument("--kind", choices=PRIOR_KINDS, required=True)
    train.add_argument("--out", required=True, help="pipeline folder to write, e.g. priors/pixel")
    train.add_argument("--minutes", type=float, default=8.0, help="total training time budget (default 8)")
    train.add_argument("--resume", action="store_true", help="continue from the train state if it exists")
    train.add_argument("--init-from", default=None, metavar="FOLDER",
                       help="continue from an exported prior folder (weights, steps, config) when there is no state")
    train.add_argument("--state", default=None, help="train state file (default <out>/../.prior_ckpt/<kind>/train_state.pt)")
    train.add_argument("--smoke", action="store_true", help="tiny model, 64 images, 3 steps per phase (CPU tests)")
    train.add_argument("--max-steps", type=int, default=None, help="cap on each phase's total steps")
    train.add_argument("--device", default="auto", help="auto (CUDA if available), cuda, cuda:1 or cpu")
    train.add_argument("--max-mb", type=float, default=None, help="refuse to save a larger fp16 pipeline")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--n-images", type=int, default=None, help="images to render (new runs only)")
    train.add_argument("--batch-size", type=int, default=None, help="UNet batch size (new runs only)")
    train.add_argument("--lr", type=float, default=None, help="UNet learning rate (new runs only)")
    train.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None,
                       help="what the UNet predicts (new runs only; default epsilon)")
    train.add_argument("--image-size", type=int, default=None,
                       help="training resolution, e.g. 512 for the latent prior (new runs only; default 64 / 256)")
    train.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="torch.compile each phase's objective on CUDA (default on; new runs only)")
    bench = commands.add_parser("bench", help="time (and profile) the training step on random images")
    bench.add_argument("--variants", nargs="+", default=["pixel:unet:256:compile"],
                       help="kind:phase:batch:compile|eager[:mode], e.g. pixel:unet:256:compile latent:vae:32:eager")
    bench.add_argument("--steps", type=int, default=40, help="timed steps per variant (a third above batch 512)")
    bench.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    bench.add_argument("--profile-steps", type=int, default=0, help="torch.profiler breakdown over this many steps")
    bench.add_argument("--device", default="auto")
    bench.add_argument("--smoke", action="store_true", help="tiny configs (CPU check of the bench itself)")
    bench.add_argument("--out", default=None, help="folder for bench.json and profile tables")
    return parser


def _bench(args: argparse.Namespace) -> int:
    from magic3d.priors.bench import Variant, run_bench

    rows = run_bench([Variant.parse(v) for v in args.variants], args.steps, args.warmup, args.device, args.smoke,
                     args.profile_steps, args.out)
    return 1 if any("error" in r for r in rows) else 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "bench":
        return _bench(args)
    from magic3d.priors.configs import default_config, with_image_size
    from magic3d.priors.train import train_prior

    config = default_config(args.kind, args.smoke)
    if args.image_size is not None:
        config = with_image_size(config, args.image_size)
    if args.n_images is not None:
        config.n_images = args.n_images
    if args.batch_size is not None:
        config.batch_size = args.batch_size
    if args.lr is not None:
        config.lr = args.lr
    if args.compile is not None:
        config.compile = args.compile
    if args.prediction_type is not None:
        config.prediction_type = args.prediction_type
    argv_text = sys.argv[1:] if argv is None else argv
    result = train_prior(
        kind=args.kind,
        out=args.out,
        minutes=args.minutes,
        resume=args.resume,
        state_path=args.state,
        smoke=args.smoke,
        max_steps=args.max_steps,
        device=args.device,
        max_mb=args.max_mb,
        seed=args.seed,
        config=config,
        command="python -m magic3d.priors " + shlex.join(argv_text),
        init_from=args.init_from,
    )
    status = "exported" if result.exported else "up to date"
    print(f"{args.kind} prior {status}: {result.out} (steps {result.steps}, "
          f"{result.train_seconds / 60:.1f} min trained, {result.fp16_mb:.2f} MB fp16)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
