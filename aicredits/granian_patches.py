"""Reflex's own command line, with three of Granian's defaults changed for this app. Both
launchers run it instead of `python -m reflex`: `python -m aicredits dev` (what `make run`
starts) and `python -m aicredits prod`.

* A backend worker that dies is replaced. Reflex 0.10 builds its production Granian server
  without `respawn_failed_workers`, and Granian's default is False: one worker killed (out
  of memory, a segfault in a C extension, SIGKILL) stops the whole server. With the flag,
  Granian starts a new worker in its place and the others keep serving; its own crash-loop
  guard still stops a server whose workers die over and over
  (tests/system/test_worker_kill.py).
* A stopping worker gets the time to drain its replies. Granian's default is to wait
  forever for it; here it waits the drain grace (DRAIN_GRACE_SECONDS, in which the worker
  finishes or cuts its replies) plus KILL_MARGIN_SECONDS, then kills it. Reflex's dev server
  sets its own 2 s, which stays.
* Each worker runs Granian's single-threaded runtime. With the multi-threaded one (Granian's
  choice for ASGI), a worker stopped while a websocket is open sometimes panics ("Cannot drop
  pointer into Python heap without the thread being attached", Granian issues #799 and #884,
  still in 2.8.9) and dies before it can settle the replies it was draining.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from granian.constants import RuntimeModes
from granian.server import common

KILL_MARGIN_SECONDS = 10
_MARK = "_aicredits_defaults"


def apply(drain_grace: float = 20.0) -> Callable[[], None]:
    """Change the defaults of every Granian server made from now on. Returns the undo."""
    original = common.AbstractServer.__init__
    if getattr(original, _MARK, False):
        return lambda: None

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("respawn_failed_workers", True)
        kwargs.setdefault("runtime_mode", RuntimeModes.st)
        if kwargs.get("workers_kill_timeout") is None:
            kwargs["workers_kill_timeout"] = round(drain_grace) + KILL_MARGIN_SECONDS
        original(self, *args, **kwargs)

    setattr(init, _MARK, True)
    common.AbstractServer.__init__ = init  # type: ignore[method-assign]

    def undo() -> None:
        common.AbstractServer.__init__ = original  # type: ignore[method-assign]

    return undo


if __name__ == "__main__":
    from aicredits.settings import get_settings

    apply(get_settings().drain_grace)
    from reflex.reflex import cli

    cli()
