"""The one exception type that reaches users as a single line, and the guard that turns it into that line."""

import sys


class VlsegError(Exception):
    """Bad input or an unusable resource. The message names the file (or argument) and the problem.

    Command-line entry points print ``error: <message>`` and exit with status 2 instead of a traceback.
    """


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def split_error(exc: BaseException, default_file) -> tuple[str, str]:
    """A one-line error read back as (file, problem): ``"<file>: <problem>"`` splits at the first ``": "``; a message
    naming no file gives (``default_file``, the whole message)."""
    text = str(exc)
    file, sep, problem = text.partition(": ")
    return (file, problem) if sep and file else (str(default_file), text)


def shape_str(shape) -> str:
    """(512, 512, 20) → "512x512x20"."""
    return "x".join(str(int(n)) for n in shape)


def run_guarded(fn) -> int:
    try:
        fn()
    except VlsegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
