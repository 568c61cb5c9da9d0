"""`python -m engine generate ...`: see engine/cli.py."""

import sys

from engine.cli import main

sys.exit(main())
