"""User-facing errors: one clear message, a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
import threading
from typing import Callable


class KeptError(Exception):
    """An error the user caused and can fix. The message names the problem and the fix."""


EXIT_USER_ERROR = 2


def utf8_text(value: str) -> str:
    """An argparse type for text on the command line, which must be UTF-8: Python hands each byte that is not over
    as a lone surrogate, which no tokenizer takes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(value[e.start])
        byte = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"code point U+{code:04X}"
        raise argparse.ArgumentTypeError(f"not valid UTF-8 ({byte} at character {e.start}); give UTF-8 text") from None
    return value


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are KeptErrors: `cli_entry` prints one line (the problem, and where the
    options are listed) and exits with code 2, where argparse prints its whole usage block first."""

    def error(self, message: str):
        raise KeptError(f"{message} (`{self.prog} --help` lists the options)")


def cli_entry(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wraps a CLI main: a KeptError becomes `error: <message>` on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        # SIGTERM unwinds like Ctrl-C, so temporary outputs are removed on the way out.
        previous = signal.signal(signal.SIGTERM, _raise_interrupt) if _main_thread() else None
        previous_hook = sys.unraisablehook
        if previous is not None:
            sys.unraisablehook = _resend_lost_interrupt(previous_hook)
        try:
            return main(*args, **kwargs) or 0
        except KeptError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USER_ERROR
        except KeyboardInterrupt as e:
            print(str(e) or "interrupted; nothing was written", file=sys.stderr)
            return 130
        except BrokenPipeError:  # e.g. `| head`: the reader left, which is not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
        finally:
            sys.unraisablehook = previous_hook
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _resend_lost_interrupt(previous_hook):
    """An unraisable-exception hook. A signal whose handler ran inside a garbage-collector callback (JAX registers
    one) or a `__del__` raised its KeyboardInterrupt where Python drops exceptions, and the command ran on as if never
    stopped; the interrupt is sent again, as SIGTERM (which the command always handles: SIGINT may be ignored in a
    background job), from another thread a moment later, so that it lands in ordinary code and not in this hook,
    which drops exceptions too."""

    def hook(unraisable):
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            resend = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM))  # once this hook has returned
            resend.daemon = True
            resend.start()
        else:
            previous_hook(unraisable)

    return hook


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
