"""Exception types. Every user-facing failure is an :class:`MbrecError` whose message says
what is wrong and where (file, line, value); the command line prints it without a traceback."""

from __future__ import annotations

from pathlib import Path


class MbrecError(Exception):
    """Base class of the errors the command line reports as one clear line."""


class DataError(MbrecError, ValueError):
    """Bad dataset input. Carries the file, the 1-based line and the offending value when known."""

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        line: int | None = None,
        value: object = None,
    ) -> None:
        self.path = None if path is None else str(path)
        self.line = line
        self.value = value
        where = ""
        if self.path is not None:
            where = self.path + (f":{line}" if line is not None else "")
        text = f"{where}: {message}" if where else message
        if value is not None:
            text += f" (value: {value!r})"
        super().__init__(text)


class ConfigError(MbrecError, ValueError):
    """A bad configuration key, value or file."""


class UnknownNameError(MbrecError, KeyError):
    """An unknown model, dataset, protocol, behavior or user name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class NonFiniteError(MbrecError):
    """A loss or a score became NaN or infinite (the weights diverged)."""
