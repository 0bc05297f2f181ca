"""What the app's edges (the Reflex State, the HTTP routes) run use cases with: this
process's database, and the thread pool that blocking use cases run on, so the event loop
never waits on a query; and a UI event's log context (an event has no HTTP request). The
edges reach the outside only through the services; this is their way in."""

from __future__ import annotations

from aicredits.adapters.blocking import run_blocking, run_blocking_to_completion
from aicredits.adapters.db import Database, database_for, get_database
from aicredits.adapters.logs import start_event

__all__ = [
    "Database",
    "database_for",
    "get_database",
    "run_blocking",
    "run_blocking_to_completion",
    "start_event",
]
