"""Errors raised by attnkit. Every message says what was expected, what was received and how to fix it."""

from __future__ import annotations


class AttnkitError(Exception):
    """Base class of attnkit's own errors."""


class NotSupportedError(AttnkitError, ValueError):
    """A combination of arguments that no engine (or not the requested engine) can run.

    ``reasons`` maps each engine that was considered to the list of reasons it refused.
    """

    def __init__(self, message: str, reasons: dict[str, list[str]] | None = None):
        self.reasons = dict(reasons or {})
        if self.reasons:
            lines = [message]
            for engine, why in self.reasons.items():
                lines.append(f"  - engine {engine!r}: " + "; ".join(why))
            message = "\n".join(lines)
        super().__init__(message)


class UnknownMechanismError(AttnkitError, ValueError, KeyError):
    """A mechanism name that is not registered. A ``ValueError`` (a bad argument value) that is also a
    ``KeyError``, so code written for the registry's earlier ``KeyError`` keeps working."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
