"""Steered-evaluation benchmark (also `safesteer bench steer-eval`); see safesteer.bench.steer_eval."""

import sys

from safesteer.bench.steer_eval import main

if __name__ == "__main__":
    main(sys.argv[1:])
