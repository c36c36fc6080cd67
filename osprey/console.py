"""Quiet console for long drivers: everything the process and its children print goes to a log
file; the driver's own step lines still reach the terminal.

Ray, Ray Train, Ray Data, DeepSpeed and pip-installed libraries each print progress bars,
banners and warnings of their own, from this process and from processes it starts (which
inherit its standard output). Redirecting file descriptors 1 and 2, not only `sys.stdout`,
catches all of them; the step lines go to a duplicate of the terminal taken before.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

Say = Callable[[str], None]


def say_to_terminal(text: str) -> None:
    print(text, flush=True)


@contextlib.contextmanager
def quiet_console(log_path: str | os.PathLike, enabled: bool = True) -> Iterator[Say]:
    """Within the block, fds 1 and 2 write to `log_path` (appended); yields the function that
    prints a line on the terminal. With `enabled` false nothing is redirected."""
    if not enabled:
        yield say_to_terminal
        return
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    terminal = os.fdopen(os.dup(1), "w", buffering=1)
    saved_err = os.dup(2)
    with open(log_path, "ab", buffering=0) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)

        def say(text: str) -> None:
            terminal.write(text + "\n")
            terminal.flush()

        try:
            yield say
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(terminal.fileno(), 1)
            os.dup2(saved_err, 2)
            os.close(saved_err)
            terminal.close()
