"""The one kind of error a user can cause, and how a stage reports it.

A stage that fails because of its input (a typo in params.yaml, a missing folder, a hard
validation failure) ends with one line on stderr saying what is wrong and what to do, and exit
status 1. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """An error the user can fix; its message is the whole report."""


def run_stage(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Call a stage's `main`, turning a UserError into one line and exit status 1."""
    try:
        main(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
