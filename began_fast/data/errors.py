"""The data package's user-facing error and warning."""


class DataError(ValueError):
    """The data cannot be used as given; the message is one line that says what was wrong and what is expected."""


class SkippedImagesWarning(UserWarning):
    """Some image files could not be decoded and were left out; the message names how many."""
