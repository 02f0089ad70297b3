"""python -m grok_moe: the command line (grok_moe.cli), as the grok-moe console script."""

import sys

from grok_moe.cli import main

sys.exit(main())
