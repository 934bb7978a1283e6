"""The project's exceptions. The CLI turns each into one stderr line and exit code 2."""


class RoutetraceError(Exception):
    """A problem the user can fix; str(exc) is the one line they see."""
    exit_code = 2


class UsageError(RoutetraceError):
    """Bad or conflicting command-line input."""


class EnvironmentProblem(RoutetraceError):
    """The machine cannot trace: not root, no bcc, no headers, no BTF, no tracefs."""


class TraceFileError(RoutetraceError):
    """A recorded trace that cannot be read."""
