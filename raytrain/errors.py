"""Errors about the user's input. The CLI prints them as one line and exits with code 2."""


class RaytrainError(Exception):
    """A problem the user can fix: a config key, a data file, a checkpoint path."""


class ConfigError(RaytrainError):
    pass


class DataError(RaytrainError):
    pass


class CheckpointError(RaytrainError):
    pass
