"""The one exception type a user ever sees: a message that names the file, row or key."""


class LorapipeError(Exception):
    """A problem with the user's input or setup; the message says what and what to do.

    Stage entry points print it without a traceback and exit non-zero.
    """
