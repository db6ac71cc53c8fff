"""The data package's user-facing error and warnings."""

import os
import warnings

# Image files that fail during the run, each named in a warning; past these, one line says the rest are not (a folder
# emptied mid-run would name every file: 202,599 lines for CelebA).
NAMED_FAILURES = 10


class DataError(ValueError):
    """The data cannot be used as given; the message is one line that says what was wrong and what is expected."""


class SkippedImagesWarning(UserWarning):
    """Some image files could not be decoded and were left out; the message names how many."""


def warn_undecodable(path: str, error: Exception, failures: int) -> None:
    """The warning for a source's file that fails during the run, its `failures`-th (counting it): named, then,
    past NAMED_FAILURES, one line for all the others."""
    if failures <= NAMED_FAILURES:
        warnings.warn(f"cannot decode {path} ({error}); using the next image", stacklevel=3)
    elif failures == NAMED_FAILURES + 1:
        warnings.warn(
            f"more than {NAMED_FAILURES} image files cannot be decoded: the others are skipped without a warning each",
            stacklevel=3,
        )


def check_folder_there(root: str) -> None:
    """DataError when the image folder `root` is gone during the run (moved, removed, unmounted): a file that then
    fails is not at fault, and each would be tried and warned about in turn."""
    if not os.path.isdir(root):
        raise DataError(f"the image folder {root} is gone (moved, removed or unmounted)") from None
