"""``python -m smes_fused.sweep``: see the package docstring, or ``--help``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
