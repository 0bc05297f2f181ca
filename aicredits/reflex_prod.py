"""Reflex's own command line, with two production fixes: a backend worker that dies is
replaced, and a stopping worker gets the time to drain its replies.

Reflex 0.10 builds its Granian server without `respawn_failed_workers`, and Granian's
default is False: one worker killed (out of memory, a segfault in a C extension, SIGKILL)
stops the whole server, and every request after it is refused. With the flag, Granian starts
a new worker in its place and the others keep serving; its own crash-loop guard still stops
a server whose workers die over and over. `python -m aicredits prod` runs this module
instead of `python -m reflex`; tests/system/test_worker_kill.py is the proof.

Granian's default is also to wait forever for a stopping worker. Here it waits the drain
grace (DRAIN_GRACE_SECONDS, in which the worker finishes or cuts its replies) plus
KILL_MARGIN_SECONDS for the cut replies to settle, then kills it.
"""

from __future__ import annotations

from typing import Any

from granian.server import common

KILL_MARGIN_SECONDS = 10


def respawn_failed_workers_by_default(drain_grace: float = 20.0) -> None:
    original = common.AbstractServer.__init__
    if getattr(original, "_aicredits_respawn", False):
        return

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("respawn_failed_workers", True)
        if kwargs.get("workers_kill_timeout") is None:
            kwargs["workers_kill_timeout"] = round(drain_grace) + KILL_MARGIN_SECONDS
        original(self, *args, **kwargs)

    init._aicredits_respawn = True  # type: ignore[attr-defined]
    common.AbstractServer.__init__ = init  # type: ignore[method-assign]


if __name__ == "__main__":
    from aicredits.settings import get_settings

    respawn_failed_workers_by_default(get_settings().drain_grace)
    from reflex.reflex import cli

    cli()
