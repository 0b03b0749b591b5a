"""User-facing errors: one clear message, a non-zero exit, never a traceback."""

from __future__ import annotations

import functools
import sys
from typing import Callable


class KeptError(Exception):
    """An error the user caused and can fix. The message names the problem and the fix."""


EXIT_USER_ERROR = 2


def cli_entry(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wraps a CLI main: a KeptError becomes `error: <message>` on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except KeptError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USER_ERROR
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper
