"""Exceptions with messages meant for users: each names the file, line, field or key at fault."""


class ImramError(Exception):
    """Base class of every error imram raises on purpose."""


class DataError(ImramError, ValueError):
    """A data file is missing, malformed or inconsistent (the message names the file and line)."""


class ConfigError(ImramError, ValueError):
    """A configuration key, value, preset or model name is unknown or invalid."""


class Interrupted(ImramError):
    """A workflow stopped on SIGTERM/SIGINT after its training checkpointed; running the same
    command again resumes it."""


class TrainingError(ImramError, RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row); the message says why
    and where the last good checkpoint is."""
