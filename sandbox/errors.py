"""The few error classes corral raises; only the CLI formats them for people."""

from __future__ import annotations


class CorralError(Exception):
    """Root of every error corral raises on purpose."""

    #: A short, actionable hint for the person reading the error (may be empty).
    hint: str = ""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        if hint:
            self.hint = hint

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base} (hint: {self.hint})" if self.hint else base


class KernelError(CorralError):
    """A syscall failed; the message names the call, its arguments and errno."""

    def __init__(self, message: str, errno: int = 0, hint: str = "") -> None:
        super().__init__(message, hint)
        self.errno = errno


class HostSetupError(CorralError):
    """The host lacks something corral needs; `.hint` says what to change."""


class TemplateError(CorralError):
    """A template (or --set override) is invalid: file, line and key path in the text."""


class NotFound(CorralError):
    """The named thing (agent, template, user) does not exist."""


class Conflict(CorralError):
    """The request conflicts with the current state (exists already, wrong state)."""


class PermissionDenied(CorralError):
    """The caller is not allowed to do this."""
