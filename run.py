#!/usr/bin/env python3
"""Text completion with a Grok-style model from a clone: python run.py --prompt "ROMEO:".

The same program as `grok-moe` and `python -m grok_moe` (grok_moe/cli.py);
run from the clone, it uses the clone's grok_moe and its checkpoints/ (the
bundled demo model in checkpoints/demo). `python run.py --help` lists the flags.
"""

import sys

from grok_moe.cli import main

if __name__ == "__main__":
  sys.exit(main())
