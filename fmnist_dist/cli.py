"""The `fmnist-dist` command line: parses flags and hands over to the module that does the work.

fmnist-dist train [--epochs N] [--batch-size N] ...      (also under `accelerate launch -m fmnist_dist`)
fmnist-dist evaluate [--checkpoint checkpoints/model.pth] [--json]
fmnist-dist predict [--checkpoint checkpoints/model.pth] --index 0 1 2 | --image shirt.png
fmnist-dist synthetic-data --out data-synthetic [--force]
fmnist-dist plot checkpoints            (or checkpoints/metrics.jsonl)
fmnist-dist --version; fmnist-dist SUBCOMMAND --help lists every flag with its default
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import fmnist_dist
from fmnist_dist.errors import UsageError
from fmnist_dist.inputs.backgrounds import BACKGROUNDS
from fmnist_dist.recipe.model import CLASSES
from fmnist_dist.runtime.job_exit import ThisProcessStopped, clean_up_warnings, leave_job, record_for_launcher
from fmnist_dist.runtime.launcher_death import stop_with_launcher
from fmnist_dist.runtime.output_streams import keep_output_from_failing
from fmnist_dist.runtime.stop_signals import PREEMPTED_EXIT_CODE, StopRequest, TrainingStopped
from fmnist_dist.settings.train_config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_LR,
    DEFAULT_MOMENTUM,
    DEFAULT_WARMUP_EPOCHS,
    LR_SCHEDULES,
    REFERENCE_BATCH_SIZE,
    RESUME_LATEST,
    TrainConfig,
    check_at_most,
    check_count,
    check_positive,
    check_seed,
)
from fmnist_dist.storage import strict_json
from fmnist_dist.storage.run_dir import RunDirectory

USAGE_ERROR = 2
# Where `train` writes its model by default, which evaluate and predict read.
DEFAULT_CHECKPOINT = RunDirectory(TrainConfig().output_dir).model
# synthetic-data builds each split in memory (about 7 KB per image while it is drawn).
MAX_SYNTHETIC_IMAGES = 1_000_000


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: ...)" after each flag's help, except where there is no value to show: None (the help
    says what happens), on/off switches and empty lists."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        # The hook ArgumentDefaultsHelpFormatter itself overrides; argparse offers no public one.
        if action.default is None or isinstance(action.default, bool) or action.default == []:
            return action.help
        return super()._get_help_string(action)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported in one line (with a pointer to --help) instead of the usage block,
    and --help shows every flag's default."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        _report(f"{message} (see `{self.prog} --help`)")
        raise SystemExit(USAGE_ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; a UsageError becomes one line on stderr and exit code 2, a requested stop exit 75.

    Each process leaves its process group before it exits, and gives its line to torch's launcher for its report.
    """
    keep_output_from_failing()  # first: a closed or broken stdout or stderr never ends a run
    stop_with_launcher()  # a launcher killed from now on takes this process with it
    argv = list(sys.argv[1:] if argv is None else argv)
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # reported by the subcommand's parser, so that the message points to its --help
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.argv = argv
    try:
        return args.handler(args)
    except UsageError as error:
        _report(str(error), error)
        return USAGE_ERROR
    except TrainingStopped as stopped:
        if _is_main_process():
            print(f"fmnist-dist: {stopped}", file=sys.stderr, flush=True)
        _report_to_launcher_and_warn(str(stopped), stopped)
        return PREEMPTED_EXIT_CODE
    except KeyboardInterrupt as interrupted:
        _report(
            "interrupted at once, without saving (a second Ctrl-C); `fmnist-dist train --resume auto` continues "
            "from the newest complete state, if there is one",
            interrupted,
        )
        return 130
    finally:
        leave_job()


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="fmnist-dist", description="FashionMNIST training with Hugging Face Accelerate.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {fmnist_dist.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrorParser)
    _add_train(commands.add_parser("train", help="train the model (one device, or many under accelerate launch)"))
    _add_evaluate(commands.add_parser("evaluate", help="test accuracy and loss of a saved model"))
    _add_predict(commands.add_parser("predict", help="predicted classes of test images or image files"))
    _add_synthetic(commands.add_parser("synthetic-data", help="write a synthetic dataset in FashionMNIST's format"))
    _add_plot(commands.add_parser("plot", help="redraw curves.png and confusion.png from a run's metrics.jsonl"))
    return parser


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=TrainConfig().data_dir,
        help="dataset root (torchvision's: FashionMNIST/raw holds the IDX files)",
    )
    parser.add_argument(
        "--no-download",
        dest="download",
        action="store_false",
        help="fail instead of downloading FashionMNIST when any of its files is missing",
    )


