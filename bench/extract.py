"""Extraction benchmark (also `safesteer bench extract`); see safesteer.bench.extract."""

import sys

from safesteer.bench.extract import main

if __name__ == "__main__":
    main(sys.argv[1:])
