"""Errors about the user's input, and the rules arguments must follow. The CLI prints these errors
as one line and exits with code 2."""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from typing import Any, Callable


class RaytrainError(Exception):
    """A problem the user can fix: a config key, a data file, a checkpoint path. Its text is the
    message it was raised with: Ray Data appends a retry note to the args of an exception raised in
    its tasks, which is no part of the one line."""

    def __init__(self, message: str = "", *args):
        super().__init__(message, *args)
        self.message = message  # kept in __dict__, so a copy pickled back from a task has it too

    def __str__(self) -> str:
        return self.message


class ConfigError(RaytrainError):
    pass


class DataError(RaytrainError):
    pass


class CheckpointError(RaytrainError):
    pass


def first_line(err: BaseException) -> str:
    """What went wrong, short: the first line of an exception's message, else its class name."""
    text = str(err).strip()
    return text.splitlines()[0] if text else err.__class__.__name__


def limit_from_env(name: str, default: int, unit: str, error: type[RaytrainError]) -> int:
    """A positive whole-number limit set by environment variable `name`, else `default`."""
    raw = os.environ.get(name, "")
    if not raw.strip():
        return default
    if not raw.strip().isdigit() or int(raw) <= 0:
        raise error(f"{name}={raw!r}: expected a positive number of {unit}")
    return int(raw)


def one_line(message: object) -> str:
    """`message` as one printable line: a file name may hold newlines, control characters or bytes
    that are not UTF-8 (surrogates in Python), which would break the line or the encoder."""
    text = str(message).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


@dataclass(frozen=True)
class Rule:
    """What an argument must be, one rule for the API (check) and the CLI (which parses text with
    `convert`, then asks `holds`)."""

    expected: str  # "a positive whole number": the error says "expected <this>, got <value>"
    holds: Callable[[Any], bool]
    convert: Callable[[str], Any]  # command-line text -> value; ValueError when it is none

    def check(self, name: str, value: Any, error: type[RaytrainError] = RaytrainError) -> Any:
        if not self.holds(value):
            raise error(f"{name}: expected {self.expected}, got {value!r}")
        return value


def _number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _whole(text: str) -> int:
    if not text.strip().isdigit():
        raise ValueError(text)
    return int(text)


POSITIVE = Rule("a positive whole number", lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1, _whole)
NON_NEGATIVE = Rule("a number of 0 or more", lambda v: _number(v) and 0 <= v < math.inf, float)  # nan fails too
POSITIVE_NUMBER = Rule("a number above 0", lambda v: _number(v) and 0 < v < math.inf, float)
FRACTION = Rule("a number from 0 up to (not including) 1", lambda v: _number(v) and 0 <= v < 1, float)
PORT = Rule("a TCP port from 1 to 65535", lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool) and 0 < v < 65536, _whole)
