"""Gated SAE benchmark (also `safesteer bench sae`); see safesteer.bench.sae."""

import sys

from safesteer.bench.sae import main

if __name__ == "__main__":
    main(sys.argv[1:])
