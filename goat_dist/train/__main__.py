"""``python -m goat_dist.train`` (and ``torchrun -m goat_dist.train``): the goat-train program."""

import sys

from goat_dist.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
