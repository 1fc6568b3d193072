"""Errors a user sees as one line, never as a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment, shown as one line.

    The message names the file, key or URL at fault and what is wrong with it.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class ConfigError(UserError):
    """A bad run configuration: the message starts with the file and key."""


class StorageError(UserError):
    """Storage that cannot be reached or read: the message names the URL."""
