"""The app's HTTP routes alone (`build_api`, the /v1 API with its gateway), in one process
that starts in a second or two: something to kill fifty times (test_kill_runs.py). Run as
`python -m tests.system.api_worker PORT` with the app's environment."""

from __future__ import annotations

import sys

import uvicorn

from aicredits.api.routes import build_api
from aicredits.settings import get_settings

if __name__ == "__main__":
    uvicorn.run(
        build_api(get_settings()), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning"
    )
