"""Errors users see. Each names the file and the problem; the CLI prints the message and exits with status 1."""


class EdgeMoEError(Exception):
    """Base class: a problem with user input (a file, an option), reported without a traceback."""


class FormatError(EdgeMoEError):
    """A container or checkpoint file is malformed, truncated or corrupt."""


class UnsupportedModelError(EdgeMoEError):
    """The checkpoint is an architecture edgemoe does not read."""


class FileReadError(EdgeMoEError):
    """The file cannot be read: missing, a directory, not a regular file, no permission."""


class NotAContainerError(FormatError):
    """The file is not an edgemoe container (wrong magic), or a container version this edgemoe does not read."""


class CorruptFileError(FormatError):
    """The file is truncated or a checksum does not match: it was damaged after it was written."""


class InvalidFileError(FormatError):
    """The file's index or architecture description breaks the format (types, ranges, unknown or missing fields)."""


class ContextError(EdgeMoEError):
    """A prompt longer than the context (max_ctx). Carries the numbers, so the CLI can name its own options."""

    def __init__(self, message: str, n_tokens: int, max_ctx: int, model_max: int):
        super().__init__(message)
        self.n_tokens, self.max_ctx, self.model_max = n_tokens, max_ctx, model_max


class Terminated(BaseException):
    """A termination signal (SIGTERM, SIGHUP) turned into an exception, so that cleanup (`with` blocks, `finally`)
    runs: a writer then removes its temporary file. A BaseException, like KeyboardInterrupt, so that no
    `except Exception` swallows it. The command exits with status 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum
