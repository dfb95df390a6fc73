"""The one error type hf-relearn raises for bad input: the CLI prints its message and exits 2."""


class RelearnError(ValueError):
    """A user-facing error: the message says what was wrong and what is valid instead."""
