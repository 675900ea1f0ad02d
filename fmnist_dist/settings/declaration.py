"""A setting declared once: its kind, help, bounds or choices, and whether a resumed run carries it over.

The command line (flags, help, defaults), validation of flags and of a saved state's settings, and what a
resumed run may change are all read from these declarations (`TrainConfig`'s field metadata, and the other
subcommands' flags in `settings.commands`).
"""

from __future__ import annotations

import argparse
import enum
import math
from collections.abc import Callable
from dataclasses import Field, dataclass, field
from pathlib import Path
from typing import Any

from fmnist_dist.errors import UsageError

SETTING = "setting"  # the key of a field's `Setting` in its dataclass metadata


def nonempty_path(text: str) -> Path:
    """argparse's `type` for a path flag: `Path("")` would silently mean the current directory."""
    if not text:
        raise argparse.ArgumentTypeError(
            "got an empty path, which would mean the current directory; pass a path (`.` for the current directory)"
        )
    return Path(text)


def _path_from_plain(value: Any) -> Any:
    # A saved path is a string; an empty one stays a string, so that it is refused as no path.
    return Path(value) if isinstance(value, str) and value else value


def _tuple_from_plain(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Kind:
    """What values a setting takes.

    Attributes:
        noun: the values in words, for a refusal ("a whole number").
        accepts: whether a value (in the field's Python type) is of this kind.
        parse: argparse's `type` for the flag's text; None for on/off switches, which take no value.
        from_plain: a plain value (JSON's, argparse's list) in the field's Python type; values it cannot convert
            pass unchanged, to be refused by `accepts`.
    """

    noun: str
    accepts: Callable[[Any], bool]
    parse: Callable[[str], Any] | None
    from_plain: Callable[[Any], Any] = _same


# bool is a subclass of int in Python, and JSON `true` loads as True: neither is a count or a rate.
WHOLE = Kind("a whole number", lambda value: type(value) is int, int)
NUMBER = Kind("a number", lambda value: type(value) in (int, float), float)
TEXT = Kind("a string", lambda value: isinstance(value, str), str)
PATH = Kind("a non-empty path", lambda value: isinstance(value, Path), nonempty_path, _path_from_plain)
SWITCH = Kind("true or false", lambda value: type(value) is bool, None)
WORDS = Kind(
    "a list of strings",
    lambda value: isinstance(value, tuple) and all(isinstance(word, str) for word in value),
    str,
    _tuple_from_plain,
)


@dataclass(frozen=True)
class Bounds:
    """The range a number must lie in (NaN lies in none).

    Attributes:
        low, high: the ends; `high` may be a function, for a limit of this machine (its CPU count).
        low_open: `low` itself is refused (`0 < value`: "greater than 0").
        high_open: `high` itself is refused.
        requirement, advice: one phrase for the whole range and what to do, where a refusal needs more than
            "greater than 0" or "at most N" (momentum, seeds).
    """

    low: float
    high: float | Callable[[], float] = math.inf
    low_open: bool = False
    high_open: bool = False
    requirement: str | None = None
    advice: str | None = None

    def refusal(self, value: float, this_machine: bool = True) -> Refusal | None:
        """Why `value` is out of range, and what to pass instead; None when it is in range.

        Args:
            this_machine: whether a limit of this machine applies (not to what another machine saved).
        """
        high = self.high if not callable(self.high) else self.high() if this_machine else math.inf
        above_low = value > self.low if self.low_open else value >= self.low
        below_high = value < high if self.high_open else value <= high
        if above_low and below_high:
            return None
        if self.requirement is not None:
            return Refusal(f"must be {self.requirement} (got {value})", self.advice or "")
        if not above_low:
            if self.low_open and self.low == 0:
                return Refusal(f"must be greater than 0 (got {value})", "pass a positive value")
            return Refusal(f"must be {self.low} or more (got {value})", f"pass a value of at least {self.low}")
        return Refusal(f"must be at most {high} (got {value})", "pass a smaller value")


@dataclass(frozen=True)
class Refusal:
    """Why a value is not allowed ("must be greater than 0 (got 0)"), and what to pass instead."""

    problem: str
    advice: str


class Scope(enum.Enum):
    """What a setting belongs to, which decides what a resumed run does with the state's value."""

    RUN = "run"  # the training run's: a resumed run takes the saved value unless the flag is given now
    # How this invocation computes (device, precision, threads, data loading): it depends on the machine the run
    # continues on, so it is never carried over; a value other than the state's is announced.
    MACHINE = "machine"
    # Where this invocation starts, writes and reports: never carried over, never compared.
    INVOCATION = "invocation"


@dataclass(frozen=True)
class Setting:
    """One setting, declared once.

    Attributes:
        kind: its values (`WHOLE`, `NUMBER`, `TEXT`, `PATH`, `SWITCH`, `WORDS`).
        help: the flag's help; "(default: ...)" is added from the default.
        bounds, choices: the values allowed, for a number or a word.
        optional: None is allowed (not given; the help says what happens then).
        scope: what a resumed run does with the saved value (see `Scope`).
        excludes: the field this one excludes: given together (both set, both non-zero), they are refused.
        flag: the flag, where it is not `--` + the field name with dashes (the off switches: `--no-download`).
        nargs, const, metavar: argparse's, where the flag takes other than one value.
        extra_check: a further refusal of a value (an empty `--resume`), or None.
    """

    kind: Kind
    help: str
    bounds: Bounds | None = None
    choices: tuple[str, ...] | None = None
    optional: bool = False
    scope: Scope = Scope.RUN
    excludes: str | None = None
    flag: str | None = None
    nargs: str | None = None
    const: Any = None
    metavar: str | None = None
    extra_check: Callable[[Any], Refusal | None] | None = None

    def refusal(self, value: Any, this_machine: bool = True) -> Refusal | None:
        """Why `value` (in the field's Python type) is not allowed, and what to pass instead; None if it is.

        Args:
            this_machine: whether limits of this machine apply (see `Bounds.refusal`).
        """
        if value is None and self.optional:
            return None
        if not self.kind.accepts(value):
            return Refusal(f"is {_shown(value)}, not {self.kind.noun}", f"pass {self.kind.noun}")
        if self.choices is not None and value not in self.choices:
            return Refusal(f"is {value!r}, not one of {', '.join(self.choices)}", "pass one of them")
        if self.bounds is not None and (refusal := self.bounds.refusal(value, this_machine)):
            return refusal
        return self.extra_check(value) if self.extra_check else None

    def check(self, flag: str, value: Any) -> None:
        """Refuse a value this setting does not allow.

        Raises:
            UsageError: "FLAG must be ... (got ...); pass ..." or "FLAG is ..., not ...; pass ...".
        """
        if refusal := self.refusal(value):
            raise UsageError(f"{flag} {refusal.problem}; {refusal.advice}")


def _shown(value: Any) -> str:
    return "empty" if value == "" else repr(value)


def setting(default: Any, help: str, **declared: Any) -> Any:
    """A dataclass field with its `Setting` in the metadata (read back with `setting_of`)."""
    return field(default=default, metadata={SETTING: Setting(help=help, **declared)})


def setting_of(dataclass_field: Field) -> Setting:
    """The declaration of a field made by `setting`."""
    return dataclass_field.metadata[SETTING]