def _add_train(parser: argparse.ArgumentParser) -> None:
    _add_data_flags(parser)
    defaults = TrainConfig()
    add = parser.add_argument
    add("--epochs", type=int, default=defaults.epochs, help="passes over the training set")
    batch = parser.add_mutually_exclusive_group()
    batch.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"images per process per micro-batch (default {DEFAULT_BATCH_SIZE}); the global batch "
        "grows with the number of processes",
    )
    batch.add_argument(
        "--global-batch-size",
        type=int,
        default=None,
        help="images per optimizer step across all processes and accumulation steps, split evenly: "
        "the same batches on any number of processes",
    )
    add("--eval-batch-size", type=int, default=defaults.eval_batch_size, help="per process, for evaluation")
    add("--lr", type=float, default=DEFAULT_LR, help="SGD learning rate (the tutorial's is 1e-3)")
    add("--momentum", type=float, default=DEFAULT_MOMENTUM, help="SGD momentum (the tutorial's is 0)")
    add("--weight-decay", type=float, default=defaults.weight_decay, help="SGD weight decay (L2)")
    add(
        "--scale-lr",
        action="store_true",
        help=f"linear scaling rule: multiply --lr by global batch size / {REFERENCE_BATCH_SIZE} (with a warm-up)",
    )
    add(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        default=defaults.lr_schedule,
        help="after the warm-up: constant, cosine (CosineAnnealingLR to 0) or onecycle (OneCycleLR); the "
        "tutorial's is constant",
    )
    warmup = parser.add_mutually_exclusive_group()
    warmup.add_argument(
        "--warmup-steps", type=int, default=None, help="optimizer steps of linear warm-up from lr/10 to lr"
    )
    warmup.add_argument(
        "--warmup-epochs",
        type=float,
        default=None,
        help=f"linear warm-up over this many epochs (default: {DEFAULT_WARMUP_EPOCHS} unless "
        "--warmup-steps is given; fractions allowed; the tutorial's is 0)",
    )
    add("--seed", type=int, default=defaults.seed, help="initial weights and the shuffling of every epoch")
    add(
        "--threads",
        type=int,
        default=None,
        help="CPU threads per process (default: OMP_NUM_THREADS if set, as `accelerate launch` and torchrun set it "
        "for their processes; else the usable cores divided by the processes on this node)",
    )
    add("--num-workers", type=int, default=defaults.num_workers, help="DataLoader worker processes")
    add(
        "--data-on-device",
        choices=("auto", "on", "off"),
        default=defaults.data_on_device,
        help="keep the dataset on the accelerator (auto: on for GPUs, off for the CPU)",
    )
    add("--output-dir", type=Path, default=defaults.output_dir, help="model.pth, metrics.jsonl, plots, states")
    add(
        "--overwrite",
        action="store_true",
        help="start afresh in an --output-dir that holds an earlier run (its states, metrics and model are replaced)",
    )
    add("--cpu", action="store_true", help="train on the CPU (gloo across processes) even with a GPU")
    add(
        "--mixed-precision",
        choices=("no", "fp16", "bf16"),
        default=None,
        help="default: what `accelerate config`/`accelerate launch` says",
    )
    add("--gradient-accumulation-steps", type=int, default=None, help="default: what `accelerate launch` says, else 1")
    add("--log-every", type=int, default=defaults.log_every, help="log the train loss every N optimizer steps")
    add(
        "--checkpoint-every",
        type=int,
        default=defaults.checkpoint_every,
        help="also save a resumable state every N steps (0: only at the end of each epoch)",
    )
    add("--keep-states", type=int, default=defaults.keep_states, help="how many saved states to keep")
    add(
        "--resume",
        nargs="?",
        const=RESUME_LATEST,
        default=None,
        metavar="auto|STATE_DIR",
        help="continue from the newest state in --output-dir, or from STATE_DIR; `--resume auto` also starts "
        "afresh when there is no state (the same command for the first start and every restart)",
    )
    add("--no-progress", dest="progress", action="store_false", help="no progress bar (one line per epoch stays)")
    add("--tracker", choices=("wandb", "none"), default=defaults.tracker, help="where the run is tracked")
    add("--wandb-project", default=defaults.wandb_project, help="W&B project")
    add("--run-name", default=None, help="W&B run name (default: W&B picks one)")
    add("--run-group", default=None, help="W&B run group")
    add("--tags", nargs="+", default=[], help="W&B run tags")
    add(
        "--log-samples-every-epoch",
        action="store_true",
        help="log sample predictions and the confusion matrix after every epoch, not only at the end",
    )
    add("--log-model", action="store_true", help="store the final model.pth as a W&B artifact")
    parser.set_defaults(handler=_train, command_parser=parser)


