#!/usr/bin/env python3
"""Make sure axe-core (the accessibility checker the browser tests inject into every page) is
in .tools/axe-core, fetched from the npm registry with its integrity checked. Prints the path
of axe.min.js. Standard library only, like js_runtime.py, whose fetching it reuses."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from js_runtime import TOOLS, fetch_package

VERSION = "4.14.1"
DEST = TOOLS / "axe-core"


def main() -> int:
    script = DEST / "axe.min.js"
    marker = DEST / "package.json"
    if not (script.exists() and f'"version": "{VERSION}"' in marker.read_text()):
        fetch_package("axe-core", VERSION, DEST)
    print(script)
    return 0


if __name__ == "__main__":
    sys.exit(main())
