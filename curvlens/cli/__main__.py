"""``python -m curvlens.cli``: the ``curvlens`` command line."""
import sys

from curvlens.cli import main

if __name__ == "__main__":
    sys.exit(main())
