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


def limit_from_env(name: str, default: int, unit: str, error: type[RaytrainError]) -> int:
    """A positive whole-number limit set by environment variable `name`, else `default`."""
    raw = os.environ.get(name, "")
    if not raw.strip():
        return default
    if not raw.strip().isdigit() or int(raw) <= 0:
        raise error(f"{name}={raw!r}: expected a positive number of {unit}")
    return int(raw)
