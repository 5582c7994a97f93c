"""One error type for bad input; the CLI maps it to a one-line message and exit code 2."""

from __future__ import annotations


class CimError(Exception):
    """Bad input or an unsupported request: reported to the user as one line, exit code 2."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        text = " ".join(str(message).split())  # one line: newlines and other whitespace become spaces
        super().__init__("".join(_escape(ch) for ch in text))


def _escape(ch: str) -> str:
    """Control characters (NUL, ESC, ...) from user input are shown escaped, never sent to the terminal."""
    return ch if ch.isprintable() or ch == " " else ascii(ch)[1:-1]


class ProfileError(CimError):
    """A chip profile that cannot be found, parsed or validated."""


class ModelInputError(CimError):
    """A model folder, checkpoint or config that cannot be used."""


class BundleError(CimError):
    """A bundle that is incomplete, altered or inconsistent."""


def failure_detail(exc: BaseException) -> str:
    """One line saying why an operation failed: an OSError's ``strerror``, else the message's first line."""
    text = getattr(exc, "strerror", None) or str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
