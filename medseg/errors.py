"""Error types shared by every part of medseg.

Library code raises these with the offending file or config key in the message; only the CLI turns
them into exit codes (2 for configuration and input errors, see ``medseg.cli``).
"""

from __future__ import annotations


class MedsegError(Exception):
    """Base class for every error medseg raises on purpose."""


class ConfigError(MedsegError):
    """A configuration key, value or file is wrong; the message names the key or file."""


class DataError(MedsegError):
    """An input file or dataset folder cannot be used; the message names the file."""


class ModelError(MedsegError):
    """A model, checkpoint or export cannot be built, loaded or used."""


class RunExistsError(MedsegError):
    """An output folder already exists and ``--overwrite`` was not given."""


class OutputError(MedsegError):
    """An output file cannot be written (the disk is full, a quota is exceeded); the message
    names the file."""
