"""MkDocs hook: pages that are generated from the code at build time, so that they cannot drift from it.

A page holds a marker comment where the generated text goes:

    <!-- generated: cli -->            every subcommand and flag of `fmnist_dist.cli.build_parser()`, with the
                                       range and default each flag's declaration gives (`fmnist_dist.settings`)
    <!-- generated: run-directory -->  the tree of an output directory that `fmnist_dist.storage.run_dir` declares
    <!-- generated: progress-fields --> the fields of a state's progress.json, from the `Progress` docstring
    <!-- generated: metrics-fields --> the fields of a metrics.jsonl record: `EpochRecord`'s fields, their types,
                                       tracker names and `Attributes:` docstring
    <!-- generated: peak-flops -->     the dense peak FLOP/s of each GPU that MFU is reported for, by precision:
                                       `fmnist_dist.runtime.throughput.PEAK_FLOPS`

Nothing between or around the markers is generated; a marker the hook does not know fails the build.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import math
import os
import re
import types
import typing
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fmnist_dist.settings.declaration import Setting

MARKER = re.compile(r"<!-- generated: ([a-z-]+) -->")
# The values of a flag, by the name of its argparse `type`.
TYPE_NAMES = {"int": "integer", "float": "number", "Path": "path", "nonempty_path": "non-empty path", "str": "text"}
# The limits of the machine a command runs on (a `Bounds.high` that is a function), by the function's name.
MACHINE_LIMITS = {"_cpu_count": "the machine's CPU count"}
JSON_TYPE_NAMES = {int: "integer", str: "string"}


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Replace each `<!-- generated: NAME -->` marker with the text its generator writes."""
    return MARKER.sub(lambda match: _generator(match.group(1))(), markdown)


def _generator(name: str) -> Callable[[], str]:
    generators = {
        "cli": cli_reference,
        "run-directory": run_directory_tree,
        "progress-fields": progress_fields,
        "metrics-fields": metrics_fields,
        "peak-flops": peak_flops_table,
    }
    if name not in generators:
        raise ValueError(f"unknown generated section {name!r}; known: {', '.join(generators)}")
    return generators[name]


def cli_reference() -> str:
    """Markdown for the whole command line: the top-level options, then one section per subcommand."""
    from fmnist_dist.cli import build_parser

    parser = build_parser()
    sections = [_usage(parser), _options_table(parser, {})]
    for name, subparser in _subcommands(parser):
        sections += [f"## `{parser.prog} {name}`", _help_of(parser, name), _usage(subparser)]
        sections += [_options_table(subparser, _declarations(name, subparser))]
        sections += _exclusive_groups(subparser)
    return "\n\n".join(section for section in sections if section)


def run_directory_tree() -> str:
    """The output-directory tree from `fmnist_dist.storage.run_dir`'s docstring, which declares every name."""
    from fmnist_dist.storage import run_dir

    doc = inspect.getdoc(run_dir) or ""
    tree = re.search(r"^<output-dir>/\n(?:[ \t]+\S.*\n?)+", doc, re.MULTILINE)
    if tree is None:
        raise ValueError("fmnist_dist.storage.run_dir's docstring has no `<output-dir>/` tree to generate from")
    return f"```text\n{tree.group(0).rstrip()}\n```"


def progress_fields() -> str:
    """A list of the fields of a state's progress.json: the `Attributes:` section of `Progress`'s docstring."""
    from fmnist_dist.storage.training_state import Progress

    return "\n".join(f"- {', '.join(f'`{name}`' for name in names)}: {text}" for names, text in _attributes(Progress))


def metrics_fields() -> str:
    """A table of the fields of a metrics.jsonl record, one row per field of `EpochRecord`, in the JSON's order.

    Raises:
        ValueError: a field lacks its line under `Attributes:` in `EpochRecord`'s docstring, or a line there
            names no field.
    """
    from fmnist_dist.storage.metrics_log import TRACKER_KEY, EpochRecord

    described = {name: text for names, text in _attributes(EpochRecord) for name in names}
    fields = dataclasses.fields(EpochRecord)
    if undocumented := sorted({f.name for f in fields} ^ described.keys()):
        raise ValueError(f"EpochRecord's fields and the Attributes: of its docstring differ in: {undocumented}")
    hints = typing.get_type_hints(EpochRecord)
    rows = [
        f"| `{f.name}` | {_json_type(hints[f.name])} | {_always_there(f)} | "
        f"{f'`{f.metadata[TRACKER_KEY]}`' if TRACKER_KEY in f.metadata else ''} | {described[f.name]} |"
        for f in fields
    ]
    header = "| field | type | in every record | name in the tracker | what |\n| --- | --- | --- | --- | --- |"
    return "\n".join([header, *rows])


