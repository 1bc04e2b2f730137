"""``python -m safesteer`` (what ``torchrun -m safesteer ...`` runs on every rank)."""

import sys

from safesteer.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