def _add_checkpoint_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=DEFAULT_CHECKPOINT,
        help="model weights saved by `fmnist-dist train` (or the PyTorch quickstart), or a saved "
        "state's model.safetensors",
    )


def _add_evaluate(parser: argparse.ArgumentParser) -> None:
    _add_checkpoint_flag(parser)
    _add_data_flags(parser)
    parser.add_argument("--batch-size", type=int, default=1000, help="test images per process per batch")
    parser.add_argument("--cpu", action="store_true", help="evaluate on the CPU even with a GPU")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=_evaluate, command_parser=parser)


def _add_predict(parser: argparse.ArgumentParser) -> None:
    _add_checkpoint_flag(parser)
    _add_data_flags(parser)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--index", type=int, nargs="+", help="test-set indices")
    what.add_argument("--image", type=Path, nargs="+", help="image files (PNG, JPEG; any size)")
    parser.add_argument(
        "--background",
        choices=BACKGROUNDS,
        default="auto",
        help="with --image: the ground the garments stand on; white (a product photo) is inverted to "
        "FashionMNIST's light on dark, and transparent parts are filled with it; auto judges each image",
    )
    parser.set_defaults(handler=_predict, command_parser=parser)


def _add_synthetic(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="dataset root to write (use it as --data-dir)")
    parser.add_argument("--train-size", type=int, default=60000, help=f"training images (1-{MAX_SYNTHETIC_IMAGES})")
    parser.add_argument("--test-size", type=int, default=10000, help=f"test images (1-{MAX_SYNTHETIC_IMAGES})")
    parser.add_argument("--seed", type=int, default=0, help="the random patterns and images")
    parser.add_argument("--force", action="store_true", help="replace a dataset already in --out")
    parser.set_defaults(handler=_synthetic, command_parser=parser)


def _add_plot(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "output_dir",
        type=Path,
        metavar="RUN",
        help="a training run's --output-dir, or its metrics.jsonl (the plots go next to it)",
    )
    parser.set_defaults(handler=_plot, command_parser=parser)


def _train(args: argparse.Namespace) -> int:
    fields = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    given = given_flags(args.argv)
    cfg = TrainConfig(**{**fields, "tags": tuple(args.tags)})  # a bad value fails here, before the slow imports
    # Before the slow imports, so that a preemption during start-up is not lost either; kept until the process
    # exits, so that a signal after training has finished does not turn a finished run into a killed one.
    stop = StopRequest().install()
    from fmnist_dist.runtime.collective_errors import lost_peers_reported
    from fmnist_dist.training.job import run_training  # heavy imports only for the commands that need them

    with lost_peers_reported():
        run_training(cfg, given, stop)
    return 0


def given_flags(argv: Sequence[str]) -> frozenset[str]:
    """The `train` settings written on this command line (a resumed run takes the others from its state)."""
    parser = OneLineErrorParser(prog="fmnist-dist train")
    _add_train(parser)
    not_given = object()  # not a string: argparse would run a string default through the flag's type
    parser.set_defaults(**dict.fromkeys(TrainConfig.__dataclass_fields__, not_given))
    subcommand_args = list(argv)[list(argv).index("train") + 1 :]
    given = {k for k, v in vars(parser.parse_args(subcommand_args)).items() if v is not not_given}
    return frozenset(given & TrainConfig.__dataclass_fields__.keys())


