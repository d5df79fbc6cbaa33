"""User-facing errors: the CLI prints `error: <message>` and exits 2 for these."""


class PsearchError(Exception):
    """A problem with the user's input (a file, a value, a setting), not a bug.

    The message must name the file or value at fault; it is printed on one line.
    """

    exit_code = 2
