"""The one kind of error a user can cause, and how a stage reports it.

A stage that fails because of its input (a typo in params.yaml, a missing folder, a hard
validation failure) ends with one line on stderr saying what is wrong and what to do, and exit
status 1. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Callable

# A write refused for lack of room: a full disk, a quota, a file-size limit.
NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class UserError(Exception):
    """An error the user can fix; its message is the whole report."""


# The modules each Keras backend imports: a stage run with a backend whose module is missing gets
# one line saying how to install it (PyTorch is optional: `make env-torch`).
BACKEND_MODULES = {"torch": ("torch",), "jax": ("jax", "jaxlib"), "tensorflow": ("tensorflow",)}


def run_stage(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Call a stage's `main`, turning a UserError, or a write refused for lack of room, into one
    line and exit status 1, and Ctrl-C into one line and death by SIGINT (status 130 in a shell)."""
    try:
        main(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        # Ctrl-C: what the stage had finished is kept (atomic outputs, train's checkpoint, a
        # download's .part file); 130 is the shell's status for a process stopped by SIGINT.
        print("interrupted; run the stage again to go on (train resumes after its last completed epoch, "
              "a download from where it stopped)", file=sys.stderr)
        # The interrupt goes on up, its traceback left out: Python ends a process whose
        # KeyboardInterrupt nobody caught by SIGINT itself, after its clean-up, so that a shell
        # running a script stops there too. A plain exit status 130 lets bash go on to the
        # script's next command (it takes such a stage to have handled Ctrl-C itself).
        hook = sys.excepthook

        def quiet(kind: type[BaseException], value: BaseException, trace: object) -> None:
            if not issubclass(kind, KeyboardInterrupt):
                hook(kind, value, trace)  # type: ignore[arg-type]

        sys.excepthook = quiet
        raise KeyboardInterrupt from None
    except ModuleNotFoundError as error:
        backend = os.environ.get("KERAS_BACKEND", "tensorflow")
        missing = (error.name or "").split(".")[0]
        if missing not in BACKEND_MODULES.get(backend, ()):
            raise
        how = (
            "run make env-torch (PyTorch is optional; a uv sync, which make runs when uv.lock changes, removes it again)"
            if backend == "torch"
            else "run make env, which installs the project's environment from uv.lock"
        )
        print(f"error: KERAS_BACKEND is {backend}, but {missing} is not installed in this environment; {how}; "
              "or unset KERAS_BACKEND for TensorFlow", file=sys.stderr)
        raise SystemExit(1) from None
    except OSError as error:
        # Libraries that wrap the OS error (pyarrow, h5py) keep only its text.
        texts = [os.strerror(code) for code in NO_ROOM]
        if error.errno not in NO_ROOM and not any(text in str(error) for text in texts):
            raise
        where = f" writing {error.filename}" if error.filename else ""
        reason = error.strerror or next(text for text in texts if text in str(error))
        print(
            f"error: no room left{where} ({reason}); free some space (or raise the quota) and run again. "
            "Outputs are written under a temporary name and renamed only when complete: nothing half-written "
            "was left under an output's name",
            file=sys.stderr,
        )
        raise SystemExit(1) from None
