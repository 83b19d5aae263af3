"""The exception type for mistakes a user can fix."""


class UserError(Exception):
    """Bad input: a wrong path, a malformed file, an unknown name.

    The message is one line that names the value, what was wrong and what to do.
    The CLI prints it without a traceback and exits with status 2.
    """
