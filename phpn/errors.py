"""User-facing errors.

Every problem a user can cause (a bad file, a wrong option, data that does not fit the
model) raises a subclass of :class:`PhpnError` whose message says what went wrong *and*
what to do. The CLI prints it without a traceback; the app shows it with ``st.error``.
"""


class PhpnError(Exception):
    """Base class: ``str(err)`` is a complete sentence for the user."""

    def __init__(self, problem: str, fix: str = ""):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} {fix}".strip())


class CheckpointError(PhpnError):
    """A checkpoint cannot be read, or does not fit the architecture asked for."""


class NotDecomposableError(PhpnError):
    """The model's head cannot be written exactly as a sum of part-prototypes."""


class DataError(PhpnError):
    """Images or class folders are missing, empty, unreadable or do not fit the model."""


class ConfigError(PhpnError):
    """An option is out of range or inconsistent with the data."""


class RunError(PhpnError):
    """A saved run is missing, damaged, or belongs to another checkpoint."""


class Cancelled(Exception):
    """Raised inside a long computation when the caller asked it to stop."""
