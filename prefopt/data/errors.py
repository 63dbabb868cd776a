"""The one error type of the data layer, with one-line messages that say where the problem is."""

from __future__ import annotations

__all__ = ["DataError", "row_error", "first_line"]


class DataError(ValueError):
    """Bad input data: a message of one line that names the file and, for a row problem, the row and the field.

    ``reason`` is the message without the ``"{source} row {index}: "`` location, so that equal problems in different
    rows can be counted together; for errors not tied to a row it is the whole message.
    """

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = message if reason is None else reason


def row_error(source: str, index: int, field: str | None, problem: str) -> DataError:
    """``{source} row {index}: field '{field}' {problem}`` (without the field part when ``field`` is None)."""
    reason = problem if field is None else f"field '{field}' {problem}"
    return DataError(f"{source} row {index}: {reason}", reason=reason)


def first_line(exc: BaseException) -> str:
    """The first non-blank line of an exception's message, or its type name when the message is blank."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
