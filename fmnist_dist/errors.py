"""Errors a user can fix: the CLI prints them as one line and exits with code 2."""


class UsageError(Exception):
    """Bad input (a flag, a file, a directory): the message says what is wrong and what to do."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (or its type's name), for one-line reports."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
