"""The one exception of nas.data."""


class DataError(Exception):
    """Data that is missing, malformed or cannot be fetched; its message is one line for the user."""
