"""Conditional-steering cost benchmark; see safesteer.bench.conditional."""

import sys

from safesteer.bench.conditional import main

if __name__ == "__main__":
    main(sys.argv[1:])
