"""The one exception type for mistakes a user can fix (a missing file, a bad argument, a mismatched output).

The command line prints its message as one line and exits non-zero, without a traceback; the library raises it
like any other exception.
"""


class UserError(Exception):
    """An error whose message tells the user what is wrong and how to fix it."""
