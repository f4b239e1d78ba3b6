"""``python -m curvlens``: the ``curvlens`` command line (:mod:`curvlens.cli`)."""
import sys

from curvlens.cli import main

if __name__ == "__main__":
    sys.exit(main())
