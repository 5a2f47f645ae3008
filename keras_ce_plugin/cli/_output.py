"""How ``keras-ce`` talks to a person: errors and warnings, one line each."""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator
from typing import Any, TextIO


def one_line(message: object) -> str:
    """``message`` with every run of whitespace (newlines too) as one space."""
    return " ".join(str(message).split())


def print_error(message: object) -> None:
    """``keras-ce: error: ...`` on one line of stderr."""
    print(f"keras-ce: error: {one_line(message)}", file=sys.stderr)


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Shows each ``UserWarning`` as one ``keras-ce: warning: ...`` line on stderr."""
    with warnings.catch_warnings():
        original = warnings.showwarning

        def show(
            message: Warning | str,
            category: type[Warning],
            filename: str,
            lineno: int,
            file: TextIO | None = None,
            line: str | None = None,
        ) -> Any:
            if not issubclass(category, UserWarning):
                return original(message, category, filename, lineno, file, line)
            print(f"keras-ce: warning: {one_line(message)}", file=sys.stderr)

        warnings.showwarning = show
        yield
