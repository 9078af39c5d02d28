"""The one exception of nas.data."""

from nas.errors import NasError


class DataError(NasError):
    """Data that is missing, malformed or cannot be fetched; its message is one line for the user."""
