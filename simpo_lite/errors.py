"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, invalid value): no traceback is shown."""


class ConfigError(UserError):
    """One or more problems in a configuration, all reported at once, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class RunError(Exception):
    """A run that cannot go on (non-finite loss, interruption): one line, the given exit code."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (libraries' messages run to many lines), or its type."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