def _evaluate(args: argparse.Namespace) -> int:
    from fmnist_dist.inference import evaluate_checkpoint

    check_count("--batch-size", args.batch_size)
    result = evaluate_checkpoint(args.checkpoint, args.data_dir, args.download, args.batch_size, args.cpu)
    if not _is_main_process():
        return 0
    # None (JSON null) for a class the test set lacks: NaN is not valid JSON.
    per_class = {name: None if math.isnan(a) else a for name, a in zip(CLASSES, result.per_class_accuracy())}
    if args.json:
        print(
            strict_json.dumps(
                {
                    "accuracy": result.accuracy,
                    "loss": result.loss,
                    "samples": result.samples,
                    "per_class_accuracy": per_class,
                }
            )
        )
        return 0
    print(f"test accuracy {100 * result.accuracy:.2f}%, loss {result.loss:.4f} ({result.samples} images)")
    for name, accuracy in per_class.items():
        print(f"  {name:<12} " + ("no test images" if accuracy is None else f"{100 * accuracy:6.2f}%"))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from fmnist_dist.inference import predict_files, predict_test_images

    if args.image:
        predictions = predict_files(args.checkpoint, args.image, args.background)
    elif args.background != "auto":
        raise UsageError("--background describes the files of --image; test images (--index) need none")
    else:
        predictions = predict_test_images(args.checkpoint, args.data_dir, args.download, args.index)
    for p in predictions:
        actual = f', actual: "{p.actual}"' if p.actual else ""
        print(f'{p.source}: predicted: "{p.predicted}" ({100 * p.probability:.1f}%){actual}')
    return 0


def _synthetic(args: argparse.Namespace) -> int:
    from fmnist_dist.inputs.synthetic import write_synthetic_dataset

    for flag, size in (("--train-size", args.train_size), ("--test-size", args.test_size)):
        check_positive(flag, size)
        check_at_most(flag, size, MAX_SYNTHETIC_IMAGES)
    check_seed("--seed", args.seed)
    raw_dir = write_synthetic_dataset(args.out, args.train_size, args.test_size, args.seed, force=args.force)
    print(
        f"wrote {args.train_size} train and {args.test_size} test images to {raw_dir}; train with --data-dir {args.out}"
    )
    return 0


def _plot(args: argparse.Namespace) -> int:
    from fmnist_dist.storage.metrics_log import records_for_plot
    from fmnist_dist.storage.plots import plot_run

    given = args.output_dir
    run_dir = RunDirectory(given.parent if given.is_file() else given)  # a run directory, or the metrics file in one
    plot_run(records_for_plot(given if given.is_file() else run_dir.metrics), run_dir.curves, run_dir.confusion)
    print(f"wrote {run_dir.curves} and {run_dir.confusion}")
    return 0


def _is_main_process() -> bool:
    # Set by accelerate launch / torchrun; absent in a plain run.
    return os.environ.get("RANK", "0") == "0"


def _report(message: str, error: BaseException | None = None) -> None:
    """Print an error, one line per line of `message`, once per node; then the clean-up warnings it carries.

    Where several processes share a node they hit the same error (the same flags, files and data), or one
    process hit it and `collective_errors.fail_together` brought its message to them all: the node's first
    process (LOCAL_RANK 0, set by the launcher; absent in a plain run) prints it. An error of one process alone
    (`ThisProcessStopped`: its peers are gone) is printed by that process, whichever it is.
    """
    if os.environ.get("LOCAL_RANK", "0") == "0" or isinstance(error, ThisProcessStopped):
        for line in message.splitlines():
            print(f"fmnist-dist: error: {line}", file=sys.stderr, flush=True)
    _report_to_launcher_and_warn(message, error)


def _report_to_launcher_and_warn(message: str, error: BaseException | None) -> None:
    """The line for torch's launcher's report, and the warnings of the clean-up steps that failed on the way."""
    record_for_launcher(message)
    for warning in clean_up_warnings(error):
        print(f"fmnist-dist: warning: {warning}", file=sys.stderr, flush=True)
