"""Mutation-testing report (`make mutants`); see safesteer.bench.mutants."""

import sys

from safesteer.bench.mutants import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
