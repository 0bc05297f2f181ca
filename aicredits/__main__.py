"""`python -m aicredits ...`: the operator's command line."""

import sys

from aicredits.cli import main

sys.exit(main())
