"""The error type of the conversion tools, and how their messages quote another error."""

from __future__ import annotations


class ConversionError(ValueError):
    """An input that does not fit: the message names the file (or hub id) and, where there is one, the key."""


def _first_line(error: BaseException) -> str:
    """The first line of `error`'s message, or its type's name when the message is empty."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


__all__ = ["ConversionError"]
