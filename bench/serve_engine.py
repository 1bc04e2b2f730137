"""Engine benchmark: vLLM with policies vs vLLM plain vs the HF engine (see safesteer.bench.serve_engine)."""

import sys

from safesteer.bench.serve_engine import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
