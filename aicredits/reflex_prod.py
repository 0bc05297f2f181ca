"""Reflex's own command line, with one production fix: a backend worker that dies is
replaced.

Reflex 0.10 builds its Granian server without `respawn_failed_workers`, and Granian's
default is False: one worker killed (out of memory, a segfault in a C extension, SIGKILL)
stops the whole server, and every request after it is refused. With the flag, Granian starts
a new worker in its place and the others keep serving; its own crash-loop guard still stops
a server whose workers die over and over. `python -m aicredits prod` runs this module
instead of `python -m reflex`; tests/system/test_worker_kill.py is the proof.
"""

from __future__ import annotations

from typing import Any

from granian.server import common


def respawn_failed_workers_by_default() -> None:
    original = common.AbstractServer.__init__
    if getattr(original, "_aicredits_respawn", False):
        return

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("respawn_failed_workers", True)
        original(self, *args, **kwargs)

    init._aicredits_respawn = True  # type: ignore[attr-defined]
    common.AbstractServer.__init__ = init  # type: ignore[method-assign]


if __name__ == "__main__":
    respawn_failed_workers_by_default()
    from reflex.reflex import cli

    cli()