def peak_flops_table() -> str:
    """A table of `PEAK_FLOPS`: one row per GPU, in the order they are matched, its peaks in TFLOP/s by precision."""
    from fmnist_dist.runtime.throughput import PEAK_FLOPS

    precisions = ("fp32", "tf32", "bf16", "fp16", "fp8")
    header = "| GPU | found in the device name (regular expression) | " + " | ".join(precisions) + " | source |"
    rows = [
        f"| {peak.name} | `{peak.pattern}` | "
        + " | ".join(f"{peak.flops[p] / 1e12:g}" if p in peak.flops else "" for p in precisions)
        + f" | [datasheet]({peak.source}) |"
        for peak in PEAK_FLOPS
    ]
    return "\n".join([header, "| --- " * (len(precisions) + 3) + "|", *rows])


def _attributes(cls: type) -> list[tuple[list[str], str]]:
    """The `Attributes:` section of a class's docstring: each item's names (`a, b: ...` names two) and text."""
    doc = inspect.getdoc(cls) or ""
    if "Attributes:" not in doc:
        raise ValueError(f"{cls.__name__}'s docstring has no Attributes: section to generate its fields from")
    section = inspect.cleandoc(doc.split("Attributes:", 1)[1])
    items = re.split(r"\n(?=\S)", section)  # an attribute starts a line; its continuation lines are indented
    return [_attribute(item) for item in items if item.strip()]


def _attribute(item: str) -> tuple[list[str], str]:
    names, _, text = item.partition(": ")
    return [name.strip() for name in names.split(",")], " ".join(text.split())


def _json_type(hint: object) -> str:
    """How a field's type reads in the JSON: `int | None` is an integer, null where a float was not finite."""
    kinds = [arg for arg in typing.get_args(hint) if arg is not type(None)] if _is_optional(hint) else [hint]
    (kind,) = kinds
    if kind is float:
        return "number, or null where not finite"
    if typing.get_origin(kind) is list:  # the confusion matrix, one row and one column per class
        from fmnist_dist.recipe.model import CLASSES

        return f"{len(CLASSES)} x {len(CLASSES)} integers" + (", or null" if _is_optional(hint) else "")
    if kind not in JSON_TYPE_NAMES:
        raise ValueError(f"no JSON name for the type {kind!r} of an EpochRecord field; add it to JSON_TYPE_NAMES")
    return JSON_TYPE_NAMES[kind]


def _is_optional(hint: object) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def _always_there(field: dataclasses.Field) -> str:
    # A field with a default is one that older versions did not write: their records lack it.
    required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
    return "yes" if required else "not in older versions' records"


