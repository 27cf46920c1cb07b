"""Errors users see. Each names the file and the problem; the CLI prints the message and exits with status 1."""


class EdgeMoEError(Exception):
    """Base class: a problem with user input (a file, an option), reported without a traceback."""


class FormatError(EdgeMoEError):
    """A container or checkpoint file is malformed, truncated or corrupt."""


class UnsupportedModelError(EdgeMoEError):
    """The checkpoint is an architecture edgemoe does not read."""
