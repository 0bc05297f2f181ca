"""Hear that this process is asked to stop, before its server starts shutting down.

Granian turns SIGTERM and SIGINT into its own shutdown: it stops accepting connections and
waits for the open ones to close, and only then runs the app's lifespan shutdown. Open
connections (a streaming reply, a websocket) never close on their own, so the app would
never hear of the stop before Granian kills the worker. This chains a callback in front of
Granian's handler, on the event loop the worker serves from, so the app can drain its
replies while Granian waits.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def call_before_stop(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> bool:
    """Run `callback` on SIGTERM or SIGINT, then whatever the loop already did on that signal.
    Returns False (and changes nothing) when the loop has no such handler to chain to: the
    server does not stop through this loop, and the caller must rely on its lifespan."""
    # The loop's own table of handlers (asyncio's Unix loops): there is no public way to
    # read the handler a signal already has.
    table: dict[int, asyncio.Handle] = getattr(loop, "_signal_handlers", {})
    previous = {sig: table.get(sig) for sig in STOP_SIGNALS}
    if not all(previous.values()):
        return False
    fired = False

    def handler(earlier: asyncio.Handle) -> None:
        nonlocal fired
        if not fired:
            fired = True
            try:
                callback()
            except Exception:
                logger.exception("the stop callback failed")
        earlier._run()

    for sig, earlier in previous.items():
        assert earlier is not None
        loop.add_signal_handler(sig, handler, earlier)
    return True
