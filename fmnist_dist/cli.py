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
from typing import NoReturn

import fmnist_dist
from fmnist_dist.errors import UsageError
from fmnist_dist.inputs.backgrounds import BACKGROUNDS
from fmnist_dist.recipe.model import CLASSES
from fmnist_dist.runtime.job_exit import ThisProcessStopped, clean_up_warnings, leave_job, record_for_launcher
from fmnist_dist.runtime.launcher_death import stop_with_launcher
from fmnist_dist.runtime.output_streams import keep_output_from_failing
from fmnist_dist.runtime.stop_signals import PREEMPTED_EXIT_CODE, StopRequest, TrainingStopped
from fmnist_dist.settings import commands
from fmnist_dist.settings.declaration import SWITCH, Setting, nonempty_path
from fmnist_dist.settings.train_config import DEFAULTS, EXCLUSIVE_PAIRS, SETTINGS, TrainConfig, flag_of
from fmnist_dist.storage import strict_json
from fmnist_dist.storage.run_dir import RunDirectory

USAGE_ERROR = 2
# Where `train` writes its model by default, which evaluate and predict read.
DEFAULT_CHECKPOINT = RunDirectory(TrainConfig().output_dir).model


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: ...)" after each flag's help, except where there is no value to show: None (the help
    says what happens), on/off switches and empty lists."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        # The hook ArgumentDefaultsHelpFormatter itself overrides; argparse offers no public one.
        if not _shows_default(action.default):
            return action.help
        return super()._get_help_string(action)


def _shows_default(default: object) -> bool:
    """Whether --help shows "(default: ...)": not for None (the help says what happens), on/off switches and empty
    lists."""
    return default is not None and not isinstance(default, bool) and default not in ([], ())


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
    keep_output_from_failing()  # first: a closed or broken stdout or stderr never ends a run; a log shows each line
    stop_with_launcher()  # a launcher killed from now on takes this process with it
    argv = list(sys.argv[1:] if argv is None else argv)
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # reported by the subcommand's parser, so that the message points to its --help
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        _check_declared(args)
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


def _add_flag(
    parser: argparse.ArgumentParser | argparse._MutuallyExclusiveGroup,
    flag: str,
    dest: str,
    declared: Setting,
    default: object,
    track_given: bool = False,
) -> None:
    """Add the flag of a declared setting.

    Args:
        track_given: leave the flag out of the parsed namespace unless it is given (argparse.SUPPRESS), so that
            the namespace itself says which flags were given; the help still shows `default`.
    """
    help_text = declared.help
    if track_given and _shows_default(default):
        help_text += f" (default: {default})"
    options: dict[str, object] = {
        "dest": dest,
        "help": help_text,
        "default": argparse.SUPPRESS if track_given else default,
    }
    if declared.kind is SWITCH:  # an on switch, or the off switch of a setting that is on by default
        options["action"] = "store_false" if default else "store_true"
    else:
        options.update(
            type=declared.kind.parse, choices=declared.choices, nargs=declared.nargs, metavar=declared.metavar
        )
        if declared.const is not None:
            options["const"] = declared.const
    parser.add_argument(flag, **options)  # type: ignore[arg-type]


def _add_declared(parser: argparse.ArgumentParser, flags: dict[str, tuple[str, Setting, object]]) -> None:
    """Add flags `{dest: (flag, setting, default)}` and have `main` check their values before the handler runs."""
    for dest, (flag, declared, default) in flags.items():
        _add_flag(parser, flag, dest, declared, default)
    parser.set_defaults(declared={dest: (flag, declared) for dest, (flag, declared, _) in flags.items()})


def _check_declared(args: argparse.Namespace) -> None:
    """Refuse a value outside its declared bounds (train's are checked by TrainConfig itself)."""
    for dest, (flag, declared) in getattr(args, "declared", {}).items():
        declared.check(flag, getattr(args, dest))


def _data_flags() -> dict[str, tuple[str, Setting, object]]:
    return {name: (flag_of(name), SETTINGS[name], DEFAULTS[name]) for name in ("data_dir", "download")}


def _add_train(parser: argparse.ArgumentParser) -> None:
    """Every TrainConfig field as a flag; a flag not given is absent from the namespace (see `_train`)."""
    groups = {}
    for one, other in EXCLUSIVE_PAIRS:
        groups[one] = groups[other] = parser.add_mutually_exclusive_group()
    for name, declared in SETTINGS.items():
        _add_flag(groups.get(name, parser), flag_of(name), name, declared, DEFAULTS[name], track_given=True)
    parser.set_defaults(handler=_train, command_parser=parser)


