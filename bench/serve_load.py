"""Serving load test (see safesteer.bench.serve_load)."""

import sys

from safesteer.bench.serve_load import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
