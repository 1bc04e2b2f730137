"""Segmented gate cost benchmark; see safesteer.bench.gate_segments."""

import sys

from safesteer.bench.gate_segments import main

if __name__ == "__main__":
    main(sys.argv[1:])
