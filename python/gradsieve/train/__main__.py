"""``python -m gradsieve.train``: the same as ``gradsieve-train``."""

import sys

from gradsieve.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
