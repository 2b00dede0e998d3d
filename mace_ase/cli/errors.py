"""How the command line reports an ordinary mistake: one line ``error: ...`` on stderr and exit status 2.

An ordinary mistake is something the user can fix from the message: a missing or unreadable structure file, a
directory where a file is expected, an unknown model name, a model file that cannot be used, an element the model
does not know, a device this machine does not have, no network or no cached copy of a model. Anything else is a
bug in mace-ase (or a library) and keeps its traceback. ``--debug`` or ``-vv`` shows the traceback in every case.
"""

from __future__ import annotations

import sys
import traceback

EXIT_USAGE = 2  # as argparse uses for a bad command line


class CommandError(Exception):
    """A mistake on the command line; the message says what is wrong and what to do."""


def ordinary_errors() -> tuple[type[BaseException], ...]:
    """Exception types that are the user's to fix (their messages say how), not bugs."""
    from mace_ase.io.cache import OfflineError
    from mace_ase.io.download import DownloadError
    from mace_ase.io.integrity import IntegrityError

    # OSError: files (missing, a directory, permissions); ValueError: bad values, unknown model names, model files
    # that cannot be read or are unsupported (ModelFileError), elements the model lacks; ImportError: an optional
    # extra that is not installed (its message names the extra).
    return CommandError, OSError, ValueError, ImportError, OfflineError, DownloadError, IntegrityError


def report(error: BaseException, show_traceback: bool) -> int:
    """Print ``error`` for a user (with its traceback if asked) and return the exit status."""
    if show_traceback:
        traceback.print_exception(error, file=sys.stderr)
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE
