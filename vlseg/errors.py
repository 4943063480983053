"""The one exception type that reaches users as a single line."""


class VlsegError(Exception):
    """Bad input or an unusable resource. The message names the file (or argument) and the problem.

    Command-line entry points print ``error: <message>`` and exit with status 2 instead of a traceback.
    """
