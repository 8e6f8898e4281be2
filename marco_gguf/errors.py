"""The one exception type that reaches the user as a single line."""


class MarcoError(Exception):
    """A failure the user can act on; the CLI prints it as one line and exits non-zero."""