def _subcommands(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    # argparse keeps subparsers in a private action type; its `choices` maps each name to its parser.
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def _help_of(parser: argparse.ArgumentParser, name: str) -> str:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                if choice.dest == name and choice.help:
                    return choice.help[0].upper() + choice.help[1:] + "."
    return ""


def _usage(parser: argparse.ArgumentParser) -> str:
    # argparse wraps the usage to the terminal's width (COLUMNS): fixed here, so that every build is the same.
    with _environment(COLUMNS="72"):
        usage = parser.format_usage().strip()
    return f"```text\n{usage}\n```"


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value


def _declarations(command: str, parser: argparse.ArgumentParser) -> dict[str, tuple[Setting, object]]:
    """`{dest: (Setting, default)}` for each flag of a subcommand that is declared in `fmnist_dist.settings`.

    train's flags are TrainConfig's fields (argparse holds no default for them: a flag not given stays out of the
    namespace); the other subcommands keep theirs in the parser's `declared` default, which the CLI checks.
    """
    from fmnist_dist.settings.train_config import DEFAULTS, SETTINGS

    if command == "train":
        return {name: (declared, DEFAULTS[name]) for name, declared in SETTINGS.items()}
    defaults = {action.dest: action.default for action in parser._actions}
    declared_flags = parser.get_default("declared") or {}
    return {dest: (declared, defaults[dest]) for dest, (_, declared) in declared_flags.items()}


def _options_table(parser: argparse.ArgumentParser, declarations: dict[str, tuple[Setting, object]]) -> str:
    rows = [_row(action, declarations.get(action.dest)) for action in parser._actions if _documented(action)]
    if not rows:
        return ""
    header = "| option | what | default | values |\n| --- | --- | --- | --- |"
    return "\n".join([header, *rows])


def _documented(action: argparse.Action) -> bool:
    # -h/--help is on every command and said once on the page.
    hidden = (argparse._SubParsersAction, argparse._HelpAction)
    return action.help is not argparse.SUPPRESS and not isinstance(action, hidden)


def _row(action: argparse.Action, declaration: tuple[Setting, object] | None) -> str:
    """One flag's row; a declared flag's help, default and range come from its declaration."""
    names = ", ".join(f"`{name}`" for name in action.option_strings) or f"`{action.metavar or action.dest}`"
    if declaration is None:
        cells = [names, _help_text(action.help), _default(action, action.default), _values(action)]
    else:
        declared, default = declaration
        values = ", ".join([_values(action), *([_range(declared)] if declared.bounds else [])])
        cells = [names, _help_text(declared.help), _default(action, default), values]
    return "| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in cells) + " |"


def _help_text(help: str | None) -> str:
    text = (help or "").replace("%(prog)s", "fmnist-dist")
    return text.replace("%%", "%")


def _default(action: argparse.Action, default: object) -> str:
    if action.required:
        return "required"
    # A switch has no value; None and an empty list mean "not given", and the help says what then happens.
    if action.nargs == 0 or default is None or default in ([], ()):
        return ""
    return f"`{default}`"


def _values(action: argparse.Action) -> str:
    if action.nargs == 0:
        return "switch"
    parts = []
    if action.choices:
        parts.append(" | ".join(f"`{choice}`" for choice in action.choices))  # the row escapes the bars
    elif action.metavar and "|" in action.metavar:
        # "auto|STATE_DIR" lists the values, which says more than their type; the bar stays outside the code
        # spans, where the row escapes it.
        parts.append(" | ".join(f"`{value}`" for value in action.metavar.split("|")))
    elif action.type is not None:
        name = getattr(action.type, "__name__", str(action.type))
        parts.append(TYPE_NAMES.get(name, name))
    else:
        parts.append("text")
    if action.nargs in ("+", "*"):
        parts.append("one or more" if action.nargs == "+" else "any number")
    elif action.nargs == "?":
        parts.append("may also be given without a value")
    return ", ".join(parts)


def _range(declared: Setting) -> str:
    """A declared number's range in words ("1 to 2^31-1", "at least 0, below 1"), from its `Bounds`."""
    from fmnist_dist.settings.declaration import WHOLE

    bounds = declared.bounds
    assert bounds is not None
    low, low_open, high, high_open = bounds.low, bounds.low_open, bounds.high, bounds.high_open
    if declared.kind is WHOLE:  # the open end of a range of whole numbers is the next whole number inside
        if low_open:
            low, low_open = low + 1, False
        if high_open and not callable(high):
            high, high_open = high - 1, False
    if not callable(high) and high == math.inf:
        return f"more than {_number(low)}" if low_open else f"{_number(low)} or more"
    if not (low_open or high_open):
        return f"{_number(low)} to {_limit(high)}"
    above = f"{'more than' if low_open else 'at least'} {_number(low)}"
    return f"{above}, {'below' if high_open else 'at most'} {_limit(high)}"


def _limit(high: float | Callable[[], float]) -> str:
    """An upper end: a number, or the machine limit a function stands for (its value here is not the reader's)."""
    if not callable(high):
        return _number(high)
    name = getattr(high, "__name__", repr(high))
    if name not in MACHINE_LIMITS:
        raise ValueError(f"no words for the machine limit {name} of a setting's Bounds; add it to MACHINE_LIMITS")
    return MACHINE_LIMITS[name]


def _number(value: float) -> str:
    # 2^31-1 reads better than 2147483647; a float (float32's largest) in four digits.
    if isinstance(value, int):
        below_a_power_of_two = value + 1 > 2**16 and (value + 1) & value == 0
        return f"2^{value.bit_length()}-1" if below_a_power_of_two else str(value)
    return f"{value:.4g}"


def _exclusive_groups(parser: argparse.ArgumentParser) -> list[str]:
    lines = []
    for group in parser._mutually_exclusive_groups:
        flags = " and ".join(f"`{action.option_strings[0]}`" for action in group._group_actions)
        lines.append(f"- {flags} exclude each other" + ("; one of them is required." if group.required else "."))
    return ["\n".join(lines)] if lines else []
