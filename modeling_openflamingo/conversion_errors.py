"""The error type of the conversion tools."""

from __future__ import annotations


class ConversionError(ValueError):
    """An input that does not fit: the message names the file (or hub id) and, where there is one, the key."""


__all__ = ["ConversionError"]
