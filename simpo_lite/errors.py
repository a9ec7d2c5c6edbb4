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


def human_size(n: int | float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class DiskFull(RunError):
    """A write that ran out of disk space (files.guard raises it): one line with what was being written,
    how much it needs, the space left, and a way forward (`hint`, which the caller may make precise)."""

    def __init__(self, what: str, path, needed: int | None, more_than: bool, free: int | None,
                 hint: str | None = None):
        self.what, self.path, self.needed, self.more_than, self.free = what, path, needed, more_than, free
        self.hint = hint
        super().__init__(self._message(), exit_code=1)

    def with_hint(self, hint: str) -> "DiskFull":
        self.hint = hint
        self.args = (self._message(),)
        return self

    def _message(self) -> str:
        need = ("" if not self.needed else
                f"; it needs {'more than' if self.more_than else 'about'} {human_size(self.needed)}")
        free = "" if self.free is None else f", {human_size(self.free)} free there"
        hint = self.hint or "free some space (or write somewhere else) and run the command again"
        return f"disk full while writing {self.what} ({self.path}){need}{free}; {hint}"


def interrupt_on_sigterm() -> None:
    """Schedulers, `timeout`, `docker stop` and `kill` send SIGTERM: treat it as Ctrl-C, so a run saves a
    checkpoint and an export removes its unfinished folder, instead of dying where it stands."""
    import signal
    import threading

    def handler(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)