def _checkpoint_flag() -> dict[str, tuple[str, Setting, object]]:
    return {"checkpoint": ("--checkpoint", commands.CHECKPOINT, DEFAULT_CHECKPOINT)}


def _add_evaluate(parser: argparse.ArgumentParser) -> None:
    _add_declared(
        parser,
        {
            **_checkpoint_flag(),
            **_data_flags(),
            "batch_size": ("--batch-size", commands.EVAL_BATCH_SIZE, 1000),
        },
    )
    parser.add_argument("--cpu", action="store_true", help="evaluate on the CPU even with a GPU")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=_evaluate, command_parser=parser)


def _add_predict(parser: argparse.ArgumentParser) -> None:
    _add_declared(parser, {**_checkpoint_flag(), **_data_flags()})
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--index", type=int, nargs="+", help="test-set indices")
    what.add_argument("--image", type=nonempty_path, nargs="+", help="image files (PNG, JPEG; any size)")
    parser.add_argument(
        "--background",
        choices=BACKGROUNDS,
        default="auto",
        help="with --image: the ground the garments stand on; white (a product photo) is inverted to "
        "FashionMNIST's light on dark, and transparent parts are filled with it; auto judges each image",
    )
    parser.set_defaults(handler=_predict, command_parser=parser)


def _add_synthetic(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=nonempty_path, required=True, help=commands.DATASET_OUT.help)
    _add_declared(
        parser,
        {
            "train_size": ("--train-size", commands.TRAIN_SIZE, 60000),
            "test_size": ("--test-size", commands.TEST_SIZE, 10000),
            "seed": ("--seed", commands.SYNTHETIC_SEED, 0),
        },
    )
    parser.add_argument("--force", action="store_true", help="replace a dataset already in --out")
    parser.set_defaults(handler=_synthetic, command_parser=parser)


def _add_plot(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", type=nonempty_path, metavar="RUN", help=commands.RUN.help)
    parser.set_defaults(handler=_plot, command_parser=parser)


def train_settings(args: argparse.Namespace) -> tuple[TrainConfig, frozenset[str]]:
    """The settings of a parsed `train` command line, and the names of those written on it.

    The namespace holds only the flags given (see `_add_train`): they are what a resumed run takes over the
    saved settings, and TrainConfig fills in the rest.

    Raises:
        UsageError: a value its setting does not allow.
    """
    given = {name: value for name, value in vars(args).items() if name in SETTINGS}
    return TrainConfig.from_plain(given), frozenset(given)


def _train(args: argparse.Namespace) -> int:
    cfg, given = train_settings(args)  # a bad value fails here, before the slow imports
    # Before the slow imports, so that a preemption during start-up is not lost either; kept until the process
    # exits, so that a signal after training has finished does not turn a finished run into a killed one.
    stop = StopRequest().install()
    from fmnist_dist.runtime.collective_errors import lost_peers_reported
    from fmnist_dist.training.job import run_training  # heavy imports only for the commands that need them

    with lost_peers_reported():
        run_training(cfg, given, stop)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from fmnist_dist.inference import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, args.data_dir, args.download, args.batch_size, args.cpu)
    if not _is_main_process():
        return 0
    # None (JSON null) for a class the test set lacks: NaN is not valid JSON.
    per_class = {
        name: None if math.isnan(a) else a for name, a in zip(CLASSES, result.per_class_accuracy(), strict=True)
    }
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
        return _results_printed()
    print(f"test accuracy {100 * result.accuracy:.2f}%, loss {result.loss:.4f} ({result.samples} images)")
    for name, accuracy in per_class.items():
        print(f"  {name:<12} " + ("no test images" if accuracy is None else f"{100 * accuracy:6.2f}%"))
    return _results_printed()


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
    return _results_printed()


def _results_printed() -> int:
    """0 once the results of `evaluate` or `predict` are on stdout, their only output.

    A stdout that failed (a redirect to a full disk, a closed descriptor, a reader that left) drops what is
    written to it rather than raise (`keep_output_from_failing`, for training's sake); here the results are lost,
    and a script must not read the empty file as an answer.

    Raises:
        UsageError: stdout failed, so the results were not written.
    """
    sys.stdout.flush()
    if getattr(sys.stdout, "lost", False):
        raise UsageError(
            "standard output failed (closed, a full disk, or its reader left), so the results were not written; "
            "run again with standard output going to a terminal, a pipe or a file that can take them"
        )
    return 0


def _synthetic(args: argparse.Namespace) -> int:
    from fmnist_dist.inputs.synthetic import write_synthetic_dataset

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
    written = plot_run(
        records_for_plot(given if given.is_file() else run_dir.metrics), run_dir.curves, run_dir.confusion
    )
    print(f"wrote {' and '.join(map(str, written))}")
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
