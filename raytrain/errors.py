"""Errors about the user's input. The CLI prints them as one line and exits with code 2."""
import os


class RaytrainError(Exception):
    """A problem the user can fix: a config key, a data file, a checkpoint path."""


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
