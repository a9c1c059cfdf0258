"""Exceptions meant for the user: the CLI prints their message without a traceback."""

from __future__ import annotations


class EdgeftError(Exception):
    """Something the user can fix. The message says what happened, where, and what to do."""

    exit_code = 1


class ModelError(EdgeftError):
    """A model could not be found, fetched, converted or loaded."""


class DataError(EdgeftError):
    """A training or evaluation data file is unusable."""


class RunError(EdgeftError):
    """A run directory is missing, incomplete, or would be overwritten."""


class ConfigError(EdgeftError):
    """A configuration value is out of range or inconsistent."""


class DeviceError(EdgeftError):
    """The requested device or method cannot run on this machine."""


class ExportError(EdgeftError):
    """An export could not be produced or failed verification."""


class DiskSpaceError(EdgeftError):
    """Not enough free disk space for the work asked for."""


class GenerationError(EdgeftError):
    """A request to the runtime cannot be served as asked (bad options, prompt too long)."""
